"""Speed section of ``moe-passes bench``: is expert-parallel all-to-all hidden, and how close to the ideal?

One run spawns ``options.world_size`` real ranks (gloo on CPU with one
compute thread each, NCCL on CUDA) and measures, side by side, two models:

- ``moe_only``: an attention-free decoder of ``SparseMoeBlock`` layers (the
  reference MoE block, unmodified; LayerNorm -> block -> residual), shaped so
  that all-to-all is a real share of the step: wide hidden size, many tokens,
  narrow experts. Variants: eager, Inductor default, Inductor with
  ``reorder_for_compute_comm_overlap``, Inductor with its own overlap scheduler
  (``aten_distributed_optimizations.enable_overlap_scheduling``; the row
  carries the error where it does not run) and the Domino backend with 2 and
  4 chunks, plus 4 chunks with our overlap scheduler off (the ablation that
  separates what chunking alone does from what the overlap does).
- ``decoder``: the reference model's own decoder layers (``text.DecoderLayer``:
  GQA attention with M-RoPE + MoE; ``moe_passes.models.stacks.decoder_stack``,
  the ``bench`` preset with the sizes of ``decoder_shape``) on ``[B, S, H]``
  inputs of B >= 4 sequences. Variants: ``inductor``, ``domino_moe_n{2,4}``
  (``domino_mode="moe"``: token chunks inside the MoE region),
  ``domino_layer_n{2,4}`` (``domino_mode="layer"``: micro-batches of whole
  layers along B) and ``domino_layer_n2_dw`` (layer mode +
  ``defer_weight_grads=True``). A backend option this torch's ``BackendConfig``
  does not have yet makes its row fail with the error in ``note``; today's pass
  IS the MoE mode, so the ``domino_moe`` rows run without ``domino_mode`` until
  the option exists and say so.

Per row (the slowest rank for each number; ranks are barrier-aligned):

- ``step_ms``: median step (forward + backward + SGD step), after ``--warmup``
  steps (the first compiles; Inductor compiles one rank at a time, the other
  ranks load the first one's FX-graph cache entry).
- ``exposed_comm_ms``: time the stepping thread spends inside ``wait_tensor``
  (profiler, median of 3 steps); on CUDA the NCCL kernel time not overlapped by
  compute kernels.
- ``compute_ms``: the same compiled step with every all-to-all replaced by a
  local copy of the same bytes: the process group the graph names is swapped,
  for the measured steps only, for ``LocalCopyGroup``, whose all-to-all copies
  the input into the output on this rank (each rank "receives" what it sends, so
  the split sizes and bytes stay the rank's own and the graph, its code and its
  chunking are unchanged: no recompile). The ranks still run at the same time
  (same CPU contention), each on its own. The ranks' agreement check
  (``rank_check``) finds no peers there and does nothing.
  Where the ranks share cores (a 2-core machine running other work), all ranks
  computing at once is slower than the compute inside a real step, in which a
  waiting rank leaves its core to the others: then ``compute_ms`` can exceed
  ``step_ms`` and the bound is no lower bound. The ``inductor`` rows also time
  the compute one rank at a time (``compute_alone_ms``, json) and the notes give
  the ratio (about 1 with a core per rank).
- ``comm_ms``: the all-to-alls alone: the calls one profiled step issued
  (``_c10d_functional::all_to_all_single`` with its split sizes and dtype, from
  ``record_shapes``) replayed in the same order with the same sizes on the real
  group, all issued, then all waited, no compute.
- ``compute_cpu_ms`` (json, CPU only): the CPU time of the stepping thread in
  those compute steps (CPU autograd and the local copies run on it): the
  compute's own work, which other processes' load hardly changes; the notes
  give each row's over the Inductor row's, with ``compute_faults``, the minor
  page faults per compute step. On glibc's default allocator, buffers above
  its mmap threshold are mapped fresh (zero-filled pages) in every step: the
  decoder's unchunked [16384, 256] fp32 exchange buffers (16 MiB) take ~10k
  faults per step and rank, its chunked rows fewer. Measured on a 2-core box,
  a chunked row's compute CPU over Inductor's was 0.83x in one run and 1.08x
  in another; with ``MALLOC_MMAP_THRESHOLD_=33554432
  MALLOC_TRIM_THRESHOLD_=4294967296`` in the environment (the ranks inherit
  it) Inductor and domino_moe_n2 were equal. Differences of that size are the
  allocator, not the compute (CUDA's caching allocator has no such cost).
- Interleaved: every variant of a model is compiled and warmed up first (each
  its own model instance and compiled step, all alive), then ``--steps``
  rounds take one sample of each variant in turn (step, compute step, replay;
  the variants' order rotating each round; medians). So the load of a shared
  machine weighs on the three numbers of a row AND on the rows of a model
  alike: the ratios between rows are taken under the same load. (Measured one
  variant after the other, minutes apart, they were not: on this 2-core box
  the Inductor row's compute ranged 178 to 1934 ms over runs of one day, and
  one run put the Domino rows' compute 2.5x below it, another 1.6x above,
  while interleaved runs give each row's compute CPU within 0.8x-1.2x of it.)
- ``peak_MiB``: peak memory of a step above what was live before it, as the
  memory section measures it (``moe_passes.bench.memory.peak_bytes_of``): on
  CPU the profiler's allocator events (``profile_memory=True``, every thread of
  the rank process, gloo's included), peak of their running sum; on CUDA
  ``torch.cuda.max_memory_allocated``. The median of ``PEAK_STEPS`` steps (the
  running sum of several threads' events differs from step to step; each
  sample is in the json, ``peak_samples_MiB``).
- ratios to the same model's ``inductor`` row: ``step_vs_inductor``,
  ``exposed_vs_inductor``, ``ideal_vs_inductor`` = max(compute_ms, comm_ms) of
  the row / the Inductor step, ``peak_vs_inductor``.

``--trace DIR`` also writes one profiled step per variant and rank as a Chrome
trace and a timeline picture per model (``moe_passes.bench.timeline``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import pickle
import re
import socket
import statistics
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator

from moe_passes.bench import BenchOptions, BenchSection, quiet_profiler_stderr
from moe_passes.errors import error_summary

progress = logging.getLogger("moe_passes.progress")  # printed as progress lines by the CLI

COLUMNS = ["model", "variant", "step_ms", "exposed_comm_ms", "predicted_exposed_ms", "compute_ms", "comm_ms", "peak_MiB", "compile_s",
           "step_vs_inductor", "exposed_vs_inductor", "ideal_vs_inductor", "peak_vs_inductor", "note"]
#: The attention-free stack's rows (names as before the decoder model was added).
VARIANTS = ["eager", "inductor", "inductor_reorder_comm", "inductor_overlap_scheduler", "domino_n2", "domino_n4",
            "domino_n4_unscheduled"]
#: The decoder layers' rows.
DECODER_VARIANTS = ["inductor", "domino_moe_n2", "domino_moe_n4", "domino_layer_n2", "domino_layer_n4", "domino_layer_n2_dw"]
MODELS: dict[str, list[str]] = {"moe_only": VARIANTS, "decoder": DECODER_VARIANTS}
MiB = 1024 * 1024
#: Steps whose peak memory is measured per row (the median is the row's ``peak_MiB``).
PEAK_STEPS = 3


def shape(options: BenchOptions) -> dict[str, int]:
    """``moe_only`` sizes: full size by default, tiny with ``quick`` (for tests and smoke runs)."""
    if options.quick:
        return {"layers": 2, "hidden": 64, "intermediate": 32, "experts": 4, "top_k": 2, "tokens": 64}
    return {"layers": 2, "hidden": 1024, "intermediate": 128, "experts": 8, "top_k": 2, "tokens": 4096}


def decoder_shape(options: BenchOptions) -> dict[str, int]:
    """``decoder`` sizes: the ``bench`` preset's attention (8 heads, 4 KV heads, head dim 32, hidden 256) with
    narrow experts and top-8 routing, so the all-to-all is a real share of the step (see the README's bench
    section for the measured share); ``batch`` sequences of ``seq`` tokens per rank. Tiny with ``quick``."""
    if options.quick:
        return {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "head_dim": 16, "ffn": 32, "experts": 4,
                "top_k": 2, "batch": 4, "seq": 16}
    return {"layers": 2, "hidden": 256, "heads": 8, "kv_heads": 4, "head_dim": 32, "ffn": 32, "experts": 32,
            "top_k": 16, "batch": 8, "seq": 128}


def plan(options: BenchOptions) -> list[tuple[str, str]]:
    """(model, variant) of every row this run measures, in table order (``options.variants`` filters)."""
    every = [(m, v) for m, names in MODELS.items() for v in names]
    if options.variants is None:
        return every
    wanted = set()
    for item in options.variants:
        model, sep, variant = item.partition("/")
        if not sep or (model, variant) not in every:
            raise ValueError(f"unknown speed variant {item!r}; known: {[f'{m}/{v}' for m, v in every]}")
        wanted |= {(model, variant), (model, "inductor")}
    return [mv for mv in every if mv in wanted]


def _build_model(model: str, options: BenchOptions, group: Any) -> Any:
    import torch

    from moe_passes.models.stacks import decoder_stack, speed_stack

    torch.manual_seed(0)
    if model == "moe_only":
        d = shape(options)
        return speed_stack(d["layers"], d["hidden"], d["intermediate"], d["experts"], d["top_k"], group).to(options.device)
    d = decoder_shape(options)
    return decoder_stack(d["layers"], d["hidden"], d["heads"], d["kv_heads"], d["head_dim"], d["ffn"], d["experts"],
                         d["top_k"], group).to(options.device)


def _inputs(model: str, options: BenchOptions, rank: int) -> list[Any]:
    """Two batches per rank (steps alternate them): ``[1, tokens, H]`` for ``moe_only``, ``[B, S, H]`` for ``decoder``."""
    import torch

    g = torch.Generator().manual_seed(rank)
    if model == "moe_only":
        d = shape(options)
        size = (1, d["tokens"], d["hidden"])
    else:
        d = decoder_shape(options)
        size = (d["batch"], d["seq"], d["hidden"])
    return [torch.randn(*size, generator=g).to(options.device) for _ in range(2)]


@dataclasses.dataclass
class Variant:
    """How to wrap the model, the Inductor config active while it compiles, the backend (for its report)."""

    wrap: Callable[[Any], Any]
    inductor_config: dict[str, Any]
    backend: Any = None
    note: str = ""


def _domino_mode_option(mode: str) -> tuple[dict[str, Any], str]:
    """``{"domino_mode": mode}`` where ``BackendConfig`` has the option. Without it, ``moe`` is what the pass does
    anyway (run without the option, and say so); any other mode is passed on, so the row fails with the error."""
    from moe_passes.config import BackendConfig

    if mode == "moe" and "domino_mode" not in {f.name for f in dataclasses.fields(BackendConfig)}:
        return {}, "no domino_mode option yet: today's pass (MoE-region token chunks)"
    return {"domino_mode": mode}, ""


def _variant(name: str) -> Variant:
    import torch

    def inductor(model: Any) -> Any:
        return torch.compile(model, fullgraph=True)

    if name == "eager":
        return Variant(lambda m: m, {})
    if name == "inductor":
        return Variant(inductor, {})
    if name == "inductor_reorder_comm":
        return Variant(inductor, {"reorder_for_compute_comm_overlap": True})
    if name == "inductor_overlap_scheduler":
        return Variant(inductor, {"aten_distributed_optimizations.enable_overlap_scheduling": True})
    m = re.fullmatch(r"domino(?:_(moe|layer))?_n(\d+)(_unscheduled|_dw)?", name)
    if m:
        from moe_passes import make_backend
        from moe_passes.inductor.schedule import INDUCTOR_CONFIG

        mode, chunks, suffix = m.group(1), int(m.group(2)), m.group(3) or ""
        scheduled = suffix != "_unscheduled"
        options, note = _domino_mode_option(mode) if mode else ({}, "")
        if suffix == "_dw":
            options["defer_weight_grads"] = True
        backend = make_backend(passes=("domino_ep",), num_chunks=chunks, schedule_overlap=scheduled, **options)
        return Variant(lambda model: torch.compile(model, backend=backend, fullgraph=True),
                       dict(INDUCTOR_CONFIG) if scheduled else {}, backend, note)
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


_DTYPES = {"float": "float32", "double": "float64", "long int": "int64", "int": "int32", "short int": "int16",
           "c10::BFloat16": "bfloat16", "c10::Half": "float16", "signed char": "int8", "unsigned char": "uint8"}


def local_copy_group_class() -> type:
    """``LocalCopyGroup(rank, size)``: a process group whose all-to-all copies the input into the output on this rank.

    A Python ``torch.distributed.ProcessGroup`` (torch calls its ``alltoall_base`` for the functional collectives
    that name it). It is what ``local_collectives`` swaps in to time a step's compute: every rank "receives" what it
    sent, so the per-expert counts exchange hands each rank its own counts back and every token exchange moves the
    same bytes within the rank. Built on first use: the class derives from a torch type.
    """
    import torch
    import torch.distributed as dist

    class LocalCopyGroup(dist.ProcessGroup):
        def getBackendName(self) -> str:  # noqa: N802 - torch's name
            return "local_copy"

        def alltoall_base(self, output: Any, input: Any, output_split_sizes: Any, input_split_sizes: Any,
                          opts: Any = None) -> Any:
            if list(output_split_sizes or []) != list(input_split_sizes or []) or output.shape != input.shape:
                raise RuntimeError(f"local-copy all-to-all needs matching split sizes, got output "
                                   f"{list(output_split_sizes or [])} / {tuple(output.shape)} and input "
                                   f"{list(input_split_sizes or [])} / {tuple(input.shape)}")
            output.copy_(input)
            fut: Any = torch.futures.Future()
            fut.set_result([output])
            return torch._C._distributed_c10d._create_work_from_future(fut)

    return LocalCopyGroup


@contextlib.contextmanager
def local_collectives(group: Any) -> Iterator[Any]:
    """While the block runs, collectives that name ``group`` (compiled graphs name groups by ``group_name``) go
    to a ``LocalCopyGroup`` instead; the real group is registered back after, whatever happens. Code that holds
    the group object itself (``dist.barrier()``) still reaches the real group."""
    import torch.distributed as dist
    from torch._C._distributed_c10d import _register_process_group, _unregister_process_group
    from torch.distributed.distributed_c10d import _resolve_process_group

    name = group.group_name
    real = _resolve_process_group(name)
    local = local_copy_group_class()(dist.get_rank(group), dist.get_world_size(group))
    _unregister_process_group(name)
    _register_process_group(name, local)
    try:
        yield local
    finally:
        _unregister_process_group(name)
        _register_process_group(name, real)


def recorded_exchanges(prof: Any) -> list[tuple[tuple[int, ...], str, list[int], list[int]]]:
    """The all-to-alls a profiled step issued (``record_shapes=True``), in issue order: (input shape, dtype name,
    output split sizes, input split sizes)."""
    from moe_passes.bench.timeline import ISSUE_OP, split_sizes

    calls = []
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == ISSUE_OP), key=lambda e: e.start_ns())
    for e in events:
        shapes, dtypes, concrete = e.shapes(), e.dtypes(), e.concrete_inputs()
        out_splits = split_sizes(concrete[1]) if len(concrete) > 1 else ()
        in_splits = split_sizes(concrete[2]) if len(concrete) > 2 else ()
        calls.append((tuple(shapes[0]), _DTYPES.get(dtypes[0], "float32"), list(out_splits), list(in_splits)))
    return calls


def replay_buffers(calls: list[tuple[tuple[int, ...], str, list[int], list[int]]], device: str) -> list[tuple[Any, ...]]:
    """(output, input, output splits, input splits) for every recorded all-to-all, allocated once."""
    import torch

    buffers = []
    for shape_, dtype, out_splits, in_splits in calls:
        dt = getattr(torch, dtype)
        inp = torch.zeros(shape_, dtype=dt, device=device)
        rows = sum(out_splits) if out_splits else shape_[0]
        out = torch.empty((rows, *shape_[1:]), dtype=dt, device=device)
        buffers.append((out, inp, out_splits or None, in_splits or None))
    return buffers


def replay_seconds(buffers: list[tuple[Any, ...]], group: Any, device: str) -> float:
    """One replay of the recorded all-to-alls on ``group``: every one issued in order (async), then all waited."""
    import torch
    import torch.distributed as dist

    dist.barrier()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    works = [dist.all_to_all_single(out, inp, o, i, group=group, async_op=True) for out, inp, o, i in buffers]
    for w in works:
        w.wait()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t


def predicted_exposed_ms(backend: Any, device: str) -> float | None:
    """The cost model's exposed all-to-all of one training step, summed over the chunked regions
    (``moe_passes.cost.overlap``; the rates it would use on ``device``): per region the forward's GEMM FLOPs
    and all-to-all bytes at this rank's token count, with the backward taken as twice the forward's GEMMs and
    the same exchanges again (so a step is 3x the FLOPs and 2x the bytes, each chunked alike). None without
    a chunked region."""
    if backend is None:
        return None
    from moe_passes.cost.overlap import RegionWork, load_rates

    rates = load_rates(device)
    total, seen = 0.0, False
    for graph in backend.reports:
        for r in graph["pre_grad"]:
            if r["name"] != "domino_ep" or not r.get("changed"):
                continue
            for p in (r["stats"].get("predicted") or {}).values():
                here = p.get("here")
                if not here:
                    continue
                step = RegionWork(3 * p["flops_per_token"], 2 * p["bytes_per_token"], p.get("world_size", 2))
                total += step.predict(here["tokens"], p["chunks"], rates)["exposed_s"] * 1000.0
                seen = True
    return total if seen else None


def _domino_note(backend: Any) -> str:
    """The backend summary's domino_ep line (regions chunked, mode, or why not)."""
    if backend is None:
        return ""
    lines = [ln.strip() for ln in str(backend.summary()).splitlines() if ln.strip().startswith("domino_ep")]
    return "; ".join(lines)[:300]


