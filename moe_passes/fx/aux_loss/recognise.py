"""Find router logits and the losses over them by what they compute (canonical ATen IR).

* **Router logits**: the tensor a router's top-k selection is computed from --
  ``topk(x)`` or ``topk(softmax(x))``, looking through exact casts and moves
  (``.float()``, ``.to(device)``, same-dtype copies), computed in this graph (a
  graph input is a router's output from another graph; a top-k of it is a loss's).
  The softmax on that chain is the layer's *router softmax*.
* **Stacked loss** (one group per set of layers): ``cat`` on dim 0 or ``stack`` on
  dim 0 of >= 2 floating tensors, each router logits (through exact casts) or a
  graph input (regional compile: every layer's logits arrive as inputs), with a
  softmax / logsumexp below it. Cats/stacks of the same layers (balancing loss and
  z-loss) form one group, rewritten together or not at all.
* **Loop-form loss** (transformers >= 5 writes it per layer): a softmax or
  logsumexp of one layer's router logits (through exact casts) that is not the
  router's own softmax.

Whether the region below is really a loss that sums over rows is then *proven*
by ``rewrite.Rewriter``; recognition only proposes candidates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from moe_passes.fx.aux_loss import semantics as sem
from moe_passes.fx.aux_loss.rewrite import Source
from moe_passes.ir.facts import normalize_dim, op_arg, tensor_ndim, tensor_value

aten = torch.ops.aten
LOSS_ENTRY_OPS = frozenset({aten.softmax.int, aten._softmax.default, aten.logsumexp.default, aten.log_softmax.int,
                            aten._log_softmax.default})


@dataclass
class Routers:
    logits: list[fx.Node] = field(default_factory=list)  # graph order
    softmax: dict[fx.Node, fx.Node] = field(default_factory=dict)  # logits -> router softmax
    topk: dict[fx.Node, fx.Node] = field(default_factory=dict)


@dataclass
class StackedGroup:
    logits: tuple[fx.Node, ...]  # per layer, through exact casts
    sources: list[Source] = field(default_factory=list)
    from_inputs: bool = False  # every layer's logits is a graph input (regional compile)

    def describe(self) -> str:
        kinds = "/".join(sorted({s.kind for s in self.sources}))
        return f"{kinds} of {len(self.logits)} router logits ({', '.join(s.node.name for s in self.sources)})"


def find_routers(graph: fx.Graph) -> Routers:
    out = Routers()
    for node in graph.nodes:
        if node.target is not aten.topk.default:
            continue
        x = _through_expert_split(sem.through_exact_casts(node.args[0]))
        soft = None
        if isinstance(x, fx.Node) and sem.softmax_key(x) is not None:
            soft = x
            x = sem.softmax_key(x)[0]
        else:
            x = _through_sigmoid_scores(x)
        if not isinstance(x, fx.Node) or x.target in (aten.cat.default, aten.stack.default) or x in out.topk:
            continue
        if x.op == "placeholder":
            continue  # logits computed in another graph: this top-k is a loss's, not a router's
        if soft is not None and normalize_dim(op_arg(soft, 1, "dim"), tensor_ndim(soft) or 0) != (tensor_ndim(soft) or 0) - 1:
            pass  # a router softmax over another dim is still the router's: the loss never reuses it (keys differ)
        out.logits.append(x)
        out.topk[x] = node
        if soft is not None:
            out.softmax[x] = soft
    return out


def _through_expert_split(x: Any) -> Any:
    """Grouped routing (Intern-S1-Pro, DeepSeek's groups) takes the top-k of ``scores.view(T, G, E // G)``: a
    view that only splits the last (expert) dim of ``scores``; the router's scores are behind it. Anything
    else is returned as it is."""
    if not (isinstance(x, fx.Node) and x.target in (aten.view.default, aten.reshape.default, aten._unsafe_view.default)):
        return x
    src = x.args[0]
    sv, xv = tensor_value(src), tensor_value(x)
    if sv is None or xv is None or xv.dim() != sv.dim() + 1:
        return x
    lead = sv.dim() - 1
    same_lead = all(sv.shape[i] == xv.shape[i] for i in range(lead) if isinstance(sv.shape[i], int) and isinstance(xv.shape[i], int)) \
        and all(isinstance(sv.shape[i], int) == isinstance(xv.shape[i], int) for i in range(lead))
    split = isinstance(sv.shape[-1], int) and isinstance(xv.shape[-1], int) and isinstance(xv.shape[-2], int) \
        and xv.shape[-2] * xv.shape[-1] == sv.shape[-1]
    return sem.through_exact_casts(src) if same_lead and split else x


def _through_sigmoid_scores(x: Any) -> Any:
    """The router logits behind sigmoid routing scores (MiniMax-M2, DeepSeek-V3): ``sigmoid(logits)`` and
    ``sigmoid(logits) + bias`` with a bias that broadcasts over the token rows (a parameter or buffer, not a
    value of this graph's rows). Anything else is returned as it is."""
    if isinstance(x, fx.Node) and x.target is aten.add.Tensor and len(x.args) == 2:
        a, b = x.args
        for scores, bias in ((a, b), (b, a)):
            bv, sv = tensor_value(bias), tensor_value(scores)
            if isinstance(bias, fx.Node) and bias.op in ("placeholder", "get_attr") and bv is not None \
                    and sv is not None and bv.dim() < sv.dim():
                x = sem.through_exact_casts(scores)
                break
    if isinstance(x, fx.Node) and x.target is aten.sigmoid.default:
        return sem.through_exact_casts(x.args[0])
    return x


def _has_loss_entry_below(node: fx.Node, limit: int = 400) -> bool:
    seen, stack = {node}, [node]
    while stack and len(seen) < limit:
        for u in stack.pop().users:
            if u.target in LOSS_ENTRY_OPS:
                return True
            if u not in seen:
                seen.add(u)
                stack.append(u)
    return False


def find_stacked(graph: fx.Graph, routers: Routers) -> list[StackedGroup]:
    groups: dict[tuple[fx.Node, ...], StackedGroup] = {}
    router_set = set(routers.logits)
    for node in graph.nodes:
        if node.target not in (aten.cat.default, aten.stack.default):
            continue
        tensors = node.args[0]
        if not isinstance(tensors, (list, tuple)) or len(tensors) < 2 or not all(isinstance(t, fx.Node) for t in tensors):
            continue
        vals = [tensor_value(t) for t in tensors]
        if any(v is None or not v.is_floating_point() or v.dim() < 2 for v in vals):
            continue
        rank = vals[0].dim() + (1 if node.target is aten.stack.default else 0)
        if normalize_dim(op_arg(node, 1, "dim", 0), rank) != 0:
            continue
        logits = tuple(sem.through_exact_casts(t) for t in tensors)
        from_inputs = all(x.op == "placeholder" for x in logits)
        if not (all(x in router_set for x in logits) or from_inputs):
            continue
        group = groups.setdefault(logits, StackedGroup(logits, from_inputs=from_inputs))
        group.sources.append(Source(node, "cat" if node.target is aten.cat.default else "stack", tuple(tensors)))
    # a group is a router-logit loss if a softmax / logsumexp reads any of its stackings
    return [g for g in groups.values() if any(_has_loss_entry_below(s.node) for s in g.sources)]


def find_loop_entries(graph: fx.Graph, routers: Routers, covered: set[fx.Node]) -> list[tuple[fx.Node, fx.Node]]:
    """(router logits, loss entry) pairs of the per-layer loop form."""
    router_set = set(routers.logits)
    router_softmaxes = set(routers.softmax.values())
    out = []
    for node in graph.nodes:
        if node.target not in LOSS_ENTRY_OPS or node in router_softmaxes or node in covered:
            continue
        x = sem.through_exact_casts(node.args[0])
        if x in router_set:
            out.append((x, node))
    return out


def loop_entries_on_inputs(graph: fx.Graph, covered: set[fx.Node]) -> list[fx.Node]:
    """Loss softmaxes / logsumexps of graph inputs (loop-form loss compiled apart from its layers)."""
    out = []
    for node in graph.nodes:
        if node.target in LOSS_ENTRY_OPS and node not in covered:
            x = sem.through_exact_casts(node.args[0])
            v = tensor_value(x)
            if isinstance(x, fx.Node) and x.op == "placeholder" and v is not None and v.is_floating_point() and v.dim() == 2:
                out.append(node)
    return out


def forward_closure(starts: list[fx.Node]) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = list(starts)
    while stack:
        n = stack.pop()
        for u in n.users:
            if u not in seen:
                seen.add(u)
                stack.append(u)
    return seen


def cast_chain(x: fx.Node, entry: fx.Node) -> list[fx.Node]:
    """The exact casts between router logits ``x`` and the loss entry reading them."""
    chain = []
    n = entry.args[0]
    while isinstance(n, fx.Node) and n is not x:
        chain.append(n)
        n = n.args[0]
    return chain


def describe_trigger(graph: fx.Graph) -> str | None:
    """What in this graph makes the aux-loss pass relevant (router softmax + a loss), else None."""
    routers = find_routers(graph)
    stacked = find_stacked(graph, routers)
    covered = set().union(*(forward_closure([s.node for s in g.sources]) for g in stacked)) if stacked else set()
    loop = find_loop_entries(graph, routers, covered)
    parts = []
    if routers.softmax or routers.logits:
        parts.append(f"router softmax/top-k over {len(routers.logits)} router logits "
                     f"({', '.join(x.name for x in routers.logits[:8])}{'...' if len(routers.logits) > 8 else ''})")
    if stacked:
        parts.append("stacked loss: " + "; ".join(g.describe() for g in stacked))
    if loop:
        parts.append(f"per-layer loss over {len({x for x, _ in loop})} layers ({', '.join(e.name for _, e in loop[:8])})")
    on_inputs = loop_entries_on_inputs(graph, covered)
    if on_inputs and not routers.logits:
        parts.append(f"loss softmax/logsumexp over router logits arriving as graph inputs ({', '.join(e.name for e in on_inputs[:8])})")
    if not stacked and not loop and not (on_inputs and not routers.logits):
        return None
    return "; ".join(parts)
