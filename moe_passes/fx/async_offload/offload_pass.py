"""The ``async_offload`` rewrite: an ``offload_start`` right after each chosen router output's storage is
produced, an ``offload_wait`` at the output, the host tensor returned in its place (see the package
docstring for the contract)."""


from __future__ import annotations

import logging
from typing import Any

import torch
import torch.fx as fx
from torch.utils._pytree import tree_leaves

from moe_passes.fx.async_offload.routers import LOOKED_FOR, TARGET_KINDS, RouterAnalysis, analyse, classify, is_shape_op
from moe_passes.ir.autograd import AutogradFacts, autograd_facts
from moe_passes.ir.facts import module_types, node_value, static_nbytes, storage_ref, writes_between
from moe_passes.ops.offload import OFFLOAD_START, OFFLOAD_WAIT
from moe_passes.pipeline.pass_base import GraphPass, PassResult

log = logging.getLogger(__name__)

DETACH = torch.ops.aten.detach.default
SYM_SIZE = torch.ops.aten.sym_size.int

KEPT_FOR_BACKWARD = "kept for backward (autograd saves it); the host copy still arrives without a blocking copy"
KEPT_FOR_GRADIENT = "kept until the wait (the output requires grad: its gradient flows back through the host copy)"
RELEASED = "released after the copy (nothing else holds it)"
UNKNOWN_IF_SAVED = "released after the copy unless backward saves it (could not tell: {reason})"