@dataclasses.dataclass
class _Prepared:
    """One variant compiled, warmed up and ready to be sampled: its step, the all-to-alls to replay, its samples."""

    model: str
    name: str
    variant: Variant
    step: Callable[[int], None]
    first_s: float
    calls: list[tuple[tuple[int, ...], str, list[int], list[int]]]
    buffers: list[tuple[Any, ...]]
    samples: dict[str, list[float]] = dataclasses.field(
        default_factory=lambda: {"step": [], "compute": [], "compute_cpu": [], "compute_faults": [], "comm": []})


def _prepare(rank: int, options: BenchOptions, model_name: str, name: str, group: Any) -> _Prepared:
    """Build, compile and warm up one variant; profile one step (its all-to-alls, and the Chrome trace); allocate
    the replay buffers; run the first step on local copies (new split sizes), which is not counted."""
    import torch
    import torch.distributed as dist

    from moe_passes.bench.timeline import BACKWARD, FORWARD, OPTIMIZER, STEP, trace_path

    device = options.device
    variant = _variant(name)
    model = _build_model(model_name, options, group)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    step_fn = variant.wrap(model)
    inputs = _inputs(model_name, options, rank)
    record = torch.profiler.record_function

    def step(i: int) -> None:
        with record(STEP):
            opt.zero_grad(set_to_none=True)
            with record(FORWARD):
                loss = step_fn(inputs[i % 2])
            with record(BACKWARD):
                loss.backward()
            with record(OPTIMIZER):
                opt.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    dist.barrier()
    t0 = time.perf_counter()
    with torch._inductor.config.patch(variant.inductor_config), torch._dynamo.config.patch(capture_scalar_outputs=True):
        step(0)
        first = time.perf_counter() - t0
        for i in range(1, options.warmup):
            step(i)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    # One step with shapes: the all-to-alls to replay without compute, and the Chrome trace.
    dist.barrier()
    with quiet_profiler_stderr(), torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        step(0)
    calls = recorded_exchanges(prof)
    if options.trace_dir:
        prof.export_chrome_trace(str(trace_path(options.trace_dir, model_name, name, rank)))
    prepared = _Prepared(model_name, name, variant, step, first, calls, replay_buffers(calls, device))
    with local_collectives(group):
        _timed(prepared, 1)
    return prepared


