"""What an ATen op does to rows: the one row analysis every pass asks.

A *row value* is a tensor whose leading ``lead`` dims flatten to an index over
rows: tokens (Domino's token matrix ``[T, H]``, or ``[B, S, H]`` with
``lead = 2``), token copies (top-k ids ``[T*K]``), or the aux loss's stacked
``[L*T, E]`` router logits. ``effect(node, lead)`` answers, from the op's
schema and normalised dims (never from its spelling), what the op does to the
rows of the operand it reads them from:

``keep``
    the output's rows are the input's rows, one to one, each computed from its
    own row only (row-local); ``lead`` is the output's row dims (None for
    view-like ops, whose row dims follow from shapes: the caller resolves them).
``reduce``
    the row dims are reduced away; ``linear`` says which reductions are a sum of
    per-block partials ("sum", "mean", "count"), None for max/var/norm/...
``mix``
    the op crosses rows (a softmax or cumsum over the row dim, a transpose that
    moves it, an expand along it); ``reason`` says how, in user terms.

One effect holds per op *family* (``family``): value-preserving casts,
pointwise ops (``torch.Tag.pointwise``), views, shape ops, ops along one dim,
reductions, matmuls, concatenation, gathers, norms, counts. Operand roles that
only the caller knows (which other operands hold rows, and whether their
layouts agree; whether a matmul weight is replicated) stay with the caller:
``effect`` says what the op does *if* its row operand is the one named.

Rules are registered per op packet (``@rule(aten.softmax, aten._softmax)``);
an op without a rule gets DTensor's sharding propagation as the fallback
(``Shard(0)`` kept without redistribution = keep) when every row operand has
``lead == 1`` and static shapes; otherwise ``effect`` returns None (no rule:
the caller declines with a reason). An analysis that cannot prove a value
row-local raises ``NotRowLocal`` with the reason.

Passes that ask: Domino's token-row analysis (``moe_passes.fx.domino.row_analysis``,
which adds only its MoE algebra: routing permutations, gathers, the all-to-all pair,
grouped GEMMs, per-expert counters) and the layer-wise aux loss
(``moe_passes.fx.aux_loss.rewrite``, which adds only its per-layer emission).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
import torch.fx as fx

from moe_passes.ir.facts import normalize_dim, normalize_dims, op_arg, tensor_ndim, tensor_value

aten = torch.ops.aten


class NotRowLocal(Exception):
    """A value cannot be shown row-local (or a row reduction exact); the message names the node and why."""


@dataclass(frozen=True)
class Effect:
    """What one op does to the rows of its row operand (see the module docstring)."""

    kind: str  # "keep" | "reduce" | "mix"
    #: identity | pointwise | view | expand | shape | split | along | reduce | matmul | batch | cat | gather
    #: | one_hot | norm | count | dtensor
    family: str
    lead: int | None = None  # keep: row dims of the output (None: resolve from shapes)
    linear: str | None = None  # reduce: "sum" | "mean" | "count" (sum of per-block partials), None otherwise
    outputs: int = 0  # >0: the op returns a tuple of that many values, each with this effect
    reason: str = ""  # mix / non-linear reduce: why, in user terms
    dims: tuple[int, ...] = ()  # along / reduce / shape: the normalised dims the op acts on
    data: int = 0  # position of the operand rows are read from (addmm: 1)

    @property
    def keeps(self) -> bool:
        return self.kind == "keep"


Rule = Callable[[fx.Node, int], Effect]
RULES: dict[Any, tuple[str, Rule]] = {}


def rule(*packets: Any, family: str) -> Callable[[Rule], Rule]:
    """Register ``fn(node, lead) -> Effect`` for every overload of the given op packets."""

    def register(fn: Rule) -> Rule:
        for p in packets:
            if p in RULES:
                raise ValueError(f"two row rules for {p}")
            RULES[p] = (family, fn)
        return fn

    return register


def packet(node: fx.Node) -> Any:
    t = node.target
    return t.overloadpacket if isinstance(t, torch._ops.OpOverload) else t


def family_of(node: fx.Node) -> str | None:
    """The family of an op with a registered rule (pointwise ops included), else None."""
    if node.op != "call_function":
        return None
    entry = RULES.get(packet(node))
    if entry is not None:
        return entry[0]
    if _is_pointwise(node):
        return "pointwise"
    return None


def effect(node: fx.Node, lead: int = 1, row_args: dict[fx.Node, int] | None = None) -> Effect | None:
    """What ``node`` does to rows whose leading ``lead`` dims are the row index.

    ``row_args`` (operand -> its lead), when given, lets the DTensor fallback mark which operands are
    sharded; without it only ``node.args[0]`` is. None: no rule and no DTensor opinion.
    """
    if node.op != "call_function":
        return None
    entry = RULES.get(packet(node))
    if entry is not None:
        return entry[1](node, lead)
    if _is_pointwise(node):
        return Effect("keep", "pointwise", lead)
    from moe_passes.ir.rows_dtensor import dtensor_keeps_rows

    args = row_args if row_args is not None else ({node.args[0]: lead} if node.args and isinstance(node.args[0], fx.Node) else {})
    verdict = dtensor_keeps_rows(node, args) if args and set(args.values()) == {1} else None
    if verdict is True:
        return Effect("keep", "dtensor", lead)
    if isinstance(verdict, str):
        return Effect("mix", "dtensor", reason=verdict)
    return None


def _is_pointwise(node: fx.Node) -> bool:
    t = node.target
    return isinstance(t, torch._ops.OpOverload) and torch.Tag.pointwise in t.tags


def _rank(node: fx.Node, position: int = 0) -> int:
    a = node.args[position] if len(node.args) > position else None
    return tensor_ndim(a) or 0


def _mix(family: str, reason: str, **kw: Any) -> Effect:
    return Effect("mix", family, reason=reason, **kw)


def op_display(node: fx.Node) -> str:
    """``softmax`` for ``aten.softmax.int``: the op as a user wrote it (no namespace or overload)."""
    p = packet(node)
    return getattr(p, "__name__", None) or str(p)


# ---------------------------------------------------------------------------------------------- families
#: Value-preserving unary ops: same elements, maybe another dtype/device/layout (casts, moves, copies).
IDENTITY = (
    aten.detach,
    aten.alias,
    aten.clone,
    aten.contiguous,
    aten.to,
    aten._to_copy,
    aten.type_as,
    aten.lift_fresh_copy,
    aten.positive,
    aten._assert_tensor_metadata,
)


@rule(*IDENTITY, family="identity")
def _identity(node: fx.Node, lead: int) -> Effect:
    return Effect("keep", "identity", lead)


@rule(aten.dropout, aten.native_dropout, family="pointwise")
def _dropout(node: fx.Node, lead: int) -> Effect:
    p, train = op_arg(node, 1, "p", 0.0), op_arg(node, 2, "train", True)
    if p == 0 or train is False:
        return Effect("keep", "pointwise", lead, outputs=2 if packet(node) is aten.native_dropout else 0)
    return _mix(
        "pointwise",
        f"{op_display(node)}(p={p}) in training draws one random number per element: "
        "split into chunks it draws other numbers than the unsplit op",
    )


@rule(aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.view_as, aten.reshape_as, family="view")
def _view(node: fx.Node, lead: int) -> Effect:
    return Effect("keep", "view", None)


@rule(aten.expand, aten.expand_as, family="expand")
def _expand(node: fx.Node, lead: int) -> Effect:
    src, out = tensor_value(node.args[0]), tensor_value(node)
    if src is None or out is None or src.dim() != out.dim():
        return _mix("expand", "expand adds leading dims (moves the row dim)")
    from moe_passes.ir.facts import known_equal

    if any(not known_equal(out.shape[i], src.shape[i]) for i in range(min(lead, src.dim()))):
        return _mix("expand", "expand along the row dim")
    return Effect("keep", "expand", lead)


@rule(aten.unsqueeze, family="shape")
def _unsqueeze(node: fx.Node, lead: int) -> Effect:
    d = normalize_dim(op_arg(node, 1, "dim"), _rank(node) + 1)
    if d is None or d < lead:
        return _mix("shape", f"unsqueeze({op_arg(node, 1, 'dim')}) puts a new dim before the row dim", dims=(d,) if d is not None else ())
    return Effect("keep", "shape", lead, dims=(d,))


@rule(aten.squeeze, family="shape")
def _squeeze(node: fx.Node, lead: int) -> Effect:
    rank = _rank(node)
    dims = op_arg(node, 1, "dim", None) if len(node.args) > 1 or "dim" in node.kwargs else None
    if dims is None:
        src = tensor_value(node.args[0])
        if src is None or any(not isinstance(src.shape[i], int) or src.shape[i] == 1 for i in range(lead)):
            return _mix("shape", "squeeze() may drop the row dim (a size-1 or symbolic row count)")
        return Effect("keep", "shape", lead)
    norm = normalize_dims(dims, rank)
    if norm is None or any(d < lead for d in norm):
        return _mix("shape", "squeeze of the row dim", dims=norm or ())
    return Effect("keep", "shape", lead, dims=norm)


@rule(aten.transpose, family="shape")
def _transpose(node: fx.Node, lead: int) -> Effect:
    rank = _rank(node)
    d0, d1 = normalize_dim(op_arg(node, 1, "dim0"), rank), normalize_dim(op_arg(node, 2, "dim1"), rank)
    if d0 != d1 and (d0 is None or d1 is None or d0 < lead or d1 < lead):
        return _mix("shape", "transpose moves the row dim")
    return Effect("keep", "shape", lead)


@rule(aten.permute, family="shape")
def _permute(node: fx.Node, lead: int) -> Effect:
    rank = _rank(node)
    if [normalize_dim(d, rank) for d in list(op_arg(node, 1, "dims"))[:lead]] != list(range(lead)):
        return _mix("shape", "permute moves the row dim")
    return Effect("keep", "shape", lead)


@rule(aten.t, aten.movedim, aten.numpy_T, aten.mT, aten.swapaxes, aten.swapdims, family="shape")
def _moves(node: fx.Node, lead: int) -> Effect:
    if packet(node) is aten.t and _rank(node) < 2:
        return Effect("keep", "shape", lead)
    return _mix("shape", f"{op_display(node)} moves the row dim")


@rule(aten.select, aten.slice, aten.narrow, aten.unflatten, family="shape")
def _positional(node: fx.Node, lead: int) -> Effect:
    d = normalize_dim(op_arg(node, 1, "dim", 0), _rank(node))
    if d is not None and d < lead and _whole_slice(node):
        return Effect("keep", "shape", lead)  # ``x[:, 0]`` spells a full slice of dim 0 first
    if d is None or d < lead:
        return _mix("shape", f"{op_display(node)} along the row dim picks rows by position", dims=(d,) if d is not None else ())
    return Effect("keep", "shape", lead, dims=(d,))


def _whole_slice(node: fx.Node) -> bool:
    """``aten.slice(x, d, 0 | None, end, 1)`` with ``end`` at least the dim's size: every row, in order."""
    if packet(node) is not aten.slice:
        return False
    start, end, step = op_arg(node, 2, "start", None), op_arg(node, 3, "end", None), op_arg(node, 4, "step", 1)
    if start not in (None, 0) or step != 1:
        return False
    if end is None or (isinstance(end, int) and end >= 2**62):
        return True
    src, out = tensor_value(node.args[0]), tensor_value(node)
    d = normalize_dim(op_arg(node, 1, "dim", 0), src.dim()) if src is not None else None
    if d is None or out is None:
        return False
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return bool(statically_known_true(out.shape[d] == src.shape[d]))


