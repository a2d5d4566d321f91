"""``async_offload``: copy router tensors that leave the graph to the host, asynchronously.

Router logits and selected experts returned for logging or routing replay sit
on the device until the step ends, and the user's ``.cpu()`` stalls the
stream. This pass starts the device-to-host copy right after the tensor is
produced (``moe_passes::offload_start``) and waits for it at the end of the
forward (``moe_passes::offload_wait``), returning the host tensor instead of
the device one. The device tensor is then freed at its last device use, not
held as a graph output until the forward ends.

Stage: **pre-grad**, on the Dynamo graph. Only there are the *user's* outputs
exactly the graph outputs (after AOT partitioning, forward outputs mix user
outputs with tensors saved for backward) and is ``nn_module_stack`` intact to
tell a router's ``F.linear`` from any other. The inserted ops are opaque
custom ops with fake kernels, so AOT autograd and Inductor carry them through
as extern calls; the offloaded values never require grad, so autograd has
nothing to differentiate through them.

Which outputs (``BackendConfig.offload_targets``):

* kinds: ``router_logits`` (the output of the router ``F.linear`` inside an
  MoE block, or a detach/view/dtype-cast/cat/stack of such outputs) and
  ``selected_experts`` (``topk`` indices of a softmax/sigmoid of router
  logits, or index arithmetic/reshapes of them).
* ``"auto"``: every router tensor output that backward does not keep.
  Explicit kinds: every output of those kinds, even when backward keeps its
  device buffer (the host copy is still correct; it just frees nothing).

Safety rules, each reported as a skip with its reason:

* an output that **requires grad** is never offloaded, whatever the config:
  the caller may backpropagate through it, and a host copy would silently
  cut that gradient path (and the op has no backward);
* an output that is **mutated in place** after it is produced is not
  offloaded (a copy taken at production would return stale values);
* in ``"auto"`` mode an output whose storage backward **saves** (found by
  running the graph on fake tensors under ``saved_tensors_hooks``, e.g.
  ``topk`` saves its indices when the routing weights need grad) is left
  alone: the device buffer lives on for backward, so the copy buys nothing.
"""

from __future__ import annotations

import logging
import operator
from contextlib import ExitStack
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._pytree import tree_leaves

from moe_passes.fx.match import is_topk, module_types
from moe_passes.fx.pass_base import GraphPass, PassResult
from moe_passes.inductor.ops import OFFLOAD_START, OFFLOAD_WAIT

log = logging.getLogger("moe_passes")

TARGET_KINDS: tuple[str, ...] = ("router_logits", "selected_experts")
_SCORES = "routing_scores"  # softmax/sigmoid of router logits: a label on the way to selected experts

_SHAPE_METHODS = frozenset(
    {"detach", "view", "reshape", "contiguous", "clone", "float", "to", "flatten", "squeeze", "unsqueeze",
     "view_as", "reshape_as", "type"}
)
_SHAPE_FUNCTIONS = frozenset({torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.clone, torch.detach})
_SCORE_FUNCTIONS = frozenset({F.softmax, torch.softmax, torch.sigmoid, F.sigmoid, F.log_softmax, torch.log_softmax})
_SCORE_METHODS = frozenset({"softmax", "sigmoid", "log_softmax"})
_JOIN_FUNCTIONS = frozenset({torch.cat, torch.stack, torch.concat})
_INDEX_ARITHMETIC = frozenset({operator.add, operator.sub, torch.add, torch.sub})


def _val(node: Any) -> Any:
    if not isinstance(node, fx.Node):
        return None
    return node.meta.get("val", node.meta.get("example_value"))


def _type_name(t: Any) -> str:
    return t.__name__ if isinstance(t, type) else str(t).rsplit(".", 1)[-1].strip("'>")


def _is_router_linear(node: fx.Node) -> bool:
    """``F.linear`` whose innermost module is a router (``*.gate`` / ``*.router`` / ``*Router``) inside an MoE block."""
    if node.op != "call_function" or node.target not in (F.linear, torch._C._nn.linear):
        return False
    stack = module_types(node)
    if not stack:
        return False
    path, mtype = stack[-1]
    is_router = path.rsplit(".", 1)[-1] in ("gate", "router") or _type_name(mtype).lower().endswith("router")
    in_moe = any("moe" in _type_name(t).lower() for _, t in stack[:-1])
    return is_router and in_moe


def _is_shape_op(node: fx.Node) -> bool:
    """Ops that keep a router tensor's meaning: views, detach, copies, dtype casts."""
    if node.op == "call_method":
        return node.target in _SHAPE_METHODS
    return node.target in _SHAPE_FUNCTIONS


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if isinstance(_val(a), torch.Tensor)]


