"""How many chunks hide a Domino region's all-to-all: the cost model behind ``num_chunks="auto"``.

Per region, from the graph alone and the same on every rank (``moe_passes.fx.domino.work`` reads them
off a Domino region):

* **work per token**: the FLOPs of every GEMM in the region that multiplies rows by a weight from
  outside (projections, router, experts: ``linear``/``mm``/``addmm``/``matmul`` with a 2-D weight,
  grouped GEMMs with a 3-D one, ``bmm`` with per-row gathered weights), times the rows per token the
  row analysis gave the operand (``row(m)``, ``bag``/``recv`` copies: top-k). Attention's score
  GEMMs (``S x S`` per sequence) are left out: they depend on one rank's sequence length, and the
  decision must not (rank-invariant collectives); leaving them out only under-counts what can hide
  the all-to-all.
* **bytes per token**: what the dispatch and the combine move per token (row width x element size x
  copies per token), times ``(W - 1) / W`` (under uniform routing a rank keeps 1/W of its rows).

With a compute rate, a bandwidth and a per-all-to-all latency (``Rates``: measured by
``moe-passes bench --section calibrate`` and cached in ``calibration_path()``, else built-in
defaults per device, named in every report), at ``REFERENCE_TOKENS`` tokens per rank:
compute ``P``, communication ``C(N) = bytes / bandwidth + 3 N latency`` (count exchange, dispatch,
combine per chunk), and for ``N`` chunks the exposed communication of a pipeline whose first
chunk's exchange cannot hide: ``E(N) = C(N) / N + max(0, (N - 1) / N * (C(N) - P))``. The chosen
``N`` minimises ``P + E(N)`` over ``CANDIDATES`` (ties: the smaller N); ``E(1) = C(1)`` is reported
beside it, and a choice predicted no better than unchunked says so. Why a reference count and
not this rank's: ranks see different lengths, and a decision that differs between ranks makes them
issue different collectives; the prediction at this rank's own count is reported beside it.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: N the model chooses among. Never 1: a user who asked for Domino gets it; when the model predicts no
#: gain over unchunked (tiny models, high latency) the report says so (``exposed_unchunked_s``).
CANDIDATES = (2, 4, 8)
#: Tokens per rank the decision is made at (rank-invariant; a typical training micro-batch per rank).
REFERENCE_TOKENS = 8192


@dataclass(frozen=True)
class Rates:
    flops_per_s: float  # dense GEMM rate, one rank
    bytes_per_s: float  # all-to-all bandwidth: bytes a rank sends per second
    latency_s: float  # fixed cost of one all-to-all
    source: str  # where the numbers come from (reports quote it)


#: Built-in rates when nothing was calibrated: CPU gloo with one compute thread (this project's CI
#: machine class), and an H100/H200 node with NVLink all-to-all. Calibrate for real numbers.
DEFAULT_RATES = {
    "cpu": Rates(2.0e10, 1.0e9, 2.0e-4, "built-in CPU gloo defaults (moe-passes bench --section calibrate measures yours)"),
    "cuda": Rates(4.0e14, 1.5e11, 3.0e-5, "built-in H100 NVLink defaults (moe-passes bench --section calibrate measures yours)"),
}


def calibration_path() -> Path:
    """``$MOE_PASSES_CALIBRATION``, else ``$XDG_CACHE_HOME/moe_passes/calibration.json`` (``~/.cache``)."""
    env = os.environ.get("MOE_PASSES_CALIBRATION")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "moe_passes" / "calibration.json"


def load_rates(device: str) -> Rates:
    """The calibrated rates for ``device`` ("cpu" / "cuda"), else the built-in defaults."""
    path = calibration_path()
    try:
        data = json.loads(path.read_text())[device]
        return Rates(float(data["flops_per_s"]), float(data["bytes_per_s"]), float(data["latency_s"]),
                     f"calibrated {data.get('when', '')} ({path})")
    except FileNotFoundError:
        pass
    except (KeyError, ValueError, TypeError, json.JSONDecodeError) as e:
        log.warning("cost model: ignoring %s (%s: %s); using built-in rates", path, type(e).__name__, e)
    return DEFAULT_RATES.get(device, DEFAULT_RATES["cpu"])


def save_rates(device: str, rates: Rates, when: str) -> Path:
    """Merge ``rates`` for ``device`` into the calibration file; returns its path."""
    path = calibration_path()
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        data = {}
    data[device] = {**{k: v for k, v in asdict(rates).items() if k != "source"}, "when": when}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


@dataclass(frozen=True)
class RegionWork:
    flops_per_token: float
    bytes_per_token: float
    world_size: int

    def predict(self, tokens: float, n: int, rates: Rates) -> dict[str, float]:
        """Seconds of compute, communication and exposed communication for ``n`` chunks at ``tokens``."""
        compute = self.flops_per_token * tokens / rates.flops_per_s
        comm = self.bytes_per_token * tokens / rates.bytes_per_s + 3 * n * rates.latency_s
        exposed = comm if n == 1 else comm / n + max(0.0, (n - 1) / n * (comm - compute))
        return {"compute_s": compute, "comm_s": comm, "exposed_s": exposed, "step_s": compute + exposed}


def choose_chunks(work: RegionWork, rates: Rates, tokens_here: Any = None) -> tuple[int, dict[str, Any]]:
    """(N, prediction): the N of ``CANDIDATES`` with the lowest predicted step at ``REFERENCE_TOKENS``."""
    preds = {n: work.predict(REFERENCE_TOKENS, n, rates) for n in (1, *CANDIDATES)}
    best = min(CANDIDATES, key=lambda n: (round(preds[n]["step_s"], 12), n))
    out: dict[str, Any] = {"chunks": best, "reference_tokens": REFERENCE_TOKENS, "rates": rates.source,
                           "flops_per_token": work.flops_per_token, "bytes_per_token": work.bytes_per_token,
                           **{k: v for k, v in preds[best].items()},
                           "exposed_unchunked_s": preds[1]["exposed_s"]}
    if isinstance(tokens_here, int) and tokens_here > 0:
        here = work.predict(tokens_here, best, rates)
        out["here"] = {"tokens": tokens_here, **here}
    return best, out


def describe(choice: dict[str, Any]) -> str:
    """One line for reports: N, predicted exposed communication, the rates' source."""
    ms = 1e3
    text = (f"{choice['chunks']} chunks: predicted exposed all-to-all {choice['exposed_s'] * ms:.3g} ms of "
            f"{choice['comm_s'] * ms:.3g} ms (unchunked {choice['exposed_unchunked_s'] * ms:.3g} ms) behind "
            f"{choice['compute_s'] * ms:.3g} ms compute at {choice['reference_tokens']} tokens/rank; {choice['rates']}")
    if choice["step_s"] >= choice["compute_s"] + choice["exposed_unchunked_s"]:
        text += "; predicted no faster than unchunked at this size (the region is too small to hide its all-to-all)"
    return text
