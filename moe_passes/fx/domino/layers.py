"""Whole-layer regions: micro-batches of whole sequences through attention, norms, router and experts.

The seed's Domino (xtuner) splits the batch into micro-batches that run through
*whole decoder layers*, so one micro-batch's all-to-all hides behind another's
attention, norms and router as well as its experts.  Here a whole-layer region
is an MoE region (``regions``) grown backwards to the earliest ``[B, S, ...]``
value it can start from; the chunked unit is then a sequence (dim 0 of that
value) instead of a token, and the same row analysis (``row_analysis``, with
``T = B``) proves every op between: attention over ``[B, heads, S, S]``
(``scaled_dot_product_attention``, batched matmuls, a softmax over the key
dim) keeps dim 0, norms and projections keep it, and the MoE algebra keeps
whole sequences' tokens together (``B*S`` tokens are ``row(S)``).  Per-sequence
values computed outside the region (rotary tables ``[B, S, d]``, masks
``[B, 1, S, S]``) are read by row: each chunk reads its own sequences of them,
exact because the op aligns their dim 0 with the rows.

How a start is chosen: candidates are the ``[B, S, ...]`` floating-point
ancestors of the MoE token matrix (``B * S`` = its token count) after the
previous region's combine, tried by how much of the layer they cover (the
number of nodes between the candidate and the combine), largest first; the
first one the analysis proves wins, unless a value it reads by row belongs to
another region (then the candidate does not start the layer: the residual
stream enters it from the side).  Consecutive regions are then rebuilt so that
each region's extension stops where the next one starts, and the rewrite joins
them chunk to chunk (``rewrite.rewrite_region(join=...)``: no concatenation
between layers).  A region with no provable start keeps MoE-mode token chunks; the
report says which mode each region got and why.

Rank-invariance: the decision reads the program and shapes' structure (which
dims are the batch, whether the batch is statically 1), never one rank's data.
"""

from __future__ import annotations

import logging
from typing import Any

import torch.fx as fx

from moe_passes.fx.domino.kinds import Unproven
from moe_passes.fx.domino.regions import MoERegion, RegionError, grow_region
from moe_passes.ir.facts import ancestors, descendants, known_equal, tensor_value

log = logging.getLogger(__name__)

#: How many start candidates are tried per region before giving up (largest coverage first).
MAX_CANDIDATES = 8


def _candidates(region: MoERegion, after: int, order: dict[fx.Node, int]) -> list[tuple[fx.Node, Any]]:
    """(A, B): floating ``[B, S, ...]`` ancestors of the token matrix with ``B * S`` its token count."""
    T = region.num_tokens
    out = []
    for a in ancestors([region.tokens]):
        if order[a] <= after or a.op not in ("call_function", "placeholder"):
            continue
        v = tensor_value(a)
        if v is None or v.dim() < 2 or not v.dtype.is_floating_point:
            continue
        B, S = v.shape[0], v.shape[1]
        if not known_equal(B * S, T):
            continue
        out.append((a, B))
    return out


def layer_start(region: MoERegion, after: int, taken: set[fx.Node]) -> tuple[MoERegion | None, str]:
    """The largest provable whole-layer region around ``region`` starting after node index ``after``, or
    (None, why not). ``taken``: nodes of earlier regions (a start whose row inputs are among them is not
    the layer's input)."""
    graph = region.dispatch.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    cands = _candidates(region, after, order)
    if not cands:
        return None, (f"no [B, S, ...] value with B * S = {region.num_tokens} tokens feeds the token matrix "
                      f"{region.tokens.name} (tokens not laid out as whole sequences)")
    if all(isinstance(B, int) and B == 1 for _, B in cands):
        return None, "one sequence per rank (batch 1, e.g. packed sequences): nothing to split along the batch"
    back = ancestors([region.combine])
    sized = sorted(((len(descendants(a) & back), a, B) for a, B in cands if not (isinstance(B, int) and B == 1)),
                   key=lambda t: (-t[0], order[t[1]]))
    reasons: list[str] = []
    for _size, a, B in sized[:MAX_CANDIDATES]:
        try:
            r = grow_region(region.dispatch, region.combine, a, B, region.top_k, region.count_exchange,
                            region.topk, row_inputs=True, mode="layer", seeds=region.seeds)
        except (RegionError, Unproven) as e:
            reasons.append(f"from {a.name}: {e}")
            continue
        side = [x.name for x in r.row_inputs if x in taken]
        if side:
            reasons.append(f"from {a.name}: reads {side} of an earlier region by row (not the layer's input)")
            continue
        r.path, r.token_matrix = region.path, region.tokens
        return r, f"whole layers from {a.name} ({B} sequences)"
    return None, "no start proven: " + "; ".join(reasons[:3]) + (f" (+{len(reasons) - 3} more)" if len(reasons) > 3 else "")


def layer_regions(regions: list[MoERegion]) -> tuple[list[MoERegion], dict[str, str]]:
    """Each MoE region as a whole-layer region where one is proven (else as it is), consecutive regions
    bounded by each other; and per region path, the mode it got and why."""
    if not regions:
        return [], {}
    graph = regions[0].dispatch.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    regions = sorted(regions, key=lambda r: order[r.dispatch])
    recomputed = [r for r in regions if any(n.meta.get("recompute") is not None for n in r.nodes)]
    if recomputed:
        # Decided from the program (checkpointing is the same on every rank), never from one rank's shapes.
        why = ("moe (token chunks): activation checkpointing recomputes this layer in backward, and with a "
               "symbolic batch Inductor's backward then asserts the recomputed all-to-all's sizes against a "
               "batch size it was not given (torch 2.13: NameError in the generated code); whole-layer "
               "micro-batches are not used under checkpointing")
        return regions, {r.path: why for r in regions}
    chosen: list[MoERegion] = []
    modes: dict[str, str] = {}
    taken: set[fx.Node] = set()
    after = -1
    for r in regions:
        lr, why = layer_start(r, after, taken)
        pick = lr if lr is not None else r
        modes[r.path] = ("layer: " if lr is not None else "moe (token chunks): ") + why
        log.info("domino_ep: %s: %s", r.label, modes[r.path])
        chosen.append(pick)
        taken |= set(pick.nodes) | {pick.tokens}
        after = order[r.combine]
    # bound each region's extension by where the next one starts, so regions stay disjoint
    final: list[MoERegion] = []
    for i, r in enumerate(chosen):
        nxt = chosen[i + 1].tokens if i + 1 < len(chosen) else None
        stop = frozenset(descendants(nxt) - {nxt}) if nxt is not None else frozenset()
        if nxt is not None and set(r.nodes) & stop:
            r2 = grow_region(r.dispatch, r.combine, r.tokens, r.num_tokens, r.top_k, r.count_exchange, r.topk,
                             row_inputs=r.mode == "layer" or bool(r.seeds), stop=stop, mode=r.mode, seeds=r.seeds)
            r2.path, r2.token_matrix = r.path, r.token_matrix
            r = r2
        final.append(r)
    return final, modes
