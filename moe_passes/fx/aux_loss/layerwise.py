"""The ``layerwise_aux_loss`` pass: orchestration of recognise -> rewrite -> statistics -> placement.

Runs on the canonical pre-dispatch ATen IR (``ir = "aten"``). A graph handed
over in Dynamo's torch IR (a backend that does not re-trace yet, a script that
calls the pass on a captured graph) is re-traced in place first, in the graph's
own fake mode, with Dynamo's placeholder names kept.

Every graph that holds a router softmax and a loss over router logits
(``trigger``) ends with the loss rewritten, or with a reason in
``PassResult.skipped`` for each candidate left alone. The pass is transactional:
a group it cannot prove is left exactly as it was, and an internal error restores
the whole graph and is reported as a skip, never a crash.
"""

from __future__ import annotations

import logging
import operator
from typing import Any

import torch
import torch.fx as fx

from moe_passes.fx.aux_loss import placement, recognise, stack_chains
from moe_passes.fx.aux_loss import semantics as sem
from moe_passes.fx.aux_loss.rewrite import TAG, Rewriter, Source, Unsupported
from moe_passes.fx.aux_loss.stats import Statistics, reuse_router_ops
from moe_passes.ir.canonical import is_canonical
from moe_passes.ir.facts import is_softmax, is_static_int, node_value
from moe_passes.ir.fake_mode import fake_eval
from moe_passes.pipeline.pass_base import GraphPass, PassResult
from moe_passes.pipeline.validation import copy_graph_module

log = logging.getLogger(__name__)
aten = torch.ops.aten


def _looks_aten(gm: fx.GraphModule) -> bool:
    """A graph already made of OpOverloads (hand-built ATen graphs, post-grad graphs)."""
    calls = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    return bool(calls) and all(
        n.op == "call_function"
        and (
            isinstance(n.target, torch._ops.OpOverload)
            or n.target is operator.getitem
            or getattr(n.target, "__module__", "") in ("_operator", "torch.fx.experimental.sym_node")
        )
        for n in calls
    )


def propagate_meta(gm: fx.GraphModule, nodes: list[fx.Node]) -> None:
    """Fake values (``meta['val']``) for new nodes, in the graph's own fake mode."""
    live = set(nodes)
    for node in gm.graph.nodes:
        if node not in live or "val" in node.meta or node.op != "call_function":
            continue
        try:
            fake_eval(node)
        except Exception as err:  # noqa: BLE001 - metadata is a courtesy; the backend re-propagates
            log.debug("layerwise_aux_loss: no metadata for %s: %s", node.name, err)


