"""``moe-passes`` as users run it: a subprocess per format, error exits, the bench renderer.

Only one run compiles with Inductor (``--stage backward``); the others stop at
the pre-grad graphs, which is all the per-pass diff needs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from moe_passes.bench import BenchOptions, BenchSection

ROOT = Path(__file__).parent.parent


def moe_passes_cli(*args: str, timeout: int = 400) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("moe-passes")
    cmd = [exe] if exe else [sys.executable, "-m", "moe_passes.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "160"}
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def test_console_script_is_installed() -> None:
    assert shutil.which("moe-passes"), "pip install -e . installs the moe-passes console script"


@pytest.fixture(scope="module")
def json_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("cli") / "diff.json"
    proc = moe_passes_cli(
        "diff", "moe_stack", "--pass", "domino_ep", "--pass", "async_offload", "--num-chunks", "2",
        "--format", "json", "--output", str(out),
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(out.read_text())


def test_json_has_one_section_per_pass_with_diff_summary_and_estimates(json_run: dict[str, Any]) -> None:
    assert json_run["target"] == "moe_stack" and json_run["stage"] == "pre_grad"
    assert json_run["passes"] == ["domino_ep", "async_offload"] and json_run["num_chunks"] == 2
    domino, offload = json_run["sections"]
    assert domino["pass_name"] == "domino_ep" and offload["pass_name"] == "async_offload"
    for section in (domino, offload):
        assert section["estimate_before"]["peak_live_bytes"] > 0
        assert section["estimate_after"]["unhinted_sizes"] > 0
    assert domino["diff"].startswith("--- ") and domino["summary"]["nodes_added"] > 0
    # The loss is the only output: nothing to offload, the graph is unchanged, and the reason is given.
    assert offload["diff"] == "" and offload["summary"]["changed"] is False and offload["summary"]["skipped"]
    # Domino with 2 chunks: every layer's count exchange, dispatch and combine happen per chunk.
    assert domino["summary"]["collectives"] == "6 -> 12" and domino["summary"]["waits"] == "6 -> 12"
    assert domino["summary"]["matched"] == ["L['self'].layers.0", "L['self'].layers.1"]
    assert domino["summary"]["chunks"] == "L['self'].layers.0: 2, L['self'].layers.1: 2"
    # Same tokens travel, plus one extra count exchange per layer (4 experts x int64).
    assert domino["estimate_after"]["bytes_communicated"] == domino["estimate_before"]["bytes_communicated"] + 2 * 32


def test_text_format_shows_coloured_diff_and_tables() -> None:
    proc = moe_passes_cli("diff", "moe_stack", "--pass", "layerwise_aux_loss")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "--- graph 0 / layerwise_aux_loss (before)" in out and "+++ graph 0 / layerwise_aux_loss (after)" in out
    assert re.search(r"^-\s+\w+: ", out, re.MULTILINE) and re.search(r"^\+\s+\w+: ", out, re.MULTILINE)
    assert "summary" in out and "static estimates" in out and "peak live before" in out


def test_html_format_writes_a_page(tmp_path: Path) -> None:
    out = tmp_path / "diff.html"
    proc = moe_passes_cli("diff", "moe_stack", "--pass", "layerwise_aux_loss", "--format", "html", "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    page = out.read_text()
    assert page.lstrip().lower().startswith("<!doctype html>") and "layerwise_aux_loss" in page and "summary" in page


def one_layer_target() -> Any:
    """A ``package.module:function`` target: the smallest EP MoE model (halves the compile time)."""
    from moe_passes.targets import moe_stack

    return moe_stack(num_layers=1)


def test_backward_stage_compiles_and_shows_the_schedule(tmp_path: Path) -> None:
    out = tmp_path / "bw.json"
    proc = moe_passes_cli(
        "diff", "tests.test_cli:one_layer_target", "--stage", "backward", "--pass", "domino_ep", "--num-chunks", "2",
        "--format", "json", "--output", str(out),
    )
    assert proc.returncode == 0, proc.stderr
    sections = json.loads(out.read_text())["sections"]
    titles = [s["title"] for s in sections]
    assert titles[0] == "graph 0 / backward: no passes vs pre-grad passes"
    assert "graph 0 / backward / schedule_overlap" in titles
    # Backward: the gradients of dispatch and combine (counts need none), now per chunk.
    assert sections[0]["summary"]["collectives"] == "2 -> 4"


@pytest.mark.slow
def test_output_code_stage(tmp_path: Path) -> None:
    out = tmp_path / "code.json"
    proc = moe_passes_cli("diff", "moe_stack", "--stage", "output_code", "--pass", "domino_ep", "--format", "json", "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    sections = json.loads(out.read_text())["sections"]
    assert [s["title"] for s in sections] == ["graph 0 / forward output code", "graph 0 / backward output code"]
    assert all("torchinductor" not in s["after"] for s in sections)


@pytest.mark.parametrize(
    "args, message",
    [
        (["diff", "moe_stack", "--pass", "nope"], "unknown pass(es) ['nope']; known passes:"),
        (["diff", "no_such_package.models:build"], "cannot import target module 'no_such_package.models'"),
        (["diff", "moe_passes.targets:no_such_function"], "has no callable 'no_such_function'"),
        (["diff", "bogus-preset"], "unknown preset 'bogus-preset'"),
        (["diff", "moe_stack", "--num-chunks", "0"], "--num-chunks must be a positive integer"),
        (["bench", "--section", "nope"], "unknown bench section"),
    ],
)
def test_clear_errors_exit_non_zero(args: list[str], message: str) -> None:
    proc = moe_passes_cli(*args)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def run(options: BenchOptions) -> BenchSection:
    """A bench section for the renderer test (the CLI imports it by module name)."""
    return BenchSection("fake speed", ["config", "step_ms", "ratio"], [{"config": "inductor", "step_ms": 12.5, "ratio": 1.0}], ["quick" if options.quick else "full"])


def test_bench_renders_sections_and_keeps_going_after_a_broken_one(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from moe_passes import bench
    from moe_passes.cli import main

    monkeypatch.setattr(bench, "SECTIONS", {"broken": "tests.no_such_bench_module", "fake": "tests.test_cli"})
    out = tmp_path / "bench.json"
    status = main(["bench", "--section", "broken", "fake", "--quick", "--json", str(out)])
    assert status == 1  # a section failed, so the command fails, but only after running the rest
    printed = capsys.readouterr().out
    assert "broken: unavailable" in printed and "No module named 'tests.no_such_bench_module'" in printed
    assert "fake speed" in printed and "12.5" in printed and "inductor" in printed
    data = json.loads(out.read_text())
    assert data["options"]["quick"] is True
    assert data["sections"]["broken"]["error"].startswith("ModuleNotFoundError")
    assert data["sections"]["fake"]["rows"] == [{"config": "inductor", "step_ms": 12.5, "ratio": 1.0}]
    assert data["sections"]["fake"]["notes"] == ["quick"]
