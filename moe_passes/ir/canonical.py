"""The canonical IR the analysis passes read: Dynamo's graph re-traced to pre-dispatch ATen.

Why: Dynamo's torch-level graph spells one op many ways (``F.softmax``,
``Tensor.softmax``, ``torch.softmax``; ``.float()``/``.to``/``.type`` casts),
hides writes in method names and keeps negative dims. Re-tracing the same
forward with ``make_fx(pre_dispatch=True)`` gives one ``OpOverload`` per op
with a schema (mutation visible as ``alias_info.is_write``; dims and defaults
explicit), before autograd, so AOT autograd still derives the backward of
whatever a pass rewrites.

How (verified on torch 2.13 CPU inside a real backend call):

* the re-trace runs in **Dynamo's own fake mode and shape env**
  (``torch._guards.detect_fake_mode(example_inputs)``); a fake mode of our
  own fails with "Mixing fake modes";
* ``torch.fx.traceback.preserve_node_meta()`` keeps ``nn_module_stack``,
  ``stack_trace`` and ``source_fn_stack`` on every ATen node (absent only on
  the root module's own nodes, as in Dynamo's graph);
* unbacked sizes from ``.item()``/``.tolist()`` stay unbacked symbols of the
  same shape env, so the all-to-all split sizes remain data-dependent;
* functional collectives appear as ``_c10d_functional.*.default``.

``torch.func.functionalize`` on top hit an internal functorch assert, so the
canonical graph is *not* functionalized: in-place ATen ops stay, and every
analysis reads them from schemas (``moe_passes.ir.facts.mutated_args``).

Higher-order ops are ops (``_UnwrappingInterpreter``):

* an activation checkpoint (``tag_activation_checkpoint``: ``checkpoint(...,
  use_reentrant=False)``, ``checkpoint_wrapper``) is inlined the way AOT
  autograd traces one itself: every node recorded for its body carries
  ``meta["ac_graph_id"]`` and ``meta["recompute"]`` (``PREFER_RECOMPUTE``), which
  ``make_fx`` and AOT autograd copy onto the nodes they derive from it, so the
  passes analyse and rewrite the body and the min-cut partitioner still
  recomputes it in backward. A selective-checkpoint policy
  (``create_selective_checkpoint_contexts``, kept by Dynamo as the body's
  ``meta["_checkpoint_context_fn"]``) decides per op below autograd: such a body
  is recorded with autograd's own decompositions (``aten.mm``, not
  ``aten.linear``) and each node gets the policy's decision for its op. Any
  other ``context_fn`` refuses the re-trace with the reason;
* a user's ``torch.autograd.Function`` (``autograd_function_apply``) stays one
  node with its forward and backward bodies: its own backward survives, and an
  analysis that meets it meets an op it has no rule for;
* torch 2.11's identity-gradient wait Function is re-traced as the wait it
  means (``identity_gradient_wait``).

The re-trace is skipped (the Dynamo graph is used as is, and the reason is
returned) when no fake mode can be found (hand-built graphs), when tracing
raises, or when it would change what autograd does (``check_retrace_keeps_autograd``:
a higher-order op that did not survive, a checkpoint inlined without its
recompute tags, or a changed set of inputs that get a gradient); passes that
need the canonical form then decline with that reason.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_leaves, tree_map

from moe_passes.errors import error_summary
from moe_passes.ir.autograd import changed_gradient_inputs
from moe_passes.ir.facts import is_wait, node_value, op_namespace_and_name
from moe_passes.ir.fake_mode import graph_fake_mode, placeholder_fakes

log = logging.getLogger(__name__)

#: ``gm.meta`` key marking a graph module that is already in the canonical IR.
CANONICAL_META_KEY = "moe_passes_canonical"


@dataclass
class Canonicalized:
    gm: fx.GraphModule
    canonical: bool  # False: gm is the input graph unchanged, ``reason`` says why
    reason: str | None = None
    fake_mode: FakeTensorMode | None = None


def is_canonical(gm: fx.GraphModule) -> bool:
    return bool(getattr(gm, "meta", {}).get(CANONICAL_META_KEY))


def canonicalize(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Canonicalized:
    """Re-trace ``gm`` to pre-dispatch ATen in its own fake mode; metadata kept.

    Returns the input unchanged (``canonical=False`` and a reason) when that is not possible.
    """
    if is_canonical(gm):
        return Canonicalized(gm, True, fake_mode=graph_fake_mode(gm, example_inputs))
    mode = graph_fake_mode(gm, example_inputs)
    if mode is None:
        return Canonicalized(gm, False, "no fake mode on the graph or its example inputs (hand-built graph)")
    from torch.fx.experimental.proxy_tensor import make_fx

    args = placeholder_fakes(gm, example_inputs, mode)
    waits = {n: identity_gradient_wait(gm, n) for n in gm.graph.nodes}
    waits = {n: w for n, w in waits.items() if w is not None}
    checkpoints: dict[fx.Node, InlinedCheckpoint] = {}

    def run(*a: Any) -> Any:
        checkpoints.clear()  # one entry per checkpoint of this trace
        return _UnwrappingInterpreter(gm, waits, checkpoints).run(*a)

    try:
        with mode, torch.fx.traceback.preserve_node_meta():
            traced = make_fx(run, pre_dispatch=True, tracing_mode="real")(*args)
    except CheckpointRefused as e:
        log.warning("canonical IR unavailable: %s", e)
        return Canonicalized(gm, False, str(e), mode)
    except Exception as e:  # noqa: BLE001 - any tracer failure means "use the Dynamo graph"
        reason = f"pre-dispatch re-trace failed ({error_summary(e)})"
        hops = _higher_order_nodes(gm)
        if hops:
            reason += "; the graph holds higher-order ops: " + ", ".join(
                f"{nodes[0].name} (torch.ops.higher_order.{name})" for name, nodes in hops.items())
        log.warning("canonical IR unavailable: %s", reason)
        return Canonicalized(gm, False, reason, mode)
    try:
        carry_dynamo_attributes(gm, traced)
        check_retrace_keeps_autograd(gm, traced, unwrapped=set(waits), checkpoints=checkpoints)
    except RuntimeError as e:
        log.warning("canonical IR unavailable: %s", e)
        return Canonicalized(gm, False, str(e), mode)
    traced.meta = dict(getattr(gm, "meta", {}))
    traced.meta[CANONICAL_META_KEY] = True
    log.debug("canonical IR: %d Dynamo nodes -> %d ATen nodes", len(gm.graph.nodes), len(traced.graph.nodes))
    return Canonicalized(traced, True, fake_mode=mode)


def _compute_nodes(body: fx.GraphModule) -> list[fx.Node]:
    """A higher-order op body's nodes other than placeholders, the output and grad-mode switches."""
    return [n for n in body.graph.nodes if n.op not in ("placeholder", "output")
            and not (n.op == "call_function" and getattr(n.target, "__name__", "") == "_set_grad_enabled")]