def _minor_faults() -> int:
    """Minor page faults of this thread so far (Linux; 0 elsewhere)."""
    import resource

    who = getattr(resource, "RUSAGE_THREAD", None)
    return resource.getrusage(who).ru_minflt if who is not None else 0


def _timed(p: _Prepared, i: int) -> tuple[float, float, int]:
    """(wall s, CPU s of this thread, minor page faults of this thread) of one barrier-aligned step. The CPU time
    is the step's own work wherever it all runs on the stepping thread (CPU autograd, local-copy all-to-alls):
    what other processes on the machine do weighs on the wall time, hardly on it."""
    import torch.distributed as dist

    dist.barrier()
    t, c, f = time.perf_counter(), time.thread_time(), _minor_faults()
    p.step(i)
    return time.perf_counter() - t, time.thread_time() - c, _minor_faults() - f


def _sample(p: _Prepared, i: int, group: Any, device: str) -> None:
    """One sample of each: the step, the step on local copies (compute), the all-to-alls replayed alone (comm)."""
    p.samples["step"].append(_timed(p, i)[0])
    with local_collectives(group):
        wall, cpu, faults = _timed(p, i)
    p.samples["compute"].append(wall)
    p.samples["compute_cpu"].append(cpu)
    p.samples["compute_faults"].append(faults)
    p.samples["comm"].append(replay_seconds(p.buffers, group, device) if p.buffers else 0.0)


