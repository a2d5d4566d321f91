"""Weight-gradient (dW) deferral in the post-grad backward graph: which GEMMs may move, and what moving them costs.

A backward GEMM that computes only parameter gradients (``grad_W = x^T @ grad_y``: every path from it ends in
a graph output that is a parameter's gradient, through no collective) has no reader inside the backward graph
but the output: the input gradients, the all-to-alls and the rest of the chain never wait for it. So it can
run anywhere after its inputs exist, and the best place for it is inside an all-to-all's window (between the
issue and the wait), where it hides the communication instead of delaying the next issue (Megatron-Core's
split dgrad/wgrad, Lancet's dW scheduling). ``moe_passes.inductor.schedule`` places them when
``BackendConfig.defer_weight_grads`` is on; this module says which nodes qualify and reports the result.

Measured on the Domino stacks (``moe-passes bench --section checkpointing``'s 4-layer stack, with and
without checkpointing; the 2-layer test model): the default schedule already runs 25 of 26 (13 of 14)
weight-gradient GEMMs inside a window, because it sinks every wait below all ready compute and a dW GEMM
is ready compute no all-to-all waits for; the one left is a router weight gradient computed after the
last wait. There the option moves nothing. It decides where a dW GEMM becomes ready with no window
open (it then waits for the next one instead of running at once) and which filler goes first in a window.

Which outputs are parameter gradients is read from what AOTAutograd recorded, never from node names: the
backward graph's output node carries one descriptor per output (``meta["desc"]``); a parameter's gradient
is a ``GradAOTOutput`` whose ``grad_of`` is a ``ParamAOTInput`` (parameters AOTAutograd lifted itself) or a
``PlainAOTInput`` at a position Dynamo marked static (``ViewAndMutationMeta.static_input_indices``, the
forward's ``fw_metadata`` in the ``TracingContext`` that compiles the backward: Dynamo marks the
``nn.Parameter``/buffer inputs of the graph so, the user inputs that require grad are not). Without these
(another torch, a graph compiled outside AOTAutograd) nothing is deferred and the report says why.

The cost: a deferred GEMM keeps its inputs alive past their last other use (the activation and the output
gradient it multiplies). ``deferral_report`` sums those bytes (each storage once, sized from ``meta['val']``
like ``moe_passes.cost.memory``) and gives the most of them alive at one time, with the deferral and in the
order the schedule chooses without it, and counts the GEMMs whose window the deferral changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

from moe_passes.ir.facts import is_all_to_all, is_collective, is_wait


@dataclass
class ParamGradOutputs:
    """Positions of the backward graph's outputs that are parameter gradients (``None``: unknown, and why)."""

    positions: set[int] | None
    reason: str = ""


def parameter_gradient_outputs(graph: fx.Graph) -> ParamGradOutputs:
    """Which outputs of an AOT backward graph are parameter gradients, from AOTAutograd's descriptors."""
    try:
        from torch._functorch._aot_autograd.descriptors import GradAOTOutput, ParamAOTInput, PlainAOTInput
        from torch._guards import TracingContext
    except ImportError as e:  # pragma: no cover - other torch versions
        return ParamGradOutputs(None, f"AOTAutograd descriptors unavailable ({e})")
    output = graph.output_node()
    descs = output.meta.get("desc")
    if not isinstance(descs, (list, tuple)):
        return ParamGradOutputs(None, "the backward graph's output carries no AOTAutograd descriptors")
    ctx = TracingContext.try_get()
    meta = getattr(ctx, "fw_metadata", None) if ctx is not None else None
    static = set(getattr(meta, "static_input_indices", None) or ()) if meta is not None else None
    # PlainAOTInput(i) counts the user inputs after the parameters/buffers AOTAutograd lifted itself (params_flat).
    offset = len(ctx.params_flat or ()) if ctx is not None else 0
    positions: set[int] = set()
    plain_unknown = 0
    for i, desc in enumerate(descs):
        if not isinstance(desc, GradAOTOutput):
            continue
        of = desc.grad_of
        if isinstance(of, ParamAOTInput):
            positions.add(i)
        elif isinstance(of, PlainAOTInput):
            if static is None:
                plain_unknown += 1
            elif of.idx + offset in static:
                positions.add(i)
    if plain_unknown and not positions:
        return ParamGradOutputs(None, "no forward metadata (static input indices) in the tracing context: "
                                      "cannot tell parameter gradients from input gradients")
    return ParamGradOutputs(positions)


def weight_gradient_gemms(graph: fx.Graph, is_gemm: Any, params: ParamGradOutputs | None = None) -> list[fx.Node]:
    """GEMMs (``is_gemm``) whose every use path ends in a parameter-gradient output, through no collective.

    Such a node feeds no all-to-all, no activation gradient and nothing else the backward waits for: moving it
    later changes no value, only when its inputs are freed."""
    params = params if params is not None else parameter_gradient_outputs(graph)
    if not params.positions:
        return []
    output = graph.output_node()
    out_args = output.args[0] if isinstance(output.args[0], (list, tuple)) else (output.args[0],)
    at_param_only: dict[fx.Node, bool] = {}
    for i, a in enumerate(out_args):
        if isinstance(a, fx.Node):
            ok = i in params.positions
            at_param_only[a] = at_param_only.get(a, True) and ok
    only: dict[fx.Node, bool] = {}
    for n in reversed(list(graph.nodes)):
        if n.op != "call_function" or not n.users or is_collective(n) or is_wait(n):
            only[n] = False
            continue
        good = True
        for u in n.users:
            if u is output:
                good = good and at_param_only.get(n, False)
            else:
                good = good and only.get(u, False)
            if not good:
                break
        only[n] = good
    return [n for n in graph.nodes if only.get(n) and is_gemm(n)]