@rule(aten.split, aten.split_with_sizes, aten.chunk, aten.unbind, aten.tensor_split, family="split")
def _split(node: fx.Node, lead: int) -> Effect:
    d = normalize_dim(op_arg(node, 2 if packet(node) is not aten.unbind else 1, "dim", 0), _rank(node))
    out = node.meta.get("val")
    n = len(out) if isinstance(out, (tuple, list)) else 0
    if d is None or d < lead:
        return _mix("split", f"{op_display(node)} along the row dim picks rows by position", outputs=n)
    return Effect("keep", "split", lead, outputs=n, dims=(d,))


#: ops along one dim: (schema name of the dim argument, default when absent); tuple results where noted.
_ALONG: dict[Any, tuple[str, Any, int]] = {
    aten.softmax: ("dim", None, 0),
    aten._softmax: ("dim", None, 0),
    aten.log_softmax: ("dim", None, 0),
    aten._log_softmax: ("dim", None, 0),
    aten._safe_softmax: ("dim", None, 0),
    aten.cumsum: ("dim", None, 0),
    aten.cumprod: ("dim", None, 0),
    aten.logcumsumexp: ("dim", None, 0),
    aten.cummax: ("dim", None, 2),
    aten.cummin: ("dim", None, 2),
    aten.sort: ("dim", -1, 2),
    aten.argsort: ("dim", -1, 0),
    aten.topk: ("dim", -1, 2),
    aten.kthvalue: ("dim", -1, 2),
    aten.msort: ("", 0, 0),
    aten.glu: ("dim", -1, 0),
}


