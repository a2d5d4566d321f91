"""Running ``moe-passes`` as users do: a subprocess, with the environment a test chooses."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def moe_passes_cli(*args: str, timeout: int = 400, columns: int | None = 160, env: dict[str, str] | None = None,
                   cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("moe-passes")
    cmd = [exe] if exe else [sys.executable, "-m", "moe_passes.cli"]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    full_env.pop("COLUMNS", None)
    if columns is not None:
        full_env["COLUMNS"] = str(columns)
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd or ROOT, env=full_env)
