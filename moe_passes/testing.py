"""Testing utilities for passes, kept out of the product code paths (like ``torch.testing``).

``run_pass`` runs one pre-grad pass on a graph the way the pipeline would hand it over: an
``"aten"`` pass gets the canonical ATen IR (re-traced here, in place, as ``PassManager`` does
before the first ``"aten"`` pass), and a graph whose re-trace is refused gets the same skip the
manager reports. Unlike the manager, it does not fail closed: a pass that raises raises here, so a
test sees the error instead of a rolled-back graph.

``group_by_module`` / ``find_module_regions`` group a graph's nodes by ``nn_module_stack`` for
tests that check a pass's work module by module; no pass decides from them.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch.fx as fx

from moe_passes.ir.canonical import canonicalize_in_place, is_canonical
from moe_passes.ir.facts import is_all_to_all, is_topk, module_path, module_types, type_name, waits_of
from moe_passes.pipeline.pass_base import GraphPass, PassResult


def run_pass(graph_pass: GraphPass, gm: fx.GraphModule, example_inputs: Sequence[Any] = ()) -> PassResult:
    """Canonicalise ``gm`` in place when ``graph_pass`` reads the ATen IR, then run the pass on it."""
    if graph_pass.ir == "aten" and not is_canonical(gm):
        why = canonicalize_in_place(gm, example_inputs)
        if why is not None:
            result = PassResult(graph_pass.name)
            result.skip("graph", f"canonical ATen IR unavailable: {why}")
            return result
    return graph_pass(gm)


def group_by_module(graph: fx.Graph, depth: int | None = None) -> "OrderedDict[str, list[fx.Node]]":
    """Nodes grouped by module path (first-appearance order); nodes outside any module are left out."""
    groups: OrderedDict[str, list[fx.Node]] = OrderedDict()
    for node in graph.nodes:
        path = module_path(node, depth)
        if path is not None:
            groups.setdefault(path, []).append(node)
    return groups


@dataclass
class ModuleRegion:
    """The nodes of one module that holds all-to-all collectives (for reports, estimates, the CLI).

    This is a grouping by ``nn_module_stack`` only; a pass that rewrites a region proves its own
    region by data flow (e.g. ``moe_passes.fx.domino``) and must not rely on this grouping.
    """

    path: str
    module_type: str
    nodes: list[fx.Node] = field(default_factory=list)
    all_to_alls: list[fx.Node] = field(default_factory=list)
    waits: list[fx.Node] = field(default_factory=list)

    def describe(self) -> str:
        return f"{self.path} ({self.module_type}: {len(self.all_to_alls)} all_to_all, {len(self.nodes)} nodes)"


def find_module_regions(graph: fx.Graph) -> list[ModuleRegion]:
    """Modules whose nodes contain all-to-all collectives: per collective, the innermost module on its
    ``nn_module_stack`` that also holds a top-k (the router), else its innermost module."""
    topk_paths: set[str] = set()
    for node in graph.nodes:
        if is_topk(node):
            topk_paths.update(p for p, _ in module_types(node))
    regions: OrderedDict[str, ModuleRegion] = OrderedDict()
    for node in graph.nodes:
        if not is_all_to_all(node):
            continue
        stack = module_types(node)
        chosen = next(((p, t) for p, t in reversed(stack) if p in topk_paths), stack[-1] if stack else None)
        if chosen is None:
            continue
        path, mtype = chosen
        region = regions.setdefault(path, ModuleRegion(path, type_name(mtype)))
        region.all_to_alls.append(node)
        region.waits.extend(waits_of(node))
    for node in graph.nodes:
        for p, _ in module_types(node):
            if p in regions:
                regions[p].nodes.append(node)
                break
    return list(regions.values())
