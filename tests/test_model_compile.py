"""The whole reference model compiles into one graph and matches eager, with 2 expert-parallel ranks.

``torch.compile(fullgraph=True)`` (Inductor, scalar capture for the split
sizes of the dropless all-to-all) over images + padded text: loss and every
gradient equal eager's on fresh inputs, on every rank.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from moe_passes.models.interns1_vl import InternS1VLForConditionalGeneration, load_hf_state_dict
from tests.distributed import run_distributed
from tests.model_inputs import compile_config, make_batch

LOSS_TOL = 1e-5
GRAD_TOL = 1e-4  # max |compiled - eager| / max |eager|, per parameter


def compiled_vs_eager(rank: int, world_size: int) -> dict:
    torch._dynamo.config.capture_scalar_outputs = True
    config = compile_config()
    torch.manual_seed(0)
    full_sd = InternS1VLForConditionalGeneration(config).state_dict()
    eager = InternS1VLForConditionalGeneration(config, ep_group=dist.group.WORLD)
    compiled = InternS1VLForConditionalGeneration(config, ep_group=dist.group.WORLD)
    load_hf_state_dict(eager, full_sd)
    load_hf_state_dict(compiled, full_sd)
    step = torch.compile(compiled, backend="inductor", fullgraph=True)  # ranks compile in turn: tests/distributed.py

    results = []
    for seed in (10, 11):  # the second call reuses the compiled graph on fresh inputs
        batch = make_batch(config, seed=seed * world_size + rank, images=True, pad=True)
        for model in (eager, compiled):
            model.zero_grad(set_to_none=True)
        out = step(**batch)
        out.loss.backward()
        ref = eager(**batch)
        ref.loss.backward()
        grads = dict(eager.named_parameters())
        errors = {
            name: ((p.grad - grads[name].grad).abs().max() / grads[name].grad.abs().max().clamp(min=1e-12)).item()
            for name, p in compiled.named_parameters()
        }
        results.append({
            "loss_diff": abs(out.loss.item() - ref.loss.item()),
            "aux_diff": abs(out.aux_loss.item() - ref.aux_loss.item()),
            "grad_errors": errors,
        })
    return {"steps": results, "graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"]}


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_distributed(compiled_vs_eager, 2, timeout_s=900)


@pytest.mark.slow
def test_whole_model_is_one_graph_compiled_once(results) -> None:
    assert all(r["graphs"] == 1 for r in results), [r["graphs"] for r in results]


@pytest.mark.slow
def test_compiled_loss_matches_eager(results) -> None:
    for rank, result in enumerate(results):
        for step in result["steps"]:
            assert step["loss_diff"] < LOSS_TOL, f"rank {rank}: compiled loss differs by {step['loss_diff']}"
            assert step["aux_diff"] < LOSS_TOL, f"rank {rank}: compiled aux loss differs by {step['aux_diff']}"


@pytest.mark.slow
def test_compiled_gradients_match_eager(results) -> None:
    for rank, result in enumerate(results):
        for step in result["steps"]:
            worst = max(step["grad_errors"], key=step["grad_errors"].get)
            assert step["grad_errors"][worst] < GRAD_TOL, f"rank {rank}: gradient of {worst} off by {step['grad_errors'][worst]:.2e}"
