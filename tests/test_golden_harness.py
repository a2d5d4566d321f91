"""The golden harness itself: a changed output fails with a readable diff; --update-goldens rewrites.

Also: the normalised graph text is stable (no addresses, no shifting counters),
across captures and across processes.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_passes.cli.targets import moe_stack
from moe_passes.harness.capture import capture_graphs
from moe_passes.ir.graph_text import graph_text, normalize_output_code, normalize_text
from moe_passes.pipeline.manager import PassManager
from tests import backend_helpers as h
from tests import golden


@pytest.fixture()
def golden_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(golden, "GOLDEN_DIR", tmp_path / "golden")
    return tmp_path / "golden"


def test_matching_golden_passes(golden_dir: Path) -> None:
    golden_dir.mkdir()
    (golden_dir / "g.txt").write_text("a\nb\n")
    golden.check_golden("g.txt", "a\nb\n", update=False)


def test_differing_golden_fails_with_a_unified_diff(golden_dir: Path) -> None:
    golden_dir.mkdir()
    (golden_dir / "g.txt").write_text("line one\nwait_tensor(x)\nmatmul\n")
    with pytest.raises(AssertionError) as err:
        golden.check_golden("g.txt", "line one\nmatmul\nwait_tensor(x)\n", update=False)
    message = str(err.value)
    assert "output differs from golden g.txt (pytest --update-goldens rewrites it)" in message
    assert "--- golden/g.txt" in message and "+++ actual" in message
    assert "\n-matmul\n" in message and "\n+matmul\n" in message and "\n wait_tensor(x)\n" in message


def test_update_rewrites_the_golden(golden_dir: Path) -> None:
    golden.check_golden("sub/new.txt", "first\n", update=True)
    assert (golden_dir / "sub" / "new.txt").read_text() == "first\n"
    golden.check_golden("sub/new.txt", "second\n", update=True)
    golden.check_golden("sub/new.txt", "second\n", update=False)
    with pytest.raises(AssertionError):
        golden.check_golden("sub/new.txt", "first\n", update=False)


def test_missing_golden_says_how_to_create_it(golden_dir: Path) -> None:
    with pytest.raises(AssertionError, match="does not exist; run pytest --update-goldens"):
        golden.check_golden("absent.txt", "x\n", update=False)


def test_normalisation_removes_what_shifts_between_runs() -> None:
    raw = (
        'x: "Sym(u17)" = a.item()  \r\n'
        "y = torch.split(t, [u17, u22]) # at 0x7f3a9c0d1e80\r\n"
        "    # File: /home/someone/model.py:123 in forward, code: y = x\r\n"
        'z: "f32[s7, 16]" = w.view(s7, 16)\r\n'
        "fn = <eval_with_key>.42 torch_dynamo_resume_in_forward_at_88\n"
    )
    assert normalize_text(raw) == (
        'x: "Sym(u0)" = a.item()\n'
        "y = torch.split(t, [u0, u1]) # at 0xADDR\n"
        'z: "f32[s0, 16]" = w.view(s0, 16)\n'
        "fn = <eval_with_key>.N torch_dynamo_resume_in_forward_at_N\n"
    )


def test_output_code_normalisation_removes_cache_paths_and_hashes() -> None:
    code = "kernel = async_compile.cpp('/tmp/torchinductor_bob/ab/cabcdefghijklmnopqrstuvwxyz234567abcdefghijklmnopqrstu.py')\n"
    assert normalize_output_code(code) == "kernel = async_compile.cpp('<inductor-cache>')\n"


def test_graph_text_is_stable_across_captures() -> None:
    first = moe_stack(seed=0, num_layers=1)
    second = moe_stack(seed=1, num_layers=1)  # other weights, same structure
    text_a = graph_text(capture_graphs(first.fn, *first.example_inputs)[0].gm)
    text_b = graph_text(capture_graphs(second.fn, *second.example_inputs)[0].gm)
    assert text_a == text_b
    assert "0x" not in text_a and "File:" not in text_a


_SUBPROCESS = """
from moe_passes.harness.capture import capture_graphs
from moe_passes.ir.graph_text import graph_text
from moe_passes.cli.targets import moe_stack
import sys
t = moe_stack(seed=3, num_layers=1)
sys.stdout.write(graph_text(capture_graphs(t.fn, *t.example_inputs)[0].gm))
"""


def test_graph_text_is_stable_across_processes() -> None:
    target = moe_stack(seed=3, num_layers=1)
    here = graph_text(capture_graphs(target.fn, *target.example_inputs)[0].gm)
    there = subprocess.run(
        [sys.executable, "-c", _SUBPROCESS], capture_output=True, text=True, timeout=300, check=True,
        cwd=Path(__file__).parent.parent,
    ).stdout
    assert there == here


def small_fn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (torch.tanh(x @ w) * 2).sum()


def test_pass_output_golden(monkeypatch: pytest.MonkeyPatch, update_goldens: bool) -> None:
    """End to end: a pass's output graph checked against tests/golden/backend_scale_by_one.txt."""
    h.register(monkeypatch, h.ScaleByOnePass)
    (captured,) = capture_graphs(small_fn, torch.randn(4, 3), torch.randn(3, 5))
    PassManager([h.ScaleByOnePass()]).run(captured.gm, captured.example_inputs)
    golden.check_golden("backend_scale_by_one.txt", graph_text(captured.gm), update_goldens)
