"""How the canonical re-trace treats higher-order ops: each by what it is, never a reason to give up.

* an activation checkpoint (``tag_activation_checkpoint``) is inlined with its recompute tags
  (``meta["ac_graph_id"]``, ``meta["recompute"]``), as AOT autograd's own checkpoint path does, so the
  passes rewrite its body and the partitioner still recomputes it; a selective-checkpoint policy's
  per-op decision is written into ``meta["recompute"]`` (``checkpoint_policy``);
* a user's ``torch.autograd.Function`` (``autograd_function_apply``) stays one node with its bodies;
* torch 2.11's identity-gradient wait Function is re-traced as the wait it means.

``_UnwrappingInterpreter`` drives the re-trace of ``moe_passes.ir.canonical`` with these rules.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx
from torch.utils._pytree import tree_leaves, tree_map

from moe_passes.errors import error_summary
from moe_passes.ir.facts import is_wait, op_namespace_and_name


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
            _temp_remove_pre_dispatch_torch_function_mode,
            disable_proxy_modes_tracing,
            get_proxy_mode,
            track_tensor_tree,
        )

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