class LayerwiseAuxLossPass(GraphPass):
    """Stacked (or per-layer) router-logit losses -> per-layer partial sums at the end of each layer."""

    name = "layerwise_aux_loss"
    stage = "pre_grad"
    ir = "aten"

    def trigger(self, gm: fx.GraphModule) -> str | None:
        """Router softmax / top-k and a loss over router logits in this graph (described), else None."""
        if is_canonical(gm) or _looks_aten(gm):
            return recognise.describe_trigger(gm.graph)
        softmaxes = [n for n in gm.graph.nodes if is_softmax(n)]
        cats = [n for n in gm.graph.nodes if n.target in (torch.cat, torch.stack)]
        if softmaxes and (cats or len(softmaxes) > 1):
            return f"{len(softmaxes)} softmaxes ({', '.join(n.name for n in softmaxes[:6])}) and {len(cats)} cat/stack (torch IR)"
        return None

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        if not isinstance(gm, fx.GraphModule):
            raise ValueError(f"{self.name} needs a torch.fx.GraphModule, got {type(gm).__name__}")
        result = PassResult(self.name)
        stats: dict[str, Any] = {
            "groups_rewritten": 0,
            "layers": 0,
            "counts_without_onehot": 0,
            "logsumexp_grad_from_router_softmax": 0,
            "softmax_reused": 0,
            "topk_reused": 0,
            "all_reduces_merged": 0,
            "loop_form_layers": 0,
            "nodes_hoisted": 0,
        }
        result.stats = stats
        if not (is_canonical(gm) or _looks_aten(gm)):
            raise ValueError(
                f"{self.name} reads the canonical ATen IR; this graph is Dynamo's torch-level graph. "
                "Run it through moe_passes.pipeline.manager.PassManager (or moe_passes.testing.run_pass), "
                "which re-traces it first"
            )
        # Errors propagate: the pass manager is the one place that fails closed (restores the graph, reports
        # the traceback in PassResult.error, raises under strict).
        plans = stack_chains.plan(gm.graph, recognise.find_routers(gm.graph).logits)
        original = copy_graph_module(gm) if plans else None
        hoisted = stack_chains.hoist(gm.graph, plans)
        self._run(gm, result, stats)
        if hoisted and not result.changed:  # nothing rewritten with the hoist: the graph as it was, then as written
            gm.graph = original.graph
            gm.recompile()
            result.skipped.clear()
            result.matched.clear()
            stats.update({k: 0 for k in stats})
            self._run(gm, result, stats)
        elif hoisted:
            result.matched.append(f"note: {len(hoisted)} stack(s) of per-layer softmax/top-k chains computed on the "
                                  "stack of the router logits (the same numbers), then rewritten per layer")
        if result.changed:
            gm.graph.lint()
            gm.recompile()
        elif not result.skipped:
            trig = recognise.describe_trigger(gm.graph)
            if trig is not None:
                result.skip(trig, "no stacked or per-layer loss over these router logits could be proven a sum over token rows")
        log.info("%s: %s", self.name, stats)
        return result

    # -------------------------------------------------------------------------------------------
    def _run(self, gm: fx.GraphModule, result: PassResult, stats: dict[str, Any]) -> None:
        graph = gm.graph
        routers = recognise.find_routers(graph)
        statistics = Statistics()
        new_nodes: list[fx.Node] = []
        layer_of: dict[fx.Node, int] = {}
        totals: list[fx.Node] = []
        for group in recognise.find_stacked(graph, routers):
            rw = Rewriter(graph, group.sources, len(group.logits), stats=statistics)
            if not self._apply(gm, rw, result, group.describe(), "left the whole loss group unchanged (balancing and z-loss alike)"):
                continue
            new_nodes += rw.new_nodes
            layer_of.update(rw.layer_of)
            totals += list(rw.replace.values())
            stats["groups_rewritten"] += 1
            stats["layers"] += len(group.logits)
            where = (
                "router logits arrive as graph inputs (loss compiled apart from its layers): per-layer statistics "
                "from each layer's logits, no stacked tensor"
                if group.from_inputs
                else f"layers {[_layer_name(x) for x in group.logits]}"
            )
            result.matched.append(f"{group.describe()}: {where}")
        # the per-layer loop form
        tagged = {n for n in graph.nodes if n.meta.get("moe_passes") == TAG}
        loop_layers: set[fx.Node] = set()
        for x, entry in recognise.find_loop_entries(graph, routers, tagged):
            if entry._erased:
                continue
            src = entry.args[0]  # the logits as the loss reads them: after exact casts, after any in-place write
            while isinstance(src, fx.Node) and sem.exact_cast(src):
                src = src.args[0]
            scope = set(recognise.cast_chain(src, entry)) | {entry} | recognise.forward_closure([entry])
            rw = Rewriter(graph, [Source(src, "layer", (src,))], 1, scope=scope, stats=statistics)
            region = f"per-layer loss {entry.name} ({entry.target}) over router logits {x.name}"
            if not self._apply(gm, rw, result, region, "left this layer's loss unchanged"):
                continue
            new_nodes += rw.new_nodes
            layer_of.update(rw.layer_of)
            totals += list(rw.replace.values())
            loop_layers.add(x)
        stats["loop_form_layers"] = len(loop_layers)
        if not new_nodes:
            covered = {n for n in graph.nodes if n.meta.get("moe_passes") == TAG}
            on_inputs = recognise.loop_entries_on_inputs(graph, covered)
            if on_inputs and not routers.logits:
                result.skip(
                    f"per-layer loss over {len(on_inputs)} router logits arriving as graph inputs "
                    f"({', '.join(n.name for n in on_inputs[:8])})",
                    "the loss is already per layer and no router softmax is in this graph to reuse: nothing to rewrite",
                )
            return
        reused = reuse_router_ops(graph, [n for n in new_nodes if not n._erased], statistics.notes)
        graph.eliminate_dead_code()
        live = [n for n in new_nodes if not n._erased]
        stats["nodes_hoisted"] += placement.hoist(graph, live, routers.logits)
        stats["all_reduces_merged"] += _merge_all_reduces(graph, [t for t in totals if not t._erased])
        propagate_meta(gm, [n for n in graph.nodes if n.meta.get("moe_passes") == TAG])
        stats["softmax_reused"] += reused["softmax"]
        stats["topk_reused"] += reused["topk"]
        stats["counts_without_onehot"] += statistics.counts_without_onehot
        stats["logsumexp_grad_from_router_softmax"] += statistics.logsumexp_grad_from_router_softmax
        if loop_layers:
            result.matched.append(
                f"per-layer loss over {len(loop_layers)} layers: partial sums placed in their layer "
                f"(softmax reused {reused['softmax']}, top-k reused {reused['topk']})"
            )
        for note in dict.fromkeys(statistics.notes):
            result.matched.append(f"note: {note}")
        result.changed = True

    def _apply(self, gm: fx.GraphModule, rw: Rewriter, result: PassResult, region: str, what: str) -> bool:
        graph = gm.graph
        try:
            rw.run()
        except Unsupported as err:
            for node in reversed(rw.new_nodes):
                if not node._erased and not node.users:
                    graph.erase_node(node)
            result.skip(region, f"{what}: {err}")
            return False
        for old, new in rw.replace.items():
            old.replace_all_uses_with(new)
        for node in rw.erase:
            if not node.users:
                graph.erase_node(node)
        graph.eliminate_dead_code()
        rw.new_nodes = [n for n in rw.new_nodes if not n._erased]
        propagate_meta(gm, rw.new_nodes)
        return True


