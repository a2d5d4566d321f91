"""Shared matchers: collectives, waits, module grouping, MoE regions.

Passes, the memory estimate and the diff CLI all need to answer the same
questions ("is this node an all-to-all?", "which nodes belong to layer 3's MoE
block?"), in torch IR (Dynamo graphs: ``OpOverloadPacket`` targets) and in
ATen IR (post-grad graphs: ``OpOverload`` targets). Answering them in one
place keeps every pass agreeing on what a collective is.
"""

from __future__ import annotations

import operator
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

# Namespaces of functional collectives (plain and autograd-aware variants).
COLLECTIVE_NAMESPACES: tuple[str, ...] = ("_c10d_functional", "_c10d_functional_autograd", "c10d_functional")
WAIT_OPS: frozenset[str] = frozenset({"wait_tensor"})
ALL_TO_ALL_OPS: frozenset[str] = frozenset({"all_to_all_single"})


def op_namespace_and_name(target: Any) -> tuple[str, str] | None:
    """(namespace, op name) of an OpOverload / OpOverloadPacket target, else None."""
    if isinstance(target, torch._ops.OpOverload):
        return target.namespace, target._opname
    if isinstance(target, torch._ops.OpOverloadPacket):
        qualified = target._qualified_op_name  # "ns::name"
        ns, _, name = qualified.partition("::")
        return ns, name
    return None


def _functional_op(node: fx.Node) -> str | None:
    if node.op != "call_function":
        return None
    parsed = op_namespace_and_name(node.target)
    if parsed is None or parsed[0] not in COLLECTIVE_NAMESPACES:
        return None
    return parsed[1]


def is_wait(node: fx.Node) -> bool:
    """A ``wait_tensor`` on a functional collective's result."""
    return _functional_op(node) in WAIT_OPS


def is_collective(node: fx.Node) -> bool:
    """A functional collective (all_to_all, all_reduce, all_gather, ...), not a wait."""
    name = _functional_op(node)
    return name is not None and name not in WAIT_OPS


def is_all_to_all(node: fx.Node) -> bool:
    return _functional_op(node) in ALL_TO_ALL_OPS


def collective_kind(node: fx.Node) -> str | None:
    """Op name of a collective ("all_to_all_single", "all_reduce", ...), else None."""
    return _functional_op(node) if is_collective(node) else None


def collective_nodes(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if is_collective(n)]


def wait_nodes(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if is_wait(n)]


def waits_of(node: fx.Node) -> list[fx.Node]:
    """The ``wait_tensor`` nodes consuming a collective's output (directly or through getitem)."""
    waits: list[fx.Node] = []
    for user in node.users:
        if is_wait(user):
            waits.append(user)
        elif user.op == "call_function" and user.target is operator.getitem:
            waits.extend(u for u in user.users if is_wait(u))
    return waits


def module_path(node: fx.Node, depth: int | None = None) -> str | None:
    """Module path of a node from ``nn_module_stack``: innermost, or the entry at ``depth`` (0 = outermost)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    entries = list(stack.values())
    if depth is not None:
        if depth >= len(entries):
            return None
        entry = entries[depth]
    else:
        entry = entries[-1]
    return entry[0] if isinstance(entry, tuple) else str(entry)


def module_types(node: fx.Node) -> list[tuple[str, type | str]]:
    """(path, module type) pairs of a node's ``nn_module_stack``, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    return [(v[0], v[1]) if isinstance(v, tuple) else (str(v), "") for v in stack.values()]


def group_by_module(graph: fx.Graph, depth: int | None = None) -> "OrderedDict[str, list[fx.Node]]":
    """Nodes grouped by module path (first-appearance order); nodes outside any module are left out."""
    groups: OrderedDict[str, list[fx.Node]] = OrderedDict()
    for node in graph.nodes:
        path = module_path(node, depth)
        if path is not None:
            groups.setdefault(path, []).append(node)
    return groups


def is_topk(node: fx.Node) -> bool:
    """``torch.topk`` / ``Tensor.topk`` (torch IR) or ``aten.topk`` (ATen IR)."""
    if node.op == "call_method":
        return node.target == "topk"
    if node.op != "call_function":
        return False
    return node.target is torch.topk or op_namespace_and_name(node.target) == ("aten", "topk")


@dataclass
class MoERegion:
    """One MoE-like module: the nodes under a module path that holds all-to-all collectives."""

    path: str
    module_type: str
    nodes: list[fx.Node] = field(default_factory=list)
    all_to_alls: list[fx.Node] = field(default_factory=list)
    waits: list[fx.Node] = field(default_factory=list)

    def describe(self) -> str:
        return f"{self.path} ({self.module_type}: {len(self.all_to_alls)} all_to_all, {len(self.nodes)} nodes)"


def _type_name(t: type | str) -> str:
    return t.__name__ if isinstance(t, type) else str(t).rsplit(".", 1)[-1].strip("'>")


def find_moe_regions(graph: fx.Graph) -> list[MoERegion]:
    """Modules whose nodes contain all-to-all collectives: the innermost such module per collective.

    A collective is attributed to the innermost module on its ``nn_module_stack``
    whose nodes also include a top-k (the router), so the region spans route,
    dispatch, experts and combine even when the all-to-all itself is traced
    inside a helper module.
    """
    topk_paths: set[str] = set()
    for node in graph.nodes:
        if is_topk(node):
            topk_paths.update(p for p, _ in module_types(node))
    regions: OrderedDict[str, MoERegion] = OrderedDict()
    for node in graph.nodes:
        if not is_all_to_all(node):
            continue
        stack = module_types(node)
        chosen = next(((p, t) for p, t in reversed(stack) if p in topk_paths), stack[-1] if stack else None)
        if chosen is None:
            continue
        path, mtype = chosen
        region = regions.setdefault(path, MoERegion(path, _type_name(mtype)))
        region.all_to_alls.append(node)
        region.waits.extend(waits_of(node))
    for node in graph.nodes:
        for p, _ in module_types(node):
            if p in regions:
                regions[p].nodes.append(node)
                break
    return list(regions.values())
