"""Ranks that see different lengths never issue different collectives; a rank-divergent decision fails fast.

Issue 19 item 1: rank 0 trains at one length, rank 1 sees a new length and
recompiles (automatic dynamic: a symbolic token count) at another step. Domino
must chunk both ranks' graphs alike (the symbolic graph too), so the ranks'
collectives match and training is exact (loss and every gradient equal to the
same model run eagerly on each rank). And where a pass still decides differently
on one rank (forced here), the backend's rank check must raise a clear error on
every rank before any collective of the graph runs, instead of a gloo abort or
an NCCL hang.

Lowering: Inductor with the post-grad schedule for the small stack and the
forced decision; the reference model's run through AOTAutograd without
Inductor (``lowering="aot_eager"``): what it adds to the small stack's run is
the reference model's graphs and their collectives, decided before Inductor.

Structure: the three runs below (the small stack at different lengths, the
reference model at different lengths, the forced divergent decision) share one
2-rank process group (``SHARED``, a ``tests.distributed.SharedRun`` started by
the first ``_part``): each rank process pays its start-up and Inductor's first-compile
set-up once instead of three times, and the forced decision's rank 0 graph is
the small stack's first graph (an FX-graph-cache hit).  Each run is recorded
apart, with its traceback if it raised, and read by its own test (should a run
kill the process group, by a hang or a dead rank, the runs finished before it
still report); the forced decision runs last (it patches the pass on rank 1 and
is the run most likely to hang if the rank check regresses).  The file alone, cold
Inductor cache, 2-core machine, back to back: 255 s wall / 298 s CPU as three
process groups -> 151 s / 228 s as one at load 2; 405 s / 339 s -> 294 s / 261 s
at load 7.  The reference model's run lowered by aot_eager instead of Inductor, the file alone, cold cache,
back to back at load 2 to 3: 172 s wall / 207 s user+sys -> 117 s / 131 s.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
import torch.distributed as dist

from tests.distributed import SharedRun
from tests.domino_helpers import TinyMoEStack, init_biased, make_inputs

#: Per rank: the token count of each training step (rank 1 recompiles at step 1, rank 0 never).
LENGTHS = {0: [12, 12, 12], 1: [12, 20, 20]}
#: The file's three runs in one process group (``SHARED``); apart they had 1300 + 1600 + 1000 s,
#: about 5x each run's time.
TIMEOUT_S = 2400


def _model(world_size: int) -> torch.nn.Module:
    model = TinyMoEStack(dist.group.WORLD)
    init_biased(model, seed=1, world_size=world_size)
    return model


def _step(model: torch.nn.Module, fn: Any, opt: torch.optim.Optimizer, x: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    opt.zero_grad()
    loss, _ = fn(x)
    loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters()}
    opt.step()
    return loss.item(), grads


def different_lengths_worker(rank: int, world_size: int) -> dict[str, Any]:
    from moe_passes.inductor.backend import make_backend
    from moe_passes.inductor.rank_check import RankAgreement

    torch._dynamo.config.capture_scalar_outputs = True
    ref, model = _model(world_size), _model(world_size)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    backend = make_backend(num_chunks=2, passes=("domino_ep",))
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    worst = {"loss": 0.0, "grad": 0.0, "grad_norm": 0.0}
    for step, length in enumerate(LENGTHS[rank]):
        x = make_inputs(step, rank, length)
        ref_loss, ref_grads = _step(ref, ref, ref_opt, x)
        loss, grads = _step(model, compiled, opt, x)
        worst["loss"] = max(worst["loss"], abs(loss - ref_loss))
        worst["grad"] = max(worst["grad"], max((grads[k] - ref_grads[k]).abs().max().item() for k in ref_grads))
        worst["grad_norm"] = max(worst["grad_norm"], max(g.abs().max().item() for g in ref_grads.values()))
    # The rank check's cost per call: one 32-byte all_gather (both ranks time the same number of calls).
    agreement = RankAgreement("0" * 64, "timing", "timing", set())
    dist.barrier()
    calls = 200
    start = time.perf_counter()
    for _ in range(calls):
        agreement.check()
    per_call_us = (time.perf_counter() - start) / calls * 1e6
    reports = [
        {"symbolic": any("symbolic" in r["stats"] for r in g["pre_grad"] if r["name"] == "domino_ep"),
         "changed": [r["changed"] for r in g["pre_grad"] if r["name"] == "domino_ep"],
         "chunks": [r["stats"].get("chunks") for r in g["pre_grad"] if r["name"] == "domino_ep"]}
        for g in backend.reports
    ]
    return {**worst, "reports": reports, "check_us": per_call_us}


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT_S + 300)  # the first of the file's tests to run pays for all three runs
def test_ranks_with_different_lengths_train_exactly() -> None:
    """Rank 0 compiles one graph, rank 1 two (static, then symbolic), forward and backward."""
    results = _part("lengths")
    for rank, r in enumerate(results):
        graphs = r["reports"]
        assert len(graphs) == (1 if rank == 0 else 2), graphs
        assert all(g["changed"] == [True] for g in graphs), f"rank {rank}: a graph was not chunked: {graphs}"
        assert [g["symbolic"] for g in graphs] == ([False] if rank == 0 else [False, True]), graphs
        assert r["loss"] <= 1e-5, f"rank {rank}: loss differs by {r['loss']}"
        assert r["grad"] <= 1e-5 * max(1.0, r["grad_norm"]), f"rank {rank}: gradient differs by {r['grad']}"
        print(f"rank {rank}: rank check {r['check_us']:.1f} us per call (2 gloo ranks, CPU)")


def forced_decline_worker(rank: int, world_size: int) -> dict[str, Any]:
    from moe_passes.fx.domino import DominoEPPass
    from moe_passes.inductor.backend import make_backend
    from moe_passes.inductor.rank_check import RankDivergenceError
    from moe_passes.pipeline.pass_base import PassResult

    torch._dynamo.config.capture_scalar_outputs = True
    original = DominoEPPass.__call__
    if rank == 1:  # a decision that diverges: rank 1 declines what rank 0 chunks

        def decline(self: DominoEPPass, gm: torch.fx.GraphModule) -> PassResult:
            result = PassResult(self.name)
            result.skip("all regions", "forced to decline on rank 1 (test)")
            return result

        DominoEPPass.__call__ = decline  # type: ignore[method-assign]
    model = _model(world_size)
    compiled = torch.compile(model, backend=make_backend(num_chunks=2, passes=("domino_ep",)), fullgraph=True)
    start = time.perf_counter()
    try:
        loss, _ = compiled(make_inputs(0, rank, 12))
        loss.backward()
    except Exception as e:  # noqa: BLE001 - Dynamo may wrap it; the message is what counts
        cause: BaseException | None = e
        while cause is not None and not isinstance(cause, RankDivergenceError):
            cause = cause.__cause__ or cause.__context__
        return {"error": type(cause if cause is not None else e).__name__, "message": str(cause if cause is not None else e),
                "seconds": time.perf_counter() - start}
    finally:
        DominoEPPass.__call__ = original  # type: ignore[method-assign]
    return {"error": None, "message": "", "seconds": time.perf_counter() - start}


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT_S + 300)
def test_rank_divergent_decision_fails_fast_on_every_rank() -> None:
    results = _part("decline")
    for rank, r in enumerate(results):
        assert r["error"] == "RankDivergenceError", f"rank {rank}: {r}"
        msg = r["message"]
        assert "domino_ep: applied" in msg and "domino_ep: not applied" in msg, msg
        assert "forced to decline on rank 1" in msg and "rank 0" in msg and "rank 1" in msg, msg
        assert f"rank {rank} (this rank)" in msg, msg


#: The issue's own run: the reference model's tiny config, rank 1 sees a new length at step 1.
REFERENCE_LENGTHS = {0: [24, 24, 24], 1: [24, 40, 40]}


def reference_model_worker(rank: int, world_size: int) -> dict[str, Any]:
    from moe_passes.inductor.backend import make_backend
    from moe_passes.models.interns1_vl import InternS1VLConfig, InternS1VLForConditionalGeneration, load_hf_state_dict
    from tests.model_inputs import make_batch

    torch._dynamo.config.capture_scalar_outputs = True
    config = InternS1VLConfig.tiny()
    torch.manual_seed(0)
    full = InternS1VLForConditionalGeneration(config)
    ref = InternS1VLForConditionalGeneration(config, ep_group=dist.group.WORLD)
    model = InternS1VLForConditionalGeneration(config, ep_group=dist.group.WORLD)
    load_hf_state_dict(ref, full.state_dict())
    load_hf_state_dict(model, full.state_dict())
    backend = make_backend(passes=("domino_ep",), num_chunks=2, lowering="aot_eager")
    compiled = torch.compile(model, backend=backend)
    worst = {"loss": 0.0, "grad": 0.0}
    for step, length in enumerate(REFERENCE_LENGTHS[rank]):
        batch = make_batch(config, seed=100 * step + rank, batch=1, seq_len=length)
        ref.zero_grad()
        model.zero_grad()
        ref_loss = ref(**batch).loss
        ref_loss.backward()
        loss = compiled(**batch).loss
        loss.backward()
        worst["loss"] = max(worst["loss"], abs(loss.item() - ref_loss.item()))
        ref_params = dict(ref.named_parameters())
        for name, p in model.named_parameters():
            q = ref_params[name]
            assert (p.grad is None) == (q.grad is None), name
            if q.grad is not None:
                worst["grad"] = max(worst["grad"], (p.grad - q.grad).abs().max().item())
    domino = [[r for r in g["pre_grad"] if r["name"] == "domino_ep"] for g in backend.reports]
    return {**worst, "changed": [[r["changed"] for r in g] for g in domino],
            "symbolic": [any("symbolic" in r["stats"] for r in g) for g in domino]}


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT_S + 300)
def test_reference_model_ranks_with_different_lengths() -> None:
    """Issue 19's run: was a gloo 'collective mismatch' abort; now both ranks chunk every graph and are exact.
    The reference model: rank 0 compiles one graph, rank 1 two, lowered by ``aot_eager`` (the collectives each
    rank issues are the pre-grad pass's decision; Inductor and its post-grad schedule on ranks that recompile
    at different steps are proven by ``test_ranks_with_different_lengths_train_exactly`` above)."""
    results = _part("reference")
    for rank, r in enumerate(results):
        assert r["changed"] == ([[True]] if rank == 0 else [[True], [True]]), f"rank {rank}: {r}"
        assert r["symbolic"] == ([False] if rank == 0 else [False, True]), f"rank {rank}: {r}"
        assert r["loss"] <= 1e-5 and r["grad"] <= 1e-5, f"rank {rank}: {r}"


# ------------------------------------------------------------------ one process group for the three runs

#: The runs in the order they run (the forced decision last: it patches the pass on rank 1 while it runs), in one
#: 2-rank process group (``tests.distributed.SharedRun``: each run recorded apart, with its traceback if it raised).
SHARED = SharedRun(2, {"lengths": (different_lengths_worker, ()), "reference": (reference_model_worker, ()),
                       "decline": (forced_decline_worker, ())}, TIMEOUT_S)


def _part(name: str) -> list[Any]:
    """One run's result on every rank (the shared run starts on the first call)."""
    return SHARED.result(name)