def _finish(p: _Prepared, rank: int, options: BenchOptions, group: Any) -> dict[str, Any]:
    """After the interleaved samples: the Inductor row's compute one rank at a time, the exposed all-to-all
    (profiled steps), the peak memory; the row of this rank."""
    import torch
    import torch.distributed as dist

    from moe_passes.bench.memory import peak_bytes_of

    device = options.device
    on_gpu = device.startswith("cuda")
    p.buffers = []
    alone = []
    if p.name == "inductor":  # the baseline also times its compute one rank at a time: how much the ranks contend
        for i in range(min(3, options.steps)):
            for r in range(dist.get_world_size(group)):
                dist.barrier()
                if r == dist.get_rank(group):
                    with local_collectives(group):
                        t = time.perf_counter()
                        p.step(i)
                        alone.append(time.perf_counter() - t)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if on_gpu else [])
    waits = []
    for i in range(min(3, options.steps)):
        dist.barrier()
        with quiet_profiler_stderr(), torch.profiler.profile(activities=activities) as prof:
            p.step(i)
        waits.append(_gpu_exposed_ms(prof) if on_gpu else _wait_ms(prof))
    peaks = []
    for i in range(PEAK_STEPS):  # the allocator events' running sum varies between steps (threads' frees
        dist.barrier()           # interleave differently): the median of a few steps, every sample in the json
        peaks.append(peak_bytes_of(functools.partial(p.step, i), torch.device(device), warm_up=i == 0))
    peak = int(statistics.median(peaks))
    s = p.samples
    median = statistics.median(s["step"])
    notes = [n for n in (p.variant.note, _domino_note(p.variant.backend)) if n]
    return {
        "model": p.model,
        "variant": p.name,
        "step_ms": median * 1000.0,
        "exposed_comm_ms": statistics.median(waits),
        "predicted_exposed_ms": predicted_exposed_ms(p.variant.backend, device),
        "compute_ms": statistics.median(s["compute"]) * 1000.0,
        "compute_cpu_ms": None if on_gpu else statistics.median(s["compute_cpu"]) * 1000.0,
        "compute_faults": None if on_gpu else int(statistics.median(s["compute_faults"])),
        "comm_ms": statistics.median(s["comm"]) * 1000.0,
        "peak_bytes": peak,
        "peak_samples_MiB": [round(b / MiB, 1) for b in peaks],
        "compile_s": max(0.0, p.first_s - median) if p.name != "eager" else 0.0,
        "all_to_alls": len(p.calls),
        "compute_alone_ms": statistics.median(alone) * 1000.0 if alone else None,
        "samples_ms": {k: [round(t * 1000.0, 1) for t in v] for k, v in s.items() if k != "compute_faults"},
        "note": "; ".join(notes),
    }


