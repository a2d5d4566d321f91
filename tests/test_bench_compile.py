"""``moe-passes bench --section compile``: every case gets a row (timeouts included), targets summarised from real rows."""

from __future__ import annotations

import pytest

from moe_passes.bench import SECTIONS
from moe_passes.bench import compile as compile_bench


def test_section_is_registered() -> None:
    assert SECTIONS["compile"] == "moe_passes.bench.compile"


def test_full_grid_covers_both_axes_both_modes_and_passes_off_and_on() -> None:
    cases = compile_bench.cases(quick=False, device="cpu")
    shapes = {(c["layers"], c["experts"]) for c in cases}
    assert shapes == {(2, 8), (2, 64), (2, 512), (8, 8), (32, 8)}
    assert len(cases) == len(shapes) * 4
    assert {(c["mode"], c["passes"]) for c in cases} == {(m, p) for m in ("whole", "regional") for p in ("off", "on")}


def test_quick_grid_keeps_a_passes_off_baseline() -> None:
    cases = compile_bench.cases(quick=True, device="cpu")
    assert any(c["passes"] == "off" for c in cases) and any(c["experts"] == 512 for c in cases)
    assert {c["mode"] for c in cases} == {"whole", "regional"}


def test_a_case_over_its_limit_keeps_its_row() -> None:
    case = {"layers": 2, "experts": 8, "mode": "whole", "passes": "on", "device": "cpu"}
    row = compile_bench.run_in_subprocess(case, timeout_s=1.0)
    assert row["status"] == "timeout (> 1 s)" and row["compile_s"] is None
    assert {k: row[k] for k in ("layers", "experts", "mode", "passes")} == {k: case[k] for k in ("layers", "experts", "mode", "passes")}


def test_a_failing_case_reports_its_error() -> None:
    case = {"layers": 2, "experts": 8, "mode": "sideways", "passes": "on", "device": "no-such-device"}
    row = compile_bench.run_in_subprocess(case, timeout_s=120.0)
    assert row["status"].startswith("error:"), row


def test_summary_ratios_come_from_finished_rows_only() -> None:
    def row(layers: int, experts: int, mode: str, cpu: float | None, share: float = 0.01) -> dict:
        status = "ok" if cpu is not None else "timeout (> 1 s)"
        return {"layers": layers, "experts": experts, "mode": mode, "passes": "on", "status": status,
                "compile_cpu_s": cpu, "pass_share": share}

    rows = [row(2, 8, "whole", 10.0), row(2, 512, "whole", 12.0), row(8, 8, "whole", 40.0),
            row(2, 8, "regional", 8.0), row(8, 8, "regional", 8.8, share=0.05), row(32, 8, "regional", None)]
    lines = compile_bench.summary(rows)
    assert "whole/passes on: experts 8 -> 512: compile CPU x1.20" in lines
    assert "whole/passes on: layers 2 -> 8: compile CPU x4.00" in lines
    assert "regional/passes on: layers 2 -> 8: compile CPU x1.10" in lines
    assert "pass share of compile time (passes on): max 5.0%" in lines


@pytest.mark.slow
def test_one_real_case_compiles_once_and_matches_eager() -> None:
    """A real cold compile (regional, passes on) in this process: one graph for both layers, the passes timed."""
    result = compile_bench.run_case({"layers": 2, "experts": 8, "mode": "regional", "passes": "on", "device": "cpu"})
    assert result["graphs"] == 1 and result["loss_matches_eager"], result
    assert result["compile_s"] > 0 and 0 < result["pass_share"] < 1, result