def identity_gradient_wait(gm: fx.GraphModule, node: fx.Node) -> tuple[Any, int] | None:
    """``(wait op, argument position)`` when ``node`` is an ``autograd_function_apply`` whose forward is
    one functional-collective ``wait_tensor`` of one of its arguments and whose backward hands the
    incoming gradient to that argument unchanged (and None to the rest); else None.

    torch 2.11 captures ``all_to_all_single_autograd``'s wait this way (``_FromTorchTensor``). Such a
    Function means exactly ``wait_tensor(x)`` with an identity gradient, which is how torch 2.13's
    Dynamo captures the same code and what torch registers as ``wait_tensor``'s autograd formula, so
    the re-trace records the wait itself instead of the Function's inlined forward.
    """
    if not (node.op == "call_function" and len(node.args) >= 3
            and op_namespace_and_name(node.target) == ("higher_order", "autograd_function_apply")):
        return None
    bodies = node.args[:2]
    if not all(isinstance(b, fx.Node) and b.op == "get_attr" for b in bodies):
        return None
    fwd, bwd = (gm.get_submodule(b.target) for b in bodies)
    fwd_inputs = list(fwd.graph.find_nodes(op="placeholder"))
    computed = _compute_nodes(fwd)
    if len(computed) != 1 or not is_wait(computed[0]) or len(computed[0].args) != 1 or computed[0].kwargs:
        return None
    wait = computed[0]
    if wait.args[0] not in fwd_inputs:
        return None
    position = fwd_inputs.index(wait.args[0])
    fwd_out = fwd.graph.output_node().args[0]
    if not (isinstance(fwd_out, (tuple, list)) and fwd_out and isinstance(fwd_out[0], (tuple, list))
            and list(fwd_out[0]) == [wait]):
        return None
    bwd_inputs = list(bwd.graph.find_nodes(op="placeholder"))
    bwd_out = bwd.graph.output_node().args[0]
    if _compute_nodes(bwd) or not bwd_inputs or not isinstance(bwd_out, (tuple, list)):
        return None
    grads = list(bwd_out)
    if len(grads) != len(fwd_inputs):
        return None
    expected = [bwd_inputs[0] if i == position else None for i in range(len(fwd_inputs))]
    if grads != expected or len(node.users) != 1 or node.kwargs.get("non_differentiable_idx"):
        return None
    return wait.target, position


