"""``async_offload``: hand router tensors that leave the graph to the host, copied asynchronously.

Routing replay and expert-load logging read every layer's routing decisions
(selected experts) and, detached, its router logits on the host. Without
this pass the user's ``.cpu()`` after the step is a blocking copy that stalls
the stream, and the device tensors returned for it stay alive until the user
drops them. This pass starts a device-to-host copy of each router output right
after the tensor is produced (``moe_passes::offload_start`` on a ``detach``ed
value) and waits for it at the end of the forward (``moe_passes::offload_wait``);
the graph returns the host tensor in place of the device one.

What the caller gets (the user-visible contract):

* every router output the pass offloads is returned as a **host tensor with the
  same values, dtype and shape** (pinned memory on CUDA), as if the caller had
  called ``.cpu()`` on it, but without a blocking copy;
* an output that **requires grad** (router logits returned as the model writes
  them, e.g. ``output_router_logits=True`` in a training step) keeps its
  gradient: the host tensor requires grad and its backward moves the gradient
  back to the device logits, exactly like ``logits.cpu()`` in eager
  (``offload_wait``'s ``grad_source``). No gradient changes, silently or not;
* what autograd needs stays as it is: the copy is taken from a ``detach`` of
  the device value, and the device value itself still feeds every consumer in
  the graph and is saved for backward where a backward formula saves it (e.g.
  ``topk`` saves its indices).

So the device buffer of an offloaded output is

* released right after the copy when nothing else needs it (detached logits
  returned for logging, any router output in an inference graph);
* kept for backward when autograd saves it (selected experts under ``topk``):
  the host copy is still delivered without a blocking copy, it just frees
  nothing on the device;
* kept until the wait when the output requires grad (the wait's gradient edge
  holds it; without the pass the caller would hold it longer, as an output).

The report says, per output, what was offloaded (node, kind, module, shape,
dtype, bytes) and which of the three happened to the device buffer, and for
every router output left alone, why.

Stage: **pre-grad**, on the Dynamo graph or on its canonical pre-dispatch ATen
re-trace (``moe_passes.ir.canonical``). Only there are the *user's* outputs
exactly the graph outputs (after AOT partitioning, forward outputs mix user
outputs with tensors saved for backward) and is ``nn_module_stack`` intact to
tell a router's linear from any other. Router tensors are recognised by
meaning in both IRs: the output of a linear/matmul whose innermost module is a
router inside an MoE block; a softmax/sigmoid of it; ``topk`` indices of
those; and views, detaches, dtype casts, concatenations and index arithmetic of
those (``F.linear``/``Tensor.softmax``/``torch.topk``/``.detach()`` in torch IR,
``aten.linear.default``/``aten.softmax.int``/``aten.topk.default``/
``aten.detach.default`` in ATen IR).

Which outputs (``BackendConfig.offload_targets``): ``"auto"`` offloads every
router output (kinds ``router_logits`` and ``selected_experts``); an explicit
tuple of kinds offloads only those. Skipped, each with its reason: kinds not
listed, outputs **mutated in place** after they are produced (a copy taken at
production would return stale values), outputs without a recorded value.
"""

from __future__ import annotations

import logging
import operator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._pytree import tree_leaves

from moe_passes.pipeline.pass_base import GraphPass, PassResult
from moe_passes.ir.facts import aten_name, is_softmax, is_topk, module_types, node_value, type_name, writes_between
from moe_passes.ops.offload import OFFLOAD_START, OFFLOAD_WAIT

log = logging.getLogger(__name__)

TARGET_KINDS: tuple[str, ...] = ("router_logits", "selected_experts")
_SCORES = "routing_scores"  # softmax/sigmoid of router logits: a label on the way to selected experts

DETACH = torch.ops.aten.detach.default
SYM_SIZE = torch.ops.aten.sym_size.int

# ------------------------------------------------------------------ op meaning, both IRs

