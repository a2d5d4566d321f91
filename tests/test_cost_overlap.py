"""The cost model behind ``num_chunks="auto"``: its formula, its choice, calibrated rates, rank-invariance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moe_passes.cost.overlap import (
    CANDIDATES,
    DEFAULT_RATES,
    REFERENCE_TOKENS,
    Rates,
    RegionWork,
    choose_chunks,
    load_rates,
    save_rates,
)

RATES = Rates(flops_per_s=1e12, bytes_per_s=1e10, latency_s=0.0, source="test")


def test_exposed_communication_follows_the_pipeline_formula() -> None:
    work = RegionWork(flops_per_token=1e6, bytes_per_token=1e4, world_size=2)
    p = work.predict(1000, 4, RATES)
    compute, comm = 1e9 / 1e12, 1e7 / 1e10
    assert p["compute_s"] == pytest.approx(compute) and p["comm_s"] == pytest.approx(comm)
    # comm == compute: only the first chunk's exchange shows
    assert p["exposed_s"] == pytest.approx(comm / 4)
    assert work.predict(1000, 1, RATES)["exposed_s"] == pytest.approx(comm)


def test_more_chunks_while_they_pay_off_and_the_fewest_when_latency_dominates() -> None:
    compute_bound = RegionWork(flops_per_token=1e6, bytes_per_token=1e3, world_size=2)
    assert choose_chunks(compute_bound, RATES)[0] == max(CANDIDATES)
    slow_launch = Rates(1e12, 1e10, latency_s=1.0, source="test")
    n, pred = choose_chunks(compute_bound, slow_launch)
    assert n == min(CANDIDATES) == 2  # never 1: the report says chunking does not pay off instead
    from moe_passes.cost.overlap import describe

    assert "predicted no faster than unchunked" in describe(pred)


def test_the_choice_does_not_depend_on_this_ranks_token_count() -> None:
    """Ranks see different lengths; the decision is made at REFERENCE_TOKENS, the rank's own count only reported."""
    work = RegionWork(flops_per_token=2e5, bytes_per_token=5e3, world_size=4)
    choices = {choose_chunks(work, DEFAULT_RATES["cpu"], tokens)[0] for tokens in (1, 37, 4096, 10**6)}
    assert len(choices) == 1
    n, pred = choose_chunks(work, DEFAULT_RATES["cpu"], 37)
    assert pred["reference_tokens"] == REFERENCE_TOKENS and pred["here"]["tokens"] == 37


def test_calibrated_rates_are_read_back_and_bad_files_fall_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "cal.json"
    monkeypatch.setenv("MOE_PASSES_CALIBRATION", str(path))
    assert load_rates("cpu") == DEFAULT_RATES["cpu"]  # nothing calibrated yet
    assert save_rates("cpu", Rates(3e10, 2e9, 1e-4, "measured"), when="2026-12-03") == path
    got = load_rates("cpu")
    assert (got.flops_per_s, got.bytes_per_s, got.latency_s) == (3e10, 2e9, 1e-4) and "calibrated 2026-12-03" in got.source
    assert load_rates("cuda") == DEFAULT_RATES["cuda"]  # only the calibrated device changes
    path.write_text(json.dumps({"cpu": {"flops_per_s": "fast"}}))
    assert load_rates("cpu") == DEFAULT_RATES["cpu"]


def test_calibrated_rates_are_part_of_the_domino_cache_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from moe_passes.config import BackendConfig
    from moe_passes.fx.domino import DominoEPPass

    monkeypatch.setenv("MOE_PASSES_CALIBRATION", str(tmp_path / "cal.json"))
    auto, fixed = DominoEPPass(BackendConfig(num_chunks="auto")), DominoEPPass(BackendConfig(num_chunks=2))
    before = (auto.uuid(), fixed.uuid())
    save_rates("cpu", Rates(3e10, 2e9, 1e-4, "measured"), when="2026-12-03")
    assert auto.uuid() != before[0], "new rates may choose another N: the cached graph must not be reused"
    assert fixed.uuid() == before[1], "a fixed num_chunks does not read the rates"


def test_the_calibrate_section_measures_and_saves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two real gloo ranks exchange; the rows are measurements (positive, finite) and the file holds them."""
    from moe_passes.bench import BenchOptions, run_section

    monkeypatch.setenv("MOE_PASSES_CALIBRATION", str(tmp_path / "cal.json"))
    section = run_section("calibrate", BenchOptions(quick=True))
    rows = {r["rate"]: r for r in section.rows}
    assert set(rows) == {"flops_per_s", "bytes_per_s", "latency_s"}
    assert all(isinstance(r["measured"], float) and 0 < r["measured"] < float("inf") for r in rows.values()), rows
    got = load_rates("cpu")
    names = ("flops_per_s", "bytes_per_s", "latency_s")
    assert (got.flops_per_s, got.bytes_per_s, got.latency_s) == tuple(rows[k]["measured"] for k in names)
