"""Per-layer statistics: what each layer's partial sums are built from.

* Token counts ``sum_rows one_hot(idx, E) [* w]`` become a ``scatter_add`` of the
  (mask) weights into ``[K, E]`` / ``[E]``: no one-hot tensor, not even per layer.
* ``logsumexp`` of a layer's fp32 logits takes its gradient from the router's own
  fp32 softmax (``d lse / dx = softmax(x)``), so autograd saves nothing new for it.
* The loss's softmax / top-k of a layer are replaced by the router's own nodes when
  they compute the same numbers (same source through exact casts, same normalised
  dim, same compute dtype; same k/dim/largest/sorted) **and nothing writes the
  logits (or the router's result) in place in between** (``ir.facts.writes_between``).
  Otherwise -- another dtype (transformers' bf16 loss softmax vs its fp32 router
  softmax), an in-place ``clamp_``/``mul_`` of the logits after the router -- the
  per-layer statistics are computed from that layer's logits as the loss reads them.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from moe_passes.fx.aux_loss import semantics as sem
from moe_passes.fx.aux_loss.blocks import Emitter
from moe_passes.ir.facts import tensor_dtype, tensor_value, writes_between

aten = torch.ops.aten


def _order(graph: fx.Graph) -> dict[fx.Node, int]:
    return {n: i for i, n in enumerate(graph.nodes)}


def reusable_router_softmax(graph: fx.Graph, key: tuple[Any, ...], before: fx.Node, exclude: set[fx.Node] | None = None,
                            order: dict[fx.Node, int] | None = None) -> tuple[fx.Node | None, str | None]:
    """The earliest softmax with ``key`` placed before ``before`` that may stand for a new one there.

    Returns (node, None), or (None, why not) -- e.g. an in-place write to the logits in between."""
    order = order or _order(graph)
    src = key[0]
    found = [n for n in graph.nodes if sem.softmax_key(n) == key and n is not before and (exclude is None or n not in exclude)
             and order.get(n, 1 << 60) < order.get(before, -1)]
    if not found:
        return None, None
    cand = min(found, key=order.__getitem__)
    writes = writes_between(src, cand, before) + writes_between(cand, cand, before)
    if writes:
        return None, (f"router softmax {cand.name} not reused: {', '.join(w.name for w in writes)} "
                      f"writes the router logits in place in between; statistics recomputed from the logits")
    return cand, None


@dataclass
class Statistics:
    """Builds per-layer statistics for a ``Rewriter`` and counts what it did."""

    counts_without_onehot: int = 0
    logsumexp_grad_from_router_softmax: int = 0
    notes: list[str] = field(default_factory=list)

    def counts(self, rw: Emitter, onehot: tuple[Any, int, fx.Node], weight: Any, out_shape: tuple[Any, ...],
               out_dtype: torch.dtype, layer: int) -> fx.Node:
        idx_rows, n, node = onehot
        idx = idx_rows.emit(layer)
        idx_rank = len(tensor_value(node.args[0]).shape)
        if weight is None:
            src = rw.new(aten.ones_like.default, (idx,), {"dtype": out_dtype}, layer)
        else:
            ns = weight.narrow_shape
            w = rw.new(aten.reshape.default, (weight.narrow(layer), [-1, *ns[:-1]]), {}, layer)
            if idx_rank == 2:
                w = rw.new(aten.expand.default, (w, [-1, tensor_value(node.args[0]).shape[1]]), {}, layer)
            src = rw.new(aten.to.dtype, (w, out_dtype), {}, layer)
        zeros = rw.new(aten.new_zeros.default, (idx, list(out_shape)), {"dtype": out_dtype}, layer)
        self.counts_without_onehot += 1
        if idx_rank == 2:
            return rw.new(aten.scatter_add.default, (zeros, 1, rw.new(aten.t.default, (idx,), {}, layer),
                                                      rw.new(aten.t.default, (src,), {}, layer)), {}, layer)
        return rw.new(aten.scatter_add.default, (zeros, 0, idx, src), {}, layer)

    @staticmethod
    def counts_apply(onehot: tuple[Any, int, fx.Node], weight: Any, out_shape: tuple[Any, ...], out_dtype: torch.dtype) -> bool:
        """Whether ``sum_rows(one_hot [* w])`` can be a scatter_add: exact dtypes (counts in bf16 round
        differently when accumulated per layer), index rank 1 or 2, weights constant along the experts."""
        _, n, node = onehot
        idx_rank = len(tensor_value(node.args[0]).shape)
        if out_dtype not in (torch.float32, torch.float64, torch.int64, torch.int32) or idx_rank not in (1, 2) \
                or len(out_shape) != idx_rank or out_shape[-1] != n:
            return False
        if weight is not None:
            ns = weight.narrow_shape
            return bool(ns) and ns[-1] == 1 and len(ns) == idx_rank and all(d == 1 for d in ns)
        return True

    def logsumexp(self, rw: Emitter, node: fx.Node, x: fx.Node, layer: int) -> fx.Node:
        """lse of one layer's logits whose gradient reuses the router's fp32 softmax:
        ``lse(x.detach()) + sum(p.detach() * (x - x.detach()), -1)`` -- the second term is 0 in value,
        its gradient is ``p``, which autograd already keeps for the router."""
        plain = lambda: rw.new(node.target, (x, *node.args[1:]), dict(node.kwargs), layer)
        if tensor_dtype(x) != torch.float32:
            return plain()
        key = (sem.through_exact_casts(x), 1, torch.float32)
        p, why = reusable_router_softmax(rw.graph, key, rw.cursor, exclude=set(rw.new_nodes))
        if p is None:
            if why:
                self.notes.append(why)
            return plain()
        detached = rw.new(aten.detach.default, (x,), {}, layer)
        lse = rw.new(aten.logsumexp.default, (detached, [1]), {}, layer)
        zero = rw.new(aten.sub.Tensor, (x, detached), {}, layer)
        weighted = rw.new(aten.mul.Tensor, (rw.new(aten.detach.default, (p,), {}, layer), zero), {}, layer)
        self.logsumexp_grad_from_router_softmax += 1
        return rw.new(aten.add.Tensor, (lse, rw.new(aten.sum.dim_IntList, (weighted, [1]), {}, layer)), {}, layer)


def reuse_router_ops(graph: fx.Graph, candidates: list[fx.Node], notes: list[str]) -> dict[str, int]:
    """Replace the loss's softmax / top-k by the router's identical earlier node (see module doc)."""
    reused = {"softmax": 0, "topk": 0}
    cands = set(candidates)
    for node in [n for n in graph.nodes if n in cands]:
        if node._erased or not node.users:
            continue
        key = sem.softmax_key(node)
        if key is not None:
            order = _order(graph)
            other, why = reusable_router_softmax(graph, key, node, exclude=cands, order=order)
            if why:
                notes.append(why)
            if other is not None:
                node.replace_all_uses_with(other)
                reused["softmax"] += 1
            elif why is None and key[0].op != "placeholder":
                routers = [n for n in graph.nodes if (k := sem.softmax_key(n)) is not None and k[0] is key[0] and n not in cands]
                if routers:
                    r = sem.softmax_key(routers[0])
                    notes.append(f"router softmax {routers[0].name} (dim {r[1]}, {r[2]}) computes other numbers than the "
                                 f"loss's (dim {key[1]}, {key[2]}): per-layer statistics computed from the logits")
            continue
        tkey = sem.topk_key(node)
        if tkey is None:
            continue
        order = _order(graph)
        for other in graph.nodes:
            if other is node or other in cands or order[other] >= order[node] or sem.topk_key(other) != tkey:
                continue
            used = {u.args[1] for u in node.users if u.target is operator.getitem}
            outs = [u for u in other.users if u.target is operator.getitem and u.args[1] in used]
            if writes_between(tkey[0], other, node) or any(writes_between(o, other, node) for o in outs):
                notes.append(f"router top-k {other.name} not reused: an in-place write to the outputs the loss reads, in between")
                break
            node.replace_all_uses_with(other)
            reused["topk"] += 1
            break
    return reused