#: torch-IR functions, by meaning (ATen ops are named by their schema; methods by their name).
_TORCH_FUNCTIONS: dict[Any, str] = {
    F.linear: "linear", torch._C._nn.linear: "linear", torch.matmul: "matmul", operator.matmul: "matmul",
    torch.mm: "mm", torch.addmm: "addmm",
    F.softmax: "softmax", torch.softmax: "softmax", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid",
    F.log_softmax: "log_softmax", torch.log_softmax: "log_softmax",
    torch.cat: "cat", torch.concat: "cat", torch.stack: "stack",
    operator.add: "add", torch.add: "add", operator.sub: "sub", torch.sub: "sub",
    torch.flatten: "flatten", torch.reshape: "reshape", torch.squeeze: "squeeze", torch.unsqueeze: "unsqueeze",
    torch.clone: "clone", torch.detach: "detach",
}
#: ATen/method spellings folded onto one meaning.
_SYNONYMS = {
    "_softmax": "softmax", "_safe_softmax": "softmax", "_log_softmax": "log_softmax", "_to_copy": "to",
    "_unsafe_view": "view", "concat": "cat", "concatenate": "cat", "alias": "detach", "float": "to",
    "type": "to", "type_as": "to", "view_as": "view", "reshape_as": "reshape", "lift_fresh_copy": "clone",
}
_ROUTER_OPS = frozenset({"linear", "matmul", "mm", "addmm"})
_SHAPE_OPS = frozenset({"detach", "view", "reshape", "contiguous", "clone", "to", "flatten", "squeeze", "unsqueeze"})
_SCORE_OPS = frozenset({"softmax", "sigmoid", "log_softmax"})
_JOIN_OPS = frozenset({"cat", "stack"})
_INDEX_ARITHMETIC = frozenset({"add", "sub"})


def op_meaning(node: fx.Node) -> str | None:
    """One name per op whatever its spelling: ``"softmax"`` for ``F.softmax``, ``.softmax``, ``aten.softmax.int``."""
    if node.op == "call_method":
        name = str(node.target)
    elif node.op == "call_function":
        name = aten_name(node) or _TORCH_FUNCTIONS.get(node.target)
        if name is None:
            return None
    else:
        return None
    return _SYNONYMS.get(name, name)


def _is_router_linear(node: fx.Node) -> bool:
    """A linear/matmul whose innermost module is a router (``*.gate`` / ``*.router`` / ``*Router``) inside an MoE block."""
    if op_meaning(node) not in _ROUTER_OPS:
        return False
    stack = module_types(node)
    if not stack:
        return False
    path, mtype = stack[-1]
    is_router = path.rsplit(".", 1)[-1] in ("gate", "router") or type_name(mtype).lower().endswith("router")
    in_moe = any("moe" in type_name(t).lower() for _, t in stack[:-1])
    return is_router and in_moe


def _is_shape_op(node: fx.Node) -> bool:
    """Ops that keep a router tensor's meaning: views, detach, copies, dtype casts."""
    return op_meaning(node) in _SHAPE_OPS


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if isinstance(node_value(a), torch.Tensor)]


def classify(graph: fx.Graph) -> dict[fx.Node, str]:
    """Label router tensors: ``router_logits``, ``routing_scores`` (internal), ``selected_experts``."""
    kinds: dict[fx.Node, str] = {}
    for node in graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        meaning = op_meaning(node)
        first = kinds.get(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
        if _is_router_linear(node):
            kinds[node] = "router_logits"
        elif meaning in _SHAPE_OPS:
            if first is not None:
                kinds[node] = first
        elif meaning in _SCORE_OPS or is_softmax(node):
            if first in ("router_logits", _SCORES):
                kinds[node] = _SCORES
        elif meaning in _JOIN_OPS:
            labels = {kinds.get(a) for a in _tensor_inputs(node)}
            if len(labels) == 1 and None not in labels:
                kinds[node] = labels.pop()
        elif node.target is operator.getitem and node.args[1] == 1 and isinstance(node.args[0], fx.Node):
            topk = node.args[0]
            source = topk.args[0] if topk.args else None
            if is_topk(topk) and kinds.get(source) in ("router_logits", _SCORES):
                kinds[node] = "selected_experts"
        elif meaning in _INDEX_ARITHMETIC:
            labels = [kinds.get(a) for a in _tensor_inputs(node)]
            if labels.count("selected_experts") == 1 and all(k in (None, "selected_experts") for k in labels):
                kinds[node] = "selected_experts"
    return kinds


# ------------------------------------------------------------------ what autograd keeps


def _storage(val: Any) -> StorageWeakRef | None:
    if not isinstance(val, torch.Tensor):
        return None
    try:
        return StorageWeakRef(val.untyped_storage())
    except (NotImplementedError, RuntimeError):
        return None


@dataclass
class AutogradFacts:
    """What a training step's autograd does with the graph's values (from a fake re-run, or a safe estimate)."""

    saved: set[fx.Node]  # nodes whose storage some backward formula saves
    requires_grad: set[fx.Node]  # nodes whose value requires grad
    exact: bool = True  # False: the fake re-run failed; ``requires_grad`` over-approximates, ``saved`` is empty
    reason: str | None = None  # why not exact


def _input_value(node: fx.Node) -> Any:
    """A placeholder's value with its ``requires_grad`` as Dynamo saw it (ATen re-traces drop it in ``val``)."""
    example = node.meta.get("example_value")
    return example if isinstance(example, torch.Tensor) else node_value(node)


def _output_values(gm: fx.GraphModule) -> list[Any] | None:
    """Dynamo's values of the graph outputs (they record ``requires_grad``); None in an ATen re-trace."""
    outs = [a for a in tree_leaves(gm.graph.output_node().args) if isinstance(a, fx.Node)]
    computed = [n for n in outs if n.op in ("call_function", "call_method")]
    if not computed or any("example_value" not in n.meta for n in computed):
        return None
    return [n.meta["example_value"] for n in computed]


def _grad_dataflow(gm: fx.GraphModule) -> set[fx.Node]:
    """Over-approximation of which nodes require grad: floating values computed from inputs that do."""
    out: set[fx.Node] = set()
    for node in gm.graph.nodes:
        val = node_value(node) if node.op != "placeholder" else _input_value(node)
        if node.op in ("placeholder", "get_attr"):
            if isinstance(val, torch.Tensor) and val.requires_grad:
                out.add(node)
            continue
        if node.op not in ("call_function", "call_method") or op_meaning(node) == "detach":
            continue
        floating = any(isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()) for t in tree_leaves(val))
        if floating and any(a in out for a in node.all_input_nodes):
            out.add(node)
    return out


