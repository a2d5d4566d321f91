"""The ``domino_ep`` pass: chunk every proven expert-parallel MoE region into N token chunks.

Runs on the canonical pre-dispatch ATen IR (``ir = "aten"``).  Each chunk
routes, exchanges counts, dispatches, computes and combines only its own rows
of the token matrix, so dropless routing stays exact and the all-to-all of one
chunk can be overlapped with the expert GEMMs of another (``schedule.py``
fixes that order after AOT autograd, which derives the chunked backward).

Regions come from data flow (``regions``), safety from op meaning
(``kinds``), and the rewrite checks itself after re-propagating shapes
(``rewrite``); any failure leaves the graph untouched and says why.
"""

from __future__ import annotations

import logging
from typing import Any

import torch.fx as fx
from torch._inductor.pattern_matcher import stable_topological_sort

from moe_passes.cost.overlap import Rates, choose_chunks, describe, load_rates
from moe_passes.errors import error_summary
from moe_passes.fx.domino.layers import layer_regions
from moe_passes.fx.domino.regions import MoERegion, RegionError, build_region, describe_trigger, hop_all_to_alls, pair_all_to_alls
from moe_passes.fx.domino.rewrite import (
    assert_data_dependent_rows,
    check_rows,
    refresh_assert_messages,
    rewrite_region,
    size_values,
)
from moe_passes.fx.domino.work import region_work
from moe_passes.ir.canonical import is_canonical
from moe_passes.ir.facts import copy_node_attributes, known_equal, tensor_value
from moe_passes.ir.fake_mode import repropagate
from moe_passes.ir.rows import NotRowLocal
from moe_passes.pipeline.pass_base import GraphPass, PassResult

log = logging.getLogger(__name__)


def find_regions(gm: fx.GraphModule, result: PassResult) -> list[MoERegion]:
    """Every EP region proven safe to chunk; every other candidate is reported with its reason."""
    for hop in hop_all_to_alls(gm.graph):
        kind = getattr(hop.target, "__name__", None) or str(hop.target)
        result.skip(f"{hop.name}", f"an all-to-all inside {kind} (a custom autograd Function or other "
                    "higher-order op, kept opaque so its own backward survives): its rows are not analysed, the "
                    "region it belongs to is left alone")
    pairs, unpaired = pair_all_to_alls(gm.graph)
    regions: list[MoERegion] = []
    for d, c in pairs:
        label = f"all_to_all {d.name}/{c.name}"
        try:
            regions.append(build_region(d, c))
        except RegionError as e:
            result.skip(label, str(e))
    if unpaired:
        result.skip(f"all_to_all {[n.name for n in unpaired]}", "token all-to-all without a mirrored combine all-to-all")
    return regions


def _tokens_here(region: MoERegion) -> int | None:
    """This rank's token count in the region (static sizes only; reports, never decisions)."""
    if region.mode == "moe":
        return region.num_tokens if isinstance(region.num_tokens, int) else None
    v = tensor_value(region.tokens)
    t = v.shape[0] * v.shape[1] if v is not None and v.dim() > 1 else None
    return t if isinstance(t, int) else None


def _auto_chunks(region: MoERegion, rates: Rates) -> tuple[int, str, dict[str, Any]]:
    """N from the cost model (``moe_passes.cost.overlap``): rank-invariant work per token, calibrated rates."""
    work = region_work(region)
    if work is None:
        return 2, "2 chunks (the cost model could not size this region: a symbolic feature size)", {}
    n, choice = choose_chunks(work, rates, _tokens_here(region))
    return n, describe(choice), choice


def _prediction(region: MoERegion, n: int, rates: Rates) -> dict[str, Any]:
    """The cost model's view of a region chunked into ``n`` (fixed ``num_chunks``): work and bytes per token,
    and at this rank's token count the predicted forward compute / communication / exposure."""
    work = region_work(region)
    if work is None:
        return {}
    out: dict[str, Any] = {"chunks": n, "flops_per_token": work.flops_per_token, "bytes_per_token": work.bytes_per_token,
                           "world_size": work.world_size, "rates": rates.source}
    tokens = _tokens_here(region)
    if tokens:
        out["here"] = {"tokens": tokens, **work.predict(tokens, n, rates)}
    return out


