"""Expert parallelism is exact: EP=2 and EP=4 (real gloo processes) give EP=1's loss and gradients.

Reference: on every rank, the full model (all experts, no collectives) runs
each rank's batch and the losses are summed. Each EP rank's loss must equal
the reference loss of its own batch; its expert gradients must equal the
reference gradients of the experts it owns; the other gradients, summed over
ranks, must equal the reference gradients.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from moe_passes.models.interns1_vl import InternS1VLConfig, InternS1VLForConditionalGeneration, load_hf_state_dict
from moe_passes.models.interns1_vl.hf_loading import is_expert_key
from tests.distributed import run_distributed
from tests.model_inputs import make_batch

LOSS_TOL = 1e-5
GRAD_TOL = 1e-4  # max |ep - ref| / max |ref|, per parameter

CASES = ("images_and_padding", "skewed_routing", "grouped_routing", "global_aux_stats")


def case_config(case: str, world_size: int) -> InternS1VLConfig:
    config = InternS1VLConfig.tiny(router_z_loss_coef=0.01)
    if case == "grouped_routing":
        return config.replace(text={"num_experts_per_tok": 4}, group_routing=True, num_expert_groups=world_size)
    if case == "global_aux_stats":
        return config.replace(aux_loss_global=True)
    return config


def skew_router(model: InternS1VLForConditionalGeneration) -> None:
    """The last quarter of the experts never gets a token (with EP=4: a rank receives nothing at all).

    Their router rows are zero (logit 0) while the active experts come in pairs
    (w, -w): every token has at least top_k positive logits among the active ones.
    """
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            weight = layer.mlp.gate.weight
            active = weight.shape[0] - weight.shape[0] // 4
            weight.mul_(5.0)
            weight[1:active:2] = -weight[0 : active - 1 : 2]
            weight[active:] = 0.0


def reference_loss(model: InternS1VLForConditionalGeneration, batches: list[dict], global_aux: bool) -> torch.Tensor:
    """Sum over ranks' batches; with global statistics the balancing loss sees every rank's tokens."""
    if not global_aux:
        return sum(model(**b).loss for b in batches)
    from moe_passes.models.interns1_vl import load_balancing_loss

    config = model.config
    outs = [model(**b, output_router_logits=True) for b in batches]
    ce = sum(o.loss - config.router_aux_loss_coef * o.aux_loss - config.router_z_loss_coef * o.z_loss for o in outs)
    z = sum(o.z_loss for o in outs)
    logits = tuple(lg for o in outs for lg in o.router_logits)
    aux = load_balancing_loss(logits, config.text.num_experts, config.text.num_experts_per_tok)
    return ce + config.router_aux_loss_coef * len(batches) * aux + config.router_z_loss_coef * z


def run_case(rank: int, world_size: int, case: str) -> dict:
    config = case_config(case, world_size)
    torch.manual_seed(0)
    full = InternS1VLForConditionalGeneration(config)
    if case == "skewed_routing":
        skew_router(full)
    ep_model = InternS1VLForConditionalGeneration(config, ep_group=dist.group.WORLD)
    load_hf_state_dict(ep_model, full.state_dict())

    with_images = case == "images_and_padding"
    batches = [make_batch(config, seed=100 + r, images=with_images, pad=with_images) for r in range(world_size)]

    out = ep_model(**batches[rank], output_router_logits=True)
    out.loss.backward()
    ref = reference_loss(full, batches, case == "global_aux_stats")
    ref.backward()

    ep_losses = [torch.zeros(()) for _ in range(world_size)]
    dist.all_gather(ep_losses, out.loss.detach())
    if case == "global_aux_stats":
        loss_diff = abs(sum(ep_losses).item() - ref.item())
    else:
        loss_diff = abs(out.loss.item() - full(**batches[rank]).loss.item())
        loss_diff = max(loss_diff, abs(sum(ep_losses).item() - ref.item()))

    ref_params = dict(full.named_parameters())
    grad_errors = {}
    for name, param in ep_model.named_parameters():
        ref_grad = ref_params[name].grad
        if (param.grad is None) != (ref_grad is None):
            raise AssertionError(f"{case}: {name} has a gradient in only one of EP / reference")
        if ref_grad is None:  # the vision tower in text-only cases
            continue
        grad = param.grad.clone()
        if is_expert_key(name):
            local = param.shape[0]
            ref_grad = ref_grad[rank * local : (rank + 1) * local]
        else:
            dist.all_reduce(grad)
        grad_errors[name] = ((grad - ref_grad).abs().max() / ref_grad.abs().max().clamp(min=1e-12)).item()

    # tokens each rank sends to each expert, per layer: [layers, ranks, experts]
    counts = torch.stack([torch.bincount(s.reshape(-1), minlength=config.text.num_experts) for s in out.selected_experts])
    all_counts = [torch.zeros_like(counts) for _ in range(world_size)]
    dist.all_gather(all_counts, counts)
    return {"loss_diff": loss_diff, "grad_errors": grad_errors, "counts": torch.stack(all_counts, dim=1)}


def check_all_cases(rank: int, world_size: int) -> dict:
    return {case: run_case(rank, world_size, case) for case in CASES}


@pytest.fixture(scope="module", params=[2, 4], ids=["ep2", "ep4"])
def ep_results(request: pytest.FixtureRequest) -> tuple[int, dict]:
    world_size = request.param
    return world_size, run_distributed(check_all_cases, world_size)


@pytest.mark.parametrize("case", CASES)
def test_ep_loss_and_every_gradient_match_ep1(ep_results, case: str) -> None:
    world_size, results = ep_results
    for rank, result in enumerate(results):
        r = result[case]
        assert r["loss_diff"] < LOSS_TOL, f"rank {rank}: loss differs from EP=1 by {r['loss_diff']}"
        worst = max(r["grad_errors"], key=r["grad_errors"].get)
        print(f"ep{world_size} {case} rank {rank}: loss diff {r['loss_diff']:.1e}, worst grad {worst} {r['grad_errors'][worst]:.1e}")
        assert r["grad_errors"][worst] < GRAD_TOL, f"rank {rank}: gradient of {worst} off by {r['grad_errors'][worst]:.2e} (relative)"
        num_text_params = sum(1 for name in r["grad_errors"] if "visual" not in name)
        assert (
            num_text_params == len(InternS1VLForConditionalGeneration(case_config(case, world_size)).model.language_model.state_dict()) + 1
        )
        if case == "images_and_padding":
            assert any("visual" in name for name in r["grad_errors"])


def test_skewed_routing_really_leaves_some_expert_without_tokens(ep_results) -> None:
    world_size, results = ep_results
    counts = results[0]["skewed_routing"]["counts"]  # [layers, ranks, experts]
    assert (counts == 0).any(), "the skewed router should leave some (rank, expert) pair empty"
    assert (counts.sum(dim=1) == 0).any(), "some expert should receive no token from any rank"
    if world_size == 4:
        assert (counts.view(*counts.shape[:2], world_size, -1)[..., -1, :] == 0).all(), "the last rank should receive nothing"


def test_grouped_routing_sends_every_rank_the_same_number_of_tokens(ep_results) -> None:
    world_size, results = ep_results
    counts = results[0]["grouped_routing"]["counts"]  # [layers, ranks, experts]
    per_dest = counts.view(*counts.shape[:2], world_size, -1).sum(-1)  # [layers, src, dst]
    assert (per_dest == per_dest[..., :1]).all(), f"grouped routing is unbalanced: {per_dest.tolist()}"