def autograd_facts(gm: fx.GraphModule) -> AutogradFacts:
    """Which nodes require grad and which storages backward saves, in either IR.

    Runs the graph on the placeholders' own fake values (so parameters require
    grad as in training, and everything stays in Dynamo's fake mode) with grad
    enabled, under ``saved_tensors_hooks`` recording what every backward node
    packs. A graph none of whose outputs requires grad (traced under
    ``no_grad``, inference) has no backward: nothing is saved. Dynamo's graph
    says so in its output values (not in its other values: views of parameters
    are recorded as requiring grad even under ``no_grad``); an ATen re-trace does
    not record ``requires_grad``, so there the current grad mode decides, as it
    does for AOT autograd.
    """
    outputs = _output_values(gm)
    if outputs is not None and not any(isinstance(t, torch.Tensor) and t.requires_grad for v in outputs for t in tree_leaves(v)):
        return AutogradFacts(set(), set())
    if outputs is None and not torch.is_grad_enabled():
        return AutogradFacts(set(), set())
    inputs = [_input_value(n) for n in gm.graph.find_nodes(op="placeholder")]
    modes = {id(v.fake_mode): v.fake_mode for v in inputs if isinstance(v, FakeTensor)}
    reason = None
    if len(modes) != 1 or any(v is None for v in inputs):
        reason = "graph inputs carry no single fake mode"
    else:
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
        except Exception as e:  # cannot re-run on fake tensors: fall back to a safe estimate, say why
            reason = f"fake re-run failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        else:
            storages = {s for s in (_storage(t) for t in saved) if s is not None}
            return AutogradFacts(
                saved={n for n, v in interp.env.items() if _storage(v) in storages},
                requires_grad={n for n, v in interp.env.items()
                               if any(isinstance(t, torch.Tensor) and t.requires_grad for t in tree_leaves(v))},
            )
    log.info("async_offload: autograd facts estimated (%s)", reason)
    return AutogradFacts(set(), _grad_dataflow(gm), exact=False, reason=reason)


def saved_for_backward(gm: fx.GraphModule) -> set[fx.Node] | str:
    """Nodes whose storage eager autograd would save for backward; or why it cannot tell."""
    facts = autograd_facts(gm)
    return facts.saved if facts.exact else str(facts.reason)


# ------------------------------------------------------------------ the pass

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
        kinds = classify(graph)
        candidates = [n for n in out_nodes if kinds.get(n) in TARGET_KINDS]
        result.stats.update(targets=list(explicit) if explicit else "auto", router_outputs=len(candidates))
        if not candidates:
            result.skip("graph", "no router logits or selected experts among the graph outputs")
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
            "bytes": _static_bytes(val),
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


def _set_value(new: fx.Node, like: fx.Node, value: Any) -> None:
    """Record ``value`` under the metadata key the graph's own nodes use (``example_value`` in Dynamo's graph)."""
    new.meta["example_value" if "example_value" in like.meta else "val"] = value


def alias_root(node: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """The earliest node sharing ``node``'s storage through view-like ops (detach, view, ...), and that chain."""
    chain: list[fx.Node] = []
    storage = _storage(node_value(node))
    cur = node
    while (
        _is_shape_op(cur)
        and cur.args
        and isinstance(cur.args[0], fx.Node)
        and cur.args[0].op != "placeholder"
        and storage is not None
        and _storage(node_value(cur.args[0])) == storage
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
