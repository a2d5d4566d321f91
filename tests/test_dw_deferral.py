"""Weight-gradient (dW) deferral (``defer_weight_grads``): the option, where the GEMMs land, and exactness.

- the option is validated and keys Inductor's cache like every other;
- Inductor's final output code for the 2-layer test model (compiled on a fake group, never run) calls every
  weight-gradient GEMM the schedule put in a window between that all-to-all's issue and its wait, and the
  report says which GEMMs, which windows, and the bytes held for them;
- on 2 gloo ranks, loss and every gradient equal the eager model's, with and without per-layer activation
  checkpointing (slow: real processes, Inductor compiles).
"""

from __future__ import annotations

import re
from typing import Any
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.fx as fx
from torch import nn

from moe_passes.config import BackendConfig
from moe_passes.fx.domino import DominoEPPass
from moe_passes.inductor.backend import _inner_compile, make_backend
from moe_passes.inductor.schedule import INDUCTOR_CONFIG, ScheduleOverlapPass, as_custom_pass
from moe_passes.ir.canonical import canonicalize
from moe_passes.testing import run_pass
from tests.distributed import fake_group, run_distributed
from tests.domino_helpers import TinyMoEStack, capture_without_running, init_biased, make_inputs


def test_option_is_validated_and_part_of_the_cache_key() -> None:
    on, off = BackendConfig(defer_weight_grads=True), BackendConfig()
    assert not off.defer_weight_grads
    assert ScheduleOverlapPass(on).uuid() != ScheduleOverlapPass(off).uuid()
    assert on.digest() != off.digest()
    with pytest.raises(ValueError, match="defer_weight_grads must be True or False, got 'yes'"):
        make_backend(defer_weight_grads="yes")
    with pytest.raises(ValueError, match="needs schedule_overlap=True, got schedule_overlap='forward'"):
        make_backend(defer_weight_grads=True, schedule_overlap="forward")
    with pytest.raises(ValueError, match="needs schedule_overlap=True, got schedule_overlap=False"):
        make_backend(defer_weight_grads=True, schedule_overlap=False)


_SOURCES = re.compile(r"# Topologically Sorted Source Nodes: \[([^\]]*)\]")
_ISSUE = re.compile(r"(\w+) = torch\.ops\._c10d_functional\.all_to_all_single\.default\(")
_WAIT = re.compile(r"torch\.ops\._c10d_functional\.wait_tensor\.default\((\w+)\)")


def code_positions(code: str) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """Line numbers in ``call()`` of: each all-to-all's issue and wait (by its post-grad node name), and the
    first kernel each post-grad node is lowered into (from Inductor's "Source Nodes" comments)."""
    issue: dict[str, int] = {}
    wait: dict[str, int] = {}
    node_line: dict[str, int] = {}
    buffer_of: dict[str, str] = {}
    sources: list[str] = []
    body = code[code.index("def call(") :].splitlines()
    for i, line in enumerate(body):
        line = line.strip()
        if m := _SOURCES.match(line):
            sources = [s.strip() for s in m.group(1).split(",")]
            continue
        if m := _ISSUE.match(line):
            name = next(s for s in reversed(sources) if s.startswith("all_to_all_single"))
            issue[name], buffer_of[m.group(1)] = i, name
        elif m := _WAIT.match(line):
            wait[buffer_of[m.group(1)]] = i
        for s in sources:
            node_line.setdefault(s, i)
        sources = []
    return issue, wait, node_line


def test_output_code_runs_weight_gradients_inside_all_to_all_windows() -> None:
    with fake_group(2, values_matter=False):  # compiled, never run
        model = TinyMoEStack(dist.group.WORLD)
        init_biased(model, seed=1, world_size=2)
        config = BackendConfig(num_chunks=2, passes=("domino_ep",), defer_weight_grads=True)
        reports: list[Any] = []
        codes: list[str] = []
        scheduler = ScheduleOverlapPass(config)

        class Recording(ScheduleOverlapPass):
            def __call__(self, gm: fx.GraphModule) -> Any:
                reports.append(scheduler(gm))
                return reports[-1]

        def compile_graph(gm: fx.GraphModule, example_inputs: list[Any]) -> None:
            from torch._inductor.compile_fx import compile_fx

            canon = canonicalize(gm, example_inputs)
            assert canon.canonical, canon.reason
            run_pass(DominoEPPass(config), canon.gm)
            patch = {"post_grad_custom_post_pass": as_custom_pass(Recording(config)), "fx_graph_cache": False,
                     **INDUCTOR_CONFIG}
            with torch._inductor.config.patch(patch), torch._functorch.config.patch(force_non_lazy_backward_lowering=True):
                compile_fx(canon.gm, example_inputs, inner_compile=_inner_compile)  # tells the pass fw / bw

        from torch._inductor.graph import GraphLowering

        with mock.patch.object(GraphLowering, "save_output_code", codes.append):
            capture_without_running(model, make_inputs(0, 0, 12), compile_with=compile_graph)
    assert len(reports) == 2 and len(codes) == 2, "one forward and one backward graph"
    assert "weight_grads" not in reports[0].stats, "the forward graph has no weight gradients to place"
    dw = reports[1].stats["weight_grads"]
    # 2 layers x (2 chunks x 2 expert weight gradients + the router weight gradient of each chunk): 14 GEMMs
    assert dw["dw_gemms"] == 14, dw
    assert dw["dw_in_windows"] == 13 and dw["dw_outside_windows"] == ["addmm_default_1"], dw  # after the last wait
    assert dw["dw_held_bytes"] > 0 and dw["dw_held_peak_bytes"] <= dw["dw_held_bytes"]
    issue, wait, node_line = code_positions(codes[1])
    assert len(issue) == len(wait) == 8
    checked = 0
    for a2a, gemms in dw["dw_windows"].items():
        for gemm in gemms:
            assert issue[a2a] < node_line[gemm] < wait[a2a], f"{gemm} not between {a2a}'s issue and wait in the output code"
            checked += 1
    assert checked == 13


