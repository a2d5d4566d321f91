"""The README demo script trains: 2 gloo ranks, one loss line per step, loss going down (eager backend);
with the default (domino backend, regional compile) all three passes apply and the run ends with the
backend's summary, printed once, and no warning (slow: two ranks compile the model, minutes on 2 cores)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_train_tiny_prints_a_falling_loss_per_step() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_tiny.py"), "--backend", "eager", "--steps", "3"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [float(m) for m in re.findall(r"^step \d+/3  loss (\S+)", proc.stdout, flags=re.M)]
    assert len(losses) == 3, proc.stdout
    assert losses[-1] < losses[0], losses


def test_train_tiny_rejects_unknown_backend() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_tiny.py"), "--backend", "tvm"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert proc.returncode != 0 and "invalid choice: 'tvm'" in proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_train_tiny_default_applies_all_three_passes_and_prints_the_summary_once() -> None:
    """Default run (domino, regional compile, 2 steps): Domino chunks the decoder layer's MoE region, the
    aux-loss functions compiled with the same backend are rewritten layer-wise, the router tensors go to the
    host; one summary (rank 0), no "stays stacked and eager" warning. Loss equal to the eager run's."""
    run = [sys.executable, str(ROOT / "examples" / "train_tiny.py"), "--steps", "2"]
    proc = subprocess.run(run, capture_output=True, text=True, timeout=1700, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "stays stacked and eager" not in out and "compile_regions:" not in out, out[-3000:]
    assert proc.stdout.count("moe_passes summary:") == 1, proc.stdout
    summary = proc.stdout[proc.stdout.index("moe_passes summary:"):]
    for name, claim in (("domino_ep", r"[1-9]\d* MoE region\(s\) chunked"),
                        ("layerwise_aux_loss", r"[1-9]\d* layer\(s\) rewritten in [1-9]\d* loss group\(s\), [\d.]+ \w*B of stacked"),
                        ("async_offload", r"[1-9]\d* router tensor\(s\) moved to host")):
        line = next((ln for ln in summary.splitlines() if ln.strip().startswith(name)), "")
        assert re.search(r"applied in [1-9]\d* of", line) and re.search(claim, line), summary
    losses = [float(m) for m in re.findall(r"^step \d+/2  loss (\S+)", proc.stdout, flags=re.M)]
    eager = subprocess.run(run[:2] + ["--backend", "eager", "--steps", "2"], capture_output=True, text=True,
                           timeout=300, cwd=ROOT)
    ref = [float(m) for m in re.findall(r"^step \d+/2  loss (\S+)", eager.stdout, flags=re.M)]
    assert len(losses) == len(ref) == 2 and all(abs(a - b) < 2e-3 for a, b in zip(losses, ref)), (losses, ref)
