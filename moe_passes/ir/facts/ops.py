"""Op identity: one name per op in both IRs, schema-aware argument reading, pointwise / pure by tags and schemas."""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

# ---------------------------------------------------------------- op identity


def op_namespace_and_name(target: Any) -> tuple[str, str] | None:
    """(namespace, op name) of an OpOverload / OpOverloadPacket / HigherOrderOperator target."""
    if isinstance(target, torch._ops.OpOverload):
        return target.namespace, target._opname
    if isinstance(target, torch._ops.OpOverloadPacket):
        ns, _, name = target._qualified_op_name.partition("::")
        return ns, name
    if isinstance(target, torch._ops.HigherOrderOperator):
        return "higher_order", target.name()
    return None


def op_label(node: fx.Node) -> str | None:
    """``"aten.softmax"`` style name of a call on an OpOverload / packet (overload dropped); None otherwise."""
    parsed = op_namespace_and_name(node.target) if node.op == "call_function" else None
    return f"{parsed[0]}.{parsed[1]}" if parsed else None


def schema_of(node: fx.Node) -> torch.FunctionSchema | None:
    """The ATen schema of a ``call_function`` node on an OpOverload (None otherwise)."""
    if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
        return node.target._schema
    return None


def op_arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``name`` of a call: keyword, else positional, else its schema default, else ``default``.

    One reading for every analysis: ``softmax(x, dim=1)``, ``softmax(x, 1)`` and an omitted
    argument with a schema default all give the same answer. With a schema the position is the
    schema's (``dim`` is argument 2 of ``linalg_vector_norm(self, ord, dim, ...)``, argument 1 of
    ``sum.dim_IntList``), never assumed; ``index`` is used only for targets without one."""
    if name in node.kwargs:
        return node.kwargs[name]
    schema = schema_of(node)
    if schema is None:
        return node.args[index] if len(node.args) > index else default
    for position, a in enumerate(schema.arguments):
        if a.name != name:
            continue
        if not a.kwarg_only and len(node.args) > position:
            return node.args[position]
        return a.default_value if a.has_default_value() else default
    return default


def aten_name(node: fx.Node) -> str | None:
    """``"softmax"`` for ``aten.softmax.int`` / ``aten.softmax`` packets; None for other namespaces."""
    if node.op != "call_function":
        return None
    parsed = op_namespace_and_name(node.target)
    return parsed[1] if parsed is not None and parsed[0] == "aten" else None


# ---------------------------------------------------------------- one name per op, both IRs

#: torch-IR functions, by meaning (ATen ops are named by their schema; methods by their name).
_TORCH_FUNCTIONS: dict[Any, str] = {
    F.linear: "linear", torch._C._nn.linear: "linear", torch.matmul: "matmul", operator.matmul: "matmul",
    torch.mm: "mm", torch.addmm: "addmm",
    F.softmax: "softmax", torch.softmax: "softmax", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid",
    F.log_softmax: "log_softmax", torch.log_softmax: "log_softmax",
    torch.cat: "cat", torch.concat: "cat", torch.stack: "stack",
    operator.add: "add", torch.add: "add", operator.sub: "sub", torch.sub: "sub",
    torch.flatten: "flatten", torch.reshape: "reshape", torch.squeeze: "squeeze", torch.unsqueeze: "unsqueeze",
    torch.clone: "clone", torch.detach: "detach",
}
#: ATen/method spellings folded onto one meaning.
_SYNONYMS = {
    "_softmax": "softmax", "_safe_softmax": "softmax", "_log_softmax": "log_softmax", "_to_copy": "to",
    "_unsafe_view": "view", "concat": "cat", "concatenate": "cat", "alias": "detach", "float": "to",
    "type": "to", "type_as": "to", "view_as": "view", "reshape_as": "reshape", "lift_fresh_copy": "clone",
}


def op_meaning(node: fx.Node) -> str | None:
    """One name per op whatever its spelling: ``"softmax"`` for ``F.softmax``, ``.softmax``, ``aten.softmax.int``."""
    if node.op == "call_method":
        name = str(node.target)
    elif node.op == "call_function":
        name = aten_name(node) or _TORCH_FUNCTIONS.get(node.target)
        if name is None:
            return None
    else:
        return None
    return _SYNONYMS.get(name, name)



# ---------------------------------------------------------------- library ops with an ATen meaning

#: Custom ops (opaque to ATen: a library's ``torch.library`` op) whose result is, by their library's own
#: definition, that of an ATen op: declared once here for every analysis, and checked numerically against
#: that op for each installed library by ``tests/test_custom_op_meanings.py`` (so a library that changes
#: what its op computes fails there, not silently in a rewrite).
CUSTOM_OP_MEANINGS: dict[str, str] = {
    "moe_models.grouped_mm": "aten._grouped_mm",  # this package's reference model
    "transformers.grouped_mm_fallback": "aten._grouped_mm",  # transformers' CPU grouped GEMM (its ONNX export says so too)
    "torchtitan.deterministic_scatter_add": "aten.scatter_add",  # along dim 0: scatter_add(out, 0, index, src)
}


def op_meaning_label(node: fx.Node) -> str | None:
    """``op_label`` with library ops read as the ATen op they mean (``CUSTOM_OP_MEANINGS``)."""
    label = op_label(node)
    return CUSTOM_OP_MEANINGS.get(label, label) if label is not None else None


def is_grouped_mm(node: fx.Node) -> bool:
    """``aten._grouped_mm`` or a library op that means it (rows x 3-D weights, groups cut by offsets)."""
    return op_meaning_label(node) == "aten._grouped_mm"


# ---------------------------------------------------------------- allocations

#: ATen ops whose result is a fresh tensor that reads no input's data, by where its shape comes from:
#: its own size arguments; an input's shape (``*_like``); its own sizes with an input's dtype and device (``new_*``).
FRESH_FROM_SIZES = frozenset({"aten.zeros", "aten.empty", "aten.full", "aten.ones", "aten.empty_strided"})
FRESH_LIKE_INPUT = frozenset({"aten.zeros_like", "aten.empty_like", "aten.ones_like", "aten.full_like"})
FRESH_NEW = frozenset({"aten.new_zeros", "aten.new_empty", "aten.new_ones", "aten.new_full", "aten.new_empty_strided"})
ALLOCATIONS = FRESH_FROM_SIZES | FRESH_LIKE_INPUT | FRESH_NEW
#: Of those, the ones filled with zeros.
ZERO_ALLOCATIONS = frozenset({"aten.zeros", "aten.zeros_like", "aten.new_zeros"})


def is_allocation(node: fx.Node) -> bool:
    """A fresh tensor (``ALLOCATIONS``): nothing it holds was read from another tensor."""
    return op_label(node) in ALLOCATIONS


# ---------------------------------------------------------------- routers


def is_topk(node: fx.Node) -> bool:
    """``torch.topk`` / ``Tensor.topk`` (torch IR) or ``aten.topk`` (ATen IR)."""
    if node.op == "call_method":
        return node.target == "topk"
    if node.op != "call_function":
        return False
    return node.target is torch.topk or op_namespace_and_name(node.target) == ("aten", "topk")


def is_softmax(node: fx.Node) -> bool:
    """Any spelling of softmax: ``F.softmax``/``torch.softmax``/``.softmax``/``aten.softmax``/``aten._softmax``."""
    if node.op == "call_method":
        return node.target == "softmax"
    if node.op != "call_function":
        return False
    if node.target in (torch.softmax, torch.nn.functional.softmax, torch.special.softmax):
        return True
    return aten_name(node) in ("softmax", "_softmax", "_safe_softmax")
