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
from typing import Any

import torch
import torch.fx as fx

from moe_passes.ir.facts import normalize_dim, op_arg, tensor_dtype, tensor_ndim

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


def is_cast(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in CASTS


def exact_cast(node: fx.Node) -> bool:
    """A cast whose output holds exactly the input's values: same dtype (a move or copy), or a float
    upcast (bf16 -> fp32 ...); never a downcast or a float -> int conversion."""
    if not is_cast(node) or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    src, out = tensor_dtype(node.args[0]), tensor_dtype(node)
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


def softmax_key(node: fx.Node) -> tuple[Any, ...] | None:
    """What a softmax computes: (source before exact casts, normalised dim, compute dtype).

    ``softmax(x.float(), -1)``, ``softmax(x, 1, dtype=float32)`` and ``_softmax(x.float(), 1, False)``
    of a 2-D bf16 ``x`` all have the same key: they are the same numbers.
    """
    if node.op != "call_function" or node.target not in SOFTMAXES:
        return None
    x = node.args[0]
    rank = tensor_ndim(x)
    if rank is None:
        return None
    dim = normalize_dim(op_arg(node, 1, "dim"), rank)
    if node.target is aten.softmax.int:
        compute = op_arg(node, 2, "dtype") or tensor_dtype(x)
    else:
        compute = torch.float32 if op_arg(node, 2, "half_to_float", False) else tensor_dtype(x)
    return (through_exact_casts(x), dim, compute)


def topk_key(node: fx.Node) -> tuple[Any, ...] | None:
    if node.op != "call_function" or node.target is not aten.topk.default:
        return None
    x = node.args[0]
    rank = tensor_ndim(x)
    if rank is None:
        return None
    return (x, op_arg(node, 1, "k"), normalize_dim(op_arg(node, 2, "dim", -1), rank), bool(op_arg(node, 3, "largest", True)),
            bool(op_arg(node, 4, "sorted", True)))


def prod(values: Any) -> Any:
    out: Any = 1
    for v in values:
        out = out * v
    return out
