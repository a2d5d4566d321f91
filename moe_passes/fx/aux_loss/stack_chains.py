"""A stack of per-layer values computed alike from each layer's router logits, computed on the stack instead.

Users write the stacked loss both ways::

    probs = torch.softmax(torch.stack(router_logits), -1)             # the stacked form the pass rewrites
    probs = torch.stack([torch.softmax(l, -1) for l in router_logits])  # the same numbers, stacked later

The second spelling (issue 23: ``torch.stack`` of per-layer softmaxes, ``F.one_hot(torch.stack(idx)).sum(2)``
of per-layer top-k indices) is the first with the stack moved below a chain of ops applied alike to every
layer. ``hoist`` moves it back up: when every input of a ``stack(dim=0)`` is the same chain (same ops, same
non-tensor arguments) of ops that act on each row of their input on its own (``moe_passes.ir.rows``:
pointwise, casts, ops along a non-row dim such as softmax/top-k over the experts, and ``getitem`` of their
tuple results) applied to one layer's router logits, the chain is replayed once on ``stack(logits)`` with
every dim written from the end (``-1`` in ``[T, E]`` is ``-1`` in ``[L, T, E]``), and the stack's readers
read that. Row by row it is the same computation, so the values are identical; the stacked-form rewrite
then makes it per-layer. The caller undoes the hoist when no rewrite follows (a pass that does not
rewrite leaves the graph as it was).
"""

from __future__ import annotations

import logging
import operator
from typing import Any

import torch
import torch.fx as fx

from moe_passes.ir import rows
from moe_passes.ir.facts import normalize_dim, schema_of, tensor_value
from moe_passes.ir.fake_mode import fake_eval

log = logging.getLogger(__name__)

aten = torch.ops.aten

_FAMILIES = ("pointwise", "identity", "along")


def _chain(node: fx.Node, logits: set[fx.Node]) -> tuple[fx.Node, list[fx.Node]] | None:
    """(the router logits at its root, the ops from them to ``node``, in order), or None."""
    ops: list[fx.Node] = []
    cur = node
    while cur not in logits:
        if cur.op != "call_function":
            return None
        if cur.target is operator.getitem:
            ops.append(cur)
            cur = cur.args[0]
            continue
        if len(cur.all_input_nodes) != 1 or not cur.args or cur.args[0] is not cur.all_input_nodes[0]:
            return None
        eff = rows.effect(cur, 1)
        if eff is None or not eff.keeps or eff.family not in _FAMILIES:
            return None
        ops.append(cur)
        cur = cur.args[0]
    return cur, list(reversed(ops))


def _leaves_graph(node: fx.Node) -> bool:
    """Whether ``node``'s value, or a view of it, is a graph output."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        for u in n.users:
            if u.op == "output":
                return True
            if u.op == "call_function" and (u.target is operator.getitem or rows.family_of(u) in ("view", "identity")):
                stack.append(u)
    return False


def _signature(op: fx.Node) -> tuple[Any, ...]:
    """What must be equal for two chain ops to compute alike (their input aside)."""
    return (op.target, tuple(op.args[1:]), tuple(sorted(op.kwargs.items())))


def _negative_dims(op: fx.Node, rank: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``op``'s arguments (input excluded) with each ``dim`` written from the end of a rank-``rank`` tensor."""
    args, kwargs = list(op.args[1:]), dict(op.kwargs)
    schema = schema_of(op)
    if schema is None:
        return tuple(args), kwargs
    for position, a in enumerate(schema.arguments):
        if a.name != "dim":
            continue
        if a.name in kwargs:
            d = normalize_dim(kwargs[a.name], rank)
            kwargs[a.name] = d - rank if d is not None else kwargs[a.name]
        elif 0 < position <= len(args):
            d = normalize_dim(args[position - 1], rank)
            args[position - 1] = d - rank if d is not None else args[position - 1]
    return tuple(args), kwargs


Plan = tuple[fx.Node, list[tuple[fx.Node, list[fx.Node]]], int]


def plan(graph: fx.Graph, router_logits: list[fx.Node]) -> list[Plan]:
    """(stack node, its inputs' chains, the logits' rank) for every stack ``hoist`` would move; empty: nothing
    to do."""
    logits = set(router_logits)
    plans = []
    for node in graph.nodes:
        if node.target is not aten.stack.default:
            continue
        tensors = node.args[0]
        if not isinstance(tensors, (list, tuple)) or len(tensors) < 2 or not all(isinstance(t, fx.Node) for t in tensors):
            continue
        vals = [tensor_value(t) for t in tensors]
        if any(v is None for v in vals) or normalize_dim(node.args[1] if len(node.args) > 1 else 0, vals[0].dim() + 1) != 0:
            continue
        if _leaves_graph(node):  # returned stacks (e.g. the selected experts for logging) exist anyway: not a loss's
            continue
        chains = [_chain(t, logits) for t in tensors]
        if any(c is None or not c[1] for c in chains):
            continue
        roots = [c[0] for c in chains]  # type: ignore[index]
        if len(set(roots)) != len(roots) or len({tuple(_signature(op) for op in c[1]) for c in chains}) != 1:  # type: ignore[index]
            continue
        ranks = {tensor_value(r).dim() if tensor_value(r) is not None else None for r in roots}
        if len(ranks) != 1 or None in ranks:
            continue
        plans.append((node, chains, ranks.pop()))  # type: ignore[arg-type]
    return plans


def hoist(graph: fx.Graph, plans: list[Plan]) -> list[fx.Node]:
    """Move every planned stack of alike per-layer chains above the chain (see the module docstring); returns
    the stack nodes it made."""
    made: list[fx.Node] = []
    shared: dict[tuple[fx.Node, ...], fx.Node] = {}  # one stack of the same logits for every chain
    for node, chains, rank in plans:
        roots = tuple(c[0] for c in chains)
        created: list[fx.Node] = []
        with graph.inserting_before(node):
            stacked = shared.get(roots)
            if stacked is None:
                stacked = graph.call_function(aten.stack.default, (list(roots), 0))
                stacked.meta.update({k: v for k, v in node.meta.items() if k in ("stack_trace", "nn_module_stack")})
                shared[roots] = stacked
                made.append(stacked)
                created.append(stacked)
            cur = stacked
            for op in chains[0][1]:
                if op.target is operator.getitem:
                    cur = graph.call_function(operator.getitem, (cur, op.args[1]))
                else:
                    source = tensor_value(op.args[0])
                    args, kwargs = _negative_dims(op, source.dim() if source is not None else rank)
                    cur = graph.call_function(op.target, (cur, *args), kwargs)
                cur.meta.update({k: v for k, v in op.meta.items() if k in ("stack_trace", "nn_module_stack")})
                created.append(cur)
        for n in created:
            fake_eval(n)  # the values the stacked-form rewrite reads (shapes, dtypes)
        node.replace_all_uses_with(cur)
        graph.erase_node(node)
        log.info("layerwise_aux_loss: %s: stack of %d alike per-layer chains (%s) computed on the stack of their logits",
                 node.name, len(chains), ", ".join(str(op.target) for op in chains[0][1]))
        for _root, ops in chains:  # the per-layer chains, unless something else reads them
            for op in reversed(ops):
                if not op.users:
                    graph.erase_node(op)
    return made
