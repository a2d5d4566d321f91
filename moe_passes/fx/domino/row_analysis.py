"""Row-locality rules: the ``Kind`` (``moe_passes.fx.domino.kinds``) of every value in a candidate region.

Rules, by meaning: pointwise ops (``torch.Tag.pointwise``, casts) keep a kind
when every region operand has the same kind and every outside operand
broadcasts over dim 0; views/reshapes keep token-major order when dim 0 stays
a multiple of T; reductions, softmax, cumulative ops, sort/top-k keep rows
when their normalised dim is not 0 (over dim 0 they mix tokens: unproven,
except integer sums, which are ``add``); linear/matmul with an outside weight
keep rows; and explicit rules for the MoE ops (argsort of ids, gathers by a
permutation, its inverse ``index_copy``/``index_put``/``scatter_add``, counts,
the all-to-all pair, grouped GEMMs with offsets).  Layout metadata may be
computed by any op from metadata alone, but it reaches token data only as
all-to-all split sizes, grouped-GEMM offsets and permutations of received rows
(undone by the same permutation before the combine).  Whatever no rule covers
raises ``Unproven`` with the node and the reason.

Trust boundary (documented, not proven): layout metadata computed from the
exchanged counts is trusted to describe the rows the all-to-all delivers (the
model's own dropless routing is self-consistent for any token set).  That
covers grouped-GEMM offsets, per-expert split sizes (``torch.split(rows,
counts.tolist())``), per-row expert ids (``w1[expert_of_row]``,
``expert_of_row == e`` masks) and permutations of received rows.  Metadata
must at least be computed from the counts (``_from_counts``); what is not
told apart is arithmetic on the counts that cuts rows by position instead
(``[R // 2, R - R // 2]`` with ``R`` the received total): such code would
give other rows to each expert once chunked.  What IS
proven: token data never crosses tokens (no op over dim 0 of token rows, no
positional mask applied to rows, no metadata used as a row value).
"""

from __future__ import annotations

import dataclasses
import logging
import operator
from typing import Any

import torch
import torch.fx as fx

from moe_passes.fx.domino.kinds import ADD, BLOCKED, DATA_TAGS, META, NONE, Kind, Unproven, divides, lead_of, row, token_prefix
from moe_passes.ir import rows
from moe_passes.ir.facts import (
    FRESH_LIKE_INPUT,
    FRESH_NEW,
    ZERO_ALLOCATIONS,
    ancestors,
    functional_form,
    is_all_to_all,
    is_allocation,
    is_grouped_mm,
    is_wait,
    known_equal,
    mutated_args,
    node_value,
    normalize_dim,
    op_arg,
    op_label,
    op_meaning_label,
    op_namespace_and_name,
    source_line,
    storage_aliases,
    tensor_ndim,
    tensor_value,
)
from moe_passes.ir.rows import family_of

log = logging.getLogger(__name__)

aten = torch.ops.aten


def _name(node: fx.Node) -> str:
    t = node.target
    parsed = op_namespace_and_name(t)
    if parsed is not None:
        return f"{parsed[0]}.{parsed[1]}"
    return getattr(t, "__name__", str(t))


#: Allocations whose kind the analysis derives from their tensor input (shape like it, or a fresh buffer).
_ALLOC_LIKE = FRESH_LIKE_INPUT | FRESH_NEW
_SYM_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv, operator.mod,
                  operator.neg, operator.le, operator.lt, operator.ge, operator.gt, operator.eq, operator.ne,
                  torch.sym_sum, torch.sym_max, torch.sym_min, torch.sym_not, torch.sym_int, torch.sym_float}


def _identity_index(p: Any) -> Any:
    """``p`` with ``p // 1`` steps removed (transformers gathers received rows by ``order // 1``, its top-1 view of
    the sort order): the same index values."""
    while isinstance(p, fx.Node) and p.op == "call_function" and len(p.args) == 2 and p.args[1] == 1 and (
            op_label(p) == "aten.floor_divide" or (op_label(p) == "aten.div" and op_arg(p, 2, "rounding_mode") == "floor")):
        v = tensor_value(p)
        if v is None or v.dtype.is_floating_point:
            break
        p = p.args[0]
    return p


def at_source(node: fx.Node, message: str) -> str:
    """``message`` with the user's source line of ``node`` (from Dynamo's stack trace), when known."""
    where = source_line(node)
    return f"{message} [at {where}]" if where else message


def _dim0(node: Any) -> Any:
    v = tensor_value(node)
    return v.shape[0] if v is not None and v.dim() > 0 else None


