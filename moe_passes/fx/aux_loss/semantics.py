"""What the ATen ops the aux-loss analysis meets *mean*, one question per function.

The analysis reads the canonical pre-dispatch ATen IR (``moe_passes.ir.canonical``):
each op is an ``OpOverload`` with a schema, so an op is classified by its schema,
its tags (``torch.Tag.pointwise``) and a few explicit tables here, never by how the
user spelled it. Dims are normalised (``moe_passes.ir.facts.normalize_dim``);
in-place ops are recognised by schema (``moe_passes.ir.facts.mutated_args``) and are
never treated as pure.
"""

from __future__ import annotations

import logging
import operator
from typing import Any

import torch
import torch.fx as fx

from moe_passes.ir.facts import mutated_args, normalize_dim, tensor_value

log = logging.getLogger(__name__)

aten = torch.ops.aten

#: Value-preserving unary ops: same elements, maybe another dtype/device/layout (casts, moves, copies).
CASTS = frozenset({
    aten.to.dtype, aten.to.device, aten.to.dtype_layout, aten.to.other, aten._to_copy.default, aten.clone.default,
    aten.contiguous.default, aten.alias.default, aten.detach.default, aten.type_as.default, aten.lift_fresh_copy.default,
})
#: Shape ops that keep element order (row-major): rows stay rows if the row count per layer divides.
RESHAPES = frozenset({aten.view.default, aten.reshape.default, aten._unsafe_view.default})
#: ops with one ``dim`` argument (index 1 unless said) that act along that dim only, row by row otherwise.
DIM_OPS: dict[Any, tuple[int, Any]] = {
    aten.softmax.int: (1, None), aten._softmax.default: (1, None), aten.log_softmax.int: (1, None),
    aten._log_softmax.default: (1, None), aten.cumsum.default: (1, None), aten.topk.default: (2, -1),
    aten.sort.default: (1, -1), aten.max.dim: (1, None), aten.min.dim: (1, None), aten.argmax.default: (1, None),
    aten.argmin.default: (1, None), aten.unsqueeze.default: (1, None), aten.squeeze.dim: (1, None),
    aten.select.int: (1, None), aten.slice.Tensor: (1, 0),
}
#: ops reducing over a list of dims (index 1), keepdim at index 2.
DIMLIST_OPS = frozenset({aten.sum.dim_IntList, aten.mean.dim, aten.logsumexp.default, aten.amax.default,
                         aten.amin.default})
#: sums over rows: linear, so a sum of per-layer partials equals the whole.
ROW_SUMS = frozenset({aten.sum.dim_IntList, aten.sum.default, aten.mean.dim, aten.mean.default})
#: whole-tensor reductions that are not sums (never split by layer).
WHOLE_REDUCTIONS = frozenset({aten.max.default, aten.min.default, aten.prod.default, aten.median.default,
                              aten.var.default, aten.std.default, aten.amax.default, aten.amin.default,
                              aten.linalg_vector_norm.default, aten.any.default, aten.all.default})
