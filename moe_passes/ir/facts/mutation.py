"""Mutation and aliasing: which inputs a node writes (by schema), writes between two points, storage aliases,
and the ops that write nothing (pure, pointwise)."""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from moe_passes.ir.facts.ops import schema_of
from moe_passes.ir.facts.values import node_value

# ---------------------------------------------------------------- mutation

#: In-place operator functions Dynamo may leave in a torch-IR graph.
INPLACE_FUNCTIONS: frozenset[Any] = frozenset(
    {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
     operator.iand, operator.ior, operator.ixor, operator.ipow, operator.imatmul}
)


def mutated_args(node: fx.Node) -> list[fx.Node]:
    """The input nodes a node writes in place.

    ATen: every argument whose schema entry has ``alias_info.is_write`` (``aten.clamp_``,
    ``aten.index_put_``, ``out=`` variants). torch IR: the ``self`` of a method ending in one
    underscore (``x.add_``, ``x.clamp_``), the target of ``operator.setitem``/``iadd``..., and
    the ``out=`` keyword of any call.
    """
    if node.op not in ("call_function", "call_method"):
        return []
    written: list[Any] = []
    schema = schema_of(node)
    if schema is not None:
        for i, arg in enumerate(schema.arguments):
            if arg.alias_info is not None and arg.alias_info.is_write:
                if arg.kwarg_only or i >= len(node.args):
                    written.append(node.kwargs.get(arg.name))
                else:
                    written.append(node.args[i])
    elif node.op == "call_method":
        name = node.target
        if isinstance(name, str) and name.endswith("_") and not name.endswith("__") and node.args:
            written.append(node.args[0])
    elif node.target in INPLACE_FUNCTIONS and node.args:
        written.append(node.args[0])
    if schema is None and "out" in node.kwargs:
        written.append(node.kwargs["out"])
    out: list[fx.Node] = []
    for w in written:
        fx.map_arg(w, lambda n: out.append(n) or n)
    return out


def is_mutation(node: fx.Node) -> bool:
    """Whether the node writes any of its inputs in place."""
    return bool(mutated_args(node))


def writes_between(value: fx.Node, start: fx.Node, end: fx.Node) -> list[fx.Node]:
    """Nodes strictly after ``start`` and before ``end`` (graph order) that write ``value`` or a view
    of it (a node that aliases its input through a view op counts as the same storage)."""
    aliases = storage_aliases(value)
    hits: list[fx.Node] = []
    inside = False
    for n in value.graph.nodes:
        if n is start:
            inside = True
            continue
        if n is end:
            break
        if inside and any(a in aliases for a in mutated_args(n)):
            hits.append(n)
    return hits


def _is_view(node: fx.Node) -> bool:
    schema = schema_of(node)
    if schema is not None:
        return bool(schema.returns) and schema.returns[0].alias_info is not None and not schema.returns[0].alias_info.is_write
    if node.op == "call_method":
        return node.target in {"view", "reshape", "view_as", "expand", "expand_as", "transpose", "permute", "t",
                               "squeeze", "unsqueeze", "flatten", "unflatten", "narrow", "select", "__getitem__",
                               "split", "chunk", "unbind", "detach", "as_strided", "diagonal", "contiguous", "T"}
    if node.op == "call_function" and node.target is operator.getitem:
        # Indexing a tensor may view it; picking one output of a multi-output op (top-k's values vs
        # indices) does not alias the siblings.
        base = node.args[0] if node.args else None
        return isinstance(node_value(base), torch.Tensor)
    return node.op == "call_function" and node.target in (torch.reshape, torch.flatten,
                                                           torch.transpose, torch.squeeze, torch.unsqueeze,
                                                           torch.narrow, torch.select, torch.split, torch.chunk,
                                                           torch.unbind, torch.detach)


def storage_aliases(value: fx.Node) -> set[fx.Node]:
    """``value`` and every node that may share its storage through view ops, in both directions
    (views of it, its base if it is a view, views of that base, ...)."""
    seen = {value}
    stack = [value]
    while stack:
        n = stack.pop()
        linked = [u for u in n.users if _is_view(u) and u.all_input_nodes[:1] == [n]]
        if _is_view(n) and n.all_input_nodes:
            linked.append(n.all_input_nodes[0])
        for m in linked:
            if m not in seen:
                seen.add(m)
                stack.append(m)
    return seen


def is_pointwise(node: fx.Node) -> bool:
    """An ATen op tagged ``torch.Tag.pointwise`` that writes none of its inputs."""
    return (node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
            and torch.Tag.pointwise in node.target.tags and not mutated_args(node))


def is_pure(node: fx.Node) -> bool:
    """A call that writes nothing and has no side effect (by schema; ``getitem`` of a result is pure)."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        return True
    if not isinstance(node.target, torch._ops.OpOverload):
        return False
    if mutated_args(node) or node.target._schema.is_mutable:
        return False
    return not node.is_impure()


def functional_form(target: Any) -> Any:
    """The out-of-place overload of an in-place ATen op (``aten.masked_fill_.Scalar`` ->
    ``aten.masked_fill.Scalar``: PyTorch's naming rule, same overload), or None. Tags such as
    ``pointwise`` are often only on the functional overload."""
    if not isinstance(target, torch._ops.OpOverload) or not target._opname.endswith("_") or target._opname.startswith("_"):
        return None
    packet = getattr(getattr(torch.ops, target.namespace), target._opname[:-1], None)
    return getattr(packet, target._overloadname, None) if packet is not None else None
