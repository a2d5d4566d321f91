"""The canonical ATen re-trace keeps what autograd does with the graph, or is refused with the reason.

``make_fx`` records a higher-order op by running its body. For a user's ``torch.autograd.Function``
(Megatron-style all-to-alls, gradient scalers) Dynamo emits ``autograd_function_apply``, whose forward
runs under ``no_grad``: re-traced as is, everything before it lost its gradient (found on torch 2.13
with a custom Function in front of the reference stack; on torch 2.11 every functional-collective wait
is such a Function, so every expert weight lost its gradient there). So the re-trace keeps such a
Function as one node with its forward and backward bodies, and inlines an activation checkpoint only
with every body node tagged for recomputation (``tests/test_canonical_hops.py`` has the full proofs);
a re-trace that still loses a gradient path is refused, and the ATen passes say why.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import pytest
import torch
import torch.fx as fx
from torch.utils.checkpoint import checkpoint

import moe_passes.ir.canonical as canonical
import moe_passes.pipeline.manager as manager_module
from moe_passes.ir.canonical import canonicalize
from moe_passes.models.stacks import preset_stack


class TimesTwo(torch.autograd.Function):
    """Forward doubles; the hand-written backward triples (so a re-derived backward would differ)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad * 3


class FunctionInFront(torch.nn.Module):
    """The reference MoE stack behind a linear layer whose output passes a custom autograd.Function."""

    def __init__(self, use_checkpoint: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(16, 16)
        self.stack = preset_stack(num_layers=1, hidden_size=16, intermediate_size=32, num_experts=4, top_k=2)
        self.use_checkpoint = use_checkpoint

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        h = checkpoint(torch.sin, h, use_reentrant=False) if self.use_checkpoint else TimesTwo.apply(h)
        return self.stack(h, target)


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 16, generator=g), torch.randn(2, 4, 16, generator=g)


def _canonicalize_dynamo_graph(model: torch.nn.Module) -> canonical.Canonicalized:
    seen: list[canonical.Canonicalized] = []

    def recorder(gm: fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        seen.append(canonicalize(gm, example_inputs))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=recorder, fullgraph=True)(*_inputs())
    torch._dynamo.reset()
    assert len(seen) == 1
    return seen[0]