SOFTMAXES = frozenset({aten.softmax.int, aten._softmax.default})
TUPLE_OPS = frozenset({aten.topk.default, aten.sort.default, aten.max.dim, aten.min.dim})
FLOAT_RANK = {torch.float16: 1, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``name`` (positional ``index``) with the schema default if absent."""
    if len(node.args) > index:
        return node.args[index]
    if name in node.kwargs:
        return node.kwargs[name]
    schema = getattr(node.target, "_schema", None)
    if schema is not None:
        for a in schema.arguments:
            if a.name == name and a.has_default_value():
                return a.default_value
    return default


def ndim(node: Any) -> int | None:
    v = tensor_value(node)
    return v.dim() if v is not None else None


def dtype(node: Any) -> torch.dtype | None:
    v = tensor_value(node)
    return v.dtype if v is not None else None


def is_pure(node: fx.Node) -> bool:
    """A call that writes nothing and has no side effect (by schema)."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        return True
    if not isinstance(node.target, torch._ops.OpOverload):
        return False
    if mutated_args(node) or node.target._schema.is_mutable:
        return False
    return not node.is_impure()


def is_pointwise(node: fx.Node) -> bool:
    return (isinstance(node.target, torch._ops.OpOverload) and torch.Tag.pointwise in node.target.tags
            and not mutated_args(node))


def is_cast(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in CASTS


def exact_cast(node: fx.Node) -> bool:
    """A cast whose output holds exactly the input's values: same dtype (a move or copy), or a float
    upcast (bf16 -> fp32 ...); never a downcast or a float -> int conversion."""
    if not is_cast(node) or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    src, out = dtype(node.args[0]), dtype(node)
    if src is None or out is None:
        return False
    if src == out:
        return True
    return src in FLOAT_RANK and out in FLOAT_RANK and FLOAT_RANK[out] > FLOAT_RANK[src]


def returns_written_self(node: fx.Node) -> bool:
    """An in-place op whose result *is* its first argument (``aten.clamp_``: returns ``Tensor(a!)``)."""
    schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
    return (schema is not None and bool(schema.returns) and schema.returns[0].alias_info is not None
            and schema.returns[0].alias_info.is_write and bool(node.args) and isinstance(node.args[0], fx.Node))


def through_exact_casts(node: Any) -> Any:
    """The tensor a chain of exact casts and in-place writes starts from (``x.to(dev).float()`` -> ``x``;
    ``x.clamp_(..)`` -> ``x``). This names *which* tensor, not its values at that point: whoever reuses
    a computation on it must check ``ir.facts.writes_between`` (``stats`` does)."""
    while isinstance(node, fx.Node) and (exact_cast(node) or returns_written_self(node)):
        node = node.args[0]
    return node


def norm_dims(dims: Any, rank: int) -> tuple[int, ...] | None:
    """A dim list (None / [] = all dims) as a sorted tuple of non-negative ints; None if not ints."""
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return tuple(range(rank))
    if isinstance(dims, int):
        dims = [dims]
    out = []
    for d in dims:
        n = normalize_dim(d, rank)
        if n is None:
            return None
        out.append(n)
    return tuple(sorted(set(out)))


def softmax_key(node: fx.Node) -> tuple[Any, ...] | None:
    """What a softmax computes: (source before exact casts, normalised dim, compute dtype).

    ``softmax(x.float(), -1)``, ``softmax(x, 1, dtype=float32)`` and ``_softmax(x.float(), 1, False)``
    of a 2-D bf16 ``x`` all have the same key: they are the same numbers.
    """
    if node.op != "call_function" or node.target not in SOFTMAXES:
        return None
    x = node.args[0]
    rank = ndim(x)
    if rank is None:
        return None
    dim = normalize_dim(arg(node, 1, "dim"), rank)
    if node.target is aten.softmax.int:
        compute = arg(node, 2, "dtype") or dtype(x)
    else:
        compute = torch.float32 if arg(node, 2, "half_to_float", False) else dtype(x)
    return (through_exact_casts(x), dim, compute)


def topk_key(node: fx.Node) -> tuple[Any, ...] | None:
    if node.op != "call_function" or node.target is not aten.topk.default:
        return None
    x = node.args[0]
    rank = ndim(x)
    if rank is None:
        return None
    return (x, arg(node, 1, "k"), normalize_dim(arg(node, 2, "dim", -1), rank), bool(arg(node, 3, "largest", True)),
            bool(arg(node, 4, "sorted", True)))


def is_static(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def known_equal(a: Any, b: Any) -> bool:
    """``a == b`` for ints or SymInts, only when provable (never guards)."""
    if is_static(a) and is_static(b):
        return a == b
    try:
        from torch.fx.experimental.symbolic_shapes import statically_known_true

        return bool(statically_known_true(a == b))
    except Exception:  # noqa: BLE001 - unknown means not equal
        return False


def prod(values: Any) -> Any:
    out: Any = 1
    for v in values:
        out = out * v
    return out
