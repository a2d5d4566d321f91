"""The speed bench's table logic (the measurement itself runs real ranks: `moe-passes bench`, not CI)."""

from __future__ import annotations

import pytest

from moe_passes.bench import BenchOptions
from moe_passes.bench.speed import (
    COLUMNS,
    DECODER_VARIANTS,
    VARIANTS,
    combine,
    compute_cpu_notes,
    contention_notes,
    decoder_shape,
    exposed_us,
    overlap_gain_notes,
    plan,
    run,
    shape,
    target_notes,
)


def _cell(name: str, step: float, wait: float, note: str = "", model: str = "moe_only", compute: float = 60.0,
          comm: float = 30.0, peak: int = 100 * 2**20) -> dict:
    return {"model": model, "variant": name, "step_ms": step, "exposed_comm_ms": wait, "compute_ms": compute,
            "comm_ms": comm, "peak_bytes": peak, "compile_s": 1.0, "all_to_alls": 10, "note": note}


def test_rows_take_the_slowest_rank_and_ratios_to_inductor() -> None:
    rank0 = [_cell(v, 100.0, 40.0) for v in VARIANTS]
    rank1 = [_cell(v, 100.0, 40.0) for v in VARIANTS]
    rank1[VARIANTS.index("domino_n2")] = _cell("domino_n2", 80.0, 10.0)
    rank0[VARIANTS.index("domino_n2")] = _cell("domino_n2", 70.0, 12.0)
    rows = {r["variant"]: r for r in combine([rank0, rank1])}
    assert set(rows) == set(VARIANTS) and all(set(COLUMNS) <= set(r) for r in rows.values())
    assert all(r["model"] == "moe_only" for r in rows.values())
    assert rows["inductor"]["step_vs_inductor"] == 1.0
    assert rows["domino_n2"]["step_ms"] == 80.0 and rows["domino_n2"]["step_vs_inductor"] == 0.8
    assert rows["domino_n2"]["exposed_comm_ms"] == 12.0 and rows["domino_n2"]["exposed_vs_inductor"] == 0.3


def test_a_failed_variant_keeps_its_error_in_the_row() -> None:
    cells = [_cell(v, 100.0, 40.0) for v in VARIANTS]
    i = VARIANTS.index("inductor_overlap_scheduler")
    cells[i] = {
        "model": "moe_only",
        "variant": VARIANTS[i],
        "step_ms": None,
        "exposed_comm_ms": None,
        "compute_ms": None,
        "comm_ms": None,
        "peak_bytes": None,
        "compile_s": None,
        "note": "failed: No module named 'triton'",
    }
    row = combine([cells, cells])[i]
    assert row["note"] == "failed: No module named 'triton'" and row["step_vs_inductor"] is None
    assert row["ideal_vs_inductor"] is None and row["peak_vs_inductor"] is None