class DominoEPPass(GraphPass):
    """Chunk every proven expert-parallel MoE region into ``config.num_chunks`` token chunks.

    Rank-invariant collectives (a hard rule): every rank must issue the same collectives in the same
    order, so whether a region is chunked and into how many chunks depends only on what every rank
    shares: the program, weight shapes (``num_chunks="auto"``: the cost model at a reference token count,
    with the rates calibrated on this machine) and the config, never on one rank's
    token count, data or recompile history. A symbolic token count (``dynamic=True``,
    ``mark_dynamic``, Dynamo's automatic-dynamic recompile) is chunked like a static one, with the
    chunk sizes computed in the graph as SymInt expressions (``(T + N - 1 - k) // N``: the last
    chunks may be smaller, or empty when ``T < N``; empty chunks still issue their collectives).
    Where a decision could still differ between ranks the backend's rank check
    (``moe_passes.inductor.rank_check``) fails fast instead of letting the collectives mismatch.
    """

    name = "domino_ep"
    #: The pass changes the graph's collective sequence (the backend's rank check agrees on it).
    changes_collectives = True
    stage = "pre_grad"
    ir = "aten"
    # The aux-loss pass recognises each layer's router logits as one row-local tensor; after
    # chunking they are a concatenation of chunks, so it runs first.
    runs_after = ("layerwise_aux_loss",)

    def uuid(self) -> str:
        """The package and config (``GraphPass.uuid``), and with ``num_chunks="auto"`` the cost model's rates:
        a graph chunked with other rates must not be served from Inductor's cache."""
        base = super().uuid()
        if self.config.num_chunks != "auto":
            return base
        import hashlib

        rates = [load_rates(d) for d in ("cpu", "cuda")]
        return hashlib.sha256(f"{base}|{[(r.flops_per_s, r.bytes_per_s, r.latency_s) for r in rates]}".encode()).hexdigest()

    def trigger(self, gm: fx.GraphModule) -> str | None:
        """The all-to-alls the graph holds (any spelling), or None."""
        return describe_trigger(gm.graph)

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        result = PassResult(self.name)
        result.stats["regions"] = 0
        result.stats["chunks"] = {}
        if describe_trigger(gm.graph) is None:
            return result
        if not is_canonical(gm):
            raise ValueError(f"{self.name} reads the canonical ATen IR; this graph is Dynamo's torch-level graph. "
                             "Run it through moe_passes.pipeline.manager.PassManager (or moe_passes.testing.run_pass), "
                             "which re-traces it first")
        regions = find_regions(gm, result)
        if self.config.domino_mode == "layer" and regions:
            regions, modes = layer_regions(regions)
            result.stats["modes"] = modes
        result.stats["regions"] = len(regions)
        if not regions:
            return result
        # Rewrite a copy; keep it only if every chunk checks out after re-propagation.
        new_graph = fx.Graph(owning_module=gm)
        val_map: dict[fx.Node, fx.Node] = {}
        out = new_graph.graph_copy(gm.graph, val_map)
        new_graph.output(out)
        new_graph._codegen = gm.graph._codegen
        copy_node_attributes(gm.graph, new_graph)
        planned: list[tuple[MoERegion, int, str]] = []
        rates = load_rates(_device_of(gm))
        for region in regions:
            if self.config.num_chunks == "auto":
                n, why, choice = _auto_chunks(region, rates)
                result.stats.setdefault("auto", {})[region.path] = why
                if choice:
                    result.stats.setdefault("predicted", {})[region.path] = choice
                log.info("domino_ep: %s: auto num_chunks: %s", region.label, why)
            else:
                n = int(self.config.num_chunks)
                prediction = _prediction(region, n, rates)
                if prediction:
                    result.stats.setdefault("predicted", {})[region.path] = prediction
            if n == 1:
                result.skip(region.label, "num_chunks=1: nothing to split")
                continue
            planned.append((region, n, region.label))
        if not planned:
            return result
        reassembled_all = []
        joins: dict[fx.Node, Any] = {}
        replaced: dict[fx.Node, fx.Node] = {}
        prev: tuple[Any, int] | None = None  # (token count, N) of the previous region
        for region, n, _label in planned:
            if region.guards:  # the inputs' rows equal X's only under these guards (regions._guard_same_rows)
                result.stats.setdefault("guards", {})[region.path] = list(region.guards)
                log.info("domino_ep: %s: guarded %s (Dynamo recompiles when they fail)", region.label, "; ".join(region.guards))
            mapped = _map_region(region, val_map)
            # X may be the previous region's output (whole-layer regions in a row): run chunk to chunk
            join = joins.get(mapped.tokens) if prev is not None and prev[1] == n and known_equal(prev[0], mapped.num_tokens) else None
            if mapped.tokens in replaced:
                mapped.kinds[replaced[mapped.tokens]] = mapped.kinds[mapped.tokens]
                mapped.tokens = replaced[mapped.tokens]
            mapped.row_inputs = {replaced.get(a, a): k for a, k in mapped.row_inputs.items()}
            if join is not None:
                result.stats.setdefault("joined", []).append(region.path)
            sizes, reassembled = rewrite_region(new_graph, mapped, n, join=join, joins=joins, replaced=replaced)
            prev = (mapped.num_tokens, n)
            reassembled_all.append((sizes, reassembled))
            result.matched.append(region.path)
            result.stats["chunks"][region.path] = sizes
        old_graph = gm.graph
        # A chunk whose rows do not check out after re-propagation is a refusal (NotRowLocal: the original
        # graph stays, every planned region is skipped with the reason). Any other exception is a bug: it
        # propagates to the pass manager, the one place that fails closed (graph restored, traceback in
        # PassResult.error, raised under strict).
        try:
            stable_topological_sort(new_graph)
            new_graph.lint()
            gm.graph = new_graph
            gm.recompile()
            _repropagate(gm)  # fresh unbacked symbols per chunk, bound on their nodes
            if any([assert_data_dependent_rows(gm.graph, r, s) for s, r in reassembled_all]):
                gm.recompile()
                _repropagate(gm)
            for sizes, reassembled in reassembled_all:
                check_rows(reassembled, sizes)
            for node in gm.graph.nodes:  # graph nodes in meta would travel into AOTAutograd's copies
                node.meta.pop("domino_rows", None)
            for region, n, _label in planned:
                sizes = result.stats["chunks"][region.path]
                if any(isinstance(c, fx.Node) for c in sizes):  # report the expressions the size nodes compute
                    result.stats["chunks"][region.path] = [str(v) for v in size_values(sizes)]
                    result.stats.setdefault("symbolic", {})[region.path] = (
                        f"symbolic token count {region.num_tokens}: {n} chunks of SymInt sizes "
                        f"{result.stats['chunks'][region.path]} computed in the graph")
            refresh_assert_messages(gm.graph)
            gm.recompile()
        except NotRowLocal as e:
            gm.graph = old_graph
            gm.recompile()
            reason = f"rewrite failed its own check ({error_summary(e)})"
            log.warning("domino_ep: %s", reason)
            for _region, _, label in planned:
                result.skip(label, reason)
            result.matched.clear()
            result.stats["chunks"] = {}
            return result
        for region, _n, label in planned:
            log.info("domino_ep: %s: %s tokens split into chunks %s", label, region.num_tokens, result.stats["chunks"][region.path])
        result.changed = True
        return result