class AsyncOffloadPass(GraphPass):
    """Offload router tensors that are graph outputs: start after the producer, wait at the output."""

    name = "async_offload"
    stage = "pre_grad"
    #: Router tensors are recognised by meaning in Dynamo's torch IR and in the canonical ATen IR alike.
    ir = "any"
    #: An output-boundary rewrite: it reads the final graph's outputs, and its waits must follow all work,
    #: so it runs after the passes that restructure the forward (they see no offload ops in their regions).
    runs_after = ("layerwise_aux_loss", "domino_ep")

    def trigger(self, gm: fx.GraphModule) -> str | None:
        """Router logits / selected experts among the graph outputs, recognised as the pass itself does."""
        kinds = classify(gm.graph)
        outs = {a for a in tree_leaves(gm.graph.output_node().args) if isinstance(a, fx.Node) and kinds.get(a) in TARGET_KINDS}
        return f"{len(outs)} router tensor(s) among the graph outputs" if outs else None

    def targets(self) -> tuple[str, ...] | None:
        """The explicit kinds to offload, or None for "auto"."""
        targets = self.config.offload_targets
        if targets == "auto":
            return None
        unknown = [t for t in targets if t not in TARGET_KINDS]
        if unknown:
            raise ValueError(f"offload_targets has unknown kind(s) {unknown}; known kinds: {list(TARGET_KINDS)} or 'auto'")
        return tuple(targets)

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        result = PassResult(self.name)
        explicit = self.targets()
        graph = gm.graph
        output = graph.output_node()
        out_nodes = list(dict.fromkeys(a for a in tree_leaves(output.args) if isinstance(a, fx.Node)))
        routers = analyse(graph)
        kinds = routers.kinds
        candidates = [n for n in out_nodes if kinds.get(n) in TARGET_KINDS]
        result.stats.update(targets=list(explicit) if explicit else "auto", router_outputs=len(candidates))
        rejected = [n for n in out_nodes if n in routers.rejected]
        if not candidates:
            result.skip("graph", no_router_reason(routers, rejected))
        for node in rejected:
            what, finding = routers.rejected[node]
            result.skip(f"{node.name} ({what})", f"not a router output: {finding.reason}")
        if not candidates:
            return result
        chosen: list[fx.Node] = []
        roots: dict[fx.Node, fx.Node] = {}
        for node in candidates:
            reason = self._skip_reason(node, kinds[node], explicit, output)
            root = alias_root(node)[0]
            if reason is None and root in roots:
                reason = (
                    f"shares its device buffer with output {roots[root].name}, already offloaded; two host copies "
                    "of one buffer with different gradient edges are mis-handled by AOT autograd (torch 2.13: a "
                    "None tangent), so this output stays on the device"
                )
            if reason is None:
                chosen.append(node)
                roots[root] = node
            else:
                result.skip(f"{node.name} ({kinds[node]})", reason)
        if not chosen:
            return result
        facts = autograd_facts(gm)
        records = [self._record(n, kinds[n], facts) for n in chosen]
        self._rewrite(graph, output, out_nodes, chosen, facts)
        gm.recompile()
        result.changed = True
        result.matched = [f"{r['name']} ({r['kind']})" for r in records]
        kept_backward = sum(r["bytes"] for r in records if r["device_buffer"] == KEPT_FOR_BACKWARD)
        kept_gradient = sum(r["bytes"] for r in records if r["device_buffer"] == KEPT_FOR_GRADIENT)
        total = sum(r["bytes"] for r in records)
        result.stats.update(
            offloaded=len(chosen),
            offloaded_bytes=total,
            device_bytes_released=total - kept_backward - kept_gradient,
            device_bytes_kept_for_backward=kept_backward,
            device_bytes_kept_for_gradient=kept_gradient,
            outputs=records,
        )
        if not facts.exact:
            result.stats["autograd_facts"] = f"estimated ({facts.reason})"
        log.info("%s: offloading %s (%d bytes)", self.name, result.matched, total)
        return result

    def _skip_reason(self, node: fx.Node, kind: str, explicit: tuple[str, ...] | None, output: fx.Node) -> str | None:
        val = node_value(node)
        if not isinstance(val, torch.Tensor):
            return "no fake tensor value recorded for it"
        if explicit is not None and kind not in explicit:
            return f"kind {kind!r} is not in offload_targets {list(explicit)}"
        root = alias_root(node)[0]
        writes = writes_between(root, root, output)
        if writes:
            return f"mutated in place by {writes[0].name} after it is produced; a copy at production would be stale"
        return None

    @staticmethod
    def _record(node: fx.Node, kind: str, facts: AutogradFacts) -> dict[str, Any]:
        val = node_value(node)
        root = alias_root(node)[0]
        if node in facts.requires_grad:
            buffer = KEPT_FOR_GRADIENT
        elif node in facts.saved or root in facts.saved:
            buffer = KEPT_FOR_BACKWARD
        elif not facts.exact:
            buffer = UNKNOWN_IF_SAVED.format(reason=facts.reason)
        else:
            buffer = RELEASED
        stack = module_types(root)
        return {
            "name": node.name,
            "kind": kind,
            "module": stack[-1][0] if stack else None,
            "shape": [s if isinstance(s, int) else str(s) for s in val.shape],
            "dtype": str(val.dtype).replace("torch.", ""),
            "bytes": static_nbytes(val),
            "requires_grad": node in facts.requires_grad,
            "device_buffer": buffer,
        }

    @staticmethod
    def _rewrite(
        graph: fx.Graph, output: fx.Node, out_nodes: list[fx.Node], chosen: list[fx.Node], facts: AutogradFacts
    ) -> None:
        fake_mode = node_value(chosen[0]).fake_mode
        tickets: dict[fx.Node, fx.Node] = {}
        shapes: dict[fx.Node, list[Any]] = {}
        sources: dict[fx.Node, fx.Node] = {}
        for node in chosen:
            val = node_value(node)
            source = _hoist(graph, node)
            with graph.inserting_after(source):
                detached = graph.call_function(DETACH, (source,))
            with graph.inserting_after(detached):
                start = graph.call_function(OFFLOAD_START, (detached,))
            for new in (detached, start):
                _copy_source_meta(source, new)
            with fake_mode:
                _set_value(detached, node, val.detach())
                _set_value(start, node, OFFLOAD_START(val.detach()))
            shape: list[Any] = []
            anchor = start
            for dim, size in enumerate(val.shape):
                if isinstance(size, int):
                    shape.append(size)
                    continue
                with graph.inserting_after(anchor):
                    anchor = graph.call_function(SYM_SIZE, (source, dim))
                _set_value(anchor, node, size)
                shape.append(anchor)
            tickets[node], shapes[node], sources[node] = start, shape, source
        # The wait must follow all other work of the forward; Inductor reorders extern calls
        # for peak memory, so that order is made a data dependency (``after``).
        others: list[fx.Node] = []
        with graph.inserting_before(output):
            for node in out_nodes:
                val = node_value(node)
                if node in tickets or node.op == "placeholder" or not isinstance(val, torch.Tensor):
                    continue
                if node in facts.requires_grad or val.requires_grad:
                    detached = graph.call_function(DETACH, (node,))
                    with fake_mode:
                        _set_value(detached, node, val.detach())
                    others.append(detached)
                else:
                    others.append(node)
            for node in chosen:
                val = node_value(node)
                after = others + [t for n, t in tickets.items() if n is not node]
                grad_source = sources[node] if node in facts.requires_grad else None
                wait = graph.call_function(OFFLOAD_WAIT, (tickets[node], shapes[node], val.dtype, after, grad_source))
                with fake_mode:
                    host = torch.empty(val.shape, dtype=val.dtype, device="cpu")
                    if grad_source is not None and "example_value" in node.meta:  # Dynamo's values carry requires_grad
                        host.requires_grad_(True)
                    _set_value(wait, node, host)
                output.replace_input_with(node, wait)
        for node in chosen:
            _erase_unused_chain(graph, node)