def classify(graph: fx.Graph) -> dict[fx.Node, str]:
    """Label router tensors: ``router_logits``, ``routing_scores`` (internal), ``selected_experts``."""
    kinds: dict[fx.Node, str] = {}
    for node in graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        inputs = _tensor_inputs(node)
        first = kinds.get(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
        if _is_router_linear(node):
            kinds[node] = "router_logits"
        elif _is_shape_op(node):
            if first is not None:
                kinds[node] = first
        elif (node.op == "call_method" and node.target in _SCORE_METHODS) or node.target in _SCORE_FUNCTIONS:
            if first in ("router_logits", _SCORES):
                kinds[node] = _SCORES
        elif node.target in _JOIN_FUNCTIONS:
            labels = {kinds.get(a) for a in inputs}
            if len(labels) == 1 and None not in labels:
                kinds[node] = labels.pop()
        elif node.target is operator.getitem and node.args[1] == 1 and isinstance(node.args[0], fx.Node):
            topk = node.args[0]
            source = topk.args[0] if topk.args else None
            if is_topk(topk) and kinds.get(source) in ("router_logits", _SCORES):
                kinds[node] = "selected_experts"
        elif node.target in _INDEX_ARITHMETIC:
            labels = [kinds.get(a) for a in inputs]
            if labels.count("selected_experts") == 1 and all(k in (None, "selected_experts") for k in labels):
                kinds[node] = "selected_experts"
    return kinds


def _storage(val: Any) -> StorageWeakRef | None:
    if not isinstance(val, torch.Tensor):
        return None
    try:
        return StorageWeakRef(val.untyped_storage())
    except (NotImplementedError, RuntimeError):
        return None


def _mutates(node: fx.Node) -> bool:
    """Whether a torch-IR node writes one of its tensor arguments in place."""
    if node.kwargs.get("out") is not None:
        return True
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.endswith("__")
    if node.op != "call_function":
        return False
    if node.target is operator.setitem:
        return True
    if isinstance(node.target, torch._ops.OpOverload):
        return node.target._schema.is_mutable
    name = getattr(node.target, "__name__", "")
    return name.endswith("_") and not name.endswith("__")


def saved_for_backward(gm: fx.GraphModule) -> set[fx.Node] | str:
    """Nodes whose storage eager autograd would save for backward; or why it cannot tell.

    Runs the graph on the placeholders' own fake values (so parameters require
    grad as in training, and everything stays in Dynamo's fake mode) under
    ``saved_tensors_hooks``, recording what every backward node packs.
    """
    # Traced without grad (inference, no_grad): autograd saves nothing. Views of parameters
    # (``weight[e]``) are not evidence: Dynamo records them as requiring grad even then.
    computed = [_val(n) for n in gm.graph.nodes if n.op in ("call_function", "call_method") and n.target is not operator.getitem]
    if not any(isinstance(t, torch.Tensor) and t.requires_grad for v in computed for t in tree_leaves(v)):
        return set()
    inputs = [_val(n) for n in gm.graph.find_nodes(op="placeholder")]
    modes = {id(v.fake_mode): v.fake_mode for v in inputs if isinstance(v, FakeTensor)}
    if len(modes) != 1 or any(v is None for v in inputs):
        return "graph inputs carry no single fake mode"
    mode = next(iter(modes.values()))
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    interp = fx.Interpreter(gm, garbage_collect_values=False)
    try:
        with ExitStack() as stack:
            stack.enter_context(mode)
            if mode.shape_env is not None:
                stack.enter_context(mode.shape_env.ignore_fresh_unbacked_symbols())
            stack.enter_context(torch.enable_grad())
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))
            interp.run(*inputs, enable_io_processing=False)
    except Exception as e:  # cannot re-run on fake tensors: say why; "auto" then offloads nothing
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    storages = {s for s in (_storage(t) for t in saved) if s is not None}
    return {n for n, v in interp.env.items() if _storage(v) in storages}


