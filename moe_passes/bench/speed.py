"""Speed section of ``moe-passes bench``: is expert-parallel all-to-all hidden?

One run spawns ``options.world_size`` real ranks (gloo on CPU with one
compute thread each, NCCL on CUDA) and measures, side by side on the same
MoE stack: eager, Inductor default, Inductor with
``reorder_for_compute_comm_overlap``, Inductor with its own overlap scheduler
(``aten_distributed_optimizations.enable_overlap_scheduling``; the row
carries the error where it does not run) and the Domino backend with 2 and
4 chunks, plus 4 chunks with our overlap scheduler off (the ablation that
separates what chunking alone does from what the overlap does).  Per row: median step time (forward + backward + optimizer), the
exposed communication (time the main thread spends inside ``wait_tensor``,
from the profiler), compile time, and ratios to Inductor default.

The model is an attention-free decoder of ``SparseMoeBlock`` layers (the
reference MoE block, unmodified), shaped so that all-to-all is a real share
of the step: wide hidden size, many tokens, narrow experts.
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
import statistics
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

from moe_passes.bench import BenchOptions, BenchSection, quiet_profiler_stderr
from moe_passes.errors import error_summary

progress = logging.getLogger("moe_passes.progress")  # printed as progress lines by the CLI

COLUMNS = ["variant", "step_ms", "exposed_comm_ms", "compile_s", "step_vs_inductor", "exposed_vs_inductor", "note"]
VARIANTS = ["eager", "inductor", "inductor_reorder_comm", "inductor_overlap_scheduler", "domino_n2", "domino_n4",
            "domino_n4_unscheduled"]


def shape(options: BenchOptions) -> dict[str, int]:
    """Model/batch sizes: full size by default, tiny with ``quick`` (for tests and smoke runs)."""
    if options.quick:
        return {"layers": 2, "hidden": 64, "intermediate": 32, "experts": 4, "top_k": 2, "tokens": 64}
    return {"layers": 2, "hidden": 1024, "intermediate": 128, "experts": 8, "top_k": 2, "tokens": 4096}


def _build_model(dims: dict[str, int], group: Any, device: str) -> Any:
    import torch

    from moe_passes.models.stacks import speed_stack

    torch.manual_seed(0)
    return speed_stack(dims["layers"], dims["hidden"], dims["intermediate"], dims["experts"], dims["top_k"], group).to(device)


def _variant(name: str) -> tuple[Callable[[Any], Any], dict[str, Any]]:
    """(how to wrap the model, Inductor config active while it compiles)."""
    import torch

    def inductor(model: Any) -> Any:
        return torch.compile(model, fullgraph=True)

    if name == "eager":
        return (lambda m: m), {}
    if name == "inductor":
        return inductor, {}
    if name == "inductor_reorder_comm":
        return inductor, {"reorder_for_compute_comm_overlap": True}
    if name == "inductor_overlap_scheduler":
        return inductor, {"aten_distributed_optimizations.enable_overlap_scheduling": True}
    if name.startswith("domino_n"):
        from moe_passes.inductor.schedule import INDUCTOR_CONFIG

        chunks_text, _, suffix = name[len("domino_n") :].partition("_")
        scheduled = suffix != "unscheduled"

        def domino(model: Any) -> Any:
            from moe_passes import make_backend

            backend = make_backend(passes=("domino_ep",), num_chunks=int(chunks_text), schedule_overlap=scheduled)
            return torch.compile(model, backend=backend, fullgraph=True)

        return domino, dict(INDUCTOR_CONFIG) if scheduled else {}
    raise ValueError(f"unknown speed variant {name!r}")


def _wait_ms(prof: Any) -> float:
    """Time the stepping thread spent inside wait_tensor (exposed communication), in ms."""
    events = prof.events()
    steps = [e for e in events if e.name == "bench_step"]
    threads = {e.thread for e in steps}
    total_us = sum(e.time_range.elapsed_us() for e in events if "wait_tensor" in e.name and e.thread in threads)
    return total_us / 1000.0 / max(1, len(steps))


def _union(intervals: list[tuple[float, float]]) -> list[list[float]]:
    """Disjoint, sorted intervals covering the same time as ``intervals``."""
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged


def exposed_us(comm: list[tuple[float, float]], compute: list[tuple[float, float]]) -> float:
    """Time covered by communication intervals and by no compute interval (same clock, any units)."""
    busy = _union(compute)
    total = 0.0
    for start, end in _union(comm):
        covered = sum(max(0.0, min(end, ce) - max(start, cs)) for cs, ce in busy)
        total += (end - start) - covered
    return total


def _gpu_exposed_ms(prof: Any) -> float:
    """On CUDA: NCCL kernel time not overlapped by any compute kernel on the GPU timeline, in ms."""
    comm, compute = [], []
    for e in prof.events():
        if e.device_type.name != "CUDA":
            continue
        interval = (e.time_range.start, e.time_range.end)
        (comm if "nccl" in e.name.lower() else compute).append(interval)
    return exposed_us(comm, compute) / 1000.0


def _measure(rank: int, options: BenchOptions, name: str, dims: dict[str, int], group: Any) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    device = options.device
    torch._dynamo.reset()
    wrap, inductor_config = _variant(name)
    model = _build_model(dims, group, device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    step_fn = wrap(model)
    g = torch.Generator().manual_seed(rank)
    inputs = [torch.randn(1, dims["tokens"], dims["hidden"], generator=g).to(device) for _ in range(2)]

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def step(i: int) -> None:
        with torch.profiler.record_function("bench_step"):
            opt.zero_grad(set_to_none=True)
            step_fn(inputs[i % 2]).backward()
            opt.step()
        sync()

    dist.barrier()
    t0 = time.perf_counter()
    with torch._inductor.config.patch(inductor_config), torch._dynamo.config.patch(capture_scalar_outputs=True):
        step(0)
        first = time.perf_counter() - t0
        for i in range(1, options.warmup):
            step(i)
    times = []
    for i in range(options.steps):
        dist.barrier()
        t = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - t)
    median = statistics.median(times)
    on_gpu = device.startswith("cuda")
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if on_gpu else [])
    waits = []
    for i in range(min(3, options.steps)):
        dist.barrier()
        with quiet_profiler_stderr(), torch.profiler.profile(activities=activities) as prof:
            step(i)
        waits.append(_gpu_exposed_ms(prof) if on_gpu else _wait_ms(prof))
    return {
        "variant": name,
        "step_ms": median * 1000.0,
        "exposed_comm_ms": statistics.median(waits),
        "compile_s": max(0.0, first - median) if name != "eager" else 0.0,
        "note": "",
    }


def _rank_main(rank: int, world_size: int, port: int, options: BenchOptions, outdir: str) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    backend = "nccl" if options.device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(rank)
        options.device = f"cuda:{rank}"
    rows = []
    try:
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=600))
        dims = shape(options)
        for i, name in enumerate(VARIANTS):
            with open(Path(outdir) / f"rank{rank}.progress", "a") as f:  # the parent relays these lines
                f.write(f"rank {rank + 1}/{world_size}: variant {i + 1}/{len(VARIANTS)} {name}\n")
            try:
                rows.append(_measure(rank, options, name, dims, dist.group.WORLD))
            except Exception as e:  # a variant that cannot run on this machine says so in its row
                msg = error_summary(e)
                rows.append({"variant": name, "step_ms": None, "exposed_comm_ms": None, "compile_s": None, "note": f"failed: {msg[:300]}"})
                dist.barrier()
        result: Any = ("ok", rows)
        dist.destroy_process_group()
    except BaseException:
        result = ("error", traceback.format_exc())
    (Path(outdir) / f"rank{rank}.pkl").write_bytes(pickle.dumps(result))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join_relaying_progress(procs: list[Any], outdir: Path, timeout_s: float) -> None:
    """Join the rank processes, relaying each rank's progress lines to the progress logger meanwhile."""
    deadline = time.monotonic() + timeout_s
    seen: dict[Path, int] = {}
    while True:
        for path in sorted(outdir.glob("rank*.progress")):
            lines = path.read_text().splitlines()
            for line in lines[seen.get(path, 0):]:
                progress.info("speed: %s", line)
            seen[path] = len(lines)
        alive = [p for p in procs if p.is_alive()]
        if not alive or time.monotonic() > deadline:
            return
        alive[0].join(2.0)


