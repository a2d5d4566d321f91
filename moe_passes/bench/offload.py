"""``moe-passes bench`` section "offload": device bytes live at the end of the forward, pass off vs on.

The workload is a small stack of ``SparseMoeBlock``s whose forward returns
the loss, every layer's router logits (detached, for logging) and selected
experts: what a training loop keeps for expert-load logging or routing replay.

What "device bytes" means here, and how each column is obtained:

* ``static_device_bytes_at_end``: liveness walk of the pre-grad graph
  (``device_liveness``): bytes of compute-side storages still live when the
  forward returns. Host copies made by the offload ops are host memory and not
  counted. Sizes are exact for this workload (router tensors have static shapes).
* ``router_device_bytes_returned``: of those, the bytes the *returned router
  tensors* hold on the compute device.
* ``router_bytes_saved_for_backward``: bytes of returned router tensors that
  autograd saves for backward (they stay on the device with or without the
  pass; the pre-grad liveness walk cannot see them).
* On CUDA, ``measured_device_bytes_at_end``: ``torch.cuda.memory_allocated``
  after the compiled forward minus before it (outputs + tensors saved for
  backward), measured.
* On CPU there is no separate device memory: host copies are CPU allocations
  too, so a measured total cannot show the saving. The CPU row reports
  ``measured_cpu_bytes_at_end`` from the profiler's memory events (bytes
  allocated by the forward and not freed when it returns), which should stay
  about equal with the pass on (device tensor freed, host copy alive).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._pytree import tree_leaves

from models.interns1_vl.moe import SparseMoeBlock
from moe_passes.bench import BenchOptions, BenchSection, quiet_profiler_stderr
from moe_passes.inductor.ops import OFFLOAD_START, OFFLOAD_WAIT


class RouterStack(nn.Module):
    """Stacked MoE blocks; returns (loss, router logits per layer detached, selected experts per layer)."""

    def __init__(
        self, layers: int = 2, hidden: int = 16, experts: int = 4, top_k: int = 2, ep_group: Any = None
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            SparseMoeBlock(hidden, 2 * hidden, experts, top_k, ep_group=ep_group) for _ in range(layers)
        )
        for block in self.blocks:
            nn.init.normal_(block.gate.weight, std=0.5)
            nn.init.normal_(block.experts.gate_up_proj, std=0.2)
            nn.init.normal_(block.experts.down_proj, std=0.2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        logits, selected = [], []
        for block in self.blocks:
            out = block(x)
            x = x + out.hidden_states
            logits.append(out.router_logits.detach())
            selected.append(out.selected_experts)
        return x.pow(2).mean(), tuple(logits), tuple(selected)


def _val(node: fx.Node) -> Any:
    return node.meta.get("val", node.meta.get("example_value"))


def _bytes(t: torch.Tensor) -> int:
    numel = 1
    for s in t.shape:
        numel *= s if isinstance(s, int) else (s.node.hint if s.node.has_hint() else 0)
    return int(numel) * t.element_size()


@dataclass
class Liveness:
    """Per compute-side storage: producer, last graph user (None: live at the end of the forward), bytes."""

    first: dict[StorageWeakRef, fx.Node]
    last: dict[StorageWeakRef, fx.Node | None]
    nbytes: dict[StorageWeakRef, int]

    def storage_of(self, node: fx.Node) -> StorageWeakRef:
        return StorageWeakRef(_val(node).untyped_storage())

    def bytes_at_end(self) -> int:
        return sum(self.nbytes[s] for s, last in self.last.items() if last is None)


def device_liveness(gm: fx.GraphModule) -> Liveness:
    """Static liveness of the compute-side storages a graph allocates (inputs and host copies excluded).

    A storage lives from its first producer to the last node using any alias
    of it; a storage reachable from the graph output lives to the end. The
    outputs of ``offload_start``/``offload_wait`` are host memory.
    """
    first: dict[StorageWeakRef, fx.Node] = {}
    last: dict[StorageWeakRef, fx.Node | None] = {}
    nbytes: dict[StorageWeakRef, int] = {}
    inputs: set[StorageWeakRef] = set()
    for node in gm.graph.nodes:
        tensors = [t for t in tree_leaves(_val(node)) if isinstance(t, torch.Tensor)]
        if node.op == "output":
            for arg in node.all_input_nodes:
                for t in tree_leaves(_val(arg)):
                    if isinstance(t, torch.Tensor) and StorageWeakRef(t.untyped_storage()) in last:
                        last[StorageWeakRef(t.untyped_storage())] = None
            continue
        for arg in node.all_input_nodes:
            for t in tree_leaves(_val(arg)):
                key = StorageWeakRef(t.untyped_storage()) if isinstance(t, torch.Tensor) else None
                if key in last:
                    last[key] = node
        host = node.target in (OFFLOAD_START, OFFLOAD_WAIT)
        for t in tensors:
            key = StorageWeakRef(t.untyped_storage())
            if node.op in ("placeholder", "get_attr"):
                inputs.add(key)
            elif key not in first and key not in inputs and not host:
                first[key], last[key], nbytes[key] = node, node, _bytes(t)
    return Liveness(first, last, nbytes)


def _capture(model: nn.Module, x: torch.Tensor, passes: tuple[str, ...], targets: Any) -> fx.GraphModule:
    from moe_passes.fx.capture import capture_graphs
    from moe_passes.fx.registry import pass_class
    from moe_passes.config import BackendConfig

    gm = capture_graphs(model, x)[0].gm
    for name in passes:
        pass_class(name)(BackendConfig(passes=passes, offload_targets=targets))(gm)
    return gm


def _router_bytes_returned(gm: fx.GraphModule, live: Liveness) -> int:
    outs = [n for n in tree_leaves(gm.graph.output_node().args) if isinstance(n, fx.Node)][1:]
    keys = {live.storage_of(n) for n in outs if n.target is not OFFLOAD_WAIT}
    return sum(live.nbytes[k] for k in keys if k in live.nbytes)


def _router_bytes_saved_for_backward(gm: fx.GraphModule, live: Liveness) -> int:
    from moe_passes.fx.async_offload import classify, saved_for_backward

    saved = saved_for_backward(gm)
    if isinstance(saved, str):
        return -1
    kinds = classify(gm.graph)
    outs = [n for n in tree_leaves(gm.graph.output_node().args) if isinstance(n, fx.Node) and n in kinds]
    keys = {live.storage_of(n) for n in outs if n in saved}
    return sum(live.nbytes[k] for k in keys if k in live.nbytes)


def _measured_bytes(compiled: Any, x: torch.Tensor, device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        out = compiled(x)
        torch.cuda.synchronize(device)
        measured = torch.cuda.memory_allocated(device) - before
        del out
        return measured
    from torch.profiler import ProfilerActivity, profile

    with quiet_profiler_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = compiled(x)
    measured = sum(e.self_cpu_memory_usage for e in prof.key_averages())
    del out
    return int(measured)


def run(options: BenchOptions) -> BenchSection:
    """Pass off vs on: static device bytes at the end of the forward, and the measured figure."""
    import moe_passes

    device = torch.device(options.device)
    torch.manual_seed(0)
    layers, tokens = (2, 32) if options.quick else (4, 256)
    model = RouterStack(layers=layers).to(device)
    x = torch.randn(2, tokens // 2, 16, device=device)
    targets = ("router_logits", "selected_experts")
    rows = []
    kept = -1
    for label, passes in (("off", ()), ("on", ("async_offload",))):
        gm = _capture(model, x, passes, targets)
        live = device_liveness(gm)
        if not passes:
            kept = _router_bytes_saved_for_backward(gm, live)
        torch._dynamo.reset()
        backend = moe_passes.make_backend(passes=passes, offload_targets=targets)
        with torch._dynamo.config.patch(capture_scalar_outputs=True):
            compiled = torch.compile(model, backend=backend, fullgraph=True)
            compiled(x)
            measured = _measured_bytes(compiled, x, device)
        column = "measured_device_bytes_at_end" if device.type == "cuda" else "measured_cpu_bytes_at_end"
        rows.append(
            {
                "offload": label,
                "static_device_bytes_at_end": live.bytes_at_end(),
                "router_device_bytes_returned": _router_bytes_returned(gm, live),
                "router_bytes_saved_for_backward": kept,
                column: measured,
            }
        )
    torch._dynamo.reset()
    columns = list(rows[0])
    notes = [
        f"{layers} MoE layers, {tokens} tokens, router logits (detached) and selected experts returned; device={device}",
        "static_*: liveness walk of the pre-grad graph (compute-side storages; host copies not counted); "
        "it does not see what autograd saves for backward: router_bytes_saved_for_backward (fake run under "
        "saved_tensors_hooks) stay on the device either way, e.g. topk's selected-expert indices",
    ]
    if device.type == "cpu":
        notes.append(
            "measured_cpu_bytes_at_end: profiler memory events (allocated by the forward, not freed at its end); "
            "on CPU the host copies are CPU memory too, so this total stays about equal: it grows by the host "
            "copies of router tensors that backward keeps on the device (router_bytes_saved_for_backward)"
        )
    else:
        notes.append("measured_device_bytes_at_end: torch.cuda.memory_allocated after minus before the forward")
    return BenchSection(title="async offload: device bytes live at end of forward", columns=columns, rows=rows, notes=notes)
