"""Replace a proven region by N copies on row slices of X, reassembled after the last copy.

Copy k reads ``split_with_sizes(X, sizes)[k]``; every value leaving the region
is reassembled from the copies: token rows by ``cat`` along dim 0 (token-major,
so the pieces are exactly the rows of the unchunked value) and per-expert
counts by a sum.  Token counts baked into the graph as literal sizes (static
shapes) are retargeted to the chunk's own rows: dim 0 of a size list whose
result is ``row(m)``, and bounds ``T*m`` in comparisons that only feed runtime
assertions.  Shapes are then re-propagated in the graph's own fake mode (fresh
unbacked symbols for each chunk's split sizes) and every copy is checked: a
``row(m)`` copy has ``c*m`` rows, counts keep their shape.  A failed check
refuses the rewrite (nothing of it is kept).
"""

from __future__ import annotations

import logging
import operator
from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols, statically_known_true

from moe_passes.fx.domino.kinds import Kind, same_size, size_expr
from moe_passes.fx.domino.regions import MoERegion
from moe_passes.ir.facts import is_mutation, node_value, op_label, tensor_value
from moe_passes.ir.rows import NotRowLocal

log = logging.getLogger(__name__)

aten = torch.ops.aten

_SIZE_ARG = {"aten.view": 1, "aten.reshape": 1, "aten._unsafe_view": 1, "aten.expand": 1, "aten.new_zeros": 1,
             "aten.new_empty": 1, "aten.new_ones": 1, "aten.new_full": 1, "aten.zeros": 0, "aten.empty": 0,
             "aten.ones": 0, "aten.full": 0}
_COMPARISONS = (operator.le, operator.ge, operator.lt, operator.gt, operator.eq, operator.ne)
ASSERT = torch.ops.aten._assert_scalar.default


def chunk_sizes(num_tokens: Any, num_chunks: int) -> list[Any]:
    """Row counts of ``torch.tensor_split(x, num_chunks)``: the first ``T % N`` chunks get one more row.

    Chunk k has ``(T + N - 1 - k) // N`` rows: the first is ``ceil(T / N)``, later ones may be one
    smaller, and empty when ``T < N`` (every chunk still issues its collectives). For a symbolic T
    (a SymInt) the same formula gives SymInt expressions, one per chunk.
    """
    if isinstance(num_tokens, int):
        q, r = divmod(num_tokens, num_chunks)
        return [q + 1] * r + [q] * (num_chunks - r)
    return [(num_tokens + (num_chunks - 1 - k)) // num_chunks for k in range(num_chunks)]


def is_symbolic(v: Any) -> bool:
    return isinstance(v, torch.SymInt)


def _value(a: Any) -> Any:
    """An int argument, or the (Sym)Int value a node computes; None for anything else."""
    if isinstance(a, bool):
        return None
    if isinstance(a, int):
        return a
    if isinstance(a, fx.Node):
        v = node_value(a)
        return v if isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool) else None
    return None


def _same(a: Any, b: Any) -> bool:
    """``a == b`` for ints / SymInts / sympy sizes (symbolic multiplicities), decided without a guard
    (unknown: False)."""
    if not all(isinstance(x, (int, torch.SymInt)) for x in (a, b)):
        return same_size(a, b)
    try:
        return bool(statically_known_true(a == b))
    except Exception:  # noqa: BLE001 - unknown means not equal
        return False


def _mul(a: Any, m: Any) -> Any:
    """``a * m`` for a size ``a`` and a multiplicity ``m`` (int, or a sympy monomial: then a sympy size)."""
    if isinstance(m, int):
        return a * m
    return size_expr(a) * m