@rule(*_ALONG, family="along")
def _along(node: fx.Node, lead: int) -> Effect:
    name, default, outputs = _ALONG[packet(node)]
    dim = op_arg(node, 1, name, default) if name else default
    d = normalize_dim(dim if dim is not None else default, _rank(node))
    if d is not None and d >= lead:
        return Effect("keep", "along", lead, outputs=outputs, dims=(d,))
    return _mix(
        "along", f"{op_display(node)} over the row dim (dim {dim}) combines rows", outputs=outputs, dims=(d,) if d is not None else ()
    )


_LINEAR = {aten.sum: "sum", aten.nansum: "sum", aten.mean: "mean"}
_REDUCE_OUTPUTS = {aten.max: 2, aten.min: 2, aten.var_mean: 2, aten.std_mean: 2, aten.median: 2, aten.mode: 2}


@rule(
    aten.sum,
    aten.nansum,
    aten.mean,
    aten.amax,
    aten.amin,
    aten.max,
    aten.min,
    aten.prod,
    aten.any,
    aten.all,
    aten.var,
    aten.std,
    aten.norm,
    aten.linalg_vector_norm,
    aten.logsumexp,
    aten.argmax,
    aten.argmin,
    aten.var_mean,
    aten.std_mean,
    aten.count_nonzero,
    aten.median,
    aten.mode,
    family="reduce",
)
def _reduce(node: fx.Node, lead: int) -> Effect:
    p = packet(node)
    rank = _rank(node)
    has_dim = any(a.name == "dim" for a in node.target._schema.arguments) if isinstance(node.target, torch._ops.OpOverload) else False
    dims = op_arg(node, 1, "dim") if has_dim else None
    if p in (aten.max, aten.min, aten.median, aten.mode) and not has_dim:
        outputs = 0  # max(x) / min(x): the one value over every element
    else:
        outputs = _REDUCE_OUTPUTS.get(p, 0)
    reduced = normalize_dims(dims if not isinstance(dims, int) else [dims], rank) if dims is not None else tuple(range(rank))
    if reduced is None:
        return _mix("reduce", f"{op_display(node)} over dims {dims} that are not understood", outputs=outputs)
    if not set(reduced) & set(range(lead)):
        return Effect("keep", "reduce", lead, outputs=outputs, dims=reduced)
    return Effect(
        "reduce",
        "reduce",
        linear=_LINEAR.get(p),
        outputs=outputs,
        dims=reduced,
        reason=f"{op_display(node)} over the row dim" + ("" if p in _LINEAR else " is not a sum"),
    )


