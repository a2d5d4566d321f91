"""Overlap scheduling of all-to-alls in Inductor's post-grad (ATen) forward and backward graphs.

Inductor's default order waits on every all-to-all right after issuing it,
so nothing overlaps.  This pass re-lists the graph so that each all-to-all
is issued as soon as its inputs allow and each ``wait_tensor`` sits as late
as possible (just before the first node that needs its result), with at most
``config.max_chunks_in_flight`` all-to-alls issued but not yet waited (each
in-flight all-to-all holds a receive buffer, so this bounds memory; count
exchanges, which hold a few counts, are not counted: ``sizing_exchanges``).

It is a list scheduler over the data-flow graph: among ready nodes, the one
with the fewest matmuls between it and a not-yet-issued all-to-all goes
first (so all-to-alls start early); a wait that feeds split sizes with no
matmul in between (count exchange -> dispatch) counts as such work, every other wait
sinks below all ready compute and retires in issue order (FIFO); original
order breaks ties.

In a backward graph, work that does not depend on the incoming gradient
(activation checkpointing's recomputation, the partitioner's own, terms of
the backward computed from saved values) is ready from the start; run first,
every layer's share would stay alive until its gradient arrives. It runs
just in time instead (after pending waits, in its own order), except what
the next ``max_chunks_in_flight`` gradient all-to-alls need (hoisted: their
windows fill with the next chunk's recomputation) and cheap inputs (no
matmul, no collective) of gradient work that is otherwise ready.
``moe-passes bench --section checkpointing`` measures the memory, the
schedule's report (``overlapped_by_matmul``) the overlap. With
``defer_weight_grads`` the weight-gradient GEMMs fill open windows
(``moe_passes.inductor.dw_deferral``).

Inductor's scheduler keeps this order in its output code only with
``reorder_for_peak_memory`` off (measured on torch 2.13: its peak-memory
reordering moves every wait back next to its all-to-all, and control
dependencies from ``preserve_node_ordering`` on the waits did not stop it)
and with its post-fusion order rebuilt by ``KeepScheduledOrder`` (a kernel
fused across the schedule pulled waits up to their all-to-alls).
Backends that run this pass compile with ``INDUCTOR_CONFIG``.
"""

from __future__ import annotations

import heapq
import logging
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomSchedulerPass
from torch.utils.checkpoint import CheckpointPolicy

from moe_passes.ir.facts import all_to_all_split_args, is_all_to_all, is_wait, mutated_args, op_namespace_and_name
from moe_passes.pipeline.pass_base import GraphPass, PassResult

log = logging.getLogger(__name__)


class KeepScheduledOrder(CustomSchedulerPass):
    """Inductor scheduler pass (``_post_fusion_custom_pass``): after fusion, the kernels in the order the post-grad
    schedule chose, each fused kernel as early as its inputs allow.

    Inductor fuses kernels that read the same buffer even when the schedule put them far apart (measured on the
    2-layer test model's backward: one layer's LayerNorm weight-gradient sums fused with the other layer's,
    58 nodes later). It then sorts by each kernel's first node and re-sorts depth-first, which pulls everything
    the late half needs up to the early half: every wait between them moved next to its all-to-all and the
    weight-gradient GEMMs to the end of the graph (the output code lost the overlap of the second layer's
    backward). A list schedule by first node instead keeps every unfused kernel where it was and runs a fused
    one once all its inputs are ready. Graphs without collectives are left as Inductor ordered them.
    (A module-level class: Inductor pickles its config into the FX graph cache key, and keys it by ``uuid``.)
    """

    def __call__(self, nodes: list[Any]) -> list[Any]:
        from torch._inductor.utils import contains_collective

        if not any(contains_collective(n) for n in nodes):
            return nodes
        producer: dict[str, Any] = {}
        for n in nodes:
            for name in n.get_buffer_names():
                producer[name] = n
        position = {n: i for i, n in enumerate(nodes)}
        waiting_on: dict[Any, int] = {}
        users: dict[Any, list[Any]] = {n: [] for n in nodes}
        for n in nodes:
            preds = {producer[d.name] for d in n.unmet_dependencies if d.name in producer} - {n}
            waiting_on[n] = len(preds)
            for p in preds:
                users[p].append(n)
        ready = [(n.min_order, position[n], n) for n in nodes if waiting_on[n] == 0]
        heapq.heapify(ready)
        order: list[Any] = []
        while ready:
            *_, n = heapq.heappop(ready)
            order.append(n)
            for u in users[n]:
                waiting_on[u] -= 1
                if waiting_on[u] == 0:
                    heapq.heappush(ready, (u.min_order, position[u], u))
        return order if len(order) == len(nodes) else nodes  # a cycle cannot happen; never drop a kernel

    def uuid(self) -> str:
        from moe_passes.pipeline.pass_base import package_digest

        return f"KeepScheduledOrder|{package_digest()}"


