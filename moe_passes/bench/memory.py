"""Memory section of ``moe-passes bench``: what the aux loss costs, stacked vs layer-wise.

One training step (forward + backward) of an MoE stack whose loss adds the
stacked balancing loss and z-loss of ``moe_passes/models/interns1_vl/losses.py``, at
several layer counts, three ways: aux loss off, the unmodified stacked loss,
and the graph after the ``layerwise_aux_loss`` pass. Each graph is the Dynamo
graph a backend receives, run as-is (FX frees each value after its last use,
autograd saves what the ops need), so the difference is the pass's and nothing
else's. Aux-loss overhead = peak - peak(aux off).

Why not the full reference model: the aux-loss overhead only depends on the
router tensors, and Dynamo needs minutes to trace the dropless block's
per-expert loop at 16 layers x 64 experts (data-dependent split sizes). The
layers here keep the reference router exactly (linear -> fp32 softmax -> top-k
-> renormalise, ``SparseMoeBlock.route``) and replace the dropless dispatch by
a static-shape stand-in (shared SwiGLU modulated per selected expert), so the
routing probabilities carry gradient as in the real model.

Peak memory: CUDA ``torch.cuda.max_memory_allocated``; CPU: the profiler's
memory events (``profile_memory=True``): every allocation and free of the step,
summed in time order; the peak of that running sum is the step's peak above
what was live before it.

Two views, one row each per layer count:

- ``eager FX``: the Dynamo graph run op by op. It shows everything the
  stacked form materialises (the one-hot expert masks, the concatenated
  logits, the softmax) - what a user without Inductor pays, and what the pass
  removes from the graph.
- ``Inductor``: the same model through ``torch.compile`` with the
  ``moe_passes`` backend, passes off (aux off / stacked) or
  ``passes=("layerwise_aux_loss",)`` (layer-wise). Inductor already fuses the
  one-hot away; what the stacked form still costs compiled is the
  concatenated logits and the softmax saved for backward. This is what a
  compiled training step really allocates.

Both rows also give the step time and the aux loss's share of it
((step - step with aux off) / step).
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import nn

from moe_passes.bench import BenchOptions, BenchSection, quiet_profiler_stderr
from moe_passes.fx.aux_loss import LayerwiseAuxLossPass
from moe_passes.harness.capture import capture_graphs
from moe_passes.models.interns1_vl.moe import MoEOutput, SparseMoeBlock
from moe_passes.models.stacks import MoEStack
from moe_passes.pipeline.manager import PassManager

MiB = 1024 * 1024


class BenchMoELayer(nn.Module):
    """Reference router (``SparseMoeBlock.route``) + a static-shape expert stand-in; input ``[tokens, hidden]``."""

    def __init__(self, hidden: int, ffn: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.router = SparseMoeBlock(hidden, ffn, num_experts, top_k)  # its gate and route(); experts unused
        del self.router.experts
        self.up = nn.Linear(hidden, 2 * ffn, bias=False)
        self.down = nn.Linear(ffn, hidden, bias=False)
        self.expert_scale = nn.Parameter(torch.zeros(num_experts, hidden))

    def forward(self, x: torch.Tensor) -> MoEOutput:
        logits = self.router.gate(x)
        weights, selected = self.router.route(logits)
        gate, up = self.up(x).chunk(2, dim=-1)
        shared = self.down(nn.functional.silu(gate) * up)
        per_expert = shared.unsqueeze(1) * (1 + self.expert_scale[selected])  # [T, K, H]
        return MoEOutput((per_expert * weights.unsqueeze(-1)).sum(dim=1), logits, selected)


def bench_stack(layers: int, hidden: int, ffn: int, num_experts: int, top_k: int, aux: bool) -> MoEStack:
    """``BenchMoELayer``s on the flattened tokens; loss mean(h^2) [+ 0.01 * balancing + 0.001 * z-loss, masked]."""
    return MoEStack(layers, hidden, ffn, num_experts, top_k, block=lambda: BenchMoELayer(hidden, ffn, num_experts, top_k),
                    flatten_tokens=True, main_loss="pow2_mean", aux_coef=0.01 if aux else 0.0, z_coef=0.001 if aux else 0.0,
                    init_std=0.05)


def step_peak_bytes(gm: fx.GraphModule, inputs: list[Any], device: torch.device) -> int:
    """Peak bytes above the starting level during one forward + backward of ``gm``."""

    def step() -> None:
        gm(*inputs)[0].backward()
        for p in gm.parameters():
            p.grad = None
        for t in inputs:
            if isinstance(t, torch.Tensor):
                t.grad = None

    return peak_bytes_of(step, device)


def peak_bytes_of(step: Callable[[], None], device: torch.device, warm_up: bool = True) -> int:
    """Peak bytes above the starting level during one call of ``step`` (with ``warm_up``, a call runs first)."""
    if warm_up:
        step()  # lazy allocations and caches happen outside the measured step
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with quiet_profiler_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    # Raw allocator events (signed bytes, every thread incl. autograd's), not the per-op aggregates.
    events = sorted(
        ((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
         if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU),
    )
    if not events:
        raise RuntimeError("the profiler recorded no memory events; cannot measure CPU peak memory")
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


def training_step(compiled: Callable[..., Any], model: nn.Module, *inputs: Any) -> Callable[[], None]:
    """One forward + backward of ``compiled(*inputs)`` (a scalar loss), gradients dropped after; the last
    loss is kept as ``step.loss``."""

    def step() -> None:
        loss = compiled(*inputs)
        loss.backward()
        step.loss = loss.detach()  # type: ignore[attr-defined]
        for p in model.parameters():
            p.grad = None

    return step


def step_seconds(step: Callable[[], None], device: torch.device, repeats: int = 5) -> float:
    """Median wall time of ``step`` (forward + backward), after the warm-up ``peak_bytes_of`` already ran."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _bench_inputs(hidden: int, tokens: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    batch = 4
    x = torch.randn(batch, tokens // batch, hidden, generator=g).to(device)
    mask = torch.ones(batch, tokens // batch, dtype=torch.long, device=device)
    mask[0, (tokens // batch) * 3 // 4:] = 0  # some padding: the mask path is the realistic one
    return x, mask


def _row(view: str, layers: int, num_experts: int, top_k: int, tokens: int, peaks: dict[str, int],
         seconds: dict[str, float]) -> dict[str, Any]:
    over_stacked = peaks["stacked"] - peaks["off"]
    over_layerwise = peaks["layerwise"] - peaks["off"]
    return {
        "view": view,
        "layers": layers,
        "experts": num_experts,
        "top_k": top_k,
        "tokens": tokens,
        "peak_off_MiB": round(peaks["off"] / MiB, 2),
        "peak_stacked_MiB": round(peaks["stacked"] / MiB, 2),
        "peak_layerwise_MiB": round(peaks["layerwise"] / MiB, 2),
        "aux_overhead_stacked_MiB": round(over_stacked / MiB, 2),
        "aux_overhead_layerwise_MiB": round(over_layerwise / MiB, 2),
        "overhead_ratio": round(over_layerwise / over_stacked, 4) if over_stacked > 0 else None,
        "step_ms_off": round(seconds["off"] * 1e3, 2),
        "step_ms_stacked": round(seconds["stacked"] * 1e3, 2),
        "step_ms_layerwise": round(seconds["layerwise"] * 1e3, 2),
        "aux_share_stacked": round((seconds["stacked"] - seconds["off"]) / seconds["stacked"], 4),
        "aux_share_layerwise": round((seconds["layerwise"] - seconds["off"]) / seconds["layerwise"], 4),
    }


def measure(layers: int, hidden: int, ffn: int, num_experts: int, top_k: int, tokens: int,
            device: torch.device) -> dict[str, Any]:
    """Eager-FX view: peaks (aux off / stacked / layer-wise) of the Dynamo graphs run op by op, one layer count."""
    x, mask = _bench_inputs(hidden, tokens, device)
    peaks: dict[str, int] = {}
    seconds: dict[str, float] = {}
    stats: dict[str, Any] = {}
    for aux in (False, True):
        torch.manual_seed(0)
        model = bench_stack(layers, hidden, ffn, num_experts, top_k, aux).to(device)
        graphs = capture_graphs(model, x, mask)
        if len(graphs) != 1:
            raise RuntimeError(f"expected one graph, Dynamo produced {len(graphs)}")
        gm, inputs = graphs[0].gm, graphs[0].example_inputs
        if not aux:
            peaks["off"], seconds["off"] = _peak_and_time(gm, inputs, device)
            continue
        run = PassManager([LayerwiseAuxLossPass()], snapshot=False).apply(copy.deepcopy(gm), inputs)
        rewritten, result = run.gm, run.records[0].result
        if not result.changed:
            raise RuntimeError(f"layerwise_aux_loss did not apply: {result.as_dict()}")
        stats = result.stats
        peaks["stacked"], seconds["stacked"] = _peak_and_time(gm, inputs, device)
        peaks["layerwise"], seconds["layerwise"] = _peak_and_time(rewritten, inputs, device)
    row = _row("eager FX", layers, num_experts, top_k, tokens, peaks, seconds)
    row["pass_stats"] = {k: stats.get(k) for k in ("layers", "counts_without_onehot", "softmax_reused", "topk_reused")}
    return row


def _peak_and_time(gm: fx.GraphModule, inputs: list[Any], device: torch.device) -> tuple[int, float]:
    def step() -> None:
        gm(*inputs)[0].backward()
        for p in gm.parameters():
            p.grad = None
        for t in inputs:
            if isinstance(t, torch.Tensor):
                t.grad = None

    return peak_bytes_of(step, device), step_seconds(step, device)


def measure_compiled(layers: int, hidden: int, ffn: int, num_experts: int, top_k: int, tokens: int,
                     device: torch.device) -> dict[str, Any]:
    """Inductor view: the compiled training step (moe_passes backend), aux off / stacked / layer-wise."""
    from moe_passes.config import BackendConfig
    from moe_passes.inductor.backend import DominoBackend

    x, mask = _bench_inputs(hidden, tokens, device)
    peaks: dict[str, int] = {}
    seconds: dict[str, float] = {}
    losses: dict[str, float] = {}
    for variant, aux, passes in (("off", False, ()), ("stacked", True, ()), ("layerwise", True, ("layerwise_aux_loss",))):
        torch.manual_seed(0)
        model = bench_stack(layers, hidden, ffn, num_experts, top_k, aux).to(device)
        backend = DominoBackend(BackendConfig(passes=passes))
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=backend, fullgraph=True)

        step = training_step(compiled, model, x, mask)
        peaks[variant] = peak_bytes_of(step, device)
        seconds[variant] = step_seconds(step, device)
        losses[variant] = float(step.loss)  # type: ignore[attr-defined]
        if passes:
            applied = [r for g in backend.reports for r in g["pre_grad"] if r["name"] == "layerwise_aux_loss"]
            if not applied or not applied[0]["changed"]:
                raise RuntimeError(f"layerwise_aux_loss did not apply under torch.compile: {backend.reports}")
    torch._dynamo.reset()
    if abs(losses["layerwise"] - losses["stacked"]) > 1e-4 * max(1.0, abs(losses["stacked"])):
        raise RuntimeError(f"compiled layer-wise loss {losses['layerwise']} != stacked {losses['stacked']}")
    return _row("Inductor", layers, num_experts, top_k, tokens, peaks, seconds)


def run(options: BenchOptions) -> BenchSection:
    """Aux-loss memory overhead, stacked vs layer-wise, eager-FX and Inductor rows, at 4/8/16 layers (2/4 with --quick)."""
    device = torch.device(options.device)
    if options.quick:
        layer_counts, hidden, ffn, experts, top_k, tokens = (2, 4), 32, 32, 32, 4, 1024
    else:
        layer_counts, hidden, ffn, experts, top_k, tokens = (4, 8, 16), 64, 64, 64, 8, 4096
    rows = []
    started = time.perf_counter()
    for layers in layer_counts:
        rows.append(measure(layers, hidden, ffn, experts, top_k, tokens, device))
    for layers in layer_counts:
        rows.append(measure_compiled(layers, hidden, ffn, experts, top_k, tokens, device))
    method = ("torch.cuda.max_memory_allocated" if device.type == "cuda"
              else "torch.profiler memory events (profile_memory=True), peak of the running allocation sum")
    notes = [
        f"peak memory of one forward+backward step, measured with {method}",
        "aux overhead = peak - peak with the aux loss off (same model, no balancing/z-loss)",
        "view 'eager FX': the Dynamo graph a backend receives, unmodified vs after layerwise_aux_loss, run op by op "
        "(everything the stacked form materialises, one-hot masks included)",
        "view 'Inductor': torch.compile with the moe_passes backend, passes=() (off, stacked) vs "
        "passes=('layerwise_aux_loss',); Inductor fuses the one-hot away, the stacked form still keeps the "
        "concatenated logits and the softmax saved for backward",
        "aux_share = (step - step with aux off) / step, median of 5 steps",
        "target: layer-wise overhead <= 10% of stacked at the largest layer count, and flat in the layer count",
        "layers: reference router (SparseMoeBlock gate + route: fp32 softmax, top-k, renorm) with a static-shape "
        "expert stand-in; loss: losses.py stacked balancing loss + z-loss with an attention mask (padding)",
        f"section took {time.perf_counter() - started:.1f} s",
    ]
    columns = ["view", "layers", "experts", "top_k", "tokens", "peak_off_MiB", "peak_stacked_MiB", "peak_layerwise_MiB",
               "aux_overhead_stacked_MiB", "aux_overhead_layerwise_MiB", "overhead_ratio",
               "step_ms_off", "step_ms_stacked", "step_ms_layerwise", "aux_share_stacked", "aux_share_layerwise"]
    return BenchSection(title="Aux-loss memory: stacked vs layer-wise (eager FX graph and Inductor-compiled step)",
                        columns=columns, rows=rows, notes=notes)
