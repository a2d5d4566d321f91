"""What in a graph makes each built-in pass applicable (its *trigger*), by meaning, in both IRs.

``GraphPass.trigger(gm)`` falls back to these until a pass overrides it. A trigger
is a short description of what was seen ("2 all_to_all collectives"), or None
when the graph holds nothing the pass is for (e.g. the first graph of a model
with a graph break): a requested pass that changes nothing in a triggered graph
must say why (WARNING, and ``strict=True`` raises); in an untriggered graph it is
silent.
"""

from __future__ import annotations

import operator
from typing import Callable

import torch.fx as fx
from torch.utils._pytree import tree_leaves

from moe_passes.ir.facts import is_all_to_all, is_softmax, is_topk, tensor_value


def all_to_all_trigger(gm: fx.GraphModule) -> str | None:
    """Domino EP: the graph issues all-to-all collectives."""
    n = sum(1 for node in gm.graph.nodes if is_all_to_all(node))
    return f"{n} all_to_all collective(s)" if n else None


def _scalar_float_outputs(gm: fx.GraphModule) -> list[fx.Node]:
    out = gm.graph.output_node()
    found = []
    for a in tree_leaves(out.args):
        v = tensor_value(a) if isinstance(a, fx.Node) else None
        if v is not None and v.dim() == 0 and v.is_floating_point():
            found.append(a)
    return found


def router_loss_trigger(gm: fx.GraphModule) -> str | None:
    """Layer-wise aux loss: a router (softmax and top-k) and a scalar loss the graph returns."""
    softmaxes = sum(1 for n in gm.graph.nodes if is_softmax(n))
    topks = sum(1 for n in gm.graph.nodes if is_topk(n))
    losses = _scalar_float_outputs(gm)
    if softmaxes and topks and losses:
        return f"{softmaxes} softmax, {topks} top-k and {len(losses)} scalar output(s)"
    return None


_PASS_THROUGH_METHODS = {"float", "to", "type", "view", "reshape", "detach", "contiguous", "flatten"}


def _router_source(node: fx.Node, depth: int = 4) -> fx.Node | None:
    """The softmax/top-k a value comes from through getitem, casts and views (a few steps)."""
    for _ in range(depth):
        if is_softmax(node) or is_topk(node):
            return node
        if node.op == "call_function" and node.target is operator.getitem:
            pass
        elif node.op == "call_method" and node.target in _PASS_THROUGH_METHODS:
            pass
        elif node.op == "call_function" and getattr(node.target, "__name__", "").split(".")[0] in (
            "_to_copy", "view", "reshape", "clone", "detach", "alias", "_unsafe_view", "to"
        ):
            pass
        else:
            return None
        inputs = node.all_input_nodes
        if not inputs:
            return None
        node = inputs[0]
    return node if (is_softmax(node) or is_topk(node)) else None


def router_output_trigger(gm: fx.GraphModule) -> str | None:
    """Async offload: router tensors (softmax / top-k results) leave the graph as outputs."""
    out = gm.graph.output_node()
    hits = {a.name for a in tree_leaves(out.args) if isinstance(a, fx.Node) and _router_source(a) is not None}
    return f"{len(hits)} router tensor(s) among the graph outputs" if hits else None


DEFAULT_TRIGGERS: dict[str, Callable[[fx.GraphModule], str | None]] = {
    "domino_ep": all_to_all_trigger,
    "layerwise_aux_loss": router_loss_trigger,
    "async_offload": router_output_trigger,
}


def default_trigger(name: str, gm: fx.GraphModule) -> str | None:
    """The built-in trigger of pass ``name``; for a pass without one, every graph with a node is one."""
    fn = DEFAULT_TRIGGERS.get(name)
    if fn is not None:
        return fn(gm)
    n = sum(1 for node in gm.graph.nodes if node.op not in ("placeholder", "output"))
    return f"a graph of {n} operations" if n else None
