"""Compile section of ``moe-passes bench``: cold-cache compile time vs experts and layers.

Model: a stack of pre-norm MoE decoder layers (``BenchDecoderLayer``: RMSNorm
-> the reference ``SparseMoeBlock`` as written, grouped-GEMM experts -> residual)
plus the stacked balancing loss of ``moe_passes/models/interns1_vl/losses.py``; hidden
size tiny so the figures are compile time, not kernel time.

Each case runs in its own process with a fresh ``TORCHINDUCTOR_CACHE_DIR``
(cold FX-graph and kernel caches) and a wall-clock limit: a case that runs
out of time still gets its row ("timeout"). Compile time = first training
step (forward + backward, which triggers Dynamo, AOT autograd and Inductor)
minus one steady-state step.

Axes: experts (8, 64, 512) at 2 layers; layers (2, 8, 32) at 8 experts;
whole-model ``torch.compile`` vs regional (``moe_passes.regional.compile_regions``,
one compile per decoder-layer class); ``DominoBackend`` with no pre-grad pass
("off") vs the default passes ("on"). Pass time = the pre-grad passes'
recorded ``seconds`` plus the post-grad passes' time (measured here around each
post-grad pass), as a share of the compile time.

Single process, no expert parallelism: domino_ep finds no all-to-all region
here (it still searches every graph; its search time is in the pass share).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

progress = logging.getLogger("moe_passes.progress")  # printed as progress lines by the CLI

HIDDEN, FFN, TOP_K, TOKENS = 32, 32, 2, 64
CASE_TIMEOUT_S = 240.0  # per case, whole process (import + compile + 3 steps); override: MOE_PASSES_COMPILE_CASE_TIMEOUT_S
RESULT_PREFIX = "COMPILE_BENCH_RESULT "


def build_stack(layers: int, experts: int, device: str) -> Any:
    import torch
    from torch import nn

    from moe_passes.models.interns1_vl.losses import load_balancing_loss
    from moe_passes.models.interns1_vl.moe import SparseMoeBlock
    from moe_passes.models.interns1_vl.text import RMSNorm

    class BenchDecoderLayer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = RMSNorm(HIDDEN)
            self.mlp = SparseMoeBlock(HIDDEN, FFN, experts, TOP_K)

        def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            out = self.mlp(self.norm(h))
            return h + out.hidden_states, out.router_logits

    class BenchMoEStack(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(BenchDecoderLayer() for _ in range(layers))

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            logits = []
            for layer in self.layers:
                h, layer_logits = layer(h)
                logits.append(layer_logits)
            return h.square().mean() + 0.01 * load_balancing_loss(tuple(logits), experts, TOP_K)

    torch.manual_seed(0)
    model = BenchMoEStack()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.1)
    return model.to(device), BenchDecoderLayer


class _TimedPostGrad:
    """Adds each call's wall time to ``seconds`` without changing the pass's class module (INDUCTOR_CONFIG) or uuid."""

    seconds = 0.0

    @classmethod
    def wrap(cls, graph_pass: Any) -> Any:
        base = type(graph_pass)

        def __call__(self: Any, gm: Any) -> Any:  # noqa: N807
            start = time.perf_counter()
            try:
                return base.__call__(self, gm)
            finally:
                cls.seconds += time.perf_counter() - start

        graph_pass.__class__ = type(f"Timed{base.__name__}", (base,), {"__call__": __call__, "__module__": base.__module__})
        return graph_pass


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (Inductor's C++ compiler runs): robust to a loaded machine."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    """One cold compile in this process; the parent gives it a fresh Inductor cache directory."""
    import copy

    import torch

    from moe_passes.config import BackendConfig
    from moe_passes.inductor.backend import DominoBackend
    from moe_passes.regional import compile_regions

    torch.set_num_threads(1)
    device = case.get("device", "cpu")
    model, layer_type = build_stack(case["layers"], case["experts"], device)
    eager = copy.deepcopy(model)
    config = BackendConfig() if case["passes"] == "on" else BackendConfig(passes=())
    backend = DominoBackend(config, post_grad=[_TimedPostGrad.wrap(p) for p in DominoBackend(config).post_grad_passes()])
    if case["mode"] == "regional":
        compile_regions(model, backend, block_types=(layer_type,), fullgraph=True)
        step_fn = model
    else:
        step_fn = torch.compile(model, backend=backend, fullgraph=True)
    g = torch.Generator().manual_seed(1)
    # requires_grad: as hidden states coming out of an embedding; every layer then sees the same input kind
    # (a first layer fed a grad-less tensor would be a second graph under regional compile).
    x = torch.randn(1, TOKENS, HIDDEN, generator=g).to(device).requires_grad_(True)

    def step(fn: Any) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start, cpu = time.perf_counter(), _cpu_seconds()
        loss = fn(x)
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        step.loss = loss.item()  # type: ignore[attr-defined]
        step.cpu = _cpu_seconds() - cpu  # type: ignore[attr-defined]
        return time.perf_counter() - start

    first = step(step_fn)
    first_cpu = step.cpu  # type: ignore[attr-defined]
    compiled_loss = step.loss  # type: ignore[attr-defined]
    steady = min(step(step_fn) for _ in range(2))
    steady_cpu = step.cpu  # type: ignore[attr-defined]
    step(eager)
    pre = sum(r.seconds for g_ in backend.graphs for r in g_.pre_grad)
    passes_s = pre + _TimedPostGrad.seconds
    compile_s = max(first - steady, 1e-9)
    return {
        "compile_s": round(compile_s, 2),
        "compile_cpu_s": round(max(first_cpu - steady_cpu, 0.0), 2),
        "step_ms": round(steady * 1e3, 2),
        "graphs": len(backend.graphs),
        "pass_s": round(passes_s, 3),
        "pass_share": round(passes_s / compile_s, 4),
        "loss_matches_eager": abs(compiled_loss - step.loss) <= 1e-5 * max(1.0, abs(step.loss)),  # type: ignore[attr-defined]
    }


def cases(quick: bool, device: str) -> list[dict[str, Any]]:
    shapes: list[tuple[int, int]] = []
    experts_axis, layers_axis = ((8, 512), (2, 8)) if quick else ((8, 64, 512), (2, 8, 32))
    for e in experts_axis:
        shapes.append((2, e))
    for n in layers_axis:
        if (n, 8) not in shapes:
            shapes.append((n, 8))
    out = []
    for layers, experts in shapes:
        for mode in ("whole", "regional"):
            for passes in (("on",) if quick else ("off", "on")):
                out.append({"layers": layers, "experts": experts, "mode": mode, "passes": passes, "device": device})
    if quick:  # one passes-off baseline so the quick table still shows what the passes cost
        out.insert(1, {"layers": 2, "experts": 8, "mode": "whole", "passes": "off", "device": device})
    return out


def run_in_subprocess(case: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    row: dict[str, Any] = {k: case[k] for k in ("layers", "experts", "mode", "passes")}
    with tempfile.TemporaryDirectory(prefix="moe_passes_compile_bench_") as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(cache, "inductor"),
                   TRITON_CACHE_DIR=os.path.join(cache, "triton"), OMP_NUM_THREADS="1")
        # one compile thread: the C++ compiler then runs as a direct child, so its CPU time is counted
        env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
        started = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, "-m", "moe_passes.bench.compile", "--case", json.dumps(case)],
                                  capture_output=True, text=True, timeout=timeout_s, env=env)
        except subprocess.TimeoutExpired:
            row.update(status=f"timeout (> {timeout_s:.0f} s)", compile_s=None)
            return row
        wall = time.perf_counter() - started
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        row.update(status=f"error: {tail[:160]}", compile_s=None)
        return row
    row.update(json.loads(lines[-1][len(RESULT_PREFIX):]))
    row.update(status="ok", process_s=round(wall, 1))
    return row


def run(options: Any) -> Any:
    from moe_passes.bench import BenchSection

    timeout_s = float(os.environ.get("MOE_PASSES_COMPILE_CASE_TIMEOUT_S", CASE_TIMEOUT_S))
    jobs = int(os.environ.get("MOE_PASSES_COMPILE_JOBS", "1"))
    started = time.perf_counter()
    todo = cases(options.quick, options.device)
    if jobs > 1:  # wall times then include waiting for a core; compile_cpu_s stays comparable
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(jobs) as pool:
            rows = list(pool.map(lambda case: run_in_subprocess(case, timeout_s), todo))
    else:
        rows = []
        for i, case in enumerate(todo):
            progress.info("compile: case %d/%d: %d layers, %d experts, %s, passes %s", i + 1, len(todo),
                          case["layers"], case["experts"], case["mode"], case["passes"])
            rows.append(run_in_subprocess(case, timeout_s))
    notes = [
        f"cold cache: one process and a fresh TORCHINDUCTOR_CACHE_DIR per case, {timeout_s:.0f} s limit per case "
        "(a case over the limit keeps its row as 'timeout')",
        "compile_s = first forward+backward minus one steady step (wall); compile_cpu_s = the same in CPU seconds of the "
        "process and its compiler children (what the compile costs on a machine shared with other jobs); "
        "graphs = graphs the backend compiled "
        "(regional: one per decoder-layer class, whatever the layer count)",
        "pass_share = (pre-grad pass seconds from the backend reports + post-grad pass seconds) / compile_s; target <= 0.10",
        f"model: RMSNorm + reference SparseMoeBlock (grouped-GEMM experts) per layer, hidden {HIDDEN}, ffn {FFN}, "
        f"top-{TOP_K}, {TOKENS} tokens, stacked balancing loss; single process (no EP: domino_ep searches, finds no region)",
        "targets: compile time flat in experts; regional flat in layers; passes <= 10% of compile time",
        f"device {options.device}; {jobs} case(s) at a time; section took {time.perf_counter() - started:.0f} s",
    ]
    notes += summary(rows)
    columns = [
        "layers",
        "experts",
        "mode",
        "passes",
        "status",
        "compile_s",
        "compile_cpu_s",
        "graphs",
        "pass_s",
        "pass_share",
        "step_ms",
        "loss_matches_eager",
    ]
    return BenchSection(title="Compile time (cold cache) vs experts and layers", columns=columns, rows=rows, notes=notes)


def summary(rows: list[dict[str, Any]]) -> list[str]:
    """Ratios for the targets, from the rows that finished."""
    ok = {(r["layers"], r["experts"], r["mode"], r["passes"]): r["compile_cpu_s"] for r in rows if r.get("status") == "ok"}
    out = []
    for mode in ("whole", "regional"):
        for passes in ("off", "on"):
            by_e = sorted((e, s) for (n, e, m, p), s in ok.items() if n == 2 and m == mode and p == passes)
            if len(by_e) >= 2:
                out.append(f"{mode}/passes {passes}: experts {by_e[0][0]} -> {by_e[-1][0]}: compile CPU x{by_e[-1][1] / by_e[0][1]:.2f}")
            by_n = sorted((n, s) for (n, e, m, p), s in ok.items() if e == 8 and m == mode and p == passes)
            if len(by_n) >= 2:
                out.append(f"{mode}/passes {passes}: layers {by_n[0][0]} -> {by_n[-1][0]}: compile CPU x{by_n[-1][1] / by_n[0][1]:.2f}")
    shares = [r["pass_share"] for r in rows if r.get("status") == "ok" and r["passes"] == "on"]
    if shares:
        out.append(f"pass share of compile time (passes on): max {max(shares):.1%}")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="one compile-bench case (internal: run by moe-passes bench --section compile)")
    parser.add_argument("--case", required=True, help="JSON: layers, experts, mode (whole|regional), passes (on|off), device")
    args = parser.parse_args(argv)
    result = run_case(json.loads(args.case))
    print(RESULT_PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