INDUCTOR_CONFIG: dict[str, Any] = {"reorder_for_peak_memory": False, "_post_fusion_custom_pass": KeepScheduledOrder()}

#: Expert / projection compute: what an in-flight all-to-all should overlap with.
HEAVY_OPS: frozenset[str] = frozenset({"mm", "addmm", "bmm", "baddbmm", "convolution", "matmul", "_grouped_mm"})


def is_heavy(n: fx.Node) -> bool:
    """A matmul-class op: ATen mm/addmm/bmm/baddbmm/convolution/_grouped_mm, or any op named ``*grouped_mm*``
    (custom grouped-GEMM expert kernels, their weight-gradient ops)."""
    parsed = op_namespace_and_name(n.target) if n.op == "call_function" else None
    if parsed is None:
        return False
    ns, name = parsed
    return (ns == "aten" and name in HEAVY_OPS) or "grouped_mm" in name


_FAR = 1 << 30


def comm_urgency(nodes: list[fx.Node], seeds: set[fx.Node] | None = None) -> dict[fx.Node, int]:
    """Fewest matmuls between a node and some all-to-all that needs it (``_FAR`` if none does).

    Running the most urgent ready work first starts the next all-to-all
    soonest: a count-exchange wait (0 matmuls to the dispatch) goes before
    another chunk's expert matmuls (2 matmuls to the combine).
    """
    urgency: dict[fx.Node, int] = {}
    for n in reversed(nodes):
        if (n in seeds) if seeds is not None else is_all_to_all(n):
            urgency[n] = 0
            continue
        best = min((urgency[u] for u in n.users if u in urgency), default=_FAR)
        urgency[n] = best + (1 if is_heavy(n) and best < _FAR else 0)
    return urgency


_RECOMPUTED = (CheckpointPolicy.PREFER_RECOMPUTE, CheckpointPolicy.MUST_RECOMPUTE)


def recomputed(n: fx.Node) -> bool:
    """A forward op that activation checkpointing recomputes in the backward graph (the partitioner keeps its
    ``recompute`` policy in ``meta``). Its inputs are the checkpoint's saved inputs, ready from the start of
    backward, so a list scheduler that sinks every wait below all ready compute runs every layer's
    recomputation up front and keeps it alive, undoing what checkpointing frees (measured: 1.37x the
    checkpointed peak at 4 layers). ``gradient_independent`` finds this work (and more) from data flow; these
    tags are its fallback in a backward graph without AOTAutograd's tangent descriptors. In a forward graph
    the same tags mark everything a checkpointed layer computes, and mean nothing to the schedule."""
    return n.meta.get("recompute") in _RECOMPUTED and "ac_graph_id" in n.meta


def split_urgency(nodes: list[fx.Node]) -> dict[fx.Node, int]:
    """Fewest matmuls between a node and some all-to-all's split sizes (``_FAR`` if it feeds none)."""
    split_args = {a for n in nodes if is_all_to_all(n) for a in _nodes_in(all_to_all_split_args(n))}
    return comm_urgency(nodes, split_args)