def _device_of(gm: fx.GraphModule) -> str:
    """"cuda" when the graph's inputs live on a GPU, else "cpu" (which calibrated rates apply)."""
    for n in gm.graph.nodes:
        v = tensor_value(n) if n.op == "placeholder" else None
        if v is not None and v.device.type != "meta":
            return v.device.type
    return "cpu"


def _repropagate(gm: fx.GraphModule) -> None:
    """Shapes of the rewritten graph, size-oblivious: a chunk size whose hint is 1 (``(B + 1) // 2`` for
    B = 2 sequences) is not taken for a literal 1 by a contiguity check (which would record a guard
    ``Eq((B + 1) // 2, 1)`` and simplify the chunk's shapes to 1 row)."""
    import torch.fx.experimental._config as shape_config

    with shape_config.patch(backed_size_oblivious=True):
        repropagate(gm, record=True)


def _map_region(region: MoERegion, val_map: dict[fx.Node, fx.Node]) -> MoERegion:
    m = MoERegion(region.path, val_map[region.tokens], val_map[region.dispatch], val_map[region.combine],
                  val_map.get(region.count_exchange) if region.count_exchange is not None else None,
                  region.num_tokens, region.top_k)
    m.nodes = [val_map[n] for n in region.nodes]
    m.outputs = [val_map[n] for n in region.outputs]
    m.kinds = {val_map[n]: k for n, k in region.kinds.items() if n in val_map}
    m.extra = list(region.extra)
    m.mode = region.mode
    m.row_inputs = {val_map[a]: k for a, k in region.row_inputs.items()}
    m.token_matrix = val_map.get(region.token_matrix) if region.token_matrix is not None else None
    m.topk = val_map.get(region.topk) if region.topk is not None else None
    m.seeds = tuple(val_map[a] for a in region.seeds)
    m.guards = list(region.guards)
    return m

