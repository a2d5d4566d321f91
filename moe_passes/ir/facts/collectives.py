"""Collectives and their waits, in every spelling torch 2.11-2.13 traces (functional, autograd-aware, in-place c10d)."""

from __future__ import annotations

import operator
from typing import Any

import torch.fx as fx

from moe_passes.ir.facts.ops import op_namespace_and_name

# ---------------------------------------------------------------- collectives

#: Namespaces of functional collectives across torch 2.11-2.13: plain, autograd-aware, legacy.
COLLECTIVE_NAMESPACES: tuple[str, ...] = ("_c10d_functional", "_c10d_functional_autograd", "c10d_functional")
#: Traced in-place c10d ops (``c10d.alltoall_base_`` ...): recognised so passes can refuse them by name.
INPLACE_C10D_NAMESPACE = "c10d"
WAIT_OPS: frozenset[str] = frozenset({"wait_tensor"})
ALL_TO_ALL_OPS: frozenset[str] = frozenset({"all_to_all_single"})


def _functional_collective_name(node: fx.Node) -> str | None:
    if node.op != "call_function":
        return None
    parsed = op_namespace_and_name(node.target)
    if parsed is None or parsed[0] not in COLLECTIVE_NAMESPACES:
        return None
    return parsed[1]


def is_wait(node: fx.Node) -> bool:
    """A ``wait_tensor`` on a functional collective's result."""
    return _functional_collective_name(node) in WAIT_OPS


def is_collective(node: fx.Node) -> bool:
    """A functional collective (all_to_all, all_reduce, all_gather, ...), not a wait."""
    name = _functional_collective_name(node)
    return name is not None and name not in WAIT_OPS


def is_all_to_all(node: fx.Node) -> bool:
    return _functional_collective_name(node) in ALL_TO_ALL_OPS


def is_inplace_c10d(node: fx.Node) -> bool:
    """A traced in-place c10d collective (not functional): its effects are not data flow."""
    if node.op != "call_function":
        return False
    parsed = op_namespace_and_name(node.target)
    return parsed is not None and parsed[0] == INPLACE_C10D_NAMESPACE


def collective_kind(node: fx.Node) -> str | None:
    """Op name of a collective ("all_to_all_single", "all_reduce", ...), else None."""
    return _functional_collective_name(node) if is_collective(node) else None


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


def all_to_all_split_args(node: fx.Node) -> tuple[Any, Any] | None:
    """(output_split_sizes, input_split_sizes) of an ``all_to_all_single`` node, either spelling."""
    if not is_all_to_all(node):
        return None
    args = list(node.args) + [None] * 4
    out_split = node.kwargs.get("output_split_sizes", args[1])
    in_split = node.kwargs.get("input_split_sizes", args[2])
    return out_split, in_split