class RowAnalysis:
    """Kinds of the region's nodes; ``X`` is ``row(1)``, nodes outside the region are outside (replicated)."""

    def __init__(self, tokens: fx.Node, num_tokens: int, region: set[fx.Node], private: set[fx.Node] = frozenset(),
                 row_inputs: bool = False, from_rows: set[fx.Node] = frozenset(), seeds: tuple[fx.Node, ...] = ()) -> None:
        self.X = tokens
        self.T = num_tokens
        self.region = region
        #: whole-layer mode: values from outside the region whose dim 0 an op aligns with the rows (rotary
        #: tables ``[B, S, d]``, per-sequence masks): each chunk reads its own rows of them (``row_input``)
        self.allow_inputs = row_inputs
        self.from_rows = from_rows  # values computed from X (the region builder's descendants of X)
        self.inputs: dict[fx.Node, Kind] = {}
        #: zero buffers made outside X's data flow, written in place only by the region (per-expert counters
        #: ``torch.zeros(E).scatter_add_(...)``): each chunk gets its own copy (``regions.private_buffers``)
        self.private = set(private)
        self.alias: dict[fx.Node, fx.Node] = {}  # result of an in-place write -> the buffer it wrote
        self.masked: set[fx.Node] = set()  # fresh received-row buffers filled by masked/indexed puts
        #: ``inv[p] = arange(len(p))`` into a fresh buffer, ``p`` a sort's indices: buffer -> ``p`` (``inv`` is p's inverse)
        self.inverse: dict[fx.Node, fx.Node] = {}
        pre = token_prefix(tuple(tensor_value(tokens).shape), num_tokens)
        if pre is None or pre[1] != 1:
            raise Unproven(f"{tokens.name}: its leading dims do not flatten to the {num_tokens} tokens")
        self.kinds: dict[fx.Node, Any] = {tokens: row(1, pre[0])}
        for s in seeds:  # graph inputs that are token rows alongside X (``top_k_index`` when the router is elsewhere)
            v = tensor_value(s)
            sp = token_prefix(tuple(v.shape), num_tokens) if v is not None else None
            if sp is None or sp[1] != 1:
                raise Unproven(f"{s.name}: its leading dims are not the {num_tokens} tokens of {tokens.name} "
                               f"(shape {tuple(v.shape) if v is not None else '?'}): not a per-token input")
            self.inputs[s] = self.kinds[s] = row(1, sp[0])
        self.written: dict[fx.Node, list[fx.Node]] = {}  # fresh buffer -> its in-place writers, in order
        self.order = {n: i for i, n in enumerate(tokens.graph.nodes)}

    # ------------------------------------------------------------------ helpers
    def kind(self, a: Any) -> Kind | None:
        """Kind of an argument: None for values from outside the region (replicated across chunks)."""
        if isinstance(a, fx.Node) and (a in self.region or a is self.X or a in self.inputs):
            k = self.kinds.get(a)
            if k is None:
                raise Unproven(f"{a.name}: no kind (analysis order)")
            return k
        return None

    def _region_args(self, node: fx.Node) -> list[tuple[fx.Node, Kind]]:
        out: list[tuple[fx.Node, Kind]] = []
        seen: set[fx.Node] = set()
        for a in node.all_input_nodes:
            k = self.kind(a)
            if k is not None and a not in seen:
                seen.add(a)
                out.append((a, k))
        return out

    # ------------------------------------------------------------------ analysis
    def run(self, nodes: list[fx.Node]) -> dict[fx.Node, Any]:
        """Kinds of ``nodes`` in graph order. Every node whose own rule fails is a blocker; the analysis goes
        on past it (its dependents are not blamed again), and all blockers are raised at once, each with
        the user's source line."""
        blockers: list[str] = []
        for n in nodes:
            if n is self.X:
                continue
            try:
                self.kinds[n] = self.transfer(n)
            except Unproven as e:
                blockers.append(at_source(n, str(e)))
                self.kinds[n] = BLOCKED
        if blockers:
            raise Unproven(blockers[0] if len(blockers) == 1 else
                           f"{len(blockers)} blockers: " + "; ".join(f"({i}) {b}" for i, b in enumerate(blockers, 1)))
        return self.kinds

    def transfer(self, n: fx.Node) -> Any:
        if n.op != "call_function":
            raise Unproven(f"{n.name}: {n.op} nodes are not chunked")
        if n in self.private:
            return Kind("fresh", fresh=True)
        if any(self.kinds.get(a) is BLOCKED for a in n.all_input_nodes):
            return BLOCKED
        if n.target is operator.getitem:
            return self._getitem(n)
        args = self._region_args(n)
        if any(isinstance(k, tuple) for _, k in args):
            raise Unproven(f"{n.name}: reads a multi-output value directly")
        tags = {k.tag for _, k in args}
        written = mutated_args(n)
        if written:
            return self._inplace(n, written, args)
        name = op_label(n)
        if name in ("aten._assert_scalar", "aten.sym_constrain_range_for_size", "aten._assert_async"):
            if tags - {"meta", "add"}:
                raise Unproven(f"{n.name}: assertion on token data")
            return NONE
        if n.target in _SYM_FUNCTIONS or name in ("aten.sym_size", "aten.sym_numel", "aten.sym_stride"):
            if name == "aten.sym_size" and tags & set(DATA_TAGS):
                return META  # a size (row counts of the chunk): metadata only
            if tags <= {"meta", "add"}:
                return META
            raise Unproven(f"{n.name}: symbolic arithmetic on token data")
        if is_wait(n):
            return self.kind(n.args[0]) or META
        if is_all_to_all(n):
            return self._all_to_all(n)
        if not args:
            raise Unproven(f"{n.name}: does not read the region (analysis error)")
        if name in ("aten.item", "aten._local_scalar_dense", "aten.tolist"):
            if tags <= {"meta", "add"}:
                return META
            raise Unproven(f"{n.name}: reads a scalar out of token data")
        # ---- MoE-specific rules first (they look at several operands)
        if name == "aten.index" or name == "aten._unsafe_index":
            return self._index(n)
        if name == "aten.index_add":
            return self._index_add(n)
        if name in ("aten.index_copy", "aten.index_put", "aten._unsafe_index_put"):
            return self._unpermute(n, name)
        if name in ("aten.scatter_add", "aten.scatter", "aten.scatter_reduce"):
            return self._scatter(n, name)
        if name != "aten.scatter_add" and op_meaning_label(n) == "aten.scatter_add":  # a library's dim-0 scatter_add
            return self._scatter(n, "aten.scatter_add", dim0=True)
        if is_grouped_mm(n):
            return self._grouped(n)
        if name == "aten.repeat_interleave" and isinstance(n.args[0], fx.Node) and len(args) == 1 and n.args[0] is args[0][0]:
            return self._repeat_rows(n, args[0][1])
        if name == "aten.split_with_sizes":
            pieces = self._split_by_layout(n)
            if pieces is not None:
                return pieces
        if name == "aten.cat":
            whole = self._cat_segments(n)
            if whole is not None:
                return whole
        if tags <= {"meta", "add"} and not (tags & {"perm", "tokidx"}):
            return self._meta_only(n, name)
        if name == "aten.floor_divide" or (name == "aten.div" and op_arg(n, 2, "rounding_mode") == "floor"):
            a, k = args[0]
            q = n.args[1]
            per = divides(q, k.m) if isinstance(q, int) and not isinstance(q, bool) else None
            if k.tag == "perm" and len(args) == 1 and n.args[0] is a and per is not None:
                return Kind("tokidx", k.m, k.key, per=per)  # MoE mode: q == m (the token of each copy)
        if tags & {"perm", "tokidx"} and family_of(n) not in ("view", "identity") and name not in ("aten.expand", "aten.unsqueeze"):
            raise Unproven(f"{n.name}: {name} on a permutation/gather index (only // top_k, reshape and expand are understood)")
        if name in _ALLOC_LIKE:
            return self._alloc_like(n, name, args)
        return self._generic(n, name, args)

    def _generic(self, n: fx.Node, name: str | None, args: list[tuple[fx.Node, Kind]]) -> Any:
        """Every op the MoE algebra does not own: what ``moe_passes.ir.rows`` says it does to token rows."""
        (a, k) = args[0]
        data_args = {x: lead_of(kx) for x, kx in args if kx.tag in DATA_TAGS}
        eff = rows.effect(n, lead_of(k), data_args)
        if eff is None:
            raise Unproven(f"{n.name}: no row-locality rule for {name or _name(n)} on {', '.join(str(k) for _, k in args)}")
        fam = eff.family
        if fam == "view":
            return self._view(n, args)
        if fam in ("shape", "split", "expand") and (n.args[0] is not a or len(args) > 1):
            raise Unproven(f"{n.name}: {name} with region-dependent arguments")
        if fam == "along" and not eff.keeps and name in ("aten.argsort", "aten.sort"):
            src = tensor_value(a)
            if k.tag == "row" and src.dim() == 1 and not src.dtype.is_floating_point:
                # Stable or not, the permutation only orders the chunk's copies; every copy is un-permuted to
                # its own row before anything reads rows by position (only the summation order of a token's
                # K copies may differ between unstable sorts).
                perm = Kind("perm", k.m, n)
                return (Kind("bag", k.m, n), perm) if name == "aten.sort" else perm
        if eff.kind == "reduce":
            src = tensor_value(n.args[0]) if isinstance(n.args[0], fx.Node) else None
            integer = src is not None and not src.dtype.is_floating_point and not src.dtype.is_complex
            token_dims = set(range(lead_of(k)))
            if eff.linear == "sum" and k.tag == "row" and integer and token_dims <= set(eff.dims):
                return ADD
            if fam == "count" and k.tag == "row" and tensor_ndim(a) == 1:
                return ADD
            kind_of_sum = "float" if not integer else "non-sum"
            raise Unproven(f"{n.name}: {name} reduces over the token dim 0 ({kind_of_sum} reduction across tokens)")
        if fam == "batch" and eff.keeps:
            return self._batch(n, name, args)
        if not eff.keeps:
            if fam == "along":
                raise Unproven(f"{n.name}: {name} over the token dim ({eff.reason})")
            raise Unproven(f"{n.name}: {eff.reason.replace('the row dim', 'the token dim')}")
        if fam in ("pointwise", "identity"):
            return self._pointwise(n, args)
        if fam == "matmul":
            return self._matmul(n, name, eff)
        if fam == "cat":
            if any(self.kind(t) is None for t in n.args[0]):
                raise Unproven(f"{n.name}: {name} of region and outside values")
            k = self._data_kind(n, args)
        elif fam == "norm":
            if any(self.kind(x) is not None for x in n.all_input_nodes if x is not n.args[0]):
                raise Unproven(f"{n.name}: {name} with token-dependent weights")
            if k.tag not in DATA_TAGS:
                raise Unproven(f"{n.name}: {name} of a {k} value")
        elif fam == "one_hot":
            k = self._same_rows(n, args)
        elif fam in ("gather", "dtensor"):
            k = self._data_kind(n, args)
        elif k.tag not in DATA_TAGS and k.tag not in ("perm", "tokidx"):
            raise Unproven(f"{n.name}: {name} of a {k} value")
        return tuple(k for _ in range(eff.outputs)) if eff.outputs else k

    # ------------------------------------------------------------------ op families
    def _data_kind(self, n: fx.Node, args: list[tuple[fx.Node, Kind]]) -> Kind:
        kinds = {k for _, k in args}
        base = {Kind(k.tag, k.m, k.key, k.p, lead=k.lead) for k in kinds if k.tag != "fresh"}
        if len(base) > 1 and any(k.tag == "recv" for k in base):
            base = {k for k in base if k.tag != "recvw"}  # per-received-row weights align with any received rows
        if len(base) != 1:
            raise Unproven(f"{n.name}: {op_label(n)} mixes values of different layouts ({', '.join(sorted(map(str, kinds)))})")
        (k,) = base
        if k.tag not in DATA_TAGS:
            raise Unproven(f"{n.name}: {op_label(n)} combines token data with {k} values")
        return k

    def _scalar_args_ok(self, n: fx.Node) -> None:
        for a in n.all_input_nodes:
            if a in self.region and tensor_value(a) is None and not isinstance(node_value(a), (tuple, list)):
                raise Unproven(f"{n.name}: scalar argument {a.name} depends on chunk-local metadata")

    def _pointwise(self, n: fx.Node, args: list[tuple[fx.Node, Kind]]) -> Kind:
        self._scalar_args_ok(n)
        args = self._drop_row_layout(n, args)
        k = self._data_kind(n, args)
        out = tensor_value(n)
        if out is None or out.dim() == 0:
            raise Unproven(f"{n.name}: pointwise result is not a row tensor")
        for a in n.all_input_nodes:
            v = tensor_value(a)
            if v is None:
                continue
            inside = self.kind(a) is not None
            lead = lead_of(k)
            if inside:
                if v.dim() != out.dim() or any(not known_equal(v.shape[i], out.shape[i]) for i in range(lead)):
                    raise Unproven(f"{n.name}: operand {a.name} is broadcast along the token dim")
            else:
                if rows.broadcast_spans_rows(tuple(v.shape), out.dim(), lead):
                    self._row_input(n, a, k, v.dim() == out.dim() and known_equal(v.shape[0], out.shape[0]))
        return k

    def _drop_row_layout(self, n: fx.Node, args: list[tuple[fx.Node, Kind]]) -> list[tuple[fx.Node, Kind]]:
        """Received rows meeting layout metadata *of those rows, in their order* (``rows.masked_fill(sorted_ids >=
        E, 0)``: the sentinel rows of a padded grouped GEMM, the ids sorted by the same sort that permuted the
        rows; ``rows * ones[order]``): read per received row, like an expert weight gathered per row (the trust
        boundary of the module docstring). What makes it sound is the order (``_row_order``): metadata in
        received order meets rows in received order, metadata permuted by ``p`` meets rows permuted by ``p``.
        A positional mask (``arange(R) < R // 2``) or ids in another order than the rows stay, and are refused."""
        recv = [k for _, k in args if k.tag == "recv"]
        if not recv or len({_identity_index(k.p) for k in recv}) != 1:
            return args
        order = _identity_index(recv[0].p)
        out = tensor_value(n)
        keep = []
        for a, k in args:
            v = tensor_value(a)
            per_row = (k.tag == "meta" and v is not None and out is not None and v.dim() == out.dim() and v.dim() > 0
                       and known_equal(v.shape[0], out.shape[0]) and self._row_order(a) == ("rows", order))
            if not per_row:
                keep.append((a, k))
        return keep

    def _row_order(self, a: Any, depth: int = 0) -> tuple[str, Any] | None:
        """``("rows", None)``: metadata with one entry per received row, in received order: the expert id of each
        row, ``repeat_interleave(expert_table, counts)`` with the table independent of the rows and the counts
        exchanged (``_from_counts``); ``("rows", p)``: the same permuted by sort indices ``p`` (``m[p]``, or the
        values of the sort whose indices are ``p``). Elementwise ops with constants, casts, ``ones_like`` and
        views that keep dim 0 keep the order. None: anything else (e.g. ``arange(R)``: a row position)."""
        if not isinstance(a, fx.Node) or depth > 32 or a.op != "call_function":
            return None
        k = self.kinds.get(a)
        if not isinstance(k, Kind) or k.tag != "meta":
            return None
        name = op_label(a)
        if a.target is operator.getitem and isinstance(a.args[0], fx.Node) and op_label(a.args[0]) == "aten.sort" and a.args[1] == 0:
            src = a.args[0].args[0]
            sv = tensor_value(src)
            if sv is not None and sv.dim() == 1 and self._row_order(src, depth + 1) == ("rows", None):
                users = [u for u in a.args[0].users if u.target is operator.getitem and u.args[1] == 1]
                return ("rows", users[0]) if len(users) == 1 else None
            return None
        if name == "aten.repeat_interleave":
            table, counts = a.args[0], (a.args[1] if len(a.args) > 1 else a.kwargs.get("repeats"))
            if isinstance(table, fx.Node) and isinstance(counts, fx.Node) and self._from_counts(counts):
                return ("rows", None) if self._table_only(table) else None
            return None
        if name == "aten.searchsorted":
            # ``searchsorted(ends, arange(R))``: the count block each received row falls in, with the block ends
            # computed from the exchanged counts (``recv_counts.cumsum(0)``): the layout itself
            ends, rows_at = a.args[0], a.args[1]
            if isinstance(ends, fx.Node) and self._from_counts(ends) and self._is_iota(rows_at):
                return ("rows", None)
            return None
        if name in ("aten.index", "aten._unsafe_index") and isinstance(a.args[1], (list, tuple)) and len(a.args[1]) == 1:
            p = a.args[1][0]
            if isinstance(p, fx.Node) and RowAnalysis._is_sort_indices(p) and self._row_order(a.args[0], depth + 1) == ("rows", None):
                return ("rows", p)
            return None
        fam = family_of(a)
        tensors = [m for m in a.all_input_nodes if tensor_value(m) is not None]
        if len(tensors) != 1:
            return None
        src = tensors[0]
        sv, av = tensor_value(src), tensor_value(a)
        if sv is None or av is None or sv.dim() == 0 or av.dim() == 0 or not known_equal(sv.shape[0], av.shape[0]):
            return None
        if fam == "pointwise" or name in ("aten.ones_like", "aten.zeros_like", "aten.unsqueeze", "aten.to", "aten._to_copy") \
                or (fam == "view" and name != "aten.expand"):
            return self._row_order(src, depth + 1)
        return None

    def _table_only(self, table: fx.Node) -> bool:
        """An expert-id table: computed (no graph input read) with sizes fixed by the program, independent of
        the rows and of the counts (``arange(local).repeat(ep)``)."""
        for m in ancestors([table]):
            v = tensor_value(m)
            if m.op != "call_function" or (v is not None and any(not isinstance(d, int) for d in v.shape)):
                return False  # an input, or sized by the run (a row count): not a fixed table
        return True

    def _row_input(self, n: fx.Node, a: fx.Node, k: Kind, aligned: bool) -> None:
        """An outside operand that varies along the rows: in whole-layer mode, when the op aligns its dim 0
        with the rows of ``k`` (same rank, same dim 0: ``out[i] = f(x[i], a[i])`` for pointwise ops and
        batched matmuls), each chunk reads the same rows of it (``a`` becomes a row input of kind ``k``);
        otherwise the region cannot be chunked."""
        v = tensor_value(a)
        if not (self.allow_inputs and aligned and k.tag == "row" and k.lead == 1):
            raise Unproven(f"{n.name}: operand {a.name} from outside the region spans the token dim "
                           f"(shape {tuple(v.shape) if v is not None else '?'}): it is not replicated across chunks")
        if a in self.from_rows:
            raise Unproven(f"{n.name}: operand {a.name} is computed from the chunked rows outside the region")
        old = self.inputs.get(a)
        if old is not None and old != k:
            raise Unproven(f"{n.name}: {a.name} is read as {old} and as {k}")
        self.inputs[a] = k
        self.kinds[a] = k

    def _same_rows(self, n: fx.Node, args: list[tuple[fx.Node, Kind]]) -> Kind:
        k = self._data_kind(n, args)
        a = args[0][0]
        if not known_equal(_dim0(a), _dim0(n)):
            raise Unproven(f"{n.name}: changes the number of rows")
        return k

    def _meta_only(self, n: fx.Node, name: str | None) -> Kind:
        # Layout arithmetic on counts / sizes: computed per chunk from the chunk's own metadata.
        return META

    def _alloc_like(self, n: fx.Node, name: str, args: list[tuple[fx.Node, Kind]]) -> Kind:
        (a, k) = args[0]
        if name in FRESH_NEW:
            # the size comes from the arguments: a fresh buffer of any layout (its rows must be written by a rule)
            return Kind("fresh", fresh=True)
        if k.tag in DATA_TAGS:
            return Kind(k.tag, k.m, k.key, k.p, fresh=name in ("aten.zeros_like", "aten.empty_like"), lead=k.lead)
        if k.tag in ("meta", "add"):
            return META
        raise Unproven(f"{n.name}: {name} of a {k} value")

    def _view(self, n: fx.Node, args: list[tuple[fx.Node, Kind]]) -> Kind:
        (a, k) = args[0]
        if n.args[0] is not a:
            raise Unproven(f"{n.name}: view whose size depends on the region")
        out = tensor_value(n)
        if k.tag in ("meta", "add"):
            return META if k.tag == "meta" else ADD
        if out is None or out.dim() == 0:
            raise Unproven(f"{n.name}: view to a scalar")
        if k.tag == "row":
            pre = token_prefix(tuple(out.shape), self.T)
            if pre is None:
                raise Unproven(f"{n.name}: reshape to {tuple(out.shape)}: no leading dims flatten to a multiple of the {self.T} tokens")
            return row(pre[1], pre[0])
        if known_equal(out.shape[0], _dim0(a)):
            return k
        raise Unproven(f"{n.name}: reshape changes the rows of a {k} value")

    def _matmul(self, n: fx.Node, name: str | None, eff: rows.Effect) -> Kind:
        data = n.args[eff.data]
        others = [o for i, o in enumerate(n.args) if i != eff.data]
        k = self.kind(data)
        if k is None or k.tag not in DATA_TAGS:
            raise Unproven(f"{n.name}: {name} whose row operand is not token data")
        if any(isinstance(o, fx.Node) and self.kind(o) is not None for o in others):
            raise Unproven(f"{n.name}: {name} of two region values (mixes tokens)")
        return k

    def _getitem(self, n: fx.Node) -> Any:
        src, i = n.args
        k = self.kinds.get(src) if isinstance(src, fx.Node) else None
        if k is None:
            raise Unproven(f"{n.name}: getitem of an unknown value")
        if isinstance(k, tuple):
            return k[i]
        if k.tag in ("meta", "add"):
            return META  # tolist()/split results of metadata
        raise Unproven(f"{n.name}: getitem of a {k} value")

    # ------------------------------------------------------------------ MoE rules
    def _index(self, n: fx.Node) -> Kind:
        src, indices = n.args[0], n.args[1]
        ks = self.kind(src)
        idx = [i for i in indices]
        if len(idx) >= 1 and idx[0] is None:
            if ks is None or ks.tag not in DATA_TAGS or any(self.kind(i) is not None for i in idx if isinstance(i, fx.Node)):
                raise Unproven(f"{n.name}: index along a non-token dim by region values")
            return ks
        if len([i for i in idx if i is not None]) != 1 or not isinstance(idx[0], fx.Node):
            raise Unproven(f"{n.name}: multi-dim advanced index")
        ki = self.kind(idx[0])
        if ks is None:
            iv = tensor_value(idx[0])
            if ki is not None and ki.tag == "meta" and iv is not None and iv.dim() == 1 and not iv.dtype.is_floating_point \
                    and iv.dtype is not torch.bool and self._from_counts(idx[0]):
                # ``w1[expert_of_row]``: a replicated tensor (expert weights) gathered per received row by the
                # chunk's own layout metadata; it may only meet the chunk's received rows.
                return Kind("recvw")
            raise Unproven(f"{n.name}: gather from an outside tensor by a region index")
        if ks.tag in ("meta", "add") and ki is not None and ki.tag in ("meta", "add"):
            return META
        if ki is None:
            raise Unproven(f"{n.name}: index of token data by an outside (fixed) index")
        if ks.tag == "row" and ks.m == ki.per and ks.lead == 1 and ki.tag == "tokidx":
            return Kind("bag", ki.m, ki.key)
        if ks.tag == "row" and ks.lead == 1 and ki.tag == "perm" and ks.m == ki.m:
            return Kind("bag", ki.m, ki.key)
        if ks.tag == "recv" and ks.p is None and ki.tag == "meta" and tensor_ndim(idx[0]) == 1:
            return Kind("recv", key=ks.key, p=idx[0])
        if ks.tag == "recv" and ks.p is not None and ki.tag == "meta" and self._inverse_of(idx[0]) is _identity_index(ks.p):
            return Kind("recv", key=ks.key, p=None)  # rows[p][inv(p)]: the received order again
        raise Unproven(f"{n.name}: index of a {ks} value by a {ki} index (not a gather by a routing permutation)")

    def _inverse_of(self, idx: fx.Node) -> fx.Node | None:
        """The sort indices ``p`` whose inverse ``idx`` is (``_note_inverse``), seen through its writes."""
        p = self.inverse.get(self.alias.get(idx, idx))
        return _identity_index(p) if p is not None else None

    def _unpermute(self, n: fx.Node, name: str) -> Kind:
        dst = n.args[0]
        accumulate = False
        if name == "aten.index_copy":
            dim, idx, src = n.args[1], n.args[2], n.args[3]
            if normalize_dim(dim, tensor_ndim(dst) or 0) != 0:
                raise Unproven(f"{n.name}: index_copy along a non-token dim")
        else:
            indices, src = n.args[1], n.args[2]
            accumulate = op_arg(n, 3, "accumulate", False)
            if len(indices) != 1 or not isinstance(indices[0], fx.Node):
                raise Unproven(f"{n.name}: {name} with {len(indices)} index tensors")
            idx = indices[0]
        put = self._put_received(n, dst, idx, src)  # accumulating or not: each row gets its own rows' values
        if put is not None:
            return put
        if accumulate:
            raise Unproven(f"{n.name}: accumulating {name} (not a permutation inverse)")
        kd, ki, ks = self.kind(dst), self.kind(idx), self.kind(src)
        if kd is None or not kd.fresh:
            raise Unproven(f"{n.name}: {name} into a buffer that is not a fresh allocation of the region")
        if ki is not None and ks is not None and ki.tag == "perm" and ks.tag == "bag" and ki.key is ks.key:
            return row(ki.m)
        if ki is not None and ks is not None and ki.tag == "meta" and ks.tag == "recv" and ks.p is idx:
            raise Unproven(f"{n.name}: {name} of received rows into a buffer of {kd} rows")
        raise Unproven(f"{n.name}: {name} of a {ks} value at a {ki} index is not the inverse of the gather")

    def _put_received(self, n: fx.Node, dst: Any, idx: Any, src: Any) -> Kind | None:
        """``out[rows_e] = f_e(x[rows_e])`` / ``out.index_add_(0, rows_e, f_e(x[rows_e]))`` (per-expert loops over
        masks or ``torch.where`` ids): values computed from received rows, written back (or added) at the
        same layout index into a buffer of those received rows, as received. Each output row is a function of
        its own row, for a fresh buffer (any earlier puts included) or, written functionally, any buffer of
        the same received rows. None: not this idiom."""
        if not isinstance(idx, fx.Node) or not isinstance(src, fx.Node):
            return None
        ki, ks, kd = self.kind(idx), self.kind(src), self.kind(dst)
        if ki is None or ks is None or ki.tag != "meta" or ks.tag != "recv" or ks.p is not idx:
            return None
        root = self.alias.get(dst, dst)
        inplace = bool(mutated_args(n))
        if root in self.masked and self.kinds[root].key is ks.key:
            return Kind("recv", key=ks.key, p=None)
        # a fresh buffer (zeros of any received layout: every row is rewritten or stays zero), or, written
        # functionally, the same received rows as received
        ok = kd is not None and ((kd.fresh and kd.tag == "fresh")
                                 or (kd.tag == "recv" and kd.key is ks.key and (kd.fresh or (kd.p is None and not inplace))))
        if not ok:
            return None
        self.masked.add(root)
        return Kind("recv", key=ks.key, p=None)

    def _scatter(self, n: fx.Node, name: str, dim0: bool = False) -> Kind:
        if dim0:
            dst, dim, idx, src = n.args[0], 0, n.args[1], n.args[2]
        else:
            dst, dim, idx = n.args[0], n.args[1], n.args[2]
            src = n.args[3] if len(n.args) > 3 else n.kwargs.get("src", n.kwargs.get("value"))
        kd, ki = self.kind(dst), self.kind(idx)
        ks = self.kind(src) if isinstance(src, fx.Node) else None
        d = normalize_dim(dim, tensor_ndim(dst) or 0)
        if d is not None and kd is not None and d >= lead_of(kd) and d > 0:
            return self._data_kind(n, self._region_args(n))
        if name == "aten.scatter_add" and ki is not None and ki.tag == "tokidx" and ks is not None and ks.tag == "bag" and ks.key is ki.key:
            if kd is None or not kd.fresh or kd.tag != "row" or kd.m != ki.per or kd.lead != 1 or not self._is_zero_alloc(dst):
                raise Unproven(f"{n.name}: combine scatter_add into a buffer that is not a fresh zero [T, H] tensor")
            return row(ki.per)
        if name == "aten.scatter_add" and ki is not None and ki.tag == "row" and tensor_ndim(idx) == 1:
            return self._counter(n, name, dst, ki, src)
        raise Unproven(f"{n.name}: {name} along dim 0 of {kd} by a {ki} index")

    def _counter(self, n: fx.Node, name: str, dst: Any, ki: Kind, src: Any) -> Kind:
        """``zeros(E).scatter_add(0, ids, src)`` / ``index_add``: per-expert sums of the chunk's copies, exact
        as the SUM of the chunk values when ``src`` is aligned with the ids (row by row) or one constant."""
        kd = self.kind(dst)
        fresh = kd is None or (kd.fresh and dst in self.private)
        if not (fresh and self._is_zero_alloc(dst)):
            raise Unproven(f"{n.name}: counts accumulated into a buffer that is not a fresh zero tensor")
        ks = self.kind(src) if isinstance(src, fx.Node) else None
        if ks is not None:
            if ks.tag != "row" or ks.m != ki.m or ks.lead != 1:
                raise Unproven(f"{n.name}: {name} adds {ks} values at {ki} ids (not one value per routed copy)")
        elif not self._is_constant_fill(src):
            raise Unproven(f"{n.name}: {name} adds values from outside the region at the chunk's ids (read by position)")
        return ADD  # per-expert counts of the chunk's copies

    @staticmethod
    def _is_constant_fill(node: Any) -> bool:
        """A tensor whose every element is the same constant (``ones``/``full``), so reading it by position is harmless."""
        if not isinstance(node, fx.Node):
            return False
        name = op_label(node)
        return name in ("aten.ones", "aten.full", "aten.ones_like", "aten.full_like", "aten.new_ones", "aten.new_full") \
            and not any(isinstance(a, fx.Node) and tensor_value(a) is not None for a in node.args[1:])

    @staticmethod
    def _is_zero_alloc(node: Any) -> bool:
        if not isinstance(node, fx.Node):
            return False
        name = op_label(node)
        if name in ZERO_ALLOCATIONS:
            return True
        if name in ("aten.full", "aten.full_like", "aten.new_full"):
            return op_arg(node, 1, "fill_value") == 0
        return False

    def _grouped(self, n: fx.Node) -> Kind:
        x, w = n.args[0], n.args[1]
        offs = n.args[2] if len(n.args) > 2 else n.kwargs.get("offs")
        kx, kw, ko = self.kind(x), self.kind(w), self.kind(offs) if isinstance(offs, fx.Node) else None
        if kw is not None:
            raise Unproven(f"{n.name}: grouped GEMM whose weight depends on the tokens")
        if kx is None or kx.tag not in ("recv", "bag"):
            raise Unproven(f"{n.name}: grouped GEMM rows are not routed token copies ({kx})")
        if (tensor_ndim(x), tensor_ndim(w)) != (2, 3):
            raise Unproven(f"{n.name}: grouped GEMM of ranks {(tensor_ndim(x), tensor_ndim(w))} (only 2-D rows x 3-D weights keep rows)")
        if offs is None or (ko is not None and ko.tag not in ("meta", "add")):
            raise Unproven(f"{n.name}: grouped GEMM without layout offsets")
        return kx

    def _all_to_all(self, n: fx.Node) -> Kind:
        src = n.args[0]
        k = self.kind(src)
        if k is None:
            raise Unproven(f"{n.name}: all-to-all of an outside value")
        if k.tag in ("meta", "add"):
            return META
        if k.tag == "bag":
            return Kind("recv", key=n, p=None, m=k.m)
        if k.tag == "recv" and k.p is None:
            d = k.key
            from moe_passes.ir.facts import all_to_all_split_args

            od, idd = all_to_all_split_args(d)
            oc, ic = all_to_all_split_args(n)
            if list(oc or []) == list(idd or []) and list(ic or []) == list(od or []):
                dk = self.kind(d.args[0])
                return dk
            raise Unproven(f"{n.name}: reverse all-to-all whose split sizes do not mirror {d.name}'s")
        raise Unproven(f"{n.name}: all-to-all of a {k} value")

    def _inplace(self, n: fx.Node, written: list[fx.Node], args: list[tuple[fx.Node, Kind]]) -> Kind:
        name = op_label(n) or _name(n)
        if len(written) != 1:
            raise Unproven(f"{n.name}: {name} writes several tensors in place")
        (buf,) = written
        root = self.alias.get(buf, buf)
        kb = self.kind(buf)
        if kb is None:
            raise Unproven(f"{n.name}: {name} writes {buf.name} (outside the region) in place"
                           + ("; it is read outside the region too, so the chunks cannot each get their own"
                              if self._is_zero_alloc(buf) else ""))
        writers = self.written.get(root, [])
        if name == "aten.copy_" and not writers and self._whole_overwrite(n, root):
            return self._record_write(n, root, self._copied_kind(n))
        own = self._own_buffer(n, root)
        if own is None and kb.tag == "meta" and all(k.tag in ("meta", "add") for _, k in args) and not self._any_perm(args):
            # layout metadata edited in place (``ids.clamp_(max=E - 1)``, ``inv[p] = arange(n)``): still metadata
            # of this chunk (each chunk edits its own copy); ``inv[p] = arange(len(p))`` is p's inverse
            self._note_inverse(n, name, root)
            return self._record_write(n, root, META)
        functional = functional_form(n.target)
        if own is None and functional is not None and torch.Tag.pointwise in functional.tags and kb.tag in DATA_TAGS:
            # ``rows.masked_fill_(mask, 0)`` on rows the region computed: the functional op's rule, layout kept
            k = self._pointwise(n, args)
            if dataclasses.replace(k, fresh=False) != dataclasses.replace(kb, fresh=False):
                raise Unproven(f"{n.name}: in-place {name} would change the layout of {buf.name} ({kb} -> {k})")
            return self._record_write(n, root, kb)
        repeat = bool(writers) and root in self.masked and name in ("aten.index_put_", "aten._unsafe_index_put_", "aten.index_add_")
        if not repeat and (not kb.fresh or writers):
            raise Unproven(f"{n.name}: {name} mutates {buf.name} in place")
        mine = {root, *(a for a, r in self.alias.items() if r is root)}
        early = [u.name for b in mine for u in b.users
                 if u is not n and u not in writers and u not in mine and self.order[u] < self.order[n]]
        if early:
            raise Unproven(f"{n.name}: {buf.name} is read by {early} before its in-place write")
        functional = {"aten.index_put_": "aten.index_put", "aten._unsafe_index_put_": "aten.index_put",
                      "aten.index_copy_": "aten.index_copy", "aten.scatter_add_": "aten.scatter_add",
                      "aten.scatter_": "aten.scatter", "aten.index_add_": "aten.index_add"}.get(name)
        if functional is None:
            raise Unproven(f"{n.name}: in-place {name} on a fresh buffer is not a recognised un-permute")
        if functional == "aten.index_add":
            k = self._index_add(n)
        elif functional in ("aten.index_put", "aten.index_copy"):
            k = self._unpermute(n, functional)
        else:
            k = self._scatter(n, functional)
        return self._record_write(n, root, k)

    def _record_write(self, n: fx.Node, root: fx.Node, k: Kind) -> Kind:
        """After ``n`` wrote buffer ``root`` in place: later readers of the buffer (and its aliases) see ``k``."""
        mine = {root, *(a for a, r in self.alias.items() if r is root)}
        self.written[root] = [*self.written.get(root, []), n]
        self.alias[n] = root
        for a in mine:
            self.kinds[a] = k
        return k

    def _own_buffer(self, n: fx.Node, root: fx.Node) -> str | None:
        """None when ``n`` may write ``root`` in place as a per-chunk edit: the region computed ``root`` (each
        chunk has its own copy), ``root`` is no view of another value (the write would reach that value too),
        and no node outside the region reads it or a view of it (they would see one chunk's edit); else why not."""
        if root not in self.region:
            return f"{root.name} is not computed by the region"
        aliases = storage_aliases(root)
        if any(a not in self.region for a in aliases) or (root.all_input_nodes and root.all_input_nodes[0] in aliases):
            return f"{root.name} shares its storage with a value outside the region"
        mine = aliases | {a for a, r in self.alias.items() if r is root}
        outside = [u.name for b in mine for u in b.users if u not in self.region]
        return f"{root.name} is read outside the region ({outside})" if outside else None

    @staticmethod
    def _any_perm(args: list[tuple[fx.Node, Kind]]) -> bool:
        return any(k.tag in ("perm", "tokidx") for _, k in args)

    def _note_inverse(self, n: fx.Node, name: str, root: fx.Node) -> None:
        """Record ``inv[p] = arange(len(p))`` (``index_put_``, fresh ``empty_like(p)`` / ``new_empty`` buffer of
        p's length, first write, no accumulation, ``p`` the indices of a sort): ``inv`` is ``p``'s inverse."""
        if name not in ("aten.index_put_", "aten._unsafe_index_put_") or self.written.get(root):
            return
        if op_label(root) not in ("aten.empty_like", "aten.zeros_like", "aten.new_empty", "aten.new_zeros", "aten.empty"):
            return
        indices, values = n.args[1], n.args[2]
        if op_arg(n, 3, "accumulate", False) or len(indices) != 1 or not isinstance(indices[0], fx.Node):
            return
        p = indices[0]
        pv, bv, vv = tensor_value(p), tensor_value(root), tensor_value(values) if isinstance(values, fx.Node) else None
        if pv is None or bv is None or vv is None or pv.dim() != 1 or bv.dim() != 1 or vv.dim() != 1:
            return
        if not (known_equal(pv.shape[0], bv.shape[0]) and known_equal(vv.shape[0], pv.shape[0])):
            return
        if not (self._is_sort_indices(p) and self._is_iota(values)):
            return
        self.inverse[root] = p

    @staticmethod
    def _is_sort_indices(p: fx.Node) -> bool:
        """The indices of a sort (``argsort(x)``, ``sort(x)[1]``) of a 1-D value: a permutation of ``range(len)``."""
        if op_label(p) == "aten.argsort":
            return True
        src = p.args[0] if p.target is operator.getitem and p.args[1] == 1 and isinstance(p.args[0], fx.Node) else None
        return src is not None and op_label(src) == "aten.sort"

    @staticmethod
    def _is_iota(v: Any) -> bool:
        """``arange(n)`` (start 0, step 1)."""
        if not isinstance(v, fx.Node) or op_label(v) != "aten.arange":
            return False
        if v.target is aten.arange.default:
            return True
        if v.target is aten.arange.start and v.args[1:2] and v.args[0] == 0:
            return True
        return v.target is aten.arange.start_step and v.args[0] == 0 and (v.args[2] if len(v.args) > 2 else 1) == 1

    def _whole_overwrite(self, n: fx.Node, root: fx.Node) -> bool:
        """``buf.copy_(src)`` as the first write of a buffer the region allocated (``empty_like`` / ``zeros`` /
        ``new_empty`` ...), nobody reading it before, ``src`` of the buffer's own shape: every element of the
        buffer becomes ``src``'s (a c10d in-place collective traced as its functional form, then
        ``output.copy_(result)``: transformers' ``all_to_all_single(recv_counts, send_counts)``)."""
        if root not in self.region or not is_allocation(root):
            return False
        if any(u is not n and self.order[u] < self.order[n] for u in root.users):
            return False
        dst, src = tensor_value(n.args[0]), tensor_value(n.args[1]) if isinstance(n.args[1], fx.Node) else None
        return (dst is not None and src is not None and dst.dim() == src.dim()
                and all(known_equal(a, b) for a, b in zip(dst.shape, src.shape)))

    def _copied_kind(self, n: fx.Node) -> Kind:
        k = self.kind(n.args[1])
        if k is None:
            raise Unproven(f"{n.name}: copies a value from outside the region into a region buffer")
        if isinstance(k, tuple) or k is BLOCKED:
            raise Unproven(f"{n.name}: copies a {k} value")
        return dataclasses.replace(k, fresh=False)

    def _index_add(self, n: fx.Node) -> Kind:
        """``zeros(E).index_add_(0, ids, ones)``: a per-expert counter (as ``scatter_add``)."""
        dst, dim, idx, src = n.args[0], n.args[1], n.args[2], n.args[3]
        ki = self.kind(idx)
        alpha = op_arg(n, 4, "alpha", 1)
        along_rows = normalize_dim(dim, tensor_ndim(dst) or 0) == 0 and not isinstance(alpha, fx.Node)
        if along_rows:
            put = self._put_received(n, dst, idx, src)
            if put is not None:
                return put
        if not along_rows or ki is None or ki.tag != "row" or tensor_ndim(idx) != 1:
            raise Unproven(f"{n.name}: index_add along dim 0 of a buffer by a {ki} index is not a per-expert counter")
        return self._counter(n, "aten.index_add", dst, ki, src)

    # ------------------------------------------------------------------ per-expert pieces
    def _split_by_layout(self, n: fx.Node) -> tuple[Kind, ...] | None:
        """``torch.split(rows, counts.tolist())``: the chunk's received (or sorted) rows in per-expert pieces,
        sized by the chunk's own layout metadata. None: not this idiom (the generic rule decides)."""
        src, sizes = n.args[0], n.args[1]
        ks = self.kind(src)
        dim = normalize_dim(op_arg(n, 2, "dim", 0), tensor_ndim(src) or 0)
        if ks is None or ks.tag not in ("recv", "bag") or dim != 0 or not isinstance(sizes, (list, tuple)):
            return None
        for size in sizes:
            k = self.kind(size) if isinstance(size, fx.Node) else None
            if k is None or k.tag not in ("meta", "add") or not self._from_counts(size):
                raise Unproven(f"{n.name}: splits routed rows by sizes that are not computed from the chunk's expert "
                               f"counts ({getattr(size, 'name', size)}: {'fixed' if k is None else 'from sizes or positions'}); "
                               f"pieces cut by position would give rows to other experts once chunked")
        return tuple(Kind("seg", key=(n, ks), p=i) for i in range(len(sizes)))

    def _repeat_rows(self, n: fx.Node, k: Kind) -> Kind:
        """``x.repeat_interleave(K, dim=0)``: each token's K copies, token-major (``row(m * K)``); along
        another dim each row is repeated within itself."""
        repeats = op_arg(n, 1, "repeats")
        src = tensor_value(n.args[0])
        dim = op_arg(n, 2, "dim", None)
        d = normalize_dim(dim, src.dim()) if dim is not None and src is not None else None
        if not isinstance(repeats, int) or repeats < 1 or k.tag not in DATA_TAGS:
            raise Unproven(f"{n.name}: repeat_interleave of {k} by {getattr(repeats, 'name', repeats)} "
                           "(only a constant number of copies of each row is understood)")
        if d is not None and d >= lead_of(k):
            return k
        if d == 0 and k.tag == "row" and k.lead == 1 and op_arg(n, 3, "output_size", None) is None:
            return row(k.m * repeats)
        raise Unproven(f"{n.name}: repeat_interleave over {'the flattened tensor' if d is None else f'dim {dim}'} of {k}")

    def _cat_segments(self, n: fx.Node) -> Kind | None:
        """``torch.cat(pieces)`` of every piece of one layout split, in order, each computed row by row: the
        split's rows again. None: not this idiom."""
        tensors = n.args[0]
        dim = normalize_dim(op_arg(n, 1, "dim", 0), tensor_ndim(n) or 1)
        kinds = [self.kind(t) if isinstance(t, fx.Node) else None for t in tensors]
        if dim != 0 or not kinds or not all(isinstance(k, Kind) and k.tag == "seg" for k in kinds):
            if dim == 0 and any(isinstance(k, Kind) and k.tag == "seg" for k in kinds):
                raise Unproven(f"{n.name}: concatenates per-expert pieces that are not every piece of one split in order")
            return None
        split, source = kinds[0].key
        if any(k.key != kinds[0].key for k in kinds) or [k.p for k in kinds] != list(range(len(split.args[1]))):
            raise Unproven(f"{n.name}: concatenates per-expert pieces that are not every piece of {split.name} in order")
        return source

    def _from_counts(self, node: fx.Node) -> bool:
        """Whether layout metadata is computed from the chunk's expert counts (an ``add`` counter, or the
        count exchange), through metadata only: an expert id or split size derived from row positions or
        sizes alone (``arange(R) % E``, ``[R // 2, R - R // 2]``) would assign other rows to each expert
        once the rows are chunked."""
        seen: set[fx.Node] = set()
        stack = [node]
        while stack:
            m = stack.pop()
            if m in seen:
                continue
            seen.add(m)
            k = self.kinds.get(m)
            if not isinstance(k, Kind):
                continue
            if k.tag == "add":
                return True
            if k.tag == "meta":
                stack.extend(m.all_input_nodes)
        return False

    def _batch(self, n: fx.Node, name: str | None, args: list[tuple[fx.Node, Kind]]) -> Kind:
        """``bmm(x.unsqueeze(1), w[eid])``, ``q @ k.transpose(-2, -1)`` of ``[B, h, S, d]``, SDPA: an op whose
        batch dim 0 is the rows of every tensor operand. An outside operand is shared when it broadcasts
        over dim 0 (size 1 there, or lower rank), a row input when its dim 0 is the rows (whole-layer mode)."""
        k = self._data_kind(n, args)
        if k.tag == "row" and k.lead != 1:
            raise Unproven(f"{n.name}: {name} batches over dim 0 of rows over {k.lead} leading dims")
        out = tensor_value(n) if not isinstance(node_value(n), (tuple, list)) else tensor_value(n.args[0])
        operands = [a for a in n.args[:4] if isinstance(a, fx.Node)] + [a for a in n.kwargs.values() if isinstance(a, fx.Node)]
        for a in operands:
            v = tensor_value(a)
            if v is None or self.kind(a) is not None:
                continue
            if out is not None and rows.broadcast_spans_rows(tuple(v.shape), out.dim(), 1):
                self._row_input(n, a, k, v.dim() == out.dim() and known_equal(v.shape[0], out.shape[0]))
        if name == "aten.scaled_dot_product_attention":
            p = op_arg(n, 4, "dropout_p", 0.0)
            if p != 0.0:
                raise Unproven(f"{n.name}: attention dropout (p={p}): chunks would draw other random masks")
        return k