def sizing_exchanges(nodes: list[fx.Node], urgency: dict[fx.Node, int] | None = None) -> set[fx.Node]:
    """All-to-alls whose result gives another all-to-all's split sizes with no matmul in between: the count
    exchanges (per-expert counts -> split sizes of the dispatch and combine). They hold a few counts, not
    rows, so the in-flight bound (a memory bound on receive buffers) does not count them: held back, a count
    exchange only holds back the dispatch it sizes (measured on the 4-micro-batch decoder forward: the third
    micro-batch's counts waited for the first micro-batch's dispatch to retire). ``urgency``: ``split_urgency``
    of ``nodes``, when the caller has it."""
    urgency = split_urgency(nodes) if urgency is None else urgency
    return {n for n in nodes if is_all_to_all(n) and urgency[n] == 0}


def _nodes_in(x: Any) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(x, found.append)
    return found


def ordering_edges(nodes: list[fx.Node]) -> dict[fx.Node, set[fx.Node]]:
    """Extra predecessors that data flow does not show: readers of a value stay on their side of its in-place writes.

    Post-grad graphs are functional except for such writes (input mutations
    put back at the end); re-listing by data flow alone could move a write
    above a read of the old value.
    """
    index = {n: i for i, n in enumerate(nodes)}
    extra: dict[fx.Node, set[fx.Node]] = {n: set() for n in nodes}
    for m in nodes:
        for target in mutated_args(m):
            for other in target.users:
                if other is m or other.op == "output":
                    continue
                if index[other] < index[m]:
                    extra[m].add(other)
                else:
                    extra[other].add(m)
    return extra


def tangent_inputs(nodes: list[fx.Node]) -> list[fx.Node]:
    """The backward graph's tangent inputs (the incoming gradients), as AOTAutograd labels them
    (``TangentAOTInput`` in the placeholder's ``meta["desc"]``); empty in a forward graph."""
    try:
        from torch._functorch._aot_autograd.descriptors import TangentAOTInput
    except ImportError:  # pragma: no cover - other torch versions
        return []
    return [n for n in nodes if n.op == "placeholder" and isinstance(n.meta.get("desc"), TangentAOTInput)]


def gradient_independent(nodes: list[fx.Node], backward: bool | None = None) -> set[fx.Node]:
    """Backward work that does not depend on the incoming gradient: checkpoint recomputation, the partitioner's
    own recomputation (a norm's affine, a cheap cast) and backward terms computed from saved values alone
    (``sigmoid(x)`` of a SiLU's backward, zero buffers). All of it is ready at the start of backward; a list
    scheduler that runs ready work first would run every layer's share up front and keep it alive until its
    layer's gradient arrives (measured: 1.37x the checkpointed peak at 4 layers). ``overlap_order`` runs it
    just in time instead, except what the next all-to-alls need.

    Found from data flow: every call not reachable from a tangent input. Without tangent descriptors (a graph
    AOTAutograd did not label) and ``backward`` set, the ops checkpointing tagged for recomputation
    (``recomputed``); in a forward graph, nothing."""
    tangents = tangent_inputs(nodes)
    if not tangents:
        if backward:
            return {n for n in nodes if recomputed(n) and not is_all_to_all(n)}
        return set()
    dependent: set[fx.Node] = set(tangents)
    for n in nodes:
        if n not in dependent and any(a in dependent for a in n.all_input_nodes):
            dependent.add(n)
    return {n for n in nodes if n.op == "call_function" and n not in dependent}


@dataclass
class OverlapPlan:
    """The order ``plan_overlap`` chose and what it decided on the way."""

    order: list[fx.Node]
    #: gradient-independent nodes (run just in time) / of those, hoisted to feed the next all-to-alls
    deferred: int = 0
    hoisted: int = 0
    #: weight-gradient GEMMs the order placed (``defer_weight_grads``), and why none when none
    weight_grads: list[fx.Node] = field(default_factory=list)
    weight_grad_reason: str = ""


def overlap_order(graph: fx.Graph, max_in_flight: int, *, backward: bool | None = None,
                  defer_weight_grads: bool = False) -> list[fx.Node]:
    """A topological order that issues all-to-alls early and waits late, bounded by ``max_in_flight``."""
    return plan_overlap(graph, max_in_flight, backward=backward, defer_weight_grads=defer_weight_grads).order


