"""Where each layer's partial sums go: at the end of their layer, never across a write.

Each per-layer node moves up to just before the first router-logits node that
follows its inputs -- the end of the layer that produced them, before the next
layer's router. There the layer's logits die with their layer, and nothing lands
inside a layer's own dispatch (Inductor mis-orders unbacked split sizes when
unrelated nodes sit between a router's top-k and the dispatch's ``.item()``).

A node is only moved above nodes that write none of its inputs (``ir.facts``:
mutation from schemas, views followed), and only if it is pure and not seeded
random. Inputs computed from graph inputs alone but placed late (mask
reshapes) move with it.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.fx as fx

from moe_passes.ir.facts import is_pure, writes_between


def _movable(node: fx.Node) -> bool:
    if not is_pure(node):
        return False
    t = node.target
    return not (isinstance(t, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in t.tags)


def input_only(graph: fx.Graph) -> set[fx.Node]:
    """Nodes computed from graph inputs (placeholders, attributes) alone by movable ops."""
    out: set[fx.Node] = set()
    for n in graph.nodes:
        if n.op in ("placeholder", "get_attr") or (_movable(n) and all(i in out for i in n.all_input_nodes)):
            out.add(n)
    return out


def late_input_only_ancestors(graph: fx.Graph, nodes: Iterable[fx.Node]) -> list[fx.Node]:
    early = input_only(graph)
    seen: set[fx.Node] = set(nodes)
    out: list[fx.Node] = []
    stack = [i for n in nodes for i in n.all_input_nodes]
    while stack:
        n = stack.pop()
        if n in seen or n not in early or n.op in ("placeholder", "get_attr"):
            continue
        seen.add(n)
        out.append(n)
        stack.extend(n.all_input_nodes)
    return out


def hoist(graph: fx.Graph, nodes: Iterable[fx.Node], boundaries: Iterable[fx.Node]) -> int:
    """Move ``nodes`` (and their late input-only ancestors) to the end of the layer their inputs come from."""
    nodes = [n for n in nodes if not n._erased and n.graph is graph]
    wanted = set(nodes) | set(late_input_only_ancestors(graph, nodes))
    bounds = [b for b in boundaries if b.graph is graph and not b._erased]
    moved = 0
    for node in [n for n in graph.nodes if n in wanted]:
        if not _movable(node):
            continue
        order = {n: i for i, n in enumerate(graph.nodes)}
        ready = max((order[i] for i in node.all_input_nodes), default=-1)
        later = sorted((b for b in bounds if order[b] > ready), key=order.__getitem__)
        if not later or order[later[0]] >= order[node]:
            continue
        barrier = later[0]
        if any(writes_between(i, barrier.prev, node) for i in node.all_input_nodes):
            continue  # an in-place write between here and there: the read stays after it
        barrier.prepend(node)
        moved += 1
    return moved