def no_router_reason(routers: RouterAnalysis, rejected: list[fx.Node]) -> str:
    """Why no graph output is offloaded: what was looked for, and what the graph's top-ks do instead."""
    head = f"no router logits or selected experts among the graph outputs ({LOOKED_FOR})"
    if not routers.topks:
        return f"{head}: the graph has no top-k"
    routing = [f for f in routers.topks if f.routes]
    parts: list[str] = []
    if routing:
        parts.append(
            f"{len(routing)} top-k(s) route experts here ({routing[0].evidence}), but none of their logits or indices "
            "(or a view/cast/stack/cat of them) is a graph output"
        )
    by_topk: dict[fx.Node, list[str]] = {}
    for node in rejected:
        what, finding = routers.rejected[node]
        by_topk.setdefault(finding.node, []).append(f"{node.name} ({what})")
    for finding in routers.topks:
        if finding.node in by_topk:
            names = by_topk[finding.node]
            parts.append(f"output{'s' if len(names) > 1 else ''} {', '.join(names)} rejected: {finding.reason}")
    if not routing and not rejected:
        parts.extend(f.reason or "" for f in routers.topks[:3])
    return f"{head}: " + "; ".join(parts)


def _set_value(new: fx.Node, like: fx.Node, value: Any) -> None:
    """Record ``value`` under the metadata key the graph's own nodes use (``example_value`` in Dynamo's graph)."""
    new.meta["example_value" if "example_value" in like.meta else "val"] = value


def alias_root(node: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """The earliest node sharing ``node``'s storage through view-like ops (detach, view, ...), and that chain."""
    chain: list[fx.Node] = []
    storage = storage_ref(node_value(node))
    cur = node
    while (
        is_shape_op(cur)
        and cur.args
        and isinstance(cur.args[0], fx.Node)
        and cur.args[0].op != "placeholder"
        and storage is not None
        and storage_ref(node_value(cur.args[0])) == storage
    ):
        chain.append(cur)
        cur = cur.args[0]
    return cur, chain[::-1]


def _hoist(graph: fx.Graph, node: fx.Node) -> fx.Node:
    """Re-create ``node``'s alias chain right after its storage's producer, so the copy starts there.

    An output like ``router_logits.detach()`` is often computed at the end of
    the layer; the values exist as soon as the router's linear ran. Falls back
    to ``node`` when a chain op takes an argument defined after the producer.
    """
    root, chain = alias_root(node)
    if not chain:
        return node
    order = {n: i for i, n in enumerate(graph.nodes)}
    for link in chain:
        if any(order[a] > order[root] for a in link.all_input_nodes if a not in chain):
            return node
    env: dict[fx.Node, fx.Node] = {}
    anchor = root
    for link in chain:
        with graph.inserting_after(anchor):
            anchor = graph.node_copy(link, lambda a: env.get(a, a))
        env[link] = anchor
    return anchor


def _erase_unused_chain(graph: fx.Graph, node: fx.Node) -> None:
    """Drop the original alias chain of an offloaded output once nothing uses it any more."""
    _, chain = alias_root(node)
    for link in reversed(chain):
        if link.users:
            return
        graph.erase_node(link)


def _copy_source_meta(src: fx.Node, dst: fx.Node) -> None:
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if key in src.meta:
            dst.meta[key] = src.meta[key]
