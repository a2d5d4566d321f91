"""Counts for the diff summary, read off what they count: the FX graph's nodes, the output code's calls.

Nodes, collectives and waits come from the graph (``moe_passes.ir.facts``),
not from its printed text. Inductor's output code has no graph, so its
collectives and waits are the *calls* in the parsed Python module: the
``assert_size_stride(..., 'torch.ops._c10d_functional....')`` messages and
comments that name the same ops are strings, and are not counted.
"""

from __future__ import annotations

import ast
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

log = logging.getLogger(__name__)


@dataclass
class Counts:
    """What a summary compares between before and after."""

    ops: Counter[str] = field(default_factory=Counter)
    collectives: int = 0
    waits: int = 0

    @property
    def nodes(self) -> int:
        return sum(self.ops.values())


def _op_name(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"module:{node.target}"
    target = node.target
    return f"{node.op}:{getattr(target, '__name__', None) or str(target)}"


def graph_counts(graph: fx.GraphModule | fx.Graph) -> Counts:
    """Computation nodes by op (placeholders, outputs and attribute reads left out), collectives, waits."""
    from moe_passes.ir.facts import collective_nodes, wait_nodes

    g = graph.graph if isinstance(graph, fx.GraphModule) else graph
    ops: Counter[str] = Counter(_op_name(n) for n in g.nodes if n.op in ("call_function", "call_method", "call_module"))
    return Counts(ops, len(collective_nodes(g)), len(wait_nodes(g)))


def _dotted(func: ast.expr) -> str:
    parts: list[str] = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def output_code_counts(code: str) -> Counts:
    """Calls in Inductor's Python output code: every call by dotted name, c10d collectives and waits."""
    try:
        tree = ast.parse(code)
    except SyntaxError as e:  # C++ wrapper code: no Python calls to count
        log.info("output code is not Python (%s); no call counts", e)
        return Counts()
    ops: Counter[str] = Counter()
    collectives = waits = 0
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        ops[name] += 1
        if "_c10d_functional" in name or "c10d_functional" in name:
            if "wait_tensor" in name:
                waits += 1
            else:
                collectives += 1
    return Counts(ops, collectives, waits)


def count_delta(before: Counts, after: Counts) -> dict[str, Any]:
    return {
        "nodes_added": sum((after.ops - before.ops).values()),
        "nodes_removed": sum((before.ops - after.ops).values()),
        "collectives": f"{before.collectives} -> {after.collectives}",
        "waits": f"{before.waits} -> {after.waits}",
    }
