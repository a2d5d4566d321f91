"""Calibrate section of ``moe-passes bench``: the rates the cost model of ``num_chunks="auto"`` uses.

Measures, on this machine and device, with the settings the speed section runs ranks with (CPU: one
compute thread per rank, gloo on 127.0.0.1; CUDA: NCCL):

* ``flops_per_s``: a dense GEMM (``[M, K] @ [K, N]``, fp32 on CPU, bf16 on CUDA), median of repeats;
* ``bytes_per_s`` and ``latency_s``: ``all_to_all_single`` between ``world_size`` real ranks, a tiny
  exchange (its median time is the latency) and a large one (bytes a rank sends over the time left
  after the latency);

and writes them to the calibration file (``moe_passes.cost.overlap.calibration_path()``:
``$MOE_PASSES_CALIBRATION`` or ``~/.cache/moe_passes/calibration.json``), which the Domino pass reads
at its next compile (the rates are part of the pass's cache key: a graph compiled with other rates is not
served from Inductor's cache). The section's rows show each rate
beside the built-in default it replaces.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
import traceback
from datetime import date, timedelta
from typing import Any

from moe_passes.bench import BenchOptions, BenchSection

COLUMNS = ["rate", "measured", "built_in_default", "ratio", "how"]


def _gemm_rate(device: str, quick: bool) -> tuple[float, str]:
    import torch

    n = 512 if quick else 2048
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)  # as each rank of the speed section computes
    for _ in range(3 if quick else 7):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    torch.set_num_threads(threads)
    return 2.0 * n**3 / statistics.median(times[1:]), f"[{n}, {n}] @ [{n}, {n}] {str(dtype).removeprefix('torch.')}"


def _rank_main(rank: int, world_size: int, port: int, quick: bool, device: str, outdir: str) -> None:
    import torch
    import torch.distributed as dist

    out = os.path.join(outdir, f"rank{rank}.txt")
    try:
        torch.set_num_threads(1)
        backend = "gloo" if device == "cpu" else "nccl"
        if device == "cuda":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=120))

        def timed(numel: int, repeats: int) -> float:
            x = torch.randn(numel * world_size, device=device)
            y = torch.empty_like(x)
            times = []
            for _ in range(repeats):
                dist.barrier()
                start = time.perf_counter()
                dist.all_to_all_single(y, x)
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            return statistics.median(times[1:])

        small = timed(8, 10 if quick else 30)
        big_numel = (1 << 16) if quick else (1 << 21)  # per destination: 256 KiB / 8 MiB of fp32
        big = timed(big_numel, 4 if quick else 8)
        sent = 4.0 * big_numel * (world_size - 1)
        with open(out, "w") as f:
            f.write(f"{small} {sent / max(big - small, 1e-9)} {sent}\n")
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - the parent reports it as the row's failure
        with open(out, "w") as f:
            f.write("error " + traceback.format_exc(limit=-4).replace("\n", " | "))


def _all_to_all_rates(options: BenchOptions) -> tuple[float, float, str]:
    import torch.multiprocessing as mp

    from moe_passes.bench.speed import _free_port

    with tempfile.TemporaryDirectory() as outdir:
        ctx = mp.get_context("spawn")
        port = _free_port()
        procs = [ctx.Process(target=_rank_main, args=(r, options.world_size, port, options.quick, options.device, outdir))
                 for r in range(options.world_size)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=300)
            if p.is_alive():
                p.kill()
                p.join()
        text = open(os.path.join(outdir, "rank0.txt")).read() if os.path.exists(os.path.join(outdir, "rank0.txt")) else "error: no result"
    if text.startswith("error"):
        raise RuntimeError(text)
    latency, bandwidth, sent = (float(v) for v in text.split())
    return latency, bandwidth, f"all_to_all_single on {options.world_size} ranks: 32 B and {sent / 2**20:.1f} MiB sent per rank"


def run(options: BenchOptions) -> BenchSection:
    from moe_passes.cost.overlap import DEFAULT_RATES, Rates, save_rates

    device = options.device
    default = DEFAULT_RATES.get(device, DEFAULT_RATES["cpu"])
    flops, how_gemm = _gemm_rate(device, options.quick)
    rows: list[dict[str, Any]] = [{"rate": "flops_per_s", "measured": flops, "built_in_default": default.flops_per_s,
                                   "ratio": flops / default.flops_per_s, "how": how_gemm}]
    notes: list[str] = []
    try:
        latency, bandwidth, how_a2a = _all_to_all_rates(options)
    except Exception as e:  # noqa: BLE001 - a row that cannot measure says why
        for rate in ("bytes_per_s", "latency_s"):
            rows.append({"rate": rate, "measured": None, "built_in_default": getattr(default, rate), "ratio": None,
                         "how": f"failed: {str(e)[:300]}"})
        return BenchSection("calibrate: the cost model's rates (not saved: the all-to-all could not be measured)",
                            COLUMNS, rows, notes)
    rows.append({"rate": "bytes_per_s", "measured": bandwidth, "built_in_default": default.bytes_per_s,
                 "ratio": bandwidth / default.bytes_per_s, "how": how_a2a})
    rows.append({"rate": "latency_s", "measured": latency, "built_in_default": default.latency_s,
                 "ratio": latency / default.latency_s, "how": how_a2a})
    path = save_rates(device, Rates(flops, bandwidth, latency, "measured"), when=date.today().isoformat())
    notes.append(f"saved to {path}: num_chunks='auto' reads it at the next compile")
    if options.quick:
        notes.append("--quick: small sizes, few repeats (a smoke run; calibrate without --quick for real rates)")
    return BenchSection(f"calibrate: the cost model's rates on {device}", COLUMNS, rows, notes)