class CheckpointRefused(RuntimeError):
    """An activation checkpoint whose recompute decisions cannot be carried into the canonical IR."""


@dataclass
class InlinedCheckpoint:
    """One ``tag_activation_checkpoint`` inlined into the canonical IR: the ``ac_graph_id`` its body's
    nodes carry, and whether a selective-checkpoint policy chose their ``recompute`` (else every node
    is ``PREFER_RECOMPUTE``)."""

    graph_id: int
    selective: bool


def _is_higher_order(node: fx.Node, name: str) -> bool:
    return node.op == "call_function" and op_namespace_and_name(node.target) == ("higher_order", name)


def _next_checkpoint_id() -> int:
    """A fresh ``ac_graph_id`` from torch's own counter (the one AOT autograd's checkpoint path draws
    from), so ids never collide with a checkpoint torch tags itself."""
    from torch._higher_order_ops import wrap

    return next(wrap.uid)


def checkpoint_policy(node: fx.Node, body: fx.GraphModule) -> Callable[..., Any] | None:
    """The selective-checkpoint policy of a ``tag_activation_checkpoint`` node: None for plain
    activation checkpointing (every op recomputed), else the ``policy_fn`` of the forward context its
    ``context_fn`` makes (Dynamo keeps ``context_fn`` on the body as ``meta["_checkpoint_context_fn"]``;
    ``create_selective_checkpoint_contexts`` makes a ``_CachingTorchDispatchMode`` holding the policy).
    Raises ``CheckpointRefused`` for any other ``context_fn``: its decisions cannot be read."""
    context_fn = getattr(body, "meta", {}).get("_checkpoint_context_fn")
    if context_fn is None:
        return None
    from torch.utils.checkpoint import _CachingTorchDispatchMode

    try:
        fwd_ctx, _ = context_fn()
    except Exception as e:  # noqa: BLE001 - unreadable policy: refuse, say why
        raise CheckpointRefused(f"activation checkpoint {node.name} (torch.ops.higher_order.tag_activation_checkpoint): "
                                f"its context_fn raised ({error_summary(e)})") from e
    policy = getattr(fwd_ctx, "policy_fn", None)
    if not isinstance(fwd_ctx, _CachingTorchDispatchMode) or not callable(policy):
        raise CheckpointRefused(
            f"activation checkpoint {node.name} (torch.ops.higher_order.tag_activation_checkpoint) has a context_fn "
            f"whose forward context is {type(fwd_ctx).__name__}, not a selective-checkpoint policy "
            "(torch.utils.checkpoint.create_selective_checkpoint_contexts): its per-op recompute decisions cannot be "
            "carried into the canonical IR, so the graph keeps the checkpoint and is not re-traced")
    return policy


