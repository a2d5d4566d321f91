"""``moe-passes bench`` section "offload": router tensors' device bytes, pass off vs on, two workloads.

Workloads:

* ``router_stack``: a small stack of ``SparseMoeBlock``s whose forward returns
  the loss, every layer's router logits (detached, for logging) and selected
  experts: what a training loop keeps for expert-load logging or routing replay.
* ``interns1_vl``: the reference model **as users run it**,
  ``model(ids, labels=ids, output_router_logits=True)`` (tiny config): router
  logits returned live (they require grad) and selected experts that ``topk``
  saves for backward. The pass offloads both (host copies without a blocking
  copy); the gradient through the returned logits is kept.

What "device bytes" means here, and how each column is obtained:

* ``static_device_bytes_at_end``: liveness walk of the pre-grad graph
  (``device_liveness``): bytes of compute-side storages still live when the
  forward returns. Host copies made by the offload ops are host memory and not
  counted. Sizes are exact for these workloads (router tensors have static shapes).
* ``router_device_bytes_returned``: of those, the bytes the *returned router
  tensors* hold on the compute device.
* ``router_bytes_offloaded``: bytes the pass hands to the host (its report's
  ``offloaded_bytes``); 0 with the pass off.
* ``router_device_bytes_kept``: router bytes still on the device after the
  forward returns. Pass off: every returned router tensor (the caller holds
  it). Pass on: only the buffers autograd saves for backward (the report's
  ``device_bytes_kept_for_backward``, e.g. ``topk``'s indices): they stay with
  or without the pass, the pre-grad liveness walk cannot see them.
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

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._pytree import tree_leaves

from moe_passes.bench import BenchOptions, BenchSection, quiet_profiler_stderr
from moe_passes.ir.facts import node_value, static_nbytes
from moe_passes.models.stacks import router_stack
from moe_passes.ops.offload import OFFLOAD_START, OFFLOAD_WAIT

log = logging.getLogger(__name__)


@dataclass
class Liveness:
    """Per compute-side storage: producer, last graph user (None: live at the end of the forward), bytes."""

    first: dict[StorageWeakRef, fx.Node]
    last: dict[StorageWeakRef, fx.Node | None]
    nbytes: dict[StorageWeakRef, int]

    def storage_of(self, node: fx.Node) -> StorageWeakRef:
        return StorageWeakRef(node_value(node).untyped_storage())

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
        tensors = [t for t in tree_leaves(node_value(node)) if isinstance(t, torch.Tensor)]
        if node.op == "output":
            for arg in node.all_input_nodes:
                for t in tree_leaves(node_value(arg)):
                    if isinstance(t, torch.Tensor) and StorageWeakRef(t.untyped_storage()) in last:
                        last[StorageWeakRef(t.untyped_storage())] = None
            continue
        for arg in node.all_input_nodes:
            for t in tree_leaves(node_value(arg)):
                key = StorageWeakRef(t.untyped_storage()) if isinstance(t, torch.Tensor) else None
                if key in last:
                    last[key] = node
        host = node.target in (OFFLOAD_START, OFFLOAD_WAIT)
        for t in tensors:
            key = StorageWeakRef(t.untyped_storage())
            if node.op in ("placeholder", "get_attr"):
                inputs.add(key)
            elif key not in first and key not in inputs and not host:
                first[key], last[key], nbytes[key] = node, node, static_nbytes(t)
    return Liveness(first, last, nbytes)


def reference_workload(quick: bool, device: torch.device) -> tuple[Any, tuple[torch.Tensor, ...]]:
    """The tiny InternS1-VL reference model as users run it: ``model(ids, labels=ids, output_router_logits=True)``."""
    from moe_passes.models.interns1_vl import InternS1VLConfig, InternS1VLForConditionalGeneration

    config = InternS1VLConfig.tiny()
    vlm = InternS1VLForConditionalGeneration(config).to(device)
    batch, seq = (2, 8) if quick else (4, 64)
    ids = torch.randint(0, config.text.vocab_size, (batch, seq), device=device)

    def step(ids: torch.Tensor) -> Any:
        return vlm(ids, labels=ids, output_router_logits=True)

    step.model = vlm  # type: ignore[attr-defined]
    step.describe = (  # type: ignore[attr-defined]
        f"interns1_vl tiny ({config.text.num_hidden_layers} MoE layers, {batch}x{seq} tokens), "
        "model(ids, labels=ids, output_router_logits=True): live router logits + selected experts"
    )
    return step, (ids,)


def _capture(fn: Any, args: tuple[torch.Tensor, ...], passes: tuple[str, ...], targets: Any) -> tuple[fx.GraphModule, dict[str, Any]]:
    from moe_passes.config import BackendConfig
    from moe_passes.harness.capture import capture_graphs
    from moe_passes.registry import pass_class

    gm = capture_graphs(fn, *args)[0].gm
    stats: dict[str, Any] = {}
    for name in passes:
        stats[name] = pass_class(name)(BackendConfig(passes=passes, offload_targets=targets))(gm).stats
    return gm, stats


def _router_bytes_returned(gm: fx.GraphModule, live: Liveness) -> int:
    """Device bytes held by returned router tensors (host copies from ``offload_wait`` are not device bytes)."""
    from moe_passes.fx.async_offload import TARGET_KINDS, classify

    kinds = classify(gm.graph)
    outs = [n for n in tree_leaves(gm.graph.output_node().args) if isinstance(n, fx.Node)]
    keys = {live.storage_of(n) for n in outs if kinds.get(n) in TARGET_KINDS}
    return sum(live.nbytes[k] for k in keys if k in live.nbytes)


def _measured_bytes(compiled: Any, args: tuple[torch.Tensor, ...], device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        out = compiled(*args)
        torch.cuda.synchronize(device)
        measured = torch.cuda.memory_allocated(device) - before
        del out
        return measured
    from torch.profiler import ProfilerActivity, profile

    with quiet_profiler_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = compiled(*args)
    measured = sum(e.self_cpu_memory_usage for e in prof.key_averages())
    del out
    return int(measured)


def _rows(workload: str, fn: Any, args: tuple[torch.Tensor, ...], targets: Any, device: torch.device) -> list[dict[str, Any]]:
    import moe_passes

    rows = []
    for label, passes in (("off", ()), ("on", ("async_offload",))):
        gm, stats = _capture(fn, args, passes, targets)
        live = device_liveness(gm)
        returned = _router_bytes_returned(gm, live)
        report = stats.get("async_offload", {})
        torch._dynamo.reset()
        backend = moe_passes.make_backend(passes=passes, offload_targets=targets)
        with torch._dynamo.config.patch(capture_scalar_outputs=True):
            compiled = torch.compile(fn, backend=backend, fullgraph=True)
            compiled(*args)
            measured = _measured_bytes(compiled, args, device)
        column = "measured_device_bytes_at_end" if device.type == "cuda" else "measured_cpu_bytes_at_end"
        rows.append(
            {
                "workload": workload,
                "offload": label,
                "static_device_bytes_at_end": live.bytes_at_end(),
                "router_device_bytes_returned": returned,
                "router_bytes_offloaded": report.get("offloaded_bytes", 0),
                "router_device_bytes_kept": returned + report.get("device_bytes_kept_for_backward", 0),
                column: measured,
            }
        )
        log.info("bench offload %s %s: %s", workload, label, rows[-1])
    torch._dynamo.reset()
    return rows


def run(options: BenchOptions) -> BenchSection:
    """Pass off vs on, on a router stack and on the reference model as written."""
    device = torch.device(options.device)
    torch.manual_seed(0)
    layers, tokens = (2, 32) if options.quick else (4, 256)
    model = router_stack(layers=layers).to(device)
    x = torch.randn(2, tokens // 2, 16, device=device)
    rows = _rows("router_stack", model, (x,), "auto", device)
    torch.manual_seed(0)
    step, args = reference_workload(options.quick, device)
    rows += _rows("interns1_vl", step, args, "auto", device)
    columns = list(rows[0])
    notes = [
        f"router_stack: {layers} MoE layers, {tokens} tokens, router logits (detached) and selected experts returned; "
        f"device={device}",
        f"interns1_vl: {step.describe}",
        "offload_targets='auto': every returned router tensor goes to the host (pinned, side stream on CUDA); "
        "returned logits that require grad keep their gradient (the host copy's backward moves it to the device)",
        "static_*: liveness walk of the pre-grad graph (compute-side storages; host copies not counted); "
        "router_device_bytes_kept: off = every returned router tensor (the caller holds it); on = the buffers "
        "autograd saves for backward (e.g. topk's selected-expert indices), kept with or without the pass",
    ]
    if device.type == "cpu":
        notes.append(
            "measured_cpu_bytes_at_end: profiler memory events (allocated by the forward, not freed at its end); "
            "on CPU the host copies are CPU memory too, so this total stays about equal: it grows by the host "
            "copies of router tensors that backward keeps on the device"
        )
    else:
        notes.append("measured_device_bytes_at_end: torch.cuda.memory_allocated after minus before the forward")
    return BenchSection(title="async offload: router tensors' device bytes at end of forward", columns=columns, rows=rows, notes=notes)