def _spawn(options: BenchOptions) -> list[list[dict[str, Any]]]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as outdir:
        ctx = mp.get_context("spawn")
        port = _free_port()
        procs = [ctx.Process(target=_rank_main, args=(r, options.world_size, port, options, outdir)) for r in range(options.world_size)]
        for p in procs:
            p.start()
        _join_relaying_progress(procs, Path(outdir), 3600.0)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        results = []
        for r in range(options.world_size):
            path = Path(outdir) / f"rank{r}.pkl"
            if not path.exists():
                raise RuntimeError(f"speed bench: rank {r} produced no result (exit code {procs[r].exitcode})")
            status, value = pickle.loads(path.read_bytes())
            if status != "ok":
                raise RuntimeError(f"speed bench: rank {r} failed:\n{value}")
            results.append(value)
        return results


def combine(per_rank: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per variant: the slowest rank's step and exposed time (ranks are barrier-aligned), ratios to Inductor."""
    rows = []
    for i, name in enumerate(VARIANTS):
        cells = [ranks[i] for ranks in per_rank]
        failed = [c["note"] for c in cells if c["note"]]
        if failed:
            rows.append({"variant": name, "step_ms": None, "exposed_comm_ms": None, "compile_s": None, "note": failed[0]})
            continue
        rows.append(
            {
                "variant": name,
                "step_ms": max(c["step_ms"] for c in cells),
                "exposed_comm_ms": max(c["exposed_comm_ms"] for c in cells),
                "compile_s": max(c["compile_s"] for c in cells),
                "note": "",
            }
        )
    base = next(r for r in rows if r["variant"] == "inductor")
    for r in rows:
        for col, ref in (("step_vs_inductor", "step_ms"), ("exposed_vs_inductor", "exposed_comm_ms")):
            ok = r[ref] is not None and base[ref] not in (None, 0)
            r[col] = round(r[ref] / base[ref], 3) if ok else None
        for col in ("step_ms", "exposed_comm_ms", "compile_s"):
            if r[col] is not None:
                r[col] = round(r[col], 2)
    return rows


def run(options: BenchOptions) -> BenchSection:
    """Measure every variant on real ranks; one table row per variant."""
    if options.world_size < 2:
        raise ValueError(f"speed bench needs at least 2 ranks for expert parallelism, got world_size={options.world_size}")
    on_gpu = options.device.startswith("cuda")
    if on_gpu:
        import torch

        if torch.cuda.device_count() < options.world_size:
            raise ValueError(f"speed bench on CUDA needs one GPU per rank: world_size={options.world_size}, "
                             f"{torch.cuda.device_count()} GPU(s) visible")
    if options.steps < 1 or options.warmup < 1:
        raise ValueError(f"speed bench needs steps >= 1 and warmup >= 1, got steps={options.steps} warmup={options.warmup}")
    dims = shape(options)
    rows = combine(_spawn(options))
    notes = [
        f"model: {dims['layers']} x (LayerNorm + SparseMoeBlock), hidden {dims['hidden']}, expert intermediate "
        f"{dims['intermediate']}, {dims['experts']} experts top-{dims['top_k']}, {dims['tokens']} tokens per rank; "
        f"{options.world_size} ranks, device {options.device}, 1 compute thread per rank",
        f"step = forward + backward + SGD step, median of {options.steps} after {options.warmup} warm-up; "
        + ("exposed comm = NCCL kernel time not overlapped by compute kernels (CUDA profiler, median of 3 steps); "
         if on_gpu else
         "exposed comm = time in wait_tensor on the stepping thread (profiler, median of 3 steps); ")
        + "compile = first step minus the median step",
        "target: exposed_vs_inductor <= 0.4 and step_vs_inductor <= 0.85 for the domino rows",
    ]
    return BenchSection(title="speed: all-to-all overlap (Domino EP)", columns=COLUMNS, rows=rows, notes=notes)