class _AutogradDecompositions(Mapping):
    """The decompositions autograd applies (``CompositeImplicitAutograd`` kernels), as a decomposition
    table for the pre-dispatch tracer.  Inside a selectively checkpointed body the policy decides per
    ATen op *below* autograd (``aten.mm``, not ``aten.linear``), so the body is recorded at that
    granularity: each canonical node is then one op the policy saw, and its tag is that op's decision."""

    _KEEP = frozenset({torch.ops.aten.size.default, torch.ops.aten.stride.default,
                       torch.ops.aten.storage_offset.default})

    def __contains__(self, op: object) -> bool:
        return (isinstance(op, torch._ops.OpOverload) and op not in self._KEEP
                and torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CompositeImplicitAutograd"))

    def __getitem__(self, op: Any) -> Callable[..., Any]:
        if op not in self:
            raise KeyError(op)
        from torch.utils._python_dispatch import autograd_would_have_decomposed

        def decomposed(*args: Any, **kwargs: Any) -> Any:
            if not autograd_would_have_decomposed(op, tree_leaves((args, kwargs))):
                return NotImplemented  # a backend kernel wins over the decomposition: recorded as is
            return op.decompose(*args, **kwargs)

        return decomposed

    def __iter__(self) -> Iterator[Any]:
        return iter(())

    def __len__(self) -> int:
        return 1  # never empty: the tracer replaces an empty table by {}

    def __bool__(self) -> bool:
        return True


@contextmanager
def _tagged(graph_id: int) -> Iterator[None]:
    """Every node the tracer records meanwhile carries ``ac_graph_id`` and ``recompute = PREFER_RECOMPUTE``
    (``torch.fx.proxy`` copies both from the current meta, as AOT autograd's checkpoint path does)."""
    import torch.fx.traceback as fx_traceback
    from torch.utils.checkpoint import CheckpointPolicy

    saved = fx_traceback.current_meta
    fx_traceback.current_meta = {**saved, "ac_graph_id": graph_id, "recompute": CheckpointPolicy.PREFER_RECOMPUTE}
    try:
        yield
    finally:
        fx_traceback.current_meta = saved


class _UnwrappingInterpreter(fx.Interpreter):
    """Runs the graph for the pre-dispatch tracer, higher-order ops treated by what they are:

    * an identity-gradient wait Function runs as the wait op itself;
    * an activation checkpoint (``tag_activation_checkpoint``) is inlined: its body runs here, every
      node recorded for it tagged with ``ac_graph_id`` and ``recompute`` exactly as AOT autograd tags
      a checkpoint it traces itself, so the passes see the body's ops and the partitioner still
      recomputes them in backward; a selective-checkpoint policy decides each op's ``recompute``;
    * a user's ``autograd_function_apply`` (a custom ``torch.autograd.Function``) stays one node with
      its forward and backward bodies, so its own autograd rule survives (``make_fx`` would run its
      forward under ``no_grad`` instead).
    """

    def __init__(self, gm: fx.GraphModule, waits: dict[fx.Node, tuple[Any, int]],
                 checkpoints: dict[fx.Node, InlinedCheckpoint], checkpoint: InlinedCheckpoint | None = None,
                 policy: Callable[..., Any] | None = None) -> None:
        super().__init__(gm)
        self.waits, self.checkpoints = waits, checkpoints
        self.checkpoint, self.policy = checkpoint, policy  # set while running a checkpoint's body

    def run_node(self, n: fx.Node) -> Any:
        if n in self.waits:
            op, position = self.waits[n]
            return (op(self.env[n.args[2 + position]]),)
        if _is_higher_order(n, "tag_activation_checkpoint"):
            return self._inline_checkpoint(n)
        if _is_higher_order(n, "autograd_function_apply"):
            return self._keep_function(n)
        return super().run_node(n)

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        return self._in_checkpoint(super().call_function, target, args, kwargs)

    def call_method(self, target: Any, args: Any, kwargs: Any) -> Any:
        return self._in_checkpoint(super().call_method, target, args, kwargs)

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        return self._in_checkpoint(super().call_module, target, args, kwargs)

    def _in_checkpoint(self, call: Callable[..., Any], target: Any, args: Any, kwargs: Any) -> Any:
        if self.checkpoint is None:
            return call(target, args, kwargs)
        from torch.fx.experimental.proxy_tensor import get_proxy_mode

        mode = get_proxy_mode()
        graph = mode.tracer.graph if mode is not None else None
        last = graph._root.prev if graph is not None else None  # nodes after it are this call's
        with ExitStack() as stack:
            stack.enter_context(_tagged(self.checkpoint.graph_id))
            if self.policy is not None and mode is not None:
                stack.enter_context(mode.enable_decompositions(_AutogradDecompositions()))
            out = call(target, args, kwargs)
        if self.policy is not None and graph is not None:
            node = last.next if last is not None else None
            while node is not None and node is not graph._root:
                _apply_policy(self.policy, node)
                node = node.next
        return out

    def _inline_checkpoint(self, n: fx.Node) -> Any:
        from torch._higher_order_ops.wrap import TagActivationCheckpoint

        args, kwargs = self.fetch_args_kwargs_from_env(n)
        body = args[0]
        if not isinstance(body, fx.GraphModule):
            raise CheckpointRefused(f"activation checkpoint {n.name}: its body is a {type(body).__name__}, not a graph")
        _, body_kwargs = TagActivationCheckpoint.divide_kwargs(kwargs)
        if body_kwargs:  # Dynamo passes the body's inputs positionally; AOT's own path would drop these too
            raise CheckpointRefused(f"activation checkpoint {n.name}: keyword inputs to its body ({', '.join(body_kwargs)})")
        policy = checkpoint_policy(n, body)
        inlined = InlinedCheckpoint(_next_checkpoint_id(), selective=policy is not None)
        self.checkpoints[n] = inlined
        inner = _UnwrappingInterpreter(body, {}, self.checkpoints, inlined, policy)
        return inner.run(*args[1:], enable_io_processing=False)

    def _keep_function(self, n: fx.Node) -> Any:
        from torch.fx.experimental.proxy_tensor import (
            _temp_remove_pre_dispatch_torch_function_mode, disable_proxy_modes_tracing, get_proxy_mode, track_tensor_tree)

        args, kwargs = self.fetch_args_kwargs_from_env(n)
        mode = get_proxy_mode()
        if mode is None:  # not tracing (a plain run): nothing to keep
            return super().run_node(n)
        # The Function's outputs (fakes with its autograd node), nothing recorded: not its ops, nor the
        # grad-mode switches around its forward.
        with disable_proxy_modes_tracing(), _temp_remove_pre_dispatch_torch_function_mode():
            out = n.target(*args, **kwargs)
        tracer = mode.tracer
        for arg, body in zip(n.args[:2], args[:2]):
            tracer.root.register_module(tracer.get_fresh_qualname(f"{arg.target}_"), body)
        proxy_args = tree_map(tracer.unwrap_proxy, args)
        proxy_kwargs = tree_map(tracer.unwrap_proxy, kwargs)
        with _tagged(self.checkpoint.graph_id) if self.checkpoint is not None else nullcontext():
            out_proxy = tracer.create_proxy("call_function", n.target, proxy_args, proxy_kwargs)
        return track_tensor_tree(out, out_proxy, constant=None, tracer=tracer)


def _apply_policy(policy: Callable[..., Any], node: fx.Node) -> None:
    """Set ``node.meta["recompute"]`` to the selective-checkpoint policy's decision for its op, called as
    ``_CachingTorchDispatchMode`` calls it (ops SAC ignores stay ``PREFER_RECOMPUTE``)."""
    from torch.utils.checkpoint import SAC_IGNORED_OPS, SelectiveCheckpointContext, _policy_from_bool

    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload) or node.target in SAC_IGNORED_OPS:
        return
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: a.meta.get("val"))
    try:
        ctx = SelectiveCheckpointContext(is_recompute=False, op_output=node.meta.get("val"))
    except TypeError:
        ctx = SelectiveCheckpointContext(is_recompute=False)
    decision = policy(ctx, node.target, *args, **kwargs)
    node.meta["recompute"] = _policy_from_bool(decision) if isinstance(decision, bool) else decision