def _size_node(graph: fx.Graph, m: Any, sources: list[fx.Node]) -> Any:
    """An int, or a node computing the symbolic multiplicity ``m`` (a monomial of size symbols) from the
    sizes of ``sources`` (X and the row inputs: whole-layer mode's symbolic sequence length)."""
    if isinstance(m, int):
        return m

    made: dict[Any, fx.Node] = {}

    def size_of(sym: Any) -> fx.Node:
        if sym not in made:
            made[sym] = graph.call_function(aten.sym_size.int, _size_source(sources, sym))
        return made[sym]

    coeff, rest = m.as_coeff_Mul()
    out: Any = int(coeff)
    for f in (rest.args if rest.is_Mul else (rest,)):
        base, exp = (f.base, int(f.exp)) if f.is_Pow else (f, 1)
        if _size_source(sources, base) is None:
            raise NotRowLocal(f"rows per sequence {m}: no size of the region's inputs gives {base}")
        for _ in range(exp):
            out = size_of(base) if isinstance(out, int) and out == 1 else graph.call_function(operator.mul, (out, size_of(base)))
    return out


def _size_source(sources: list[fx.Node], size: Any) -> tuple[fx.Node, int] | None:
    """(node, dim) of the first of ``sources`` with a dim provably equal to ``size`` (a SymInt or a sympy
    size), for a ``sym_size`` node that computes it in the graph; None if none has it."""
    for src in sources:
        v = tensor_value(src)
        for j, d in enumerate(v.shape if v is not None else ()):
            if not isinstance(d, int) and _same(d, size):
                return src, j
    return None


def _multiplicities(region: MoERegion) -> set[Any]:
    ms = {1}
    for k in region.kinds.values():
        if isinstance(k, Kind) and k.tag in ("row", "perm", "tokidx", "bag"):
            ms.add(k.m)
    return ms


def _retarget(new: fx.Node, old: fx.Node, region: MoERegion, rows: dict[int, Any]) -> fx.Node:
    """Token counts the copy reads from outside the region become the chunk's own: ``rows[m]`` is the
    chunk's ``c * m`` (an int, or a SymInt-valued node when T is symbolic).

    A size (literal int, or a node outside the region whose SymInt value is provably ``T * m``, e.g.
    Dynamo's ``s0`` placeholder or ``2 * s0``) in dim 0 of a size list whose result is ``row(m)``, and
    in comparisons that only feed runtime assertions, is replaced; nothing is guarded.

    Returns the node that stands for the copy: ``new``, or, for a symbolic view/reshape to
    ``[1, ..., c, rest...]``, ``new`` viewed to ``[c, rest...]`` and unsqueezed (torch 2.13's fake
    ``view`` of ``[c, H]`` to ``[1, c, H]`` infers ``(c, c, H // c)`` when c's hint is 1).
    """
    T = region.num_tokens
    kind = region.kinds.get(old)
    name = op_label(old)
    members = set(region.nodes)
    members.add(region.tokens)

    def outside(a: Any) -> Any:  # the value of an argument computed outside the region, else None
        return None if isinstance(a, fx.Node) and a in members else _value(a)

    if isinstance(kind, Kind) and kind.tag == "row" and name in _SIZE_ARG:
        pos = _SIZE_ARG[name]
        if len(new.args) > pos and isinstance(old.args[pos], (list, tuple)) and len(old.args[pos]) >= kind.lead:
            sizes = list(new.args[pos])
            oshape = tuple(tensor_value(old).shape) if tensor_value(old) is not None else ()
            if len(oshape) == len(sizes):
                # a -1 past the row dims is a static size of the original (heads in ``view(B, S, -1, d)``): spell
                # it out, so the copy's shape is not inferred through a chunk size whose hint may be 1, nor from
                # an empty chunk (0 elements: torch cannot infer -1 there)
                sizes[kind.lead:] = [oshape[i] if isinstance(s, int) and s == -1 and isinstance(oshape[i], int) else s
                                     for i, s in enumerate(sizes) if i >= kind.lead]
                new.args = (*new.args[:pos], type(new.args[pos])(sizes), *new.args[pos + 1:])
            lead = [outside(a) for a in old.args[pos][:kind.lead]]
            if all(v is not None for v in lead):
                if any(isinstance(v, int) and v == -1 for v in lead):  # -1 absorbs the chunk's rows; other token dims -> 1
                    sizes[:kind.lead] = [-1 if isinstance(v, int) and v == -1 else 1 for v in lead]
                elif _same(_prod(lead), _mul(T, kind.m)):
                    c = rows[kind.m]
                    if isinstance(c, fx.Node) and kind.lead > 1 and name in _VIEWS:
                        new.args = (*new.args[:pos], type(new.args[pos])([c, *sizes[kind.lead:]]), *new.args[pos + 1:])
                        return _unsqueeze(new.graph, new, kind.lead - 1)
                    sizes[:kind.lead] = [1] * (kind.lead - 1) + [c]
                new.args = (*new.args[:pos], type(new.args[pos])(sizes), *new.args[pos + 1:])
    elif old.target in _COMPARISONS and old.users and all(u.target is ASSERT for u in old.users):
        args = list(new.args)
        for i, a in enumerate(old.args):
            v = outside(a)
            if v is None or (isinstance(v, int) and v == 0):
                continue
            for m in _multiplicities(region):
                if _same(v, _mul(T, m)):
                    args[i] = rows[m]
                    break
        new.args = tuple(args)
    return new