@dataclass
class Placement:
    """Where the dW GEMMs sit in one order of the graph, and the bytes their inputs are held for."""

    #: dW GEMM name -> the all-to-all whose window holds it (the innermost), or None
    window: dict[str, str | None] = field(default_factory=dict)
    #: bytes of the GEMMs' inputs kept alive past their last other use (each storage once)
    held_bytes: int = 0
    #: the most of those held at one time
    held_peak_bytes: int = 0


def placement(order: list[fx.Node], dw: list[fx.Node], size_of: Any, alias: Any) -> Placement:
    """``Placement`` of the GEMMs ``dw`` in ``order`` (storages and sizes from ``alias`` / ``size_of``)."""
    pos = {n: i for i, n in enumerate(order)}
    spans = []
    for a in order:
        if is_all_to_all(a):
            waits = [pos[u] for u in a.users if is_wait(u)]
            if waits:
                spans.append((pos[a], min(waits), a.name))
    out = Placement()
    for d in dw:
        inside = [name for start, end, name in spans if start < pos[d] < end]
        out.window[d.name] = inside[-1] if inside else None
    inputs = {n for n in order if n.op in ("placeholder", "get_attr")}
    dw_set = set(dw)
    held: dict[Any, tuple[int, int, int]] = {}  # storage -> (from, to, bytes)
    for d in dw:
        for key in alias.get_storage_uses(d):
            if alias.storage_to_allocator[key] in inputs:
                continue  # graph inputs (saved activations, parameters) are alive for the whole graph anyway
            users = alias.storage_to_uses[key]
            last_other = max((pos[u] for u in users if u not in dw_set), default=pos[alias.storage_to_allocator[key]])
            last_dw = max(pos[u] for u in users if u in dw_set)
            if last_dw > last_other:
                held[key] = (last_other, last_dw, size_of(key.storage.nbytes()))
    out.held_bytes = sum(b for _, _, b in held.values())
    events = sorted([(s, b) for s, _, b in held.values()] + [(e, -b) for _, e, b in held.values()])
    current = 0
    for _, b in events:
        current += b
        out.held_peak_bytes = max(out.held_peak_bytes, current)
    return out


@dataclass
class DeferralReport:
    """Where the dW GEMMs of one backward graph ended up, against the schedule without deferral."""

    gemms: int = 0
    #: in an all-to-all window, with / without the deferral
    in_windows: int = 0
    in_windows_without: int = 0
    #: GEMMs whose window differs from the schedule without deferral (moved in, out, or to another window)
    moved: int = 0
    #: all-to-all node name -> the dW GEMMs scheduled between its issue and its wait
    windows: dict[str, list[str]] = field(default_factory=dict)
    outside: list[str] = field(default_factory=list)
    #: bytes of the GEMMs' inputs kept alive past their last other use, with / without the deferral; the most
    #: of them alive at one time, with / without
    held_bytes: int = 0
    held_bytes_without: int = 0
    held_peak_bytes: int = 0
    held_peak_bytes_without: int = 0
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"dw_gemms": self.gemms, "dw_moved": self.moved, "dw_in_windows": self.in_windows,
                "dw_in_windows_without_deferral": self.in_windows_without, "dw_windows": dict(self.windows),
                "dw_outside_windows": list(self.outside), "dw_held_bytes": self.held_bytes,
                "dw_held_bytes_without_deferral": self.held_bytes_without,
                "dw_held_peak_bytes": self.held_peak_bytes,
                "dw_held_peak_bytes_without_deferral": self.held_peak_bytes_without,
                **({"dw_reason": self.reason} if self.reason else {})}


def deferral_report(order: list[fx.Node], dw: list[fx.Node], without: list[fx.Node] | None = None,
                    reason: str = "") -> DeferralReport:
    """The dW GEMMs' windows in ``order`` and the memory their placement holds, against ``without`` (the order
    the schedule chose without deferral; None: ``order`` itself)."""
    from torch._inductor.fx_passes.memory_estimator import GraphAliasTracker

    from moe_passes.cost.memory import UNBACKED_FALLBACK, _Sizer

    report = DeferralReport(gemms=len(dw), reason=reason)
    if not dw:
        return report
    without = without if without is not None else order
    alias = GraphAliasTracker(order)
    size_of = _Sizer(UNBACKED_FALLBACK, order[0].graph)
    now, before = placement(order, dw, size_of, alias), placement(without, dw, size_of, alias)
    for d in dw:
        window = now.window[d.name]
        if window is None:
            report.outside.append(d.name)
        else:
            report.windows.setdefault(window, []).append(d.name)
    report.in_windows = sum(w is not None for w in now.window.values())
    report.in_windows_without = sum(w is not None for w in before.window.values())
    report.moved = sum(now.window[d.name] != before.window[d.name] for d in dw)
    report.held_bytes, report.held_peak_bytes = now.held_bytes, now.held_peak_bytes
    report.held_bytes_without, report.held_peak_bytes_without = before.held_bytes, before.held_peak_bytes
    return report
