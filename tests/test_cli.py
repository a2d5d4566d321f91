"""``moe-passes diff`` as users run it: a subprocess per format, the bench renderer.

The runs that compile with Inductor (``--stage backward``, ``--stage output_code``)
are marked slow (each is a cold compile, 30 s here); the others stop at the
pre-grad graphs, which is all the per-pass diff needs.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from moe_passes.bench import BenchOptions, BenchSection
from tests.cli_helpers import moe_passes_cli


def test_console_script_is_installed() -> None:
    assert shutil.which("moe-passes"), "pip install -e . installs the moe-passes console script"


@pytest.fixture(scope="module")
def json_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("cli") / "diff.json"
    # `--pass a b` (nargs) and a second `--pass` both add passes.
    proc = moe_passes_cli("diff", "moe_stack", "--pass", "domino_ep", "--pass", "async_offload", "--num-chunks", "2",
                          "--format", "json", "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    return json.loads(out.read_text())


def _pair(text: str) -> tuple[int, int]:
    a, b = text.split(" -> ")
    return int(a), int(b)


def test_json_has_one_section_per_pass_with_diff_summary_and_estimates(json_run: dict[str, Any]) -> None:
    assert json_run["target"] == "moe_stack" and json_run["stage"] == "pre_grad" and json_run["diff"] == "semantic"
    assert json_run["passes"] == ["domino_ep", "async_offload"] and json_run["num_chunks"] == 2
    # Sections follow the pipeline order the passes declare, whatever order they were listed in.
    assert [s["pass_name"] for s in json_run["sections"]] == json_run["pipeline"]
    assert sorted(json_run["pipeline"]) == ["async_offload", "domino_ep"]
    by_name = {s["pass_name"]: s for s in json_run["sections"]}
    domino, offload = by_name["domino_ep"], by_name["async_offload"]
    assert domino["anchor"] == "graph-0-domino_ep"
    for section in (domino, offload):
        assert section["estimate_before"]["peak_live_bytes"] > 0
        # Counts come from the graph: they agree with the estimator's own walk of the same graphs.
        summary = section["summary"]
        assert _pair(summary["collectives"]) == (section["estimate_before"]["num_collectives"],
                                                 section["estimate_after"]["num_collectives"])
        assert _pair(summary["waits"]) == (section["estimate_before"]["num_waits"], section["estimate_after"]["num_waits"])
    # Domino chunks the layers it matched: more collectives, one chunk list per matched layer.
    assert domino["summary"]["changed"] is True and domino["diff"].startswith("--- ") and domino["summary"]["nodes_added"] > 0
    before, after = _pair(domino["summary"]["collectives"])
    assert before == 6 and after > before
    assert domino["summary"]["matched"] and all(f"{m}: 2" in domino["summary"]["chunks"] for m in domino["summary"]["matched"])
    # The loss is the only output: nothing to offload, the graph is unchanged, and the reason is given.
    assert offload["diff"] == "" and offload["summary"]["changed"] is False and offload["summary"]["skipped"]


def one_layer_target() -> Any:
    """A ``package.module:function`` target: the smallest EP MoE model (halves the compile time)."""
    from moe_passes.cli.targets import moe_stack

    return moe_stack(num_layers=1)


@pytest.mark.slow
def test_backward_stage_compiles_and_shows_the_schedule(tmp_path: Path) -> None:
    out = tmp_path / "bw.json"
    proc = moe_passes_cli(
        "diff", "tests.test_cli:one_layer_target", "--stage", "backward", "--pass", "domino_ep", "--num-chunks", "2",
        "--format", "json", "--output", str(out),
    )
    assert proc.returncode == 0, proc.stderr
    # Progress names the Inductor phases, for both compiles.
    for line in ("without passes: compiling (Inductor)", "Inductor lowering the forward graph", "Inductor lowering the backward graph",
                 "with domino_ep: compiling (Inductor): done in"):
        assert line in proc.stderr, proc.stderr
    sections = json.loads(out.read_text())["sections"]
    titles = [s["title"] for s in sections]
    assert titles[0] == "graph 0 / backward: no passes vs pre-grad passes"
    assert "graph 0 / backward / schedule_overlap" in titles
    # Node counts come from the post-grad graphs themselves (not "n/a"), and the chunks add collectives.
    first = sections[0]["summary"]
    assert first["nodes_added"] is not None and first["nodes_added"] > 0
    before, after = _pair(first["collectives"])
    assert before == 2 and after > before


@pytest.mark.slow
def test_output_code_stage(tmp_path: Path) -> None:
    out = tmp_path / "code.json"
    proc = moe_passes_cli("diff", "moe_stack", "--stage", "output_code", "--pass", "domino_ep", "--format", "json", "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    sections = json.loads(out.read_text())["sections"]
    assert [s["title"] for s in sections] == ["graph 0 / forward output code", "graph 0 / backward output code"]
    assert all("torchinductor" not in s["after"] for s in sections)
    forward = sections[0]["summary"]
    # Real collectives (calls), not the assert_size_stride messages that name them: 3 per MoE layer before Domino.
    assert _pair(forward["collectives"])[0] == 6 and forward["changed"] is True


def run(options: BenchOptions) -> BenchSection:
    """A bench section for the renderer test (the CLI imports it by module name)."""
    return BenchSection("fake speed", ["config", "step_ms", "ratio"], [{"config": "inductor", "step_ms": 12.5, "ratio": 1.0}],
                        ["quick" if options.quick else "full"])


def test_bench_renders_sections_and_keeps_going_after_a_broken_one(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from moe_passes import bench
    from moe_passes.cli import main

    monkeypatch.setattr(bench, "SECTIONS", {"broken": "tests.no_such_bench_module", "fake": "tests.test_cli"})
    out = tmp_path / "bench.json"
    status = main(["bench", "--section", "broken", "fake", "--quick", "--json", str(out), "--device", "cpu"])
    assert status == 1  # a section failed, so the command fails, but only after running the rest
    captured = capsys.readouterr()
    printed = captured.out
    assert "broken: unavailable" in printed and "No module named 'tests.no_such_bench_module'" in printed
    # Header names exactly as the section declares them, never cut.
    assert re.search(r"^config\s+step_ms\s+ratio$", printed, re.MULTILINE)
    assert re.search(r"^inductor\s+12\.5\s+1$", printed, re.MULTILINE)
    assert "section 2/2: fake: done in" in captured.err
    data = json.loads(out.read_text())
    assert data["options"]["quick"] is True
    assert data["sections"]["broken"]["error"].startswith("ModuleNotFoundError")
    assert data["sections"]["fake"]["rows"] == [{"config": "inductor", "step_ms": 12.5, "ratio": 1.0}]
    assert data["sections"]["fake"]["notes"] == ["quick"]


def run_failing(options: BenchOptions) -> BenchSection:
    """A section whose every variant failed, as the speed section reports it (``note``: "failed: ...")."""
    rows = [{"variant": v, "step_ms": None, "note": "failed: ValueError: num_experts=4 is not divisible by the "
             "expert-parallel size 3"} for v in ("eager", "domino_n2")]
    return BenchSection("fake speed", ["variant", "step_ms", "note"], rows)


def run_half_failing(options: BenchOptions) -> BenchSection:
    """A section with one measured row and one that timed out (the compile section's ``status``)."""
    return BenchSection("fake compile", ["case", "status"], [{"case": "a", "status": "ok"}, {"case": "b", "status": "timeout (> 60 s)"}])


@pytest.mark.parametrize("sections, status, message", [
    (["failing"], 1, "moe-passes: bench failing: every 2 row(s) failed (nothing measured); first: failed: ValueError"),
    (["half"], 0, "moe-passes: bench half: 1 of 2 row(s) failed; first: timeout (> 60 s)"),
    (["fake", "failing"], 1, "bench failing: every 2 row(s) failed"),
    (["fake"], 0, None),
])
def test_bench_whose_every_row_failed_exits_1(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               sections: list[str], status: int, message: str | None) -> None:
    """``bench --section speed --world-size 3`` failed every variant (4 experts over 3 ranks) and exited 0."""
    from moe_passes import bench
    from moe_passes.cli import main

    runs = {"fake": run, "failing": run_failing, "half": run_half_failing}
    monkeypatch.setattr(bench, "SECTIONS", {name: "tests.test_cli" for name in runs})
    monkeypatch.setattr(bench, "run_section", lambda name, options: runs[name](options))
    out = tmp_path / "bench.json"
    assert main(["bench", "--section", *sections, "--json", str(out), "--device", "cpu", "-q"]) == status
    err = capsys.readouterr().err
    if message is None:
        assert "row(s) failed" not in err, err
    else:
        assert message in err, err
    data = json.loads(out.read_text())["sections"]
    assert data.get("failing", {}).get("failed_rows", 2) == 2


@pytest.mark.slow
def test_speed_bench_on_3_ranks_exits_1() -> None:
    """The issue's command, as a user runs it: every variant fails (4 experts over 3 ranks), so the exit status is 1."""
    proc = moe_passes_cli("bench", "--section", "speed", "--world-size", "3", "--quick", "--steps", "1", "--warmup", "1",
                          "--device", "cpu", "-q", timeout=600)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "failed: ValueError: num_experts=4 is not divisible by the expert-parallel size 3" in proc.stdout
    assert "moe-passes: bench speed: every 13 row(s) failed (nothing measured)" in proc.stderr, proc.stderr


def test_meta_device_trace_gives_the_same_estimates_without_allocating(json_run: dict[str, Any], tmp_path: Path) -> None:
    """``--meta``: same graph, same static estimates as with real tensors (the real-shape presets rely on it)."""
    out = tmp_path / "meta.json"
    proc = moe_passes_cli("diff", "moe_stack", "--meta", "--pass", "async_offload", "--format", "json", "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "capturing graphs (Dynamo) on the meta device" in proc.stderr
    meta = json.loads(out.read_text())
    assert meta["meta"] is True and "meta device" in meta["description"]
    (meta_section,) = meta["sections"]
    real_section = json_run["sections"][0]  # the first pass in the pipeline received the original graph
    for key in ("peak_live_bytes", "bytes_communicated", "num_collectives"):  # node counts depend on the IR the pass declares
        assert meta_section["estimate_before"][key] == real_section["estimate_before"][key], key
    assert meta["real_shape"][0].startswith("bytes communicated per layer: ")
