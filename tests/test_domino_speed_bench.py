"""The speed bench's table logic (the measurement itself runs real ranks: `moe-passes bench`, not CI)."""

from __future__ import annotations

import pytest

from moe_passes.bench import BenchOptions
from moe_passes.bench.speed import COLUMNS, VARIANTS, combine, exposed_us, run, shape


def _cell(name: str, step: float, wait: float, note: str = "") -> dict:
    return {"variant": name, "step_ms": step, "exposed_comm_ms": wait, "compile_s": 1.0, "note": note}


def test_rows_take_the_slowest_rank_and_ratios_to_inductor() -> None:
    rank0 = [_cell(v, 100.0, 40.0) for v in VARIANTS]
    rank1 = [_cell(v, 100.0, 40.0) for v in VARIANTS]
    rank1[VARIANTS.index("domino_n2")] = _cell("domino_n2", 80.0, 10.0)
    rank0[VARIANTS.index("domino_n2")] = _cell("domino_n2", 70.0, 12.0)
    rows = {r["variant"]: r for r in combine([rank0, rank1])}
    assert set(rows) == set(VARIANTS) and all(set(COLUMNS) <= set(r) for r in rows.values())
    assert rows["inductor"]["step_vs_inductor"] == 1.0
    assert rows["domino_n2"]["step_ms"] == 80.0 and rows["domino_n2"]["step_vs_inductor"] == 0.8
    assert rows["domino_n2"]["exposed_comm_ms"] == 12.0 and rows["domino_n2"]["exposed_vs_inductor"] == 0.3


def test_a_failed_variant_keeps_its_error_in_the_row() -> None:
    cells = [_cell(v, 100.0, 40.0) for v in VARIANTS]
    i = VARIANTS.index("inductor_overlap_scheduler")
    cells[i] = {
        "variant": VARIANTS[i],
        "step_ms": None,
        "exposed_comm_ms": None,
        "compile_s": None,
        "note": "failed: No module named 'triton'",
    }
    row = combine([cells, cells])[i]
    assert row["note"] == "failed: No module named 'triton'" and row["step_vs_inductor"] is None


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
