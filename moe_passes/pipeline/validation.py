"""Graph validation after a pass: structure, calling convention, dead nodes, fake-tensor re-propagation.

``validate(gm, before, example_inputs)`` checks a graph against ``GraphState.of``
the graph before the pass: ``graph.lint()``; no dangling users; the placeholders
(the calling convention Dynamo fixed) are untouched; no node the pass created is
dead; fake-tensor re-propagation of the whole graph **in the graph's own fake
mode** (``moe_passes.ir.fake_mode.repropagate``: inside a real compile,
Dynamo's) succeeds and the outputs keep their dtypes and ranks. ``GraphState`` is
also the roll-back point of a failed pass (``restore``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch.utils._pytree import tree_leaves

from moe_passes.errors import error_summary
from moe_passes.ir.facts import copy_node_attributes, node_value
from moe_passes.ir.fake_mode import repropagate


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule with a copy of ``gm``'s graph, sharing its parameters and submodules (and keeping
    the node attributes Dynamo sets outside ``meta``)."""
    graph = copy.deepcopy(gm.graph)
    copy_node_attributes(gm.graph, graph)
    copied = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    copied.meta = dict(getattr(gm, "meta", {}))
    for attr in ("_param_name_to_source",):
        if hasattr(gm, attr):
            setattr(copied, attr, getattr(gm, attr))
    return copied


def _dead_nodes(graph: fx.Graph) -> set[str]:
    return {
        n.name
        for n in graph.nodes
        if n.op not in ("placeholder", "output") and not n.users and not n.is_impure()
    }


def _output_signature(vals: Sequence[Any]) -> list[tuple[Any, ...]]:
    sig: list[tuple[Any, ...]] = []
    for v in vals:
        if isinstance(v, torch.Tensor):
            sig.append(("tensor", v.dtype, v.dim(), tuple(s if isinstance(s, int) else None for s in v.shape)))
        else:
            sig.append((type(v).__name__,))
    return sig


def _signature_mismatch(before: list[tuple[Any, ...]], after: list[tuple[Any, ...]]) -> str | None:
    if len(before) != len(after):
        return f"graph now returns {len(after)} values instead of {len(before)}"
    for i, (b, a) in enumerate(zip(before, after)):
        if b == ("NoneType",):  # no recorded value before the pass (hand-built graph): nothing to compare
            continue
        if b[0] != a[0] or (b[0] == "tensor" and (b[1] != a[1] or b[2] != a[2])):
            return f"output {i} changed from {b} to {a}"
        if b[0] == "tensor" and any(x is not None and y is not None and x != y for x, y in zip(b[3], a[3])):
            return f"output {i} changed shape from {b[3]} to {a[3]}"
    return None


def _flat_outputs(gm: fx.GraphModule, vals: dict[fx.Node, Any] | None = None) -> list[Any]:
    output = gm.graph.output_node()
    nodes = [a for a in tree_leaves(output.args) if isinstance(a, fx.Node)]
    if vals is None:
        return [node_value(n) for n in nodes]
    return [vals.get(n) for n in nodes]


@dataclass
class GraphState:
    """What validation compares against (and what a failed pass is rolled back to): the graph before a pass."""

    placeholders: list[str]
    dead: set[str]
    outputs: list[tuple[Any, ...]]
    gm: fx.GraphModule

    @classmethod
    def of(cls, gm: fx.GraphModule) -> "GraphState":
        return cls(
            placeholders=[n.name for n in gm.graph.find_nodes(op="placeholder")],
            dead=_dead_nodes(gm.graph),
            outputs=_output_signature(_flat_outputs(gm)),
            gm=copy_graph_module(gm),
        )

    def restore(self, gm: fx.GraphModule) -> None:
        """Put the graph back as it was (the pass's changes, including metadata it overwrote, are dropped)."""
        restored = copy.deepcopy(self.gm.graph)
        copy_node_attributes(self.gm.graph, restored)
        gm.graph = restored


#: Note recorded when re-propagation cannot run even on the unmodified graph.
REPROPAGATION_UNAVAILABLE = "fake-tensor re-propagation unavailable for this graph even before the pass"


def validate(gm: fx.GraphModule, before: GraphState, example_inputs: Sequence[Any]) -> tuple[list[str], list[str]]:
    """Check a graph after a pass; returns (problems, notes). Fills ``meta['val']`` on nodes the pass added.

    A note ``"fake-tensor re-propagation ran (N nodes)"`` says the strongest check ran.
    """
    problems: list[str] = []
    notes: list[str] = []
    graph = gm.graph
    try:
        graph.lint()
    except Exception as e:  # lint raises RuntimeError/AssertionError with the offending node
        problems.append(f"graph.lint() failed: {e}")
        return problems, notes
    nodes = set(graph.nodes)
    for node in graph.nodes:
        for user in node.users:
            if user not in nodes:
                problems.append(f"node {node.name} has a dangling user {user.name} that is not in the graph")
    placeholders = [n.name for n in graph.find_nodes(op="placeholder")]
    if placeholders != before.placeholders:
        problems.append(f"graph inputs changed from {before.placeholders} to {placeholders}")
    new_dead = sorted(_dead_nodes(graph) - before.dead)
    if new_dead:
        problems.append(f"dead nodes (no users, no side effects): {new_dead}")
    if problems:
        return problems, notes
    try:
        vals = repropagate(gm, example_inputs)
    except Exception as e:
        reason = error_summary(e)
        try:
            repropagate(before.gm, example_inputs)
        except Exception as e0:
            notes.append(f"{REPROPAGATION_UNAVAILABLE} ({error_summary(e0)})")
        else:
            problems.append(f"fake-tensor re-propagation failed: {reason}")
        return problems, notes
    notes.append(f"fake-tensor re-propagation ran ({len(vals)} nodes)")
    mismatch = _signature_mismatch(before.outputs, _output_signature(_flat_outputs(gm, vals)))
    if mismatch:
        problems.append(mismatch)
    for node, val in vals.items():
        if "val" not in node.meta and "example_value" not in node.meta and node.op != "output":
            node.meta["val"] = val
    return problems, notes
