"""``moe-passes bench``: side-by-side measurements, one section per concern.

Each section module exposes ``run(options: BenchOptions) -> BenchSection``;
the CLI renders the sections as tables and writes them to ``--json``. A
variant a section cannot measure keeps its row with the reason (``row_failure``);
a section whose every row failed counts as failed (``moe-passes bench`` exits 1).
Sections own their child processes (real ranks) and return ratios against
their own baseline measured in the same run.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

SECTIONS: dict[str, str] = {
    "speed": "moe_passes.bench.speed",
    "memory": "moe_passes.bench.memory",
    "offload": "moe_passes.bench.offload",
    "compile": "moe_passes.bench.compile",
    "checkpointing": "moe_passes.bench.checkpointing",
    "calibrate": "moe_passes.bench.calibrate",
}
#: Sections a plain ``moe-passes bench`` (no ``--section``) leaves out: calibrate writes the cost model's
#: rates to the user's cache file, which only an explicit ``--section calibrate`` should do.
OPT_IN: frozenset[str] = frozenset({"calibrate"})

#: One line per section for ``moe-passes bench --help`` (kept here, beside ``SECTIONS``: listing them
#: must not import the section modules, which import torch).
SECTION_HELP: dict[str, str] = {
    "speed": "step, exposed all-to-all, ideal bound, peak memory: Inductor vs Domino EP (real ranks)",
    "memory": "peak memory of a step: stacked vs layer-wise router aux loss",
    "offload": "router tensors' device bytes at the end of a step, async_offload off/on",
    "compile": "cold-cache compile time vs experts and layers, passes off/on",
    "checkpointing": "peak memory of Domino with and without per-layer activation checkpointing",
    "calibrate": "GEMM rate, all-to-all bandwidth and latency for num_chunks='auto' (saved; only when named)",
}


def row_failure(row: dict[str, Any]) -> str | None:
    """Why a section's row holds no measurement, or None: a section that cannot measure one variant
    keeps its row and says so in ``note`` ("failed: ...") or ``status`` ("error: ...", "timeout ...")."""
    note, status = str(row.get("note") or ""), str(row.get("status") or "")
    if note.startswith("failed"):
        return note
    if status.startswith(("error", "timeout")):
        return status
    return None


@dataclass
class BenchOptions:
    """What every section reads. ``trace_dir`` (speed section): write a Chrome trace per variant and rank and a
    timeline PNG per model there. ``variants`` (speed section): only these ``model/variant`` rows (plus each
    named model's ``inductor`` row, the baseline of its ratios); None: every row."""

    quick: bool = False
    world_size: int = 2
    steps: int = 7
    warmup: int = 2
    device: str = "cpu"
    trace_dir: str | None = None
    variants: tuple[str, ...] | None = None


@dataclass
class BenchSection:
    title: str
    columns: list[str]
    rows: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_section(name: str, options: BenchOptions) -> BenchSection:
    if name not in SECTIONS:
        raise ValueError(f"unknown bench section {name!r}; known: {sorted(SECTIONS)}")
    return importlib.import_module(SECTIONS[name]).run(options)


@contextlib.contextmanager
def quiet_profiler_stderr() -> Iterator[None]:
    """Hide the profiler's native start/stop lines (libkineto writes them to fd 2, which no setting silences).

    Anything else written to stderr meanwhile is replayed once the block ends, so
    no warning or error is lost.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            kept = [line for line in sink.read().decode(errors="replace").splitlines(keepends=True)
                    if not (line.startswith("USDT:") and "profiler_st" in line)]
            if kept:
                sys.stderr.write("".join(kept))
