"""``moe_passes.models.stacks.MoEStack``: each named configuration against a hand-written forward on the same weights.

The references below call the blocks and the loss functions of ``moe_passes/models/interns1_vl`` directly and
spell out each stack's residual loop and loss, so a wrong option (a missing norm, a dropped or
mis-weighted router loss, the wrong mask, detached logits where they must carry gradient) shows as
a loss, output or gradient that differs. Also checked: parameter names, initialisation, the node
order each ``loss_order`` promises (Dynamo graph), and the rejected combinations. No compile.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from moe_passes.bench.memory import bench_stack
from moe_passes.harness.capture import capture_graphs
from moe_passes.models.interns1_vl.losses import load_balancing_loss, router_z_loss
from moe_passes.models.stacks import MoEStack, preset_stack, router_stack, speed_stack
from tests.aux_models import make_model as aux_model
from tests.domino_helpers import TinyMoEStack, init_biased
from tests.domino_helpers import make_inputs as tiny_inputs

log = logging.getLogger(__name__)


def run_blocks(blocks: Any, x: torch.Tensor, norms: Any = None) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    logits, selected = [], []
    for i, block in enumerate(blocks):
        inp = x if norms is None else F.layer_norm(x, norms[i].normalized_shape, norms[i].weight, norms[i].bias, norms[i].eps)
        out = block(inp)
        x = x + out.hidden_states
        logits.append(out.router_logits)
        selected.append(out.selected_experts)
    return x, logits, selected


def grads_of(model: torch.nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_loss_and_grads(model: torch.nn.Module, got: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    g_got = grads_of(model, got)
    g_ref = grads_of(model, ref)
    assert g_got.keys() == g_ref.keys() and g_got
    for name in g_ref:
        torch.testing.assert_close(g_got[name], g_ref[name], rtol=0, atol=0, msg=lambda m: f"grad {name}: {m}")


def test_preset_stack_is_mse_plus_balancing_plus_z_loss() -> None:
    torch.manual_seed(0)
    model = preset_stack(num_layers=2)
    x, target = torch.randn(2, 4, 16), torch.randn(2, 4, 16)
    h, logits, _ = run_blocks(model.layers, x)
    ref = F.mse_loss(h, target) + 0.01 * load_balancing_loss(tuple(logits), 4, 2) + 0.001 * router_z_loss(tuple(logits))
    assert_same_loss_and_grads(model, model(x, target), ref)
    assert [k for k in model.state_dict()][:3] == ["layers.0.gate.weight", "layers.0.experts.gate_up_proj", "layers.0.experts.down_proj"]


def test_preset_stack_draws_every_parameter_from_normal_std_0_2_in_order() -> None:
    torch.manual_seed(3)
    model = preset_stack(num_layers=2)
    torch.manual_seed(3)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), torch.empty_like(p).normal_(0.0, 0.2), rtol=0, atol=0, msg=lambda m: f"{name}: {m}")


def test_router_stack_returns_detached_logits_and_selected_per_layer() -> None:
    torch.manual_seed(0)
    model = router_stack(layers=2, hidden=8, experts=4, top_k=2)
    torch.manual_seed(0)
    for name, p in model.named_parameters():  # (router std, expert std) = (0.5, 0.2)
        std = 0.5 if name.endswith("gate.weight") else 0.2
        torch.testing.assert_close(p.detach(), torch.empty_like(p).normal_(0.0, std), rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
    x = torch.randn(2, 3, 8)
    loss, logits, selected = model(x)
    h, ref_logits, ref_selected = run_blocks(model.blocks, x)
    assert len(logits) == len(selected) == 2
    assert all(not t.requires_grad for t in logits)
    for got, ref in zip(logits + selected, ref_logits + ref_selected):
        torch.testing.assert_close(got, ref.detach(), rtol=0, atol=0)
    assert_same_loss_and_grads(model, loss, h.pow(2).mean())
    live = router_stack(layers=2, hidden=8, experts=4, top_k=2, detach_logits=False)
    assert all(t.requires_grad for t in live(x)[1])


def test_speed_stack_is_pre_layernorm_blocks_and_mean_square() -> None:
    torch.manual_seed(0)
    model = speed_stack(2, 16, 8, 4, 2)
    with torch.no_grad():  # non-default norms, so a skipped or misplaced norm shows
        for norm in model.norms:
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(1, 6, 16)
    h, _, _ = run_blocks(model.blocks, x, model.norms)
    assert_same_loss_and_grads(model, model(x), h.square().mean())
    assert list(model.state_dict())[:2] == ["norms.0.weight", "norms.0.bias"]


def test_tiny_domino_stack_adds_a_tenth_of_the_balancing_loss_and_stacks_selected() -> None:
    model = TinyMoEStack(None, layers=2, experts=8)
    init_biased(model, seed=1, world_size=1)
    x = tiny_inputs(1, 0, 16)
    loss, selected = model(x)
    h, logits, ref_selected = run_blocks(model.blocks, x, model.norms)
    torch.testing.assert_close(selected, torch.stack(ref_selected), rtol=0, atol=0)
    assert_same_loss_and_grads(model, loss, h.square().mean() + 0.1 * load_balancing_loss(tuple(logits), 8, 2))


@pytest.mark.parametrize("padded", [False, True], ids=["plain", "mask"])
def test_aux_test_stack_masks_both_router_losses_and_concatenates_logits(padded: bool) -> None:
    model = aux_model(0, return_stacked=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 8, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]]) if padded else None
    loss, cat = model(x, mask)
    h, logits, _ = run_blocks(model.layers, x)
    lg = tuple(logits)
    ref = h.pow(2).mean() + 0.1 * load_balancing_loss(lg, 4, 2, mask) + 0.01 * router_z_loss(lg, mask)
    torch.testing.assert_close(cat, torch.cat(logits, dim=0), rtol=0, atol=0)
    assert_same_loss_and_grads(model, loss, ref)


def test_aux_test_stack_without_z_loss_has_no_z_term() -> None:
    model = aux_model(0, z_loss=None)
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))
    h, logits, _ = run_blocks(model.layers, x)
    assert_same_loss_and_grads(model, model(x), h.pow(2).mean() + 0.1 * load_balancing_loss(tuple(logits), 4, 2))


@pytest.mark.parametrize("aux", [False, True], ids=["aux_off", "aux_on"])
def test_memory_bench_stack_flattens_tokens_and_masks_its_router_losses(aux: bool) -> None:
    torch.manual_seed(0)
    model = bench_stack(2, 8, 8, 4, 2, aux)
    x = torch.randn(2, 4, 8)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    h, logits = x.reshape(-1, 8), []
    for layer in model.layers:
        out = layer(h)
        h = h + out.hidden_states
        logits.append(out.router_logits)
    ref = h.pow(2).mean()
    if aux:
        ref = ref + 0.01 * load_balancing_loss(tuple(logits), 4, 2, mask) + 0.001 * router_z_loss(tuple(logits), mask)
    assert_same_loss_and_grads(model, model(x, mask), ref)


@pytest.mark.parametrize("order", ["accumulate", "main_then_router", "router_then_main"])
def test_loss_order_is_the_graph_order(order: str) -> None:
    """The Dynamo graph records Python order; goldens and the static estimates see it."""
    torch.manual_seed(0)
    model = MoEStack(1, 8, 8, 4, 2, main_loss="square_mean", aux_coef=0.1, z_coef=0.01, loss_order=order, init_std=0.3)
    (captured,) = capture_graphs(model, torch.randn(1, 4, 8))
    nodes = [n for n in captured.gm.graph.nodes if n.op in ("call_function", "call_method")]
    name = [str(getattr(n.target, "__name__", n.target)) for n in nodes]
    main = name.index("square")
    z = name.index("logsumexp")
    # the loss additions: adds whose operands include a python float product (coef * term)
    coef_muls = [i for i, n in enumerate(nodes) if name[i] == "mul" and isinstance(n.args[0], float)]
    first_coef_mul = coef_muls[0]
    if order == "accumulate":
        assert main < first_coef_mul < z, name
    elif order == "main_then_router":
        assert main < z < first_coef_mul, name
    else:
        assert z < main < first_coef_mul, name


def test_rejected_options() -> None:
    with pytest.raises(ValueError, match="main_loss"):
        MoEStack(main_loss="l1")
    with pytest.raises(ValueError, match="returns"):
        MoEStack(returns="everything")
    with pytest.raises(ValueError, match="loss_order"):
        MoEStack(loss_order="random")
    with pytest.raises(ValueError, match="detach_logits"):
        MoEStack(aux_coef=0.1, detach_logits=True)