def _measure_model(rank: int, options: BenchOptions, model_name: str, names: list[str], group: Any,
                   lock_path: str | None = None, say: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Every variant of one model, one row each in ``names``' order, sampled in rounds.

    All variants are compiled and warmed up first (one model instance and compiled step each, alive together);
    then ``--steps`` rounds take one sample of every variant (step, compute, comm), the variants' order rotating
    each round. The ratios between rows (``step_vs_inductor``, ``ideal_vs_inductor``) are thereby taken under
    the same load: measured one variant after the other, minutes apart, the rows of one run differed by the
    load of whatever else ran on a shared machine meanwhile (the Inductor row's compute, same config, measured
    178 to 1934 ms in runs of the same day while the stepping thread's CPU time stayed about 220 ms).
    A variant that fails (compiling, or in a round) keeps its error in its row; the others go on.
    """
    import torch
    import torch.distributed as dist

    torch._dynamo.reset()
    cells: dict[str, dict[str, Any]] = {}
    ready: list[_Prepared] = []
    # every variant's step is a cache entry of the same forward code (a backend each): room for all of them
    limit = max(torch._dynamo.config.recompile_limit, 4 * len(names))
    with torch._dynamo.config.patch(recompile_limit=limit):
        for j, name in enumerate(names):
            if say:
                say(f"{model_name}: compiling variant {j + 1}/{len(names)} {name}")
            try:
                with compiles_one_rank_at_a_time(lock_path) if lock_path else contextlib.nullcontext():
                    ready.append(_prepare(rank, options, model_name, name, group))
            except Exception as e:  # a variant that cannot run on this machine says so in its row
                cells[name] = _failed_cell(model_name, name, e)
                dist.barrier()
        if say:
            say(f"{model_name}: sampling {len(ready)} variant(s) in {options.steps} interleaved round(s)")
        for i in range(options.steps):
            k = i % len(ready) if ready else 0
            for p in ready[k:] + ready[:k]:
                if p.name in cells:
                    continue
                try:
                    _sample(p, i, group, options.device)
                except Exception as e:
                    cells[p.name] = _failed_cell(model_name, p.name, e)
                    dist.barrier()
        for p in ready:
            if p.name in cells:
                continue
            try:
                cells[p.name] = _finish(p, rank, options, group)
            except Exception as e:
                cells[p.name] = _failed_cell(model_name, p.name, e)
                dist.barrier()
    return [cells[name] for name in names]


def _measure(rank: int, options: BenchOptions, model_name: str, name: str, group: Any) -> dict[str, Any]:
    """One variant alone (its row; a failure is in the row's note)."""
    return _measure_model(rank, options, model_name, [name], group)[0]


def _failed_cell(model: str, name: str, error: BaseException) -> dict[str, Any]:
    return {"model": model, "variant": name, "step_ms": None, "exposed_comm_ms": None, "predicted_exposed_ms": None,
            "compute_ms": None,
            "comm_ms": None, "peak_bytes": None, "compile_s": None, "all_to_alls": None,
            "note": f"failed: {error_summary(error)[:300]}"}


@contextlib.contextmanager
def compiles_one_rank_at_a_time(lock_path: str) -> Iterator[None]:
    """Inductor's inner compile holds a file lock shared by the ranks: the ranks trace the same graphs, so the
    first compiles and the others load its FX-graph cache entry, instead of every rank running the same C++
    compiles at once on the same cores. ``compile_s`` is then about one uncontended compile."""
    import functools

    import torch._inductor.compile_fx as compile_fx
    from filelock import FileLock

    inner = compile_fx._compile_fx_inner
    lock = FileLock(lock_path)

    @functools.wraps(inner)
    def locked(*args: Any, **kwargs: Any) -> Any:
        with lock:
            return inner(*args, **kwargs)

    compile_fx._compile_fx_inner = locked
    try:
        yield
    finally:
        compile_fx._compile_fx_inner = inner


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
        todo = plan(options)

        def say(line: str) -> None:
            with open(Path(outdir) / f"rank{rank}.progress", "a") as f:  # the parent relays these lines
                f.write(f"rank {rank + 1}/{world_size}: {line}\n")

        for model in dict.fromkeys(m for m, _ in todo):
            names = [v for m, v in todo if m == model]
            rows += _measure_model(rank, options, model, names, dist.group.WORLD, str(Path(outdir) / "inductor.lock"), say)
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


#: Environment of the rank processes, unless already set. With glibc's defaults the unchunked graph's 16 MiB
#: exchange buffers are mapped fresh (above the mmap threshold) or trimmed off the heap top on free, and
#: page-faulted back in every step: 20-33k minor faults per compute step and rank, the Inductor row's compute
#: 297-421 ms against 216 ms, noisier than any effect measured (the Domino rows, whose chunks are smaller,
#: 0-8k faults). A fixed mmap threshold above those buffers and a trim threshold of 1 GiB keep every variant's
#: memory on the heap (Inductor 4k faults, compute within 4 % of Domino's), so the rows compare the programs,
#: not the allocator's returns to the OS (what jemalloc / tcmalloc do for PyTorch CPU users).
RANK_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 * 1024 * 1024), "MALLOC_TRIM_THRESHOLD_": str(1024 * 1024 * 1024)}


@contextlib.contextmanager
def _rank_environment() -> Iterator[dict[str, str]]:
    """``RANK_ENV`` (what the user did not set) in ``os.environ`` while the ranks are spawned; yields what applies."""
    added = {k: v for k, v in RANK_ENV.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield {k: os.environ[k] for k in RANK_ENV}
    finally:
        for k in added:
            os.environ.pop(k, None)


def _spawn(options: BenchOptions) -> list[list[dict[str, Any]]]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as outdir, _rank_environment():
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


def _ratio(value: float | None, base: float | None) -> float | None:
    return round(value / base, 3) if value is not None and base not in (None, 0) else None


def combine(per_rank: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per (model, variant) in the ranks' order: the slowest rank's numbers (ranks are barrier-aligned),
    ratios to the same model's ``inductor`` row; ``ideal_vs_inductor`` = max(compute_ms, comm_ms) / its step."""
    rows = []
    for cells in zip(*per_rank):
        model, name = cells[0].get("model", "moe_only"), cells[0]["variant"]
        failed = [c["note"] for c in cells if str(c["note"]).startswith("failed")]
        row: dict[str, Any] = {"model": model, "variant": name}
        if failed:
            row.update({k: None for k in ("step_ms", "exposed_comm_ms", "compute_ms", "comm_ms", "peak_MiB", "compile_s")})
            row["note"] = failed[0]
            rows.append(row)
            continue
        for col in ("step_ms", "exposed_comm_ms", "compute_ms", "comm_ms", "compile_s"):
            row[col] = max(c[col] for c in cells)
        row["peak_MiB"] = max(c["peak_bytes"] for c in cells) / MiB
        row["peak_samples_MiB"] = [c.get("peak_samples_MiB") for c in cells]  # per rank, in the json only
        predicted = [c.get("predicted_exposed_ms") for c in cells]
        row["predicted_exposed_ms"] = max(predicted) if all(p is not None for p in predicted) else None
        row["all_to_alls"] = max(c.get("all_to_alls") or 0 for c in cells)
        row["samples_ms"] = [c.get("samples_ms") for c in cells]  # per rank, in the json only
        alone = [c.get("compute_alone_ms") for c in cells]
        row["compute_alone_ms"] = max(alone) if all(a is not None for a in alone) else None
        for col in ("compute_cpu_ms", "compute_faults"):
            got = [c.get(col) for c in cells]
            row[col] = max(got) if all(a is not None for a in got) else None
        row["note"] = cells[0]["note"]
        rows.append(row)
    for r in rows:
        base = next((b for b in rows if b["model"] == r["model"] and b["variant"] == "inductor"), None) or {}
        ideal = None if r["compute_ms"] is None or r["comm_ms"] is None else max(r["compute_ms"], r["comm_ms"])
        r["ideal_ms"] = ideal
        r["step_vs_inductor"] = _ratio(r["step_ms"], base.get("step_ms"))
        r["exposed_vs_inductor"] = _ratio(r["exposed_comm_ms"], base.get("exposed_comm_ms"))
        r["ideal_vs_inductor"] = _ratio(ideal, base.get("step_ms"))
        r["peak_vs_inductor"] = _ratio(r["peak_MiB"], base.get("peak_MiB"))
    for r in rows:
        for col in ("step_ms", "exposed_comm_ms", "predicted_exposed_ms", "compute_ms", "comm_ms", "ideal_ms", "peak_MiB",
                    "compile_s", "compute_alone_ms", "compute_cpu_ms"):
            if r.get(col) is not None:
                r[col] = round(r[col], 2)
    return rows


def contention_notes(rows: list[dict[str, Any]]) -> list[str]:
    """Per model, the Inductor row's compute with every rank computing at once over one rank computing alone: about
    1 where each rank has a core of its own; towards the rank count where they share cores (then the compute of
    the other rows, measured with all ranks at once, is no lower bound of a step in which ranks also wait)."""
    notes = []
    for r in rows:
        if r["variant"] == "inductor" and r.get("compute_alone_ms") and r.get("compute_ms") is not None:
            notes.append(f"{r['model']}: compute with the ranks at once / one rank alone = "
                         f"{r['compute_ms']} / {r['compute_alone_ms']} ms = {r['compute_ms'] / r['compute_alone_ms']:.2f}"
                         " (1: a core per rank; higher: the ranks share cores)")
    return notes


def compute_cpu_notes(rows: list[dict[str, Any]]) -> list[str]:
    """Per model, each row's ``compute_cpu_ms`` (the stepping thread's CPU time in the compute steps, slowest
    rank) over the Inductor row's: what chunking does to the compute itself, apart from the machine's load."""
    notes = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model and r.get("compute_cpu_ms") is not None]
        base = next((r["compute_cpu_ms"] for r in mine if r["variant"] == "inductor"), None)
        if base:
            parts = [f"{r['variant']} {r['compute_cpu_ms']} ms ({r['compute_cpu_ms'] / base:.2f}x, "
                     f"{r.get('compute_faults')} page faults)" for r in mine]
            notes.append(f"{model}: compute CPU time (stepping thread, slowest rank; load-insensitive) and minor page "
                         "faults per compute step: " + ", ".join(parts))
    return notes


def overlap_gain_notes(rows: list[dict[str, Any]]) -> list[str]:
    """Per model, each Domino row's wall-clock overlap ``(compute + comm - step) / comm``: the share of its
    all-to-all time the step no longer pays. 1: fully hidden at no cost to compute; 0: compute and exchange
    paid in full one after the other, whatever ``exposed`` says: on a CPU whose cores all run compute, gloo's
    exchange (copies through loopback TCP) runs on the same cores, so hiding it only moves its CPU time into
    the compute (the exchange stretches while compute runs, compute slows by what it gives up)."""
    notes = []
    for model in dict.fromkeys(r["model"] for r in rows):
        parts = []
        for r in rows:
            measured = (r.get("step_ms"), r.get("compute_ms"), r.get("comm_ms"))
            if r["model"] != model or not r["variant"].startswith("domino") or None in measured:
                continue
            if r["comm_ms"] > 0:
                parts.append(f"{r['variant']} {(r['compute_ms'] + r['comm_ms'] - r['step_ms']) / r['comm_ms']:.2f}")
        if parts:
            notes.append(f"{model}: wall-clock overlap (compute + comm - step) / comm (1: the exchange hidden for free; "
                         "0: paid in full, as when gloo's copies share the compute's cores): " + ", ".join(parts))
    return notes


def target_notes(rows: list[dict[str, Any]]) -> list[str]:
    """Issue 22's targets for each measured ``decoder`` ``domino_layer`` row: exposed <= 0.10x Inductor, step <=
    1.05x its own ideal bound, peak <= 1.15x Inductor, step below the best ``domino_moe`` row."""
    decoder = [r for r in rows if r["model"] == "decoder" and r.get("step_ms") is not None]
    moe_steps = [r["step_ms"] for r in decoder if r["variant"].startswith("domino_moe")]
    notes = []
    for r in decoder:
        if not r["variant"].startswith("domino_layer"):
            continue
        checks = [("exposed", r["exposed_vs_inductor"], 0.10), ("step/ideal", _ratio(r["step_ms"], r["ideal_ms"]), 1.05),
                  ("peak", r["peak_vs_inductor"], 1.15)]
        parts = [f"{what} {value} {'<=' if value is not None and value <= limit else '>'} {limit}" for what, value, limit in checks]
        if moe_steps:
            best = min(moe_steps)
            parts.append(f"step {r['step_ms']} {'<' if r['step_ms'] < best else '>='} best domino_moe {best}")
        notes.append(f"target {r['variant']}: " + ", ".join(parts))
    return notes


def _timelines(options: BenchOptions, rows: list[dict[str, Any]]) -> list[str]:
    from moe_passes.bench.timeline import write_timeline

    notes = []
    for model in dict.fromkeys(r["model"] for r in rows):
        try:
            path = write_timeline(options.trace_dir, model, [r for r in rows if r["model"] == model], options.world_size)
            notes.append(f"timeline: {path}")
        except Exception as e:  # noqa: BLE001 - the table stands without the picture
            notes.append(f"timeline {model} failed: {error_summary(e)}")
    return notes


def run(options: BenchOptions) -> BenchSection:
    """Measure every variant on real ranks; one table row per (model, variant)."""
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
    plan(options)  # a bad --variants name fails here, before any rank starts
    if options.trace_dir:
        Path(options.trace_dir).mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows = combine(_spawn(options))
    d, dd = shape(options), decoder_shape(options)
    notes = [
        f"moe_only: {d['layers']} x (LayerNorm + SparseMoeBlock), hidden {d['hidden']}, expert intermediate "
        f"{d['intermediate']}, {d['experts']} experts top-{d['top_k']}, {d['tokens']} tokens per rank",
        f"decoder: {dd['layers']} x reference DecoderLayer (GQA {dd['heads']}/{dd['kv_heads']} heads x {dd['head_dim']}, "
        f"M-RoPE, causal; SparseMoeBlock {dd['experts']} experts top-{dd['top_k']}, expert intermediate {dd['ffn']}), "
        f"hidden {dd['hidden']}, {dd['batch']} sequences x {dd['seq']} tokens per rank",
        f"{options.world_size} ranks, device {options.device}, 1 compute thread per rank; "
        f"step = forward + backward + SGD step, median of {options.steps} after {options.warmup} warm-up, "
        "a model's variants sampled in interleaved rounds; "
        + ("exposed comm = NCCL kernel time not overlapped by compute kernels (CUDA profiler, median of 3 steps); "
           if on_gpu else
           "exposed comm = time in wait_tensor on the stepping thread (profiler, median of 3 steps); ")
        + "compile = first step minus the median step",
        "compute = the step with every all-to-all a local copy of the same bytes (the graph's group swapped for "
        "LocalCopyGroup; same compiled code); comm = the step's all-to-alls alone, replayed with the same sizes; "
        "ideal_vs_inductor = max(compute, comm) / Inductor step; peak = "
        + ("torch.cuda.max_memory_allocated" if on_gpu else "profiler allocator events (profile_memory=True), peak of the running sum")
        + " over one step, vs the model's Inductor row",
        "targets (moe_only): exposed_vs_inductor <= 0.4 and step_vs_inductor <= 0.85 for the domino rows",
        "rank processes run with " + ", ".join(f"{k}={os.environ.get(k, v)}" for k, v in RANK_ENV.items())
        + " (glibc otherwise maps or trims and faults in the unchunked graph's large buffers every step; export them to override)",
        *contention_notes(rows),
        *compute_cpu_notes(rows),
        *overlap_gain_notes(rows),
        *target_notes(rows),
    ]
    if options.trace_dir:
        notes += _timelines(options, rows)
    notes.append(f"section took {time.perf_counter() - started:.0f} s")
    return BenchSection(title="speed: all-to-all overlap (Domino EP), ideal bound and peak memory", columns=COLUMNS,
                        rows=rows, notes=notes)