def plan_overlap(graph: fx.Graph, max_in_flight: int, *, backward: bool | None = None,
                 defer_weight_grads: bool = False) -> OverlapPlan:
    """List-schedule ``graph`` (see the module docstring); ``backward``: the graph is an AOT backward graph
    (None: known from its tangent inputs).

    In a backward graph, gradient-independent work (``gradient_independent``) runs just in time, in its
    original order, after pending waits, except the part that feeds one of the next ``max_in_flight``
    gradient all-to-alls not yet issued: that part is hoisted, so those all-to-alls issue early and their
    windows fill with the next chunk's recomputation (a window can hold at most that many all-to-alls, so
    work for later ones would only be held). Gradient work whose gradient inputs are all done gets its
    gradient-independent inputs at once when they are cheap (``hoist_if_cheap``). With activation
    checkpointing this keeps the overlap and the checkpointed memory (``moe-passes bench --section
    checkpointing``: 1.157x -> 1.048x of checkpointing alone at 4 layers, 34 of 40 backward all-to-alls
    overlapped, 30 by a matmul).

    ``defer_weight_grads``: weight-gradient GEMMs (``dw_deferral.weight_gradient_gemms``) run inside an open
    all-to-all window, after the work that issues the next all-to-all and before any other filler; with no
    window open they wait, last among ready nodes, for the next one (or the end of the graph).
    """
    nodes = list(graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    urgency = comm_urgency(nodes)
    to_splits = split_urgency(nodes)
    sizing = sizing_exchanges(nodes, to_splits)
    extra = ordering_edges(nodes)
    successors: dict[fx.Node, list[fx.Node]] = {n: list(n.users) for n in nodes}
    for n, preds in extra.items():
        for p in preds - set(n.all_input_nodes):
            successors[p].append(n)
    missing = {n: len(set(n.all_input_nodes) | extra[n]) for n in nodes}
    output = next(n for n in reversed(nodes) if n.op == "output")

    if backward is None:
        backward = bool(tangent_inputs(nodes))
    deferred = gradient_independent(nodes, backward) if backward else set()
    gradient_a2a = [n for n in nodes if is_all_to_all(n) and n not in deferred]
    plan = OverlapPlan(order=[], deferred=len(deferred))
    dw: set[fx.Node] = set()
    if defer_weight_grads and backward:
        from moe_passes.inductor.dw_deferral import parameter_gradient_outputs, weight_gradient_gemms

        params = parameter_gradient_outputs(graph)
        plan.weight_grads = weight_gradient_gemms(graph, is_heavy, params)
        plan.weight_grad_reason = params.reason if params.positions is None else (
            "" if plan.weight_grads else "no GEMM feeds parameter gradients only")
        dw = set(plan.weight_grads)
    elif defer_weight_grads:
        plan.weight_grad_reason = "not a backward graph"

    issued: dict[fx.Node, int] = {}
    hoisted: set[fx.Node] = set()
    done: set[fx.Node] = set()
    in_heap: set[fx.Node] = set()

    def key(n: fx.Node) -> tuple[int, int, int]:
        if n.op == "placeholder":
            return (-1, 0, index[n])
        if is_wait(n) and to_splits[n] > 0:  # sink: after all ready compute, oldest all-to-all first
            return (_FAR + 1, issued.get(n.args[0], 0), index[n])
        if n in deferred and n not in hoisted and not is_all_to_all(n):  # just in time, in its own order
            return (_FAR + 2, 0, index[n])
        return (urgency[n], 1 if is_wait(n) else 0, index[n])

    ready: list[tuple[tuple[int, int, int], fx.Node]] = []
    dw_ready: list[tuple[int, fx.Node]] = []  # weight-gradient GEMMs, placed by the window state

    def push(n: fx.Node) -> None:
        if n in dw:
            heapq.heappush(dw_ready, (index[n], n))
        else:
            in_heap.add(n)
            heapq.heappush(ready, (key(n), n))

    def hoist_for(root: fx.Node) -> None:
        """Hoist the gradient-independent ancestors of ``root`` (stopping at hoisted ones: theirs are hoisted)."""
        stack = [root]
        while stack:
            x = stack.pop()
            for p in x.all_input_nodes:
                if p in done or p in hoisted:
                    continue
                if p in deferred:
                    hoisted.add(p)
                    if p in in_heap:  # re-queue under its new key; the stale entry is skipped when popped
                        heapq.heappush(ready, (key(p), p))
                stack.append(p)

    def hoist_for_next_all_to_alls() -> None:
        """The next ``max_in_flight`` gradient all-to-alls not yet issued: what they need runs now."""
        for a in [a for a in gradient_a2a if a not in issued][:max_in_flight]:
            hoist_for(a)

    def hoist_if_cheap(root: fx.Node) -> None:
        """Gradient work whose gradient inputs are all done waits only on gradient-independent ones: hoist those
        if they are cheap (no matmul, no collective: a softmax backward's ``neg``, a zero buffer), so the
        gradient chain is not held behind a pending wait; recomputation with matmuls or all-to-alls stays
        just in time."""
        closure: list[fx.Node] = []
        stack, seen = [root], {root}
        while stack:
            x = stack.pop()
            for p in x.all_input_nodes:
                if p in seen or p in done or p in hoisted or p not in deferred:
                    continue
                if is_heavy(p) or is_all_to_all(p) or is_wait(p):
                    return
                seen.add(p)
                closure.append(p)
                stack.append(p)
        for p in closure:
            hoisted.add(p)
            if p in in_heap:
                heapq.heappush(ready, (key(p), p))

    # gradient inputs (not gradient-independent) each node still misses
    gradient_missing = {n: len([a for a in set(n.all_input_nodes) | extra[n] if a not in deferred]) for n in nodes}
    if deferred:
        hoist_for_next_all_to_alls()
    for n in nodes:
        if missing[n] == 0 and n is not output:
            push(n)
    blocked: list[fx.Node] = []  # all-to-alls held back by the in-flight bound
    in_flight: list[fx.Node] = []
    order: list[fx.Node] = []
    window_key = (_FAR - 1, 0, 0)  # a dW GEMM in an open window: after work that issues the next all-to-all
    while ready or blocked or dw_ready:
        if blocked and len(in_flight) < max_in_flight:
            for n in blocked:
                heapq.heappush(ready, (key(n), n))
            blocked.clear()
        while ready and (ready[0][1] in done or ready[0][0] != key(ready[0][1])):
            heapq.heappop(ready)  # stale entry of a re-keyed node
        if dw_ready and (not ready or (in_flight and ready[0][0] > window_key)):
            _, n = heapq.heappop(dw_ready)
        else:
            if not ready:
                if blocked:
                    raise RuntimeError("schedule_overlap: all-to-all blocked with no wait to retire (wait missing?)")
                break  # only stale entries were left
            _, n = heapq.heappop(ready)
            if is_all_to_all(n) and n not in sizing and len(in_flight) >= max_in_flight:
                blocked.append(n)
                if not ready and not dw_ready:  # only blocked all-to-alls are left: cannot happen while a wait is pending
                    raise RuntimeError("schedule_overlap: all-to-all blocked with no wait to retire (wait missing?)")
                continue
            in_heap.discard(n)
        done.add(n)
        order.append(n)
        if is_all_to_all(n):
            if n not in sizing:
                in_flight.append(n)
            issued[n] = len(issued)
            if deferred and n not in deferred:
                hoist_for_next_all_to_alls()
        elif is_wait(n) and n.args[0] in in_flight:
            in_flight.remove(n.args[0])
        for u in successors[n]:
            missing[u] -= 1
            if missing[u] == 0 and u is not output:
                push(u)
            elif deferred and n not in deferred and u not in deferred and u is not output:
                gradient_missing[u] -= 1
                if gradient_missing[u] == 0:
                    hoist_if_cheap(u)
    order.append(output)
    if len(order) != len(nodes):
        raise RuntimeError(f"schedule_overlap: scheduled {len(order)} of {len(nodes)} nodes (cycle?)")
    plan.order = order
    plan.hoisted = len(hoisted)
    return plan


def apply_order(graph: fx.Graph, order: list[fx.Node]) -> None:
    """Re-link the graph's nodes in ``order``."""
    prev = graph._root
    for n in order:
        if prev.next is not n:
            prev.append(n)
        prev = n


def overlap_stats(graph: fx.Graph) -> dict[str, int]:
    """How many all-to-alls have compute between their issue and their wait (0 everywhere = no overlap), how many
    of those a matmul-class op (``is_heavy``), and the most issued at once."""
    nodes = list(graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    a2as = [n for n in nodes if is_all_to_all(n)]
    overlapped = 0
    by_matmul = 0
    max_in_flight = 0
    for a in a2as:
        waits = [u for u in a.users if is_wait(u)]
        if not waits:
            continue
        window = nodes[pos[a] + 1 : pos[waits[0]]]
        if any(not is_wait(x) and not is_all_to_all(x) and x.op == "call_function" for x in window):
            overlapped += 1
        if any(is_heavy(x) for x in window):
            by_matmul += 1
    live = 0
    sizing = sizing_exchanges(nodes)  # count exchanges: not bounded (they hold counts, not rows)
    for n in nodes:
        if is_all_to_all(n) and n not in sizing:
            live += 1
            max_in_flight = max(max_in_flight, live)
        elif is_wait(n) and is_all_to_all(n.args[0]) and n.args[0] not in sizing:
            live -= 1
    return {"all_to_all": len(a2as), "overlapped": overlapped, "overlapped_by_matmul": by_matmul,
            "max_in_flight": max_in_flight}


class ScheduleOverlapPass(GraphPass):
    """Issue all-to-alls early, sink their waits, bounded in flight; forward and backward graphs."""

    name = "schedule_overlap"
    stage = "post_grad"
    ir = "aten"
    implied_by = ("domino_ep",)

    @classmethod
    def enabled(cls, config: Any) -> bool:
        return bool(config.schedule_overlap)

    @property
    def graphs(self) -> tuple[str, ...]:  # type: ignore[override]
        """The AOT graphs it runs on: forward and backward, or forward only (``schedule_overlap="forward"``)."""
        return ("forward", "inference") if self.config.schedule_overlap == "forward" else ("forward", "backward", "inference")

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        from moe_passes.inductor.backend import graph_kind

        result = PassResult(self.name)
        graph = gm.graph if isinstance(gm, fx.GraphModule) else gm
        before = overlap_stats(graph)
        if before["all_to_all"] == 0:
            result.skip("graph", "no all-to-all in this graph")
            return result
        original = list(graph.nodes)
        kind = graph_kind(graph)
        backward = None if kind == "unknown" else kind == "backward"  # unknown: from the graph's tangent inputs
        defer = self.config.defer_weight_grads
        plan = plan_overlap(graph, self.config.max_chunks_in_flight, backward=backward, defer_weight_grads=defer)
        # where the weight-gradient GEMMs would sit without the deferral (same graph, same tie-breaks)
        without = (plan_overlap(graph, self.config.max_chunks_in_flight, backward=backward).order
                   if plan.weight_grads else None)
        apply_order(graph, plan.order)
        graph.lint()
        after = overlap_stats(graph)
        result.stats = {"before": before, "after": after, "gradient_independent": plan.deferred,
                        "hoisted_for_next_all_to_alls": plan.hoisted}
        if defer and plan.weight_grad_reason != "not a backward graph":
            from moe_passes.inductor.dw_deferral import deferral_report

            result.stats["weight_grads"] = deferral_report(plan.order, plan.weight_grads, without,
                                                           plan.weight_grad_reason).as_dict()
        result.changed = plan.order != original
        result.matched.append(f"{after['all_to_all']} all-to-alls")
        log.info("schedule_overlap: %s -> %s", before, after)
        return result


def as_custom_pass(p: GraphPass) -> Any:
    """Wrap a post-grad ``GraphPass`` as Inductor's ``CustomGraphPass`` (its uuid keys the FX cache)."""
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class _Wrapped(CustomGraphPass):
        def __call__(self, graph: fx.Graph) -> None:
            gm = graph.owning_module
            p(gm if gm is not None else graph)

        def uuid(self) -> Any:
            return p.uuid()

    return _Wrapped()