def _higher_order_nodes(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    out: dict[str, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        parsed = op_namespace_and_name(n.target) if n.op == "call_function" else None
        if parsed is not None and parsed[0] == "higher_order":
            out.setdefault(parsed[1], []).append(n)
    return out


def check_retrace_keeps_autograd(src: fx.GraphModule, traced: fx.GraphModule, unwrapped: set[fx.Node] = frozenset(),
                                 checkpoints: dict[fx.Node, InlinedCheckpoint] | None = None) -> None:
    """Raise (RuntimeError, with the reason) unless the re-trace keeps what autograd does with the graph.

    ``make_fx`` runs a higher-order op such as ``autograd_function_apply`` (a user's
    ``torch.autograd.Function``, or torch 2.11's functional-collective wait) or an activation
    checkpoint by running its body: the body's ATen ops are recorded and the op's own rules (a
    hand-written backward, recomputation) are gone, and a custom Function's forward is recorded
    under ``no_grad``, which cuts the gradient of everything before it. So a re-trace in which such
    an op did not survive is refused (``unwrapped``: identity-gradient waits, re-traced as the wait
    they mean), and as a check from autograd itself, the inputs each output's gradient reaches (a fake
    forward of both graphs, autograd's graph walked) must be the same.

    An activation checkpoint may be inlined (``checkpoints``: the ones ``canonicalize`` inlined) only
    with its recomputation kept: every node recorded for it carries its ``ac_graph_id`` and a
    ``recompute`` policy, which is what AOT autograd's partitioner recomputes in backward.
    """
    from torch.utils.checkpoint import CheckpointPolicy

    checkpoints = checkpoints or {}
    before, after = _higher_order_nodes(src), _higher_order_nodes(traced)
    tagged: dict[Any, list[fx.Node]] = {}
    for n in traced.graph.nodes:
        if "ac_graph_id" in n.meta:
            tagged.setdefault(n.meta["ac_graph_id"], []).append(n)
    for node in before.get("tag_activation_checkpoint", ()):
        inlined = checkpoints.get(node)
        if inlined is None:
            continue  # not inlined: it must have survived as a node (checked below)
        nodes = tagged.get(inlined.graph_id, [])
        body = src.get_submodule(node.args[0].target) if isinstance(node.args[0], fx.Node) else None
        if not nodes and (body is None or _compute_nodes(body)):
            raise RuntimeError(f"the ATen re-trace inlined activation checkpoint {node.name} "
                               f"(torch.ops.higher_order.tag_activation_checkpoint) but none of its nodes carries "
                               f"its recompute tag (ac_graph_id {inlined.graph_id}): its recomputation would be lost")
        untagged = [n.name for n in nodes if not isinstance(n.meta.get("recompute"), CheckpointPolicy)]
        if untagged:
            raise RuntimeError(f"the ATen re-trace inlined activation checkpoint {node.name} but {', '.join(untagged[:4])} "
                               "carry no recompute policy: their recomputation would be lost")
    for name, nodes in before.items():
        nodes = [n for n in nodes if n not in unwrapped and n not in checkpoints]  # re-traced as the op they mean
        if not nodes:
            continue
        if len(after.get(name, ())) < len(nodes):
            raise RuntimeError(
                f"the ATen re-trace would inline {nodes[0].name} (torch.ops.higher_order.{name}, e.g. a custom "
                "torch.autograd.Function or an activation checkpoint) and drop its own autograd rules")
    try:
        changed = changed_gradient_inputs(src, traced)
    except Exception as e:  # noqa: BLE001 - unverifiable means refused
        raise RuntimeError(f"cannot check that the ATen re-trace keeps every gradient path "
                           f"({error_summary(e)})") from e
    if changed is None:
        raise RuntimeError("cannot check that the ATen re-trace keeps every gradient path (inputs carry no fake values)")
    if changed:
        raise RuntimeError(f"the ATen re-trace changes which inputs get a gradient: {', '.join(changed[:4])}"
                           f"{' and %d more' % (len(changed) - 4) if len(changed) > 4 else ''}")


def carry_dynamo_attributes(src: fx.GraphModule, dst: fx.GraphModule) -> None:
    """Give a re-traced graph Dynamo's placeholder identity, by position: names, metadata and the node
    attributes Dynamo sets outside ``meta`` (``_dynamo_source``, which AOT autograd requires and uses
    to mark parameters as static inputs), plus the module-level parameter-source map where it still
    covers every parameter and buffer."""
    old_ph = list(src.graph.find_nodes(op="placeholder"))
    new_ph = list(dst.graph.find_nodes(op="placeholder"))
    if len(old_ph) != len(new_ph):
        raise RuntimeError(f"re-trace changed the number of graph inputs ({len(old_ph)} -> {len(new_ph)})")
    for new in new_ph:
        new._rename("moe_passes_tmp_" + new.name)
    for old, new in zip(old_ph, new_ph):
        new._rename(old.name)
        new.target = old.target
        for key, value in old.meta.items():
            new.meta.setdefault(key, value)
        for attr, value in vars(old).items():
            if attr.startswith("_dynamo"):
                setattr(new, attr, value)
    sources = getattr(src, "_param_name_to_source", None)
    if sources is not None:
        # AOT autograd requires a source for every parameter and buffer once the map exists; the
        # re-trace may lift tensor constants into buffers Dynamo never saw. Then leave the map out:
        # AOT takes its export path, which still marks parameters and buffers as static inputs.
        names = [n for n, _ in dst.named_parameters()] + [n for n, _ in dst.named_buffers()]
        if all(n in sources for n in names):
            dst._param_name_to_source = sources
    dst.recompile()


def canonicalize_in_place(gm: fx.GraphModule, example_inputs: Sequence[Any] = ()) -> str | None:
    """Re-trace ``gm`` to the canonical IR and swap the result into ``gm`` itself (same inputs, names,
    Dynamo attributes), for callers that hold on to the module. None on success, else the reason."""
    if is_canonical(gm):
        return None
    inputs = list(example_inputs) or [node_value(p) for p in gm.graph.find_nodes(op="placeholder")]
    res = canonicalize(gm, inputs)
    if not res.canonical:
        return res.reason
    traced = res.gm
    for n in traced.graph.nodes:
        if n.op == "get_attr" and not hasattr(gm, n.target):
            setattr(gm, n.target, getattr(traced, n.target))
    gm.graph = traced.graph  # its placeholders already carry Dynamo's attributes (see canonicalize)
    gm.meta[CANONICAL_META_KEY] = True
    gm.recompile()
    return None