@rule(aten.linear, aten.matmul, aten.mm, aten.addmm, aten.bmm, family="matmul")
def _matmul(node: fx.Node, lead: int) -> Effect:
    data = 1 if packet(node) is aten.addmm else 0
    ndim = tensor_ndim(node.args[data]) or 0
    if packet(node) is aten.bmm:
        # out[b] = a[b] @ w[b]: rows in dim 0 are kept exactly when BOTH operands carry the same rows there
        # (a per-row weight gathered for each row); an operand from outside varies along the rows -> the
        # caller refuses it (family "batch": operand roles are the caller's).
        if lead != 1:
            return _mix("batch", "bmm's batch dim 0 is not the whole row index", data=data)
        return Effect("keep", "batch", 1, data=data)
    if ndim <= lead:
        return _mix("matmul", f"{op_display(node)} contracts over the row dim", data=data)
    other = tensor_ndim(node.args[1 - data]) if packet(node) is aten.matmul else None
    if other is not None and other >= 3 and ndim >= 3:
        # batched matmul (``q @ k.transpose(-2, -1)`` of [B, h, S, d]): dim 0 is a batch dim of both operands
        if lead != 1:
            return _mix("batch", "a batched matmul's batch dim 0 is not the whole row index", data=data)
        return Effect("keep", "batch", 1, data=data)
    return Effect("keep", "matmul", lead, data=data)