class AsyncOffloadPass(GraphPass):
    """Offload router tensors that are graph outputs: start after the producer, wait at the output."""

    name = "async_offload"
    stage = "pre_grad"

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
        kinds = classify(graph)
        candidates = [n for n in out_nodes if kinds.get(n) in TARGET_KINDS]
        result.stats.update(targets=list(explicit) if explicit else "auto", router_outputs=len(candidates))
        if not candidates:
            result.skip("graph", "no router logits or selected experts among the graph outputs")
            return result
        saved = saved_for_backward(gm)
        chosen: list[fx.Node] = []
        for node in candidates:
            reason = self._skip_reason(node, kinds[node], explicit, saved, graph)
            if reason is None:
                chosen.append(node)
            else:
                result.skip(f"{node.name} ({kinds[node]})", reason)
        if not chosen:
            return result
        self._rewrite(graph, output, out_nodes, chosen)
        gm.recompile()
        result.changed = True
        result.matched = [f"{n.name} ({kinds[n]})" for n in chosen]
        result.stats["offloaded"] = len(chosen)
        result.stats["offloaded_bytes"] = sum(_static_bytes(_val(n)) for n in chosen)
        if explicit is not None:
            kept = saved if isinstance(saved, str) else [n.name for n in chosen if n in saved]
            if kept:
                result.stats["device_copy_kept_for_backward"] = kept
        log.info("%s: offloading %s", self.name, result.matched)
        return result

    def _skip_reason(
        self, node: fx.Node, kind: str, explicit: tuple[str, ...] | None, saved: Any, graph: fx.Graph
    ) -> str | None:
        val = _val(node)
        if not isinstance(val, torch.Tensor):
            return "no fake tensor value recorded for it"
        if explicit is not None and kind not in explicit:
            return f"kind {kind!r} is not in offload_targets {list(explicit)}"
        if val.requires_grad:
            return (
                "requires grad: the caller may backpropagate through this output, and a detached host copy "
                "would cut that gradient path (return it .detach()ed to have it offloaded)"
            )
        mutation = self._mutated_after(node, graph)
        if mutation is not None:
            return f"mutated in place by {mutation} after it is produced; a copy at production would be stale"
        if explicit is None:
            if isinstance(saved, str):
                return f"cannot tell whether backward keeps it (fake re-run failed: {saved}); 'auto' offloads only what it can prove"
            if node in saved:
                return (
                    "backward keeps its device buffer (saved for a backward formula, e.g. topk saves its indices), "
                    "so offloading frees nothing; list the kind in offload_targets to copy it anyway"
                )
        return None

    @staticmethod
    def _mutated_after(node: fx.Node, graph: fx.Graph) -> str | None:
        node = alias_root(node)[0]
        storage = _storage(_val(node))
        seen = False
        for other in graph.nodes:
            if other is node:
                seen = True
                continue
            if not seen or not _mutates(other):
                continue
            if any(_storage(_val(a)) == storage for a in other.all_input_nodes):
                return other.name
        return None

    @staticmethod
    def _rewrite(graph: fx.Graph, output: fx.Node, out_nodes: list[fx.Node], chosen: list[fx.Node]) -> None:
        fake_mode = _val(chosen[0]).fake_mode
        tickets: dict[fx.Node, fx.Node] = {}
        shapes: dict[fx.Node, list[Any]] = {}
        for node in chosen:
            val = _val(node)
            source = _hoist(graph, node)
            with graph.inserting_after(source):
                start = graph.call_function(OFFLOAD_START, (source,))
            _copy_source_meta(source, start)
            with fake_mode:
                start.meta["example_value"] = OFFLOAD_START(val)
            shape: list[Any] = []
            anchor = start
            for dim, size in enumerate(val.shape):
                if isinstance(size, int):
                    shape.append(size)
                    continue
                with graph.inserting_after(anchor):
                    anchor = graph.call_function(torch.ops.aten.sym_size.int, (source, dim))
                anchor.meta["example_value"] = size
                shape.append(anchor)
            tickets[node], shapes[node] = start, shape
        # The wait must follow all other work of the forward; Inductor reorders extern calls
        # for peak memory, so that order is made a data dependency (``after``).
        others: list[fx.Node] = []
        with graph.inserting_before(output):
            for node in out_nodes:
                val = _val(node)
                if node in tickets or node.op == "placeholder" or not isinstance(val, torch.Tensor):
                    continue
                if val.requires_grad:
                    detached = graph.call_method("detach", (node,))
                    with fake_mode:
                        detached.meta["example_value"] = val.detach()
                    others.append(detached)
                else:
                    others.append(node)
            for node in chosen:
                after = others + [t for n, t in tickets.items() if n is not node]
                wait = graph.call_function(OFFLOAD_WAIT, (tickets[node], shapes[node], _val(node).dtype, after))
                with fake_mode:
                    wait.meta["example_value"] = torch.empty(_val(node).shape, dtype=_val(node).dtype, device="cpu")
                output.replace_input_with(node, wait)
        for node in chosen:
            _erase_unused_chain(graph, node)


def alias_root(node: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """The earliest node sharing ``node``'s storage through view-like ops (detach, view, ...), and that chain."""
    chain: list[fx.Node] = []
    storage = _storage(_val(node))
    cur = node
    while (
        _is_shape_op(cur)
        and cur.args
        and isinstance(cur.args[0], fx.Node)
        and cur.args[0].op != "placeholder"
        and storage is not None
        and _storage(_val(cur.args[0])) == storage
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


def _static_bytes(val: Any) -> int:
    if not isinstance(val, torch.Tensor):
        return 0
    numel = 1
    for s in val.shape:
        numel *= s if isinstance(s, int) else s.node.hint if s.node.has_hint() else 0
    return int(numel) * val.element_size()