_VIEWS = ("aten.view", "aten.reshape", "aten._unsafe_view")


def _unsqueeze(graph: fx.Graph, node: fx.Node, count: int) -> fx.Node:
    """``node`` with ``count`` leading dims of size 1 added (inserted right after it)."""
    out = node
    with graph.inserting_after(node):
        for _ in range(count):
            out = graph.call_function(aten.unsqueeze.default, (out, 0))
            out.meta.update({k: node.meta[k] for k in ("domino_chunk", "nn_module_stack") if k in node.meta})
    return out


def assert_data_dependent_rows(graph: fx.Graph, reassembled: list[tuple[fx.Node, list[fx.Node], Any, Kind]],
                               sizes: list[Any]) -> bool:
    """Token rows the analysis proved whose count the shapes show only as data-dependent sizes (the
    combine's output: the sum of split sizes read from the exchanged counts, ``u0 + u1``): before they are
    concatenated, each chunk's piece asserts it has the chunk's rows, ``torch._check(piece.shape[0] == c * m)``
    -- true by the analysis, checked at run time, and it tells the shape environment. Returns whether any
    assertion was added (then shapes must be propagated again)."""
    values = size_values(sizes)
    added = False
    for new, pieces, _shape, kind in reassembled:
        if kind.tag != "row" or kind.lead != 1:
            continue
        # each chunk's row count (``c * m``: an int or a node), as the rewrite computed it for this output
        for piece, c, v, rows in zip(pieces, sizes, values, new.meta["domino_rows"]):
            dim0 = tensor_value(piece).shape[0]
            if not free_unbacked_symbols(dim0) or _same(dim0, _mul(v, kind.m)):
                continue
            with graph.inserting_before(new):
                size = graph.call_function(aten.sym_size.int, (piece, 0))
                same = graph.call_function(operator.eq, (size, rows))
                graph.call_function(ASSERT, (same, f"domino: a chunk of {new.name} does not have its {c} tokens' rows"))
            added = True
    return added


def _prod(xs: list[Any]) -> Any:
    out = 1
    for x in xs:
        out *= x
    return out


Join = tuple[list[Any], list[fx.Node]]  # (chunk sizes, X's piece per chunk) from the previous region