@rule(aten.scaled_dot_product_attention, family="batch")
def _attention(node: fx.Node, lead: int) -> Effect:
    """softmax(q k^T + mask) v over [B, heads, S, d]: each batch entry (sequence) attends only to itself, so
    dim 0 is kept when it is the whole row index (whole-layer micro-batches); q, k, v and the mask are the
    caller's operands (family "batch")."""
    if lead != 1 or _rank(node) < 3:
        return _mix("batch", "attention mixes the tokens of a sequence: only whole sequences (dim 0 of [B, h, S, d]) "
                    "can be split")
    return Effect("keep", "batch", 1)


@rule(aten.cat, aten.stack, family="cat")
def _cat(node: fx.Node, lead: int) -> Effect:
    rank = tensor_ndim(node) or 1
    d = normalize_dim(op_arg(node, 1, "dim", 0), rank)
    if d is None or d < lead:
        return _mix("cat", f"{op_display(node)} along the row dim puts other rows between them", dims=(d,) if d is not None else ())
    return Effect("keep", "cat", lead, dims=(d,))


@rule(aten.gather, family="gather")
def _gather(node: fx.Node, lead: int) -> Effect:
    d = normalize_dim(op_arg(node, 1, "dim"), _rank(node))
    if d is None or d < lead:
        return _mix("gather", "gather along the row dim reads other rows", dims=(d,) if d is not None else ())
    return Effect("keep", "gather", lead, dims=(d,))


@rule(aten.one_hot, family="one_hot")
def _one_hot(node: fx.Node, lead: int) -> Effect:
    return Effect("keep", "one_hot", lead)


@rule(aten.layer_norm, aten.rms_norm, aten.native_layer_norm, family="norm")
def _norm(node: fx.Node, lead: int) -> Effect:
    shape = op_arg(node, 1, "normalized_shape")
    outputs = 3 if packet(node) is aten.native_layer_norm else 0
    if _rank(node) - len(shape) < lead:
        return _mix("norm", f"{op_display(node)} normalises over the row dim", outputs=outputs)
    return Effect("keep", "norm", lead, outputs=outputs)


@rule(aten.histc, aten.bincount, family="count")
def _count(node: fx.Node, lead: int) -> Effect:
    return Effect("reduce", "count", linear="count", dims=tuple(range(_rank(node))), reason=f"{op_display(node)} counts over every row")


def broadcast_spans_rows(operand_shape: tuple[Any, ...], out_rank: int, lead: int) -> bool:
    """Whether an operand broadcast (right-aligned) against an ``out_rank`` result varies along its first
    ``lead`` dims: a value from outside the rows that differs from row to row cannot be split with them."""
    offset = out_rank - len(operand_shape)
    return any(i >= offset and not (isinstance(operand_shape[i - offset], int) and operand_shape[i - offset] == 1) for i in range(lead))


def with_lead(e: Effect, lead: int) -> Effect:
    return replace(e, lead=lead)


def prod(values: Any) -> Any:
    """Product of ints or SymInts (1 for none)."""
    out: Any = 1
    for v in values:
        out = out * v
    return out