def test_ideal_bound_and_peak_are_computed_per_row_against_the_same_models_inductor() -> None:
    """ideal = max(compute, comm) of the row / its model's Inductor step; peak over that Inductor row's peak."""
    stack = [_cell(v, 100.0, 40.0) for v in VARIANTS]
    decoder = [_cell(v, 200.0, 80.0, model="decoder", compute=150.0, comm=90.0, peak=200 * 2**20) for v in DECODER_VARIANTS]
    decoder[1] = _cell("domino_moe_n2", 180.0, 30.0, model="decoder", compute=170.0, comm=95.0, peak=230 * 2**20)
    decoder[3] = _cell("domino_layer_n2", 160.0, 10.0, model="decoder", compute=80.0, comm=120.0, peak=210 * 2**20)
    decoder[0] = dict(decoder[0], compute_alone_ms=75.0)  # the baseline also timed one rank alone
    slower = [dict(c) for c in decoder]
    slower[3] = dict(decoder[3], compute_ms=70.0, comm_ms=130.0, peak_bytes=220 * 2**20)  # the other rank: max wins
    rows = {(r["model"], r["variant"]): r for r in combine([stack + decoder, stack + slower])}
    assert rows[("moe_only", "domino_n2")]["ideal_vs_inductor"] == 0.6  # max(60, 30) / 100
    assert rows[("decoder", "inductor")]["ideal_vs_inductor"] == 0.75  # max(150, 90) / 200
    moe, layer = rows[("decoder", "domino_moe_n2")], rows[("decoder", "domino_layer_n2")]
    assert moe["ideal_vs_inductor"] == 0.85 and moe["peak_vs_inductor"] == 1.15 and moe["step_vs_inductor"] == 0.9
    assert layer["compute_ms"] == 80.0 and layer["comm_ms"] == 130.0 and layer["ideal_ms"] == 130.0
    assert layer["ideal_vs_inductor"] == 0.65 and layer["peak_vs_inductor"] == 1.1 and layer["peak_MiB"] == 220.0
    notes = target_notes(list(rows.values()))
    layer_note = next(n for n in notes if n.startswith("target domino_layer_n2:"))
    assert "exposed 0.125 > 0.1" in layer_note and "step/ideal 1.231 > 1.05" in layer_note
    assert "peak 1.1 <= 1.15" in layer_note and "step 160.0 < best domino_moe 180.0" in layer_note
    assert contention_notes(list(rows.values())) == [
        "decoder: compute with the ranks at once / one rank alone = 150.0 / 75.0 ms = 2.00 (1: a core per rank; "
        "higher: the ranks share cores)"]


def test_compute_cpu_time_takes_the_slowest_rank_and_is_noted_against_inductor() -> None:
    """compute_cpu_ms (the stepping thread's CPU time, load-insensitive) and the page faults: max over ranks; the
    note gives each row over its model's Inductor row."""
    decoder = [dict(_cell(v, 200.0, 80.0, model="decoder"), compute_cpu_ms=200.0, compute_faults=10) for v in DECODER_VARIANTS]
    other = [dict(c) for c in decoder]
    other[0] = dict(decoder[0], compute_cpu_ms=220.0, compute_faults=9000)
    other[1] = dict(decoder[1], compute_cpu_ms=187.0)
    rows = combine([decoder, other])
    assert rows[0]["compute_cpu_ms"] == 220.0 and rows[0]["compute_faults"] == 9000
    (note,) = compute_cpu_notes(rows)
    assert note.startswith("decoder: compute CPU time") and "inductor 220.0 ms (1.00x, 9000 page faults)" in note
    assert "domino_moe_n2 200.0 ms (0.91x, 10 page faults)" in note
    assert compute_cpu_notes([dict(r, compute_cpu_ms=None) for r in rows]) == []  # CUDA rows: no CPU-time note


def test_wall_clock_overlap_is_the_share_of_the_exchange_the_step_no_longer_pays() -> None:
    """(compute + comm - step) / comm per Domino row: 1 when the step is its compute alone, 0 when it is compute
    plus the whole exchange (gloo's copies on the compute's cores); Inductor, failed rows and rows without a
    comm measurement have none."""
    cells = [_cell("inductor", 300.0, 80.0, model="decoder", compute=220.0, comm=50.0),
             _cell("domino_layer_n2", 250.0, 30.0, model="decoder", compute=200.0, comm=50.0),
             _cell("domino_layer_n4", 210.0, 30.0, model="decoder", compute=200.0, comm=40.0),
             dict(_cell("domino_moe_n2", 1.0, 1.0, model="decoder"), comm_ms=None)]
    (note,) = overlap_gain_notes(combine([cells]))
    assert note.startswith("decoder: wall-clock overlap (compute + comm - step) / comm")
    assert note.endswith("domino_layer_n2 0.00, domino_layer_n4 0.75")


