"""What a Domino region computes and moves per token: the inputs of the cost model (``moe_passes.cost.overlap``).

Read from the region's graph and the kinds the row analysis proved, never from one rank's token
count (see the cost model's docstring for what is counted and why).
"""

from __future__ import annotations

from typing import Any

import sympy
import torch.fx as fx

from moe_passes.cost.overlap import RegionWork
from moe_passes.fx.domino.kinds import Kind, size_expr
from moe_passes.ir.facts import all_to_all_split_args, op_meaning_label, tensor_value

_GEMMS = ("aten.linear", "aten.mm", "aten.addmm", "aten.matmul", "aten._grouped_mm", "aten.bmm")


def _elems(shape: Any) -> float | None:
    out = 1
    for s in shape:
        if not isinstance(s, int):
            return None
        out *= s
    return float(out)


def _per_token(m: Any, tokens_per_unit: Any) -> float | None:
    """Rows per token: the kind's rows per chunked unit over the unit's tokens (1, or S per sequence)."""
    q = sympy.cancel(size_expr(m) / size_expr(tokens_per_unit))
    return float(q) if q.is_number else None


def region_work(region: Any) -> RegionWork | None:
    """FLOPs and all-to-all bytes per token of a Domino region (``moe_passes.fx.domino.regions.MoERegion``),
    or None when a size it needs is symbolic in a way that does not cancel."""
    inside = set(region.nodes) | {region.tokens} | set(region.row_inputs)
    xv = tensor_value(region.tokens)
    unit = xv.shape[1] if region.mode == "layer" and xv is not None and xv.dim() > 1 else 1
    flops = 0.0

    def rows_per_token(a: Any) -> float | None:
        k = region.kinds.get(a)
        if not isinstance(k, Kind):
            return None
        if k.tag == "row":  # GEMM rows are every dim but the last: [B, S, H] is B*S rows of S-token units
            v = tensor_value(a)
            lead = 1
            for s in (v.shape[:-1] if v is not None else ()):
                lead = lead * s
            return _per_token(lead, region.num_tokens * unit) if v is not None else None
        if k.tag == "bag":  # token copies sorted by expert
            return _per_token(k.m, unit)
        if k.tag in ("recv", "recvw", "seg"):  # received rows: top-k copies per token (uniform routing)
            return float(region.top_k)
        return None

    for n in region.nodes:
        name = op_meaning_label(n)
        if name in _GEMMS:
            data = n.args[1] if name == "aten.addmm" else n.args[0]
            w = n.args[2] if name == "aten.addmm" else n.args[1]
            wv = tensor_value(w) if isinstance(w, fx.Node) else None
            if wv is None or (isinstance(w, fx.Node) and w in inside and name != "aten.bmm"):
                continue  # two region operands (attention scores) or no weight: not counted
            shape = tuple(wv.shape)
            per_row = _elems(shape[-2:])
            r = rows_per_token(data)
            if per_row is None or r is None:
                continue
            flops += 2.0 * per_row * r
    d = region.dispatch
    dv = tensor_value(d.args[0])
    width = _elems(tuple(dv.shape[1:])) if dv is not None else None
    splits = all_to_all_split_args(d)
    world = len(splits[0]) if splits and isinstance(splits[0], (list, tuple)) else 1
    if width is None:
        return None
    elt = dv.element_size()
    bytes_per_token = 2.0 * width * elt * region.top_k * (world - 1) / max(world, 1)
    return RegionWork(flops, bytes_per_token, world)