def rewrite_region(graph: fx.Graph, region: MoERegion, num_chunks: int, join: Join | None = None,
                   joins: dict[fx.Node, Join] | None = None, replaced: dict[fx.Node, fx.Node] | None = None,
                   ) -> tuple[list[Any], list[tuple[fx.Node, list[fx.Node], Any, Kind]]]:
    """Insert the chunk copies after the region's last node; reroute outside readers; erase the original.

    Returns the chunk sizes (ints for a static token count; for a symbolic one, the SymInt-valued
    nodes ``(T + N - 1 - k) // N`` with ``T = sym_size(X_flat, 0)``, computed in the graph) and the
    reassembled outputs for ``check_rows``.

    ``join``: X is the previous region's output, reassembled from chunks of the same sizes: chunk k reads
    that region's piece k directly (consecutive whole-layer regions run chunk to chunk, no barrier between
    layers). ``joins`` collects, per reassembled output with X's layout, (sizes, pieces) for the next region;
    ``replaced``, per output, the node that now stands for it (the original is erased).
    """
    symbolic = not isinstance(region.num_tokens, int)
    members = set(region.nodes)
    last = region.nodes[-1]
    outside_users = {out: [u for u in out.users if u not in members] for out in region.outputs}
    copies: list[dict[fx.Node, fx.Node]] = []
    reassembled: list[tuple[fx.Node, list[fx.Node], Any, Kind]] = []
    stack = dict(region.tokens.meta.get("nn_module_stack") or {})
    before = set(graph.nodes)
    with graph.inserting_before(last.next):
        xshape = tuple(tensor_value(region.tokens).shape)
        xkind = region.kinds[region.tokens]
        rest = list(xshape[xkind.lead:])
        if xkind.lead > 1 and any(not isinstance(s, int) for s in rest):
            raise RuntimeError(f"token matrix {region.tokens.name} has symbolic feature dims {rest}; not chunked")
        flat = region.tokens
        if xkind.lead > 1:  # [B, L, ...] tokens: split the flattened token dim, give each piece [1, c, ...]
            flat = graph.call_function(aten.reshape.default, (region.tokens, [-1 if symbolic else region.num_tokens, *rest]))
        if join is not None:
            sizes = list(join[0])
        elif symbolic:  # the chunk sizes are computed in the graph from the run's own token count
            total = graph.call_function(aten.sym_size.int, (flat, 0))
            sizes: list[Any] = []
            for k in range(num_chunks):
                bias = num_chunks - 1 - k
                num = graph.call_function(operator.add, (total, bias)) if bias else total
                sizes.append(graph.call_function(operator.floordiv, (num, num_chunks)))
        else:
            sizes = chunk_sizes(region.num_tokens, num_chunks)
        split = None if join is not None else graph.call_function(aten.split_with_sizes.default, (flat, list(sizes), 0))
        if split is not None:
            split.meta["nn_module_stack"] = stack
        chunk_rows: list[dict[Any, Any]] = []
        mults = sorted(_multiplicities(region) | {k.m for k in region.row_inputs.values()}, key=str)
        m_nodes = {m: _size_node(graph, m, [region.tokens, *region.row_inputs]) for m in mults}
        for c in sizes:
            chunk_rows.append({m: c if m == 1 else (graph.call_function(operator.mul, (c, m_nodes[m]))
                                                    if symbolic or not isinstance(m, int) else c * m) for m in mults})
        # values read by row from outside (whole-layer mode: rotary tables, masks): each chunk its own rows
        input_splits = {a: graph.call_function(aten.split_with_sizes.default, (a, [r[k.m] for r in chunk_rows], 0))
                        for a, k in region.row_inputs.items()}
        for k, c in enumerate(sizes):
            rows = chunk_rows[k]
            piece = join[1][k] if join is not None else graph.call_function(operator.getitem, (split, k))
            if xkind.lead > 1 and join is None:
                piece = (_unsqueeze(graph, piece, xkind.lead - 1) if symbolic else
                         graph.call_function(aten.reshape.default, (piece, [1] * (xkind.lead - 1) + [c, *rest])))
            piece.meta.setdefault("nn_module_stack", stack)
            env: dict[fx.Node, fx.Node] = {region.tokens: piece}
            for a, a_split in input_splits.items():
                env[a] = graph.call_function(operator.getitem, (a_split, k))
            for n in region.nodes:
                new = graph.node_copy(n, lambda a: env.get(a, a))  # noqa: B023 - called at once, in this iteration
                new.meta.pop("unbacked_bindings", None)
                new.meta["domino_chunk"] = k
                env[n] = _retarget(new, n, region, rows)
            copies.append(env)
            for v in rows.values():  # a row count no copy reads
                if isinstance(v, fx.Node) and v is not c and not v.users:
                    graph.erase_node(v)
        for v in m_nodes.values():  # a symbolic multiplicity no row count reads (and the sizes it read)
            todo = [v] if isinstance(v, fx.Node) else []
            while todo:
                d = todo.pop()
                if d.graph is graph and not d.users and d.op == "call_function":
                    todo.extend(a for a in d.all_input_nodes if a.op == "call_function")
                    graph.erase_node(d)
        for out, users in outside_users.items():
            kind = region.kinds[out]
            pieces = [env[out] for env in copies]
            if kind.tag == "row" and kind.lead == 1:
                new = graph.call_function(aten.cat.default, (pieces, 0))
            elif kind.tag == "row":  # [B, L, ...]: flatten the token dims of each piece, concatenate, restore
                oshape = tuple(tensor_value(out).shape)
                rest = list(oshape[kind.lead:])
                if symbolic:  # the pieces are [1, ..., c*m, rest...]: squeeze, concatenate, unsqueeze
                    ones = list(range(kind.lead - 1))
                    flat_pieces = [graph.call_function(aten.squeeze.dims, (p, ones)) for p in pieces]
                    cat = graph.call_function(aten.cat.default, (flat_pieces, 0))
                    if all(isinstance(d, int) and d == 1 for d in oshape[:kind.lead - 1]):
                        new = _unsqueeze(graph, cat, kind.lead - 1)
                    else:
                        new = graph.call_function(aten.reshape.default, (cat, _restore_shape(oshape, out, graph, region.tokens)))
                else:
                    flat_pieces = [graph.call_function(aten.reshape.default, (p, [r[kind.m], *rest])) for p, r in zip(pieces, chunk_rows)]
                    cat = graph.call_function(aten.cat.default, (flat_pieces, 0))
                    new = graph.call_function(aten.reshape.default, (cat, list(oshape)))
            else:  # per-expert counts: the sum of the chunks' counts
                new = pieces[0]
                for p in pieces[1:]:
                    new = graph.call_function(aten.add.Tensor, (new, p))
            new.meta["nn_module_stack"] = dict(out.meta.get("nn_module_stack") or {})
            reassembled.append((new, pieces, tuple(tensor_value(out).shape), kind))
            if kind.tag == "row":
                new.meta["domino_rows"] = [r[kind.m] for r in chunk_rows]
            if replaced is not None:
                replaced[out] = new
                if "val" in out.meta:  # until shapes are propagated again: the value it stands for
                    new.meta.setdefault("val", out.meta["val"])
            if joins is not None and kind.tag == "row" and kind.lead == 1 and kind.m == 1:
                joins[out] = (list(sizes), pieces)
            for u in users:
                u.replace_input_with(out, new)
    members.add(region.tokens)
    members.update(region.row_inputs)
    outside_inputs = {a for n in region.nodes for a in n.all_input_nodes if a not in members}
    for n in reversed(region.nodes):
        graph.erase_node(n)
    # A copy nobody reads (e.g. the top-k values when only the indices are used, torchtitan's router)
    # would be a new dead node per chunk: drop the pure ones.
    for env in copies:
        for n in reversed(region.nodes):
            new = env[n]
            if not new.users and not new.is_impure() and not is_mutation(new):
                graph.erase_node(new)
    # Values computed outside the region only for it (e.g. ``2 * s0`` compared with the routed counts)
    # that every copy now reads from its own chunk: drop them once nothing reads them.
    dead = [a for a in outside_inputs if a.op == "call_function"]
    while dead:
        a = dead.pop()
        if a.graph is graph and not a.users and not a.is_impure() and not is_mutation(a):
            inputs = [b for b in a.all_input_nodes if b.op == "call_function"]
            graph.erase_node(a)
            dead.extend(inputs)
    if join is not None and not region.tokens.users and region.tokens.op == "call_function":
        graph.erase_node(region.tokens)  # the previous region's concatenation, read by nobody now
    _tag_glue(region, [n for n in graph.nodes if n not in before], stack)
    return sizes, reassembled