def test_rank_processes_get_the_allocator_setting_unless_the_user_set_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ranks run with a fixed glibc mmap threshold above the unchunked graph's buffers (RANK_ENV); a value the
    user exported wins, and the parent's environment is left as it was."""
    import os

    from moe_passes.bench.speed import RANK_ENV, _rank_environment

    assert set(RANK_ENV) == {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"}
    for key in RANK_ENV:
        monkeypatch.delenv(key, raising=False)
    with _rank_environment() as applied:
        assert all(os.environ[k] == RANK_ENV[k] == applied[k] for k in RANK_ENV)
    assert not any(k in os.environ for k in RANK_ENV)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1234")
    with _rank_environment() as applied:
        assert applied == {"MALLOC_MMAP_THRESHOLD_": RANK_ENV["MALLOC_MMAP_THRESHOLD_"], "MALLOC_TRIM_THRESHOLD_": "1234"}
    assert os.environ["MALLOC_TRIM_THRESHOLD_"] == "1234" and "MALLOC_MMAP_THRESHOLD_" not in os.environ


def test_a_models_variants_are_all_prepared_then_sampled_in_rotating_rounds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows of one model are sampled under the same load: every variant compiled first, then each round samples
    each variant once (order rotating); a variant failing to compile keeps its error, the others are measured."""
    import torch.distributed as dist

    import moe_passes.bench.speed as speed

    calls: list[tuple[str, str, int]] = []

    class P:
        def __init__(self, name: str) -> None:
            self.name = name

    def prepare(rank, options, model, name, group):  # noqa: ANN001, ANN202
        calls.append(("prepare", name, -1))
        if name == "domino_moe_n4":
            raise RuntimeError("no compile here")
        return P(name)

    monkeypatch.setattr(speed, "_prepare", prepare)
    monkeypatch.setattr(speed, "_sample", lambda p, i, group, device: calls.append(("sample", p.name, i)))
    monkeypatch.setattr(speed, "_finish", lambda p, rank, options, group: {"variant": p.name, "note": ""})
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: None)
    names = ["inductor", "domino_moe_n2", "domino_moe_n4", "domino_layer_n2"]
    cells = speed._measure_model(0, BenchOptions(steps=3), "decoder", names, None)
    assert [c["variant"] for c in cells] == names
    assert cells[2]["note"].startswith("failed: RuntimeError: no compile here") and cells[0]["note"] == ""
    assert [c[0] for c in calls[:4]] == ["prepare"] * 4 and all(c[0] == "sample" for c in calls[4:])
    rounds = [[n for what, n, i in calls if what == "sample" and i == r] for r in range(3)]
    assert rounds == [["inductor", "domino_moe_n2", "domino_layer_n2"], ["domino_moe_n2", "domino_layer_n2", "inductor"],
                      ["domino_layer_n2", "inductor", "domino_moe_n2"]]


def test_the_decoder_model_splits_along_a_batch_of_sequences_and_variants_filter() -> None:
    for quick in (False, True):
        d = decoder_shape(BenchOptions(quick=quick))
        assert d["batch"] >= 4 and d["batch"] % 4 == 0  # the layer mode splits B into 2 and 4 micro-batches
    assert DECODER_VARIANTS == ["inductor", "domino_moe_n2", "domino_moe_n4", "domino_layer_n2", "domino_layer_n4",
                                "domino_layer_n2_dw"]
    assert plan(BenchOptions(variants=("decoder/domino_layer_n2",))) == [("decoder", "inductor"), ("decoder", "domino_layer_n2")]
    assert len(plan(BenchOptions())) == len(VARIANTS) + len(DECODER_VARIANTS)
    with pytest.raises(ValueError, match="unknown speed variant 'decoder/eager'"):
        plan(BenchOptions(variants=("decoder/eager",)))


def test_bad_options_are_rejected() -> None:
    with pytest.raises(ValueError, match="at least 2 ranks"):
        run(BenchOptions(world_size=1))
    with pytest.raises(ValueError, match="steps >= 1"):
        run(BenchOptions(steps=0))


def test_full_shape_makes_all_to_all_a_real_share() -> None:
    full, quick = shape(BenchOptions()), shape(BenchOptions(quick=True))
    assert full["hidden"] >= 1024 and full["tokens"] >= 4096 and full["intermediate"] < full["hidden"]
    assert quick["tokens"] < full["tokens"]


def test_exposed_time_is_communication_not_covered_by_compute() -> None:
    comm = [(0.0, 10.0), (20.0, 30.0), (25.0, 35.0)]  # the last two overlap each other: counted once
    compute = [(5.0, 22.0), (21.0, 24.0), (40.0, 50.0)]
    # [0,5) exposed, [5,10) hidden; [20,24) hidden, [24,35) exposed
    assert exposed_us(comm, compute) == 5.0 + 11.0
    assert exposed_us(comm, []) == 25.0
    assert exposed_us([], compute) == 0.0


def test_bench_flags_are_checked_before_any_rank_starts(tmp_path, capsys) -> None:
    from moe_passes.cli import main

    assert main(["bench", "--section", "speed", "--variants", "decoder/eager", "--device", "cpu", "-q"]) == 2
    assert "--variants: unknown speed variant 'decoder/eager'" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["bench", "--section", "speed", "--trace", str(blocker / "traces"), "--device", "cpu", "-q"]) == 2
    assert "--trace" in capsys.readouterr().err


def test_decoder_stack_is_the_reference_layers_on_a_batch_of_causal_sequences() -> None:
    import torch

    from moe_passes.models.interns1_vl.model import causal_attention_bias
    from moe_passes.models.stacks import decoder_stack

    model = decoder_stack(2, 32, 4, 2, 8, 16, 4, 2)
    assert all(p.abs().sum() > 0 for p in model.layers[0].mlp.parameters())  # router and experts initialised
    x = torch.randn(3, 5, 32)
    positions = torch.arange(5).expand(3, 3, 5)
    cos, sin = model.rotary_emb(positions, x.dtype)
    h = x
    for layer in model.layers:
        h, _, _ = layer(h, cos, sin, causal_attention_bias(None, 3, 5, x.dtype, x.device))
    torch.testing.assert_close(model(x), model.norm(h).square().mean(), rtol=0, atol=0)
    # the sequences are independent (per-sequence attention; routing is per token): the batch's loss is the
    # mean of each sequence's own
    per_seq = [model(x[i:i + 1]) for i in range(3)]
    torch.testing.assert_close(model(x), torch.stack(per_seq).mean(), rtol=1e-5, atol=1e-6)


def test_local_collectives_route_the_groups_all_to_alls_to_a_local_copy_and_restore_it() -> None:
    """Inside the block an all-to-all naming the group returns this rank's own input (the same bytes, copied
    locally); after it the group's own all-to-all is back (the fake group's: every slot gets slot 0)."""
    import torch
    from torch.distributed._functional_collectives import all_to_all_single

    from moe_passes.bench.speed import local_collectives
    from tests.distributed import fake_group

    x = torch.arange(12.0).view(6, 2)
    with fake_group(2) as group:
        with local_collectives(group) as local:
            assert local.getBackendName() == "local_copy"
            counts = all_to_all_single(torch.tensor([3, 1, 0, 2]), [2, 2], [2, 2], group)
            assert counts.tolist() == [3, 1, 0, 2]
            torch.testing.assert_close(all_to_all_single(x, [2, 4], [2, 4], group), x, rtol=0, atol=0)
            with pytest.raises(RuntimeError, match="matching split sizes"):
                all_to_all_single(x, [1, 5], [2, 4], group).sum()
        assert all_to_all_single(torch.tensor([3, 1, 0, 2]), [2, 2], [2, 2], group).tolist() == [3, 1, 3, 1]
