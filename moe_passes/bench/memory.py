"""Memory section of ``moe-passes bench``: what the aux loss costs, stacked vs layer-wise.

One training step (forward + backward) of an MoE stack whose loss adds the
stacked balancing loss and z-loss of ``models/interns1_vl/losses.py``, at
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
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from models.interns1_vl.losses import load_balancing_loss, router_z_loss
from models.interns1_vl.moe import SparseMoeBlock
from moe_passes.bench import BenchOptions, BenchSection, quiet_profiler_stderr
from moe_passes.fx.capture import capture_graphs
from moe_passes.fx.layerwise_aux_loss import LayerwiseAuxLossPass

MiB = 1024 * 1024


class BenchMoELayer(nn.Module):
    """Reference router (``SparseMoeBlock.route``) + a static-shape expert stand-in."""

    def __init__(self, hidden: int, ffn: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.router = SparseMoeBlock(hidden, ffn, num_experts, top_k)  # its gate and route(); experts unused
        del self.router.experts
        self.up = nn.Linear(hidden, 2 * ffn, bias=False)
        self.down = nn.Linear(ffn, hidden, bias=False)
        self.expert_scale = nn.Parameter(torch.zeros(num_experts, hidden))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.router.gate(x)
        weights, selected = self.router.route(logits)
        gate, up = self.up(x).chunk(2, dim=-1)
        shared = self.down(nn.functional.silu(gate) * up)
        per_expert = shared.unsqueeze(1) * (1 + self.expert_scale[selected])  # [T, K, H]
        return (per_expert * weights.unsqueeze(-1)).sum(dim=1), logits


class BenchStack(nn.Module):
    def __init__(self, layers: int, hidden: int, ffn: int, num_experts: int, top_k: int, aux: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(BenchMoELayer(hidden, ffn, num_experts, top_k) for _ in range(layers))
        self.num_experts, self.top_k, self.aux = num_experts, top_k, aux
        with torch.no_grad():
            for p in self.parameters():
                p.normal_(0.0, 0.05)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        logits = []
        x = x.reshape(-1, x.shape[-1])  # [tokens, hidden], as the MoE block sees it
        for layer in self.layers:
            out, layer_logits = layer(x)
            x = x + out
            logits.append(layer_logits)
        loss = x.pow(2).mean()
        if self.aux:
            lb = load_balancing_loss(tuple(logits), self.num_experts, self.top_k, mask)
            loss = loss + 0.01 * lb + 0.001 * router_z_loss(tuple(logits), mask)
        return loss


def step_peak_bytes(gm: fx.GraphModule, inputs: list[Any], device: torch.device) -> int:
    """Peak bytes above the starting level during one forward + backward of ``gm``."""

    def step() -> None:
        gm(*inputs)[0].backward()
        for p in gm.parameters():
            p.grad = None
        for t in inputs:
            if isinstance(t, torch.Tensor):
                t.grad = None

    step()  # warm-up: lazy allocations and caches happen outside the measured step
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


def measure(layers: int, hidden: int, ffn: int, num_experts: int, top_k: int, tokens: int,
            device: torch.device) -> dict[str, Any]:
    """Peaks (aux off / stacked / layer-wise) for one layer count."""
    g = torch.Generator().manual_seed(0)
    batch = 4
    x = torch.randn(batch, tokens // batch, hidden, generator=g).to(device)
    mask = torch.ones(batch, tokens // batch, dtype=torch.long, device=device)
    mask[0, (tokens // batch) * 3 // 4:] = 0  # some padding: the mask path is the realistic one
    peaks: dict[str, int] = {}
    stats: dict[str, Any] = {}
    for aux in (False, True):
        torch.manual_seed(0)
        model = BenchStack(layers, hidden, ffn, num_experts, top_k, aux).to(device)
        graphs = capture_graphs(model, x, mask)
        if len(graphs) != 1:
            raise RuntimeError(f"expected one graph, Dynamo produced {len(graphs)}")
        gm, inputs = graphs[0].gm, graphs[0].example_inputs
        if not aux:
            peaks["off"] = step_peak_bytes(gm, inputs, device)
            continue
        rewritten = copy.deepcopy(gm)
        result = LayerwiseAuxLossPass()(rewritten)
        if not result.changed:
            raise RuntimeError(f"layerwise_aux_loss did not apply: {result.as_dict()}")
        stats = result.stats
        peaks["stacked"] = step_peak_bytes(gm, inputs, device)
        peaks["layerwise"] = step_peak_bytes(rewritten, inputs, device)
    over_stacked = peaks["stacked"] - peaks["off"]
    over_layerwise = peaks["layerwise"] - peaks["off"]
    return {
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
        "pass_stats": {k: stats.get(k) for k in ("layers", "counts_without_onehot", "softmax_reused", "topk_reused")},
    }


def run(options: BenchOptions) -> BenchSection:
    """Aux-loss memory overhead, stacked vs layer-wise, at 4/8/16 layers (2/4 with --quick)."""
    device = torch.device(options.device)
    if options.quick:
        layer_counts, hidden, ffn, experts, top_k, tokens = (2, 4), 32, 32, 32, 4, 1024
    else:
        layer_counts, hidden, ffn, experts, top_k, tokens = (4, 8, 16), 64, 64, 64, 8, 4096
    rows = []
    started = time.perf_counter()
    for layers in layer_counts:
        rows.append(measure(layers, hidden, ffn, experts, top_k, tokens, device))
    method = ("torch.cuda.max_memory_allocated" if device.type == "cuda"
              else "torch.profiler memory events (profile_memory=True), peak of the running allocation sum")
    notes = [
        f"peak memory of one forward+backward step, measured with {method}",
        "aux overhead = peak - peak with the aux loss off (same model, no balancing/z-loss)",
        "target: layer-wise overhead <= 10% of stacked at the largest layer count, and flat in the layer count",
        "layers: reference router (SparseMoeBlock gate + route: fp32 softmax, top-k, renorm) with a static-shape "
        "expert stand-in; loss: losses.py stacked balancing loss + z-loss with an attention mask (padding)",
        f"graphs: the Dynamo graph a backend receives, unmodified vs after layerwise_aux_loss, run eagerly; "
        f"section took {time.perf_counter() - started:.1f} s",
    ]
    columns = ["layers", "experts", "top_k", "tokens", "peak_off_MiB", "peak_stacked_MiB", "peak_layerwise_MiB",
               "aux_overhead_stacked_MiB", "aux_overhead_layerwise_MiB", "overhead_ratio"]
    return BenchSection(title="Aux-loss memory: stacked vs layer-wise", columns=columns, rows=rows, notes=notes)