_CHECKPOINT_META = ("ac_graph_id", "recompute")


def _tag_glue(region: MoERegion, created: list[fx.Node], stack: dict[str, Any]) -> None:
    """The nodes the rewrite adds around the chunk copies (split, getitem, cat, reshape, sizes) carry the
    region's activation-checkpoint tags when the whole region sits in one checkpoint body, so the
    partitioner recomputes them with the body instead of saving them; and a module stack for reports."""
    tags = {tuple(n.meta.get(k) for k in _CHECKPOINT_META) for n in region.nodes}
    shared = next(iter(tags)) if len(tags) == 1 and None not in next(iter(tags)) else None
    for n in created:
        if shared is not None and "ac_graph_id" not in n.meta:
            n.meta.update(zip(_CHECKPOINT_META, shared))
        n.meta.setdefault("nn_module_stack", stack)


def _restore_shape(shape: tuple, out: fx.Node, graph: fx.Graph, tokens: fx.Node) -> list[Any]:
    """A size list for ``shape`` without SymInts: one symbolic dim becomes -1, the others are read from the
    token matrix's sizes (``[B, S, H]`` with both symbolic: ``[-1, sym_size(X, 1), H]``)."""
    symbolic = [i for i, s in enumerate(shape) if not isinstance(s, int)]
    out_sizes: list[Any] = [-1 if i == (symbolic[0] if symbolic else None) else s for i, s in enumerate(shape)]
    sources = [tokens]  # X, then the values it is computed from ([B, S, H] before its flattening)
    for src in sources:
        if len(sources) < 16:
            sources.extend(a for a in src.all_input_nodes if a not in sources and tensor_value(a) is not None)
    for i in symbolic[1:]:
        found = _size_source(sources, shape[i])
        if found is None:
            raise NotRowLocal(f"{out.name} has more than one symbolic dim {tuple(shape)} and {shape[i]} is not a size of "
                              f"{tokens.name} or what it is computed from; cannot restore its shape")
        out_sizes[i] = graph.call_function(aten.sym_size.int, found)
    return out_sizes


