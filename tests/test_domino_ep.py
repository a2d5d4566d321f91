"""Domino EP is exact: chunked MoE regions give the unmodified model's losses and gradients.

One process launch per world size checks every chunk count and token-count
edge case (compiles dominate the cost; 4 ranks skip N=1, see ``FOUR_RANK_CASES``)
and returns the largest differences; the tests below read that report.

Lowering: on 2 ranks Inductor with the post-grad schedule (``schedule_overlap``) for the chunked cases
that carry an Inductor-specific risk: N divides T (2, 12), N does not divide T (3, 10) and empty chunks
(4, 3: zero-row kernels); the other two, N=1 (Domino declines: nothing chunked) and (4, 10) (N=4 and a
non-divisible T, both already under Inductor in the cases above), run through AOTAutograd without
Inductor (``aot_eager``), which proves the pass's numerics.  4 ranks: every case ``aot_eager``.
``test_two_ranks_match_unmodified_model`` alone, cold Inductor cache, 2-core machine (load 2), back to
back: 165 s wall / 230 s user+sys with five Inductor compiles -> 136 s / 175 s with three.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist

from moe_passes.fx.domino import chunk_sizes
from tests.distributed import run_distributed
from tests.domino_helpers import EXPERTS, TinyMoEStack, domino_backend, init_biased, make_inputs

STEPS = 10
# (num_chunks, tokens per rank): T divisible and not, T < N (empty chunks).
CASES: list[tuple[int, int]] = [(1, 12), (2, 12), (3, 10), (4, 10), (4, 3)]
#: 2 ranks: the cases lowered by Inductor (post-grad schedule included); the others by "aot_eager".
INDUCTOR_CASES = {(2, 12), (3, 10), (4, 3)}
#: 4 ranks: every case but N=1, where Domino declines from the chunk count alone (no world size in that
#: decision): nothing chunked and the plain compile equal to eager stay proven by the 2-rank test.
FOUR_RANK_CASES = [c for c in CASES if c[0] > 1]


def _train(model: torch.nn.Module, fn: Any, rank: int, tokens: int) -> tuple[list[float], dict[str, torch.Tensor], Any]:
    """10 SGD steps on fresh inputs; losses, first-step gradients, final parameters, selected experts."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses: list[float] = []
    first_grads: dict[str, torch.Tensor] = {}
    selected = None
    for step in range(STEPS):
        opt.zero_grad()
        loss, sel = fn(make_inputs(step, rank, tokens))
        loss.backward()
        if step == 0:
            first_grads = {k: p.grad.detach().clone() for k, p in model.named_parameters()}
            selected = sel.detach().clone()
        losses.append(loss.item())
        opt.step()
    return losses, first_grads, {k: p.detach().clone() for k, p in model.named_parameters()}, selected


def _fresh_model(world_size: int) -> TinyMoEStack:
    model = TinyMoEStack(dist.group.WORLD)
    init_biased(model, seed=1, world_size=world_size)
    return model


def equivalence_worker(rank: int, world_size: int, cases: list[tuple[int, int]],
                       inductor_cases: set[tuple[int, int]]) -> dict[str, Any]:
    """Every case of ``cases``: Inductor (with the post-grad schedule) for ``inductor_cases``, else "aot_eager"."""
    torch._dynamo.config.capture_scalar_outputs = True
    torch.manual_seed(0)
    report: dict[str, Any] = {}
    references: dict[int, Any] = {}
    for num_chunks, tokens in cases:
        if tokens not in references:
            ref_model = _fresh_model(world_size)
            references[tokens] = _train(ref_model, ref_model, rank, tokens)
        ref_losses, ref_grads, ref_params, ref_sel = references[tokens]
        model = _fresh_model(world_size)
        torch._dynamo.reset()
        results: list[Any] = []
        lowering = "inductor" if (num_chunks, tokens) in inductor_cases else "aot_eager"
        compiled = torch.compile(model, backend=domino_backend(num_chunks, results=results, lowering=lowering), fullgraph=True)
        losses, grads, params, sel = _train(model, compiled, rank, tokens)
        report[f"N={num_chunks},T={tokens}"] = {
            "loss": max(abs(a - b) for a, b in zip(losses, ref_losses)),
            "grad": max((grads[k] - ref_grads[k]).abs().max().item() for k in ref_grads),
            "param": max((params[k] - ref_params[k]).abs().max().item() for k in ref_params),
            "grad_norm": max(g.abs().max().item() for g in ref_grads.values()),
            "selected_equal": bool(torch.equal(sel, ref_sel)),
            "starved_experts_unused": bool((ref_sel < ref_sel.new_tensor(EXPERTS - 2)).all()),
            "losses": losses,
            "chunks": [r.stats.get("chunks") for r in results],
            "lowering": lowering,
        }
    return report


def _check(reports: list[dict[str, Any]], inductor_cases: set[tuple[int, int]],
           cases: list[tuple[int, int]] = CASES) -> None:
    for rank, report in enumerate(reports):
        assert set(report) == {f"N={n},T={t}" for n, t in cases}
        for case, r in report.items():
            n, t = (int(v.split("=")[1]) for v in case.split(","))
            assert r["lowering"] == ("inductor" if (n, t) in inductor_cases else "aot_eager"), (case, r["lowering"])
            expected = [] if n == 1 else [chunk_sizes(t, n)] * 2
            assert [list(c.values()) for c in r["chunks"]] == [expected], f"{case}: chunked regions {r['chunks']}"
            assert r["selected_equal"], f"rank {rank} {case}: routing differs"
            assert r["starved_experts_unused"], f"rank {rank} {case}: the biased router did pick the starved experts"
            assert r["loss"] <= 1e-5, f"rank {rank} {case}: loss differs by {r['loss']}"
            assert r["grad"] <= 1e-5 * max(1.0, r["grad_norm"]), f"rank {rank} {case}: gradient differs by {r['grad']}"
            assert r["param"] <= 1e-5, f"rank {rank} {case}: parameters after {STEPS} steps differ by {r['param']}"


@pytest.mark.slow
@pytest.mark.timeout(1800)  # five fresh compiles of forward and backward, three of them Inductor (the five with
# Inductor measured 1238 s with 6 jobs sharing 2 cores)
def test_two_ranks_match_unmodified_model() -> None:
    _check(run_distributed(equivalence_worker, 2, CASES, INDUCTOR_CASES, timeout_s=1500), INDUCTOR_CASES)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_four_ranks_match_unmodified_model() -> None:
    """4 ranks through AOTAutograd without Inductor (the pass's numerics; Inductor and the post-grad schedule
    are proven on 2 ranks above, and on 4 by tests/test_user_model.py): 340 s -> about a third on 2 cores.
    ``FOUR_RANK_CASES``: N=1 (declined, nothing chunked) is the 2-rank test's; it was 4 s of each rank's
    38 s of compiles. Alone, cold cache, back to back: 187 s wall / 179 s user+sys (load 3.6) -> 85 s / 158 s
    (load 0.7)."""
    _check(run_distributed(equivalence_worker, 4, FOUR_RANK_CASES, set(), timeout_s=800), set(), FOUR_RANK_CASES)
