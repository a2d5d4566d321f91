"""What the aux-loss recognition asks of ops beyond rows: which casts are exact, which softmax / top-k
computes the same numbers as another.

What an op does to rows (keeps them, reduces them, mixes them) is the one row analysis's answer
(``moe_passes.ir.rows``); this module only names the loss's own equivalences, on the canonical
pre-dispatch ATen IR (``moe_passes.ir.canonical``), by schema and normalised dims.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from moe_passes.ir.facts import normalize_dim, op_arg, tensor_dtype, tensor_ndim, tensor_value
from moe_passes.ir.rows import family_of

aten = torch.ops.aten

SOFTMAXES = frozenset({aten.softmax.int, aten._softmax.default})
FLOAT_RANK = {torch.float16: 1, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}


def is_cast(node: fx.Node) -> bool:
    """A value-preserving unary op (cast, move, copy): the row analysis's ``identity`` family."""
    return node.op == "call_function" and family_of(node) == "identity" and tensor_value(node) is not None


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