def size_values(sizes: list[Any]) -> list[Any]:
    """Chunk sizes as values: ints, or the SymInts the size nodes compute (after ``repropagate``)."""
    return [node_value(c) if isinstance(c, fx.Node) else c for c in sizes]


def _shapes_equal(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))


def check_rows(reassembled: list[tuple[fx.Node, list[fx.Node], Any, Kind]], sizes: list[Any]) -> None:
    """Each chunk's piece has its own rows (counts: the full shape), the reassembled value the original shape.

    Symbolic sizes are compared as expressions (provably equal, no guard)."""
    values = size_values(sizes)
    for new, pieces, shape, kind in reassembled:
        got = [tuple(tensor_value(p).shape) for p in pieces]
        if kind.tag == "row":
            got = [(_prod(list(g[:kind.lead])), *g[kind.lead:]) for g in got]
            expected = [(_mul(c, kind.m), *shape[kind.lead:]) for c in values]
            if kind.lead == 1:  # the whole is the cat of the pieces checked here: its rows are theirs
                shape = (tensor_value(new).shape[0], *shape[1:])
        else:
            expected = [tuple(shape)] * len(values)
        ok = all(_shapes_equal(g, e) for g, e in zip(got, expected)) and _shapes_equal(tuple(tensor_value(new).shape), tuple(shape))
        if not ok:
            raise NotRowLocal(f"chunked {new.name} has pieces {got} (expected {expected}); refusing the rewrite")


def refresh_assert_messages(graph: fx.Graph) -> None:
    """Copied runtime asserts name their chunk's own condition."""
    for n in graph.nodes:
        if "domino_chunk" in n.meta and n.target is ASSERT and isinstance(n.args[0], fx.Node):
            cond = n.args[0]
            n.args = (cond, f"Runtime assertion failed for expression {node_value(cond)} on node '{cond.name}'")