def _layer_name(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        entry = list(stack.values())[-1]
        return str(entry[0] if isinstance(entry, tuple) else entry)
    return node.name


def _merge_all_reduces(graph: fx.Graph, totals: list[fx.Node]) -> int:
    """All of the loss's all-reduces (same reduce op and group, one wait each) become one all-reduce
    of the flattened statistics: sums are linear, so reducing the layer-summed stats is exact."""
    from moe_passes.ir.facts import collective_kind, is_wait

    below = recognise.forward_closure(totals)
    buckets: dict[tuple[Any, ...], list[fx.Node]] = {}
    for n in graph.nodes:
        if n in below and collective_kind(n) == "all_reduce" and len(n.users) == 1 and is_wait(next(iter(n.users))):
            buckets.setdefault((n.target, n.args[1], n.args[2]), []).append(n)
    merged = 0
    for (target, op, group), reduces in buckets.items():
        vals = [node_value(r) for r in reduces]
        if (
            len(reduces) < 2
            or any(not isinstance(v, torch.Tensor) for v in vals)
            or len({v.dtype for v in vals}) != 1
            or not all(is_static_int(s) for v in vals for s in v.shape)
        ):
            continue
        order = {n: i for i, n in enumerate(graph.nodes)}
        waits = [next(iter(r.users)) for r in reduces]
        first_wait = min(waits, key=order.__getitem__)
        if any(order[r.args[0]] >= order[first_wait] for r in reduces):
            continue
        wait_target = waits[0].target
        with graph.inserting_before(first_wait):
            flats = [graph.call_function(aten.reshape.default, (r.args[0], [-1])) for r in reduces]
            flat = graph.call_function(aten.cat.default, (flats,))
            reduced = graph.call_function(target, (flat, op, group))
            waited = graph.call_function(wait_target, (reduced,))
            sizes = [v.numel() for v in vals]
            pieces = graph.call_function(aten.split_with_sizes.default, (waited, sizes))
            shaped = [
                graph.call_function(aten.view.default, (graph.call_function(operator.getitem, (pieces, i)), list(v.shape)))
                for i, v in enumerate(vals)
            ]
        for new in (*flats, flat, reduced, waited, pieces, *shaped, *(s.args[0] for s in shaped)):
            new.meta["moe_passes"] = TAG
        for r, wait, new in zip(reduces, waits, shaped):
            wait.replace_all_uses_with(new)
            graph.erase_node(wait)
            graph.erase_node(r)
        merged += len(reduces)
    return merged