def _loss_and_grads(model: torch.nn.Module, fn: Callable[..., torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
    model.zero_grad(set_to_none=True)
    loss = fn(*_inputs())
    loss.backward()
    return loss.detach(), {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def test_custom_autograd_function_keeps_every_gradient_and_its_own_backward() -> None:
    """``TimesTwo``'s hand-written backward triples: a re-derived backward would double. The canonical
    graph keeps the Function as one node, the passes run on it (no "canonical ATen IR unavailable"), and
    loss and every gradient match eager."""
    from moe_passes import make_backend

    res = _canonicalize_dynamo_graph(FunctionInFront())
    assert res.canonical, res.reason
    kept = [n for n in res.gm.graph.nodes if n.op == "call_function" and "autograd_function_apply" in str(n.target)]
    assert len(kept) == 1, res.gm.code
    model = FunctionInFront()
    ref_loss, ref_grads = _loss_and_grads(model, model)
    backend = make_backend(passes=("layerwise_aux_loss", "domino_ep"))
    torch._dynamo.reset()
    loss, grads = _loss_and_grads(model, torch.compile(model, backend=backend, fullgraph=True))
    torch._dynamo.reset()
    torch.testing.assert_close(loss, ref_loss)
    for name, ref in ref_grads.items():
        assert grads[name] is not None, f"{name} lost its gradient"
        torch.testing.assert_close(grads[name], ref, rtol=1e-4, atol=1e-5, msg=name)
    skipped = [s["reason"] for rep in backend.reports for p in rep["pre_grad"] for s in p["skipped"]]
    assert not any("canonical ATen IR unavailable" in r for r in skipped), skipped


def test_activation_checkpoint_is_inlined_with_its_recompute_tags() -> None:
    from torch.utils.checkpoint import CheckpointPolicy

    res = _canonicalize_dynamo_graph(FunctionInFront(use_checkpoint=True))
    assert res.canonical, res.reason
    assert not any("higher_order" in str(n.target) for n in res.gm.graph.nodes), res.gm.code
    sin = [n for n in res.gm.graph.nodes if n.target is torch.ops.aten.sin.default]
    assert len(sin) == 1 and sin[0].meta.get("recompute") is CheckpointPolicy.PREFER_RECOMPUTE, sin
    assert "ac_graph_id" in sin[0].meta


def test_an_inlined_checkpoint_without_its_tags_is_refused() -> None:
    """The rule behind the inlining: a checkpoint that vanished from the re-trace is accepted only when
    its nodes carry the recompute tag (``check_retrace_keeps_autograd``)."""
    seen: list[tuple[fx.GraphModule, list[Any]]] = []

    def recorder(gm: fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        seen.append((gm, example_inputs))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(FunctionInFront(use_checkpoint=True), backend=recorder, fullgraph=True)(*_inputs())
    torch._dynamo.reset()
    ((gm, example_inputs),) = seen
    res = canonicalize(gm, example_inputs)
    assert res.canonical, res.reason
    hop = next(n for n in gm.graph.nodes if "tag_activation_checkpoint" in str(n.target))
    graph_id = next(n.meta["ac_graph_id"] for n in res.gm.graph.nodes if "ac_graph_id" in n.meta)
    inlined = {hop: canonical.InlinedCheckpoint(graph_id, selective=False)}
    canonical.check_retrace_keeps_autograd(gm, res.gm, checkpoints=inlined)  # tagged: accepted
    for n in res.gm.graph.nodes:
        n.meta.pop("recompute", None)
        n.meta.pop("ac_graph_id", None)
    try:
        canonical.check_retrace_keeps_autograd(gm, res.gm, checkpoints=inlined)
    except RuntimeError as e:
        assert "recompute tag" in str(e) and hop.name in str(e), e
    else:
        raise AssertionError("an untagged inlined checkpoint was accepted")
    try:
        canonical.check_retrace_keeps_autograd(gm, res.gm)  # not declared inlined: a vanished HOP
    except RuntimeError as e:
        assert "tag_activation_checkpoint" in str(e), e
    else:
        raise AssertionError("a vanished checkpoint was accepted")


def test_a_changed_gradient_path_is_found_by_autograd_itself() -> None:
    """The check behind the higher-order-op rule: the Dynamo graph against a copy in which the first
    linear layer's output is detached (what a re-trace under ``no_grad`` does). The copy is built by
    hand: which re-trace loses which path is torch's to change (torch 2.11 inlines ``TimesTwo``
    with its gradient path kept, dropping only the hand-written backward; 2.13 cuts the path)."""
    from moe_passes.ir.autograd import changed_gradient_inputs

    seen: list[fx.GraphModule] = []

    def recorder(gm: fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        seen.append(gm)
        return gm.forward

    model = preset_stack(num_layers=1, hidden_size=16, intermediate_size=32, num_experts=4, top_k=2)
    torch._dynamo.reset()
    torch.compile(model, backend=recorder, fullgraph=True)(*_inputs())
    torch._dynamo.reset()
    (before,) = seen
    assert changed_gradient_inputs(before, before) == []
    cut = fx.GraphModule(before, copy.deepcopy(before.graph))
    first_linear = next(n for n in cut.graph.nodes if n.op == "call_function" and n.target is torch._C._nn.linear)
    with cut.graph.inserting_after(first_linear):
        detached = cut.graph.call_function(torch.Tensor.detach, (first_linear,))
    first_linear.replace_all_uses_with(detached, delete_user_cb=lambda user: user is not detached)
    cut.recompile()
    lost = changed_gradient_inputs(before, cut)
    assert lost == [first_linear.args[1].name], lost  # the router gate's weight: nothing else feeds the cut edge
    assert changed_gradient_inputs(cut, before) == lost  # a gradient path that appears is a change too


def test_the_reference_stack_re_traces_with_every_gradient_path() -> None:
    model = preset_stack(num_layers=1, hidden_size=16, intermediate_size=32, num_experts=4, top_k=2)
    res = _canonicalize_dynamo_graph(model)
    assert res.canonical, res.reason


def _dtensor_graph(fn: Any, reference: Any = None) -> tuple[fx.GraphModule, str | None, list[torch.Tensor]]:
    """``fn(x, w)`` with ``w`` an ``nn.Parameter`` holding a DTensor shard (FSDP2 / transformers' EP), compiled
    through the backend (no Inductor) on a fake 2-rank group: the canonical graph, its refusal reason, the grads."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    from moe_passes import make_backend
    from tests.distributed import fake_group

    graphs: list[fx.GraphModule] = []
    with fake_group(2, values_matter=False):
        mesh = init_device_mesh("cpu", (2,))
        w = torch.nn.Parameter(DTensor.from_local(torch.randn(8, 4), mesh, [Shard(0)]))
        backend = make_backend(passes=("domino_ep",), lowering="aot_eager")
        original = manager_module.canonicalize

        def spy(gm: fx.GraphModule, inputs: Any) -> Any:
            result = original(gm, inputs)
            graphs.append(result.gm)
            return result

        x = torch.randn(3, 8, requires_grad=True)
        torch._dynamo.reset()
        try:
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(manager_module, "canonicalize", spy)
                torch.compile(lambda x: fn(x, w), backend=backend, fullgraph=True)(x).backward()
        finally:
            torch._dynamo.reset()
        grads = [x.grad, w.grad.to_local()]
        if reference is not None:  # the same math on the plain local shard, eagerly
            ref_x, ref_w = x.detach().clone().requires_grad_(), w.to_local().detach().clone().requires_grad_()
            reference(ref_x, ref_w).backward()
            torch.testing.assert_close(grads, [ref_x.grad, ref_w.grad])
    (report,) = backend.reports
    return graphs[0], report["canonical_error"], grads


def test_dtensor_parameters_read_through_to_local_keep_the_aten_ir() -> None:
    """FSDP2 / transformers' EP parameters arrive as DTensors and are read with ``.to_local()``: the re-trace
    stops there (make_fx would record the local shard as a tensor constant), the body is ATen, and every
    gradient (the DTensor parameter's included) is exact."""
    gm, error, _ = _dtensor_graph(lambda x, w: (x @ w.to_local()).sin().sum(), reference=lambda x, w: (x @ w).sin().sum())
    assert error is None, error
    assert any(n.op == "call_method" and n.target == "to_local" for n in gm.graph.nodes), gm.code
    assert not [n for n in gm.graph.nodes if n.op == "get_attr"], gm.code  # no captured shard
    assert any(n.target is torch.ops.aten.sin.default for n in gm.graph.nodes), gm.code


def test_a_dtensor_input_used_otherwise_is_refused_with_the_reason() -> None:
    gm, error, _ = _dtensor_graph(lambda x, w: (x @ w.full_tensor()[:8]).sin().sum())
    assert error is not None and "not only through .to_local()" in error, error


def test_an_empty_graph_has_no_gradient_path_to_check() -> None:
    """Dynamo emits graphs with no inputs and no outputs between two breaks (transformers' native EP under
    FSDP2 does): nothing can lose a gradient there, so it is not a canonical-IR error."""
    from moe_passes.ir.autograd import changed_gradient_inputs

    gm = fx.GraphModule(torch.nn.Module(), fx.Graph())
    gm.graph.output(())
    gm.recompile()
    assert changed_gradient_inputs(gm, gm) == []