# ---------------------------------------------------------------------------------------------- exactness
STEPS = 3
TOKENS = 12


def _train(model: nn.Module, fn: Any, rank: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses: list[float] = []
    grads: dict[str, torch.Tensor] = {}
    for step in range(STEPS):
        opt.zero_grad()
        loss, _ = fn(make_inputs(step, rank, TOKENS))
        loss.backward()
        if step == 0:
            grads = {k: p.grad.detach().clone() for k, p in model.named_parameters()}
        losses.append(loss.item())
        opt.step()
    return losses, grads


def _model(world_size: int, checkpoint: bool) -> nn.Module:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model = TinyMoEStack(dist.group.WORLD)
    init_biased(model, seed=1, world_size=world_size)
    if checkpoint:
        for i, block in enumerate(model.blocks):
            model.blocks[i] = checkpoint_wrapper(block)
    return model


def deferral_worker(rank: int, world_size: int) -> dict[str, Any]:
    torch._dynamo.config.capture_scalar_outputs = True
    torch._inductor.config.fx_graph_cache = False  # every rank runs the post-grad passes and reports them
    torch._functorch.config.enable_autograd_cache = False
    out: dict[str, Any] = {}
    for checkpoint in (False, True):
        ref = _model(world_size, checkpoint)
        ref_losses, ref_grads = _train(ref, ref, rank)
        model = _model(world_size, checkpoint)
        backend = make_backend(num_chunks=2, passes=("domino_ep",), defer_weight_grads=True)
        torch._dynamo.reset()
        losses, grads = _train(model, torch.compile(model, backend=backend, fullgraph=True), rank)
        placed = [r["stats"]["weight_grads"] for g in backend.reports for r in g["post_grad"].get("backward", [])
                  if r["name"] == "schedule_overlap" and "weight_grads" in r["stats"]]
        out["checkpoint" if checkpoint else "plain"] = {
            "loss": max(abs(a - b) for a, b in zip(losses, ref_losses)),
            "grad": max((grads[k] - ref_grads[k]).abs().max().item() for k in ref_grads),
            "grad_norm": max(g.abs().max().item() for g in ref_grads.values()),
            "grads_compared": sorted(ref_grads),
            "chunked": sum(len(r["stats"].get("chunks", {})) for g in backend.reports for r in g["pre_grad"]
                           if r["name"] == "domino_ep" and r["changed"]),
            "dw": [{k: v for k, v in p.items() if k in ("dw_gemms", "dw_in_windows")} for p in placed],
        }
    return out


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_two_ranks_with_deferred_weight_gradients_match_eager() -> None:
    """Loss and every parameter gradient equal the eager model's (2 gloo ranks, Inductor, domino_ep with 2
    chunks, defer_weight_grads=True), without and with checkpoint_wrapper on every layer."""
    for rank, report in enumerate(run_distributed(deferral_worker, 2, timeout_s=1000)):
        for case, r in report.items():
            assert r["chunked"] == 2, f"rank {rank} {case}: domino_ep chunked {r['chunked']} regions"
            assert r["dw"] and all(p["dw_gemms"] > 0 and p["dw_in_windows"] > 0 for p in r["dw"]), r["dw"]
            assert len(r["grads_compared"]) >= 10, r["grads_compared"]
            assert r["loss"] <= 1e-5, f"rank {rank} {case}: loss differs by {r['loss']}"
            assert r["grad"] <= 1e-5 * max(1.0, r["grad_norm"]), f"rank {rank} {case}: gradient differs by {r['grad']}"
