"""The README demo script trains: 2 gloo ranks, one loss line per step, loss going down (eager backend)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

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
