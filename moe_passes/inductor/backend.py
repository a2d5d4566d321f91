"""``DominoBackend``: the pre-grad pipeline on the Dynamo graph, then Inductor with the post-grad passes.

Dynamo calls the backend once per captured graph (every graph break, every
recompile). For each graph the backend runs the requested pre-grad passes in
their declared order (``moe_passes.pipeline.order``) through the validating,
fail-closed ``PassManager``: ``"torch"``-IR passes on Dynamo's graph, then,
before the first ``"aten"`` pass, the graph re-traced once to the canonical
pre-dispatch ATen IR (``moe_passes.ir.canonical``), which is also what Inductor
then compiles. It optionally verifies the transformed graph against the
original on the example inputs, then hands it to Inductor's ``compile_fx`` with
the post-grad passes the config implies installed as one ``CustomGraphPass``
whose ``uuid()`` combines the passes' uuids, so Inductor's FX graph cache never
serves code compiled with different passes or config.

Post-grad passes learn which AOT graph they see (forward, backward, inference)
from Inductor's own call: the backend wraps ``compile_fx_inner``, which AOT
autograd calls with ``is_backward``/``is_inference``.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import hashlib
import logging
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass

from moe_passes.config import DEFAULT_PASSES, BackendConfig, NumChunks
from moe_passes.cost.memory import estimate_graph
from moe_passes.inductor.graph_breaks import BreakRecorder, ended_by
from moe_passes.inductor.summary import BackendSummary, explain, explain_dict, summarize
from moe_passes.inductor.verify import VerificationError, _verify_skip_reason, verify_graphs  # noqa: F401 - VerificationError: raised here
from moe_passes.ir.facts import collective_nodes, is_all_to_all, is_wait
from moe_passes.ir.graph_text import graph_text
from moe_passes.pipeline.manager import (
    PassManager,
    PassRecord,
    copy_graph_module,
    run_post_grad,
    trace_json_artifact,
    trace_text_artifact,
)
from moe_passes.pipeline.order import load_pass, post_grad_pass_names
from moe_passes.pipeline.pass_base import GraphPass, PassResult

log = logging.getLogger(__name__)



#: The AOT graph Inductor is compiling right now ("forward", "backward", "inference"), set by the
#: backend's ``compile_fx_inner`` wrapper from the ``is_backward``/``is_inference`` AOT passes it.
_GRAPH_KIND: contextvars.ContextVar[str | None] = contextvars.ContextVar("moe_passes_graph_kind", default=None)


def _cache_hits(group: str, key: str) -> int:
    from torch._dynamo.utils import counters

    return int(counters[group][key])


CACHE_NOTE = ("served from Inductor's FX graph cache: the post-grad passes did not run in this process (the compile that "
              "filled the cache made their moves); TORCHINDUCTOR_FX_GRAPH_CACHE=0 re-runs and re-reports them")


def _note_cache(report: GraphReport, kinds: Sequence[str], note: str) -> None:
    for kind in kinds:
        report.cache[kind] = note
    log.info("graph_%d (%s): %s", report.index, "/".join(kinds), note)
    if _tracing_enabled():
        trace_json_artifact(f"moe_passes_graph_{report.index}_cache", lambda: dict(report.cache))


def _inner_compile(gm: fx.GraphModule, example_inputs: Sequence[Any], *args: Any, report: GraphReport | None = None,
                   **kwargs: Any) -> Any:
    """``compile_fx_inner`` that records which AOT graph it compiles, for the post-grad passes, and whether
    Inductor's FX graph cache served it (then no post-grad pass runs, and the report says so)."""
    from torch._inductor.compile_fx import compile_fx_inner

    kind = "backward" if kwargs.get("is_backward") else "inference" if kwargs.get("is_inference") else "forward"
    token = _GRAPH_KIND.set(kind)
    hits = _cache_hits("inductor", "fxgraph_cache_hit")
    try:
        return compile_fx_inner(gm, example_inputs, *args, **kwargs)
    finally:
        _GRAPH_KIND.reset(token)
        if report is not None and _cache_hits("inductor", "fxgraph_cache_hit") > hits:
            _note_cache(report, (kind,), CACHE_NOTE)


def graph_kind(graph: fx.Graph | None = None) -> str:
    """The AOT graph being compiled: "forward", "backward" or "inference" (from Inductor's call);
    "unknown" outside the backend's compile."""
    return _GRAPH_KIND.get() or "unknown"


@dataclass
class GraphReport:
    """Everything the backend did to one Dynamo graph."""

    index: int
    num_nodes: int
    pre_grad: list[PassRecord] = field(default_factory=list)
    post_grad: dict[str, list[PassResult]] = field(default_factory=lambda: {"forward": [], "backward": []})
    ir: str = "torch"  # the IR the graph was compiled in: "torch" (Dynamo's) or "aten" (canonical re-trace)
    canonical_error: str | None = None
    post_grad_graphs: dict[str, dict[str, str]] = field(default_factory=dict)
    post_grad_estimates: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    verify: str | None = None
    #: AOT graph kind -> why its post-grad passes did not run here (served from Inductor's or AOTAutograd's cache)
    cache: dict[str, str] = field(default_factory=dict)
    #: Graph breaks Dynamo took before this graph (``graph_breaks.BreakRecorder.take``): reason, count, the
    #: setting that removes it (``hint``), torch's own hint, where (when it ended this graph)
    graph_breaks: list[dict[str, Any]] = field(default_factory=list)
    #: The break that ended this graph (``gm.compile_subgraph_reason``): reason and where; None at a return
    ended_by: dict[str, str] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "graph": self.index,
            "num_nodes": self.num_nodes,
            "pre_grad": [r.as_dict() for r in self.pre_grad],
            "post_grad": {k: [r.as_dict() for r in v] for k, v in self.post_grad.items()},
            "verify": self.verify,
            "ir": self.ir,
            "canonical_error": self.canonical_error,
            "cache": dict(self.cache),
            "graph_breaks": [dict(b) for b in self.graph_breaks],
            "ended_by": dict(self.ended_by) if self.ended_by else None,
        }


class PostGradPipeline(CustomGraphPass):
    """Post-grad passes as one Inductor custom pass; called on the forward and the backward graph."""

    def __init__(self, passes: Sequence[GraphPass], report: GraphReport, keep_graphs: bool = False,
                 strict: bool = False) -> None:
        self.passes = list(passes)
        self.report = report
        self.keep_graphs = keep_graphs
        self.strict = strict

    def __call__(self, graph: fx.Graph) -> None:
        gm = graph.owning_module
        kind = graph_kind(graph)
        if self.keep_graphs:
            self._keep(kind, "before", gm)
        passes = [p for p in self.passes if kind == "unknown" or kind in p.graphs]
        tracing = _tracing_enabled() and bool(passes)
        stem = f"moe_passes_graph_{self.report.index}_{kind}_post_grad"
        if tracing:
            before_text, before_order = graph_text(gm), [n.name for n in gm.graph.nodes]
            trace_text_artifact(f"{stem}_before", lambda: before_text)
        run_post_grad(passes, gm, self.report.post_grad.setdefault(kind, []).append, strict=self.strict,
                      graph_name=f"graph_{self.report.index} ({kind})")
        if tracing:
            after_text = graph_text(gm)
            trace_text_artifact(f"{stem}_after", lambda: after_text)
            trace_json_artifact(f"{stem}_moves", lambda: _schedule_moves(gm, before_order))
        if self.keep_graphs:
            self._keep(kind, "after", gm)

    def _keep(self, kind: str, when: str, gm: fx.GraphModule) -> None:
        self.report.post_grad_graphs.setdefault(kind, {})[when] = graph_text(gm)
        self.report.post_grad_estimates.setdefault(kind, {})[when] = estimate_graph(gm).as_dict()

    def uuid(self) -> str:
        parts = [p.uuid() for p in self.passes] + [f"keep_graphs={self.keep_graphs}", f"strict={self.strict}"]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()


def _tracing_enabled() -> bool:
    return bool(torch._logging._internal.trace_log.handlers)


def _schedule_moves(gm: fx.GraphModule, before_order: list[str]) -> dict[str, Any]:
    """What the post-grad passes moved: each collective / wait whose position changed, and how many
    other nodes it now has between issue and wait (the structured-trace ``..._moves`` artifact)."""
    nodes = list(gm.graph.nodes)
    after = {n.name: i for i, n in enumerate(nodes)}
    before = {name: i for i, name in enumerate(before_order)}
    comm = [n for n in nodes if is_all_to_all(n) or is_wait(n)]
    moves = [{"node": n.name, "op": str(n.target), "before": before.get(n.name), "after": after[n.name]}
             for n in comm if before.get(n.name) != after[n.name]]
    windows = []
    for n in nodes:
        if is_all_to_all(n):
            waits = [u for u in n.users if is_wait(u)]
            if waits:
                w = min(after[u.name] for u in waits)
                between = sum(1 for m in nodes[after[n.name] + 1: w]
                              if m.op == "call_function" and not is_wait(m) and not is_all_to_all(m))
                windows.append({"all_to_all": n.name, "wait_at": w, "compute_nodes_between": between})
    comm_names = {n.name for n in comm}
    other = sum(1 for n in nodes if n.name not in comm_names and n.name in before and before[n.name] != after[n.name])
    return {"collective_moves": moves, "other_nodes_moved": other, "all_to_all_windows": windows,
            "nodes": len(nodes)}


class DominoBackend:
    """The torch.compile backend object; ``reports`` says what happened to every graph it compiled.

    Reports belong to the backend object: every graph it compiles (each graph break, each
    recompile, of every model compiled with it) appends one ``GraphReport`` to ``graphs``
    until ``clear_reports()``. Make one backend per model (``make_backend(...)``) to keep
    reports apart.

    The process-wide ``moe_passes.domino_backend`` (the object ``backend="domino"``
    resolves to, through the ``torch_dynamo_backends`` entry point) is one such object with
    the default config: it is shared by every ``torch.compile(..., backend="domino")`` in
    the process, so its reports accumulate across models; call
    ``domino_backend.clear_reports()`` between models, or use ``make_backend()``.

    Graph breaks: each report also holds the graph breaks Dynamo took before that graph (the one that
    ended it, and those of frames that compiled no graph), read from
    ``torch._dynamo.utils.counters["graph_break"]`` as a delta against a mark set when the backend is
    created, when its reports are cleared and at each graph (``moe_passes.inductor.graph_breaks`` says
    why that source and how breaks of other compiles in the process are kept out), with the setting
    that removes each (``capture_scalar_outputs``, ...). ``summary()`` and ``explain()`` show them.
    """

    def __init__(
        self,
        config: BackendConfig | None = None,
        keep_graphs: bool = False,
        post_grad: Sequence[GraphPass] | None = None,
    ) -> None:
        """``keep_graphs`` keeps readable pre/post-grad graph texts (the diff CLI); ``post_grad`` overrides
        the post-grad passes the config implies (tests, experiments)."""
        self.config = config if config is not None else BackendConfig()
        self.keep_graphs = keep_graphs
        self.graphs: list[GraphReport] = []
        self._breaks = BreakRecorder()  # process-global counter: only breaks after this mark are ours
        self._pre: list[GraphPass] | None = None
        self._post: list[GraphPass] | None = list(post_grad) if post_grad is not None else None

    def __repr__(self) -> str:
        return f"DominoBackend(passes={self.config.passes}, num_chunks={self.config.num_chunks!r})"

    @property
    def reports(self) -> list[dict[str, Any]]:
        """Per compiled graph: per pass what it matched, changed and skipped; post-grad results fw/bw."""
        return [g.as_dict() for g in self.graphs]

    def summary(self) -> BackendSummary:
        """What every pass did over every graph this backend compiled (since ``clear_reports()``).

        Modelled on ``torch._dynamo.explain``'s output: ``str(backend.summary())`` is the short per-pass
        text (regions chunked, aux-loss layers rewritten and stacked bytes gone, router tensors moved
        to host, all-to-alls overlapped), ``backend.summary().as_dict()`` the same as a dict with, per
        pass, applied/skipped/failed graph counts, what it matched, skip reasons and summed stats.
        """
        return summarize(self.reports)

    def explain(self) -> str:
        """Per pass, what it did where and, where it did not apply, why and what to change.

        For people: per pass (pre-grad, then post-grad) each graph it changed and what it did there
        (regions chunked, layers rewritten, tensors moved to host, all-to-alls overlapped); each graph
        it left alone with the pass's reasons verbatim, grouped where graphs share them, and a ``fix:``
        line where there is something to change: the Dynamo setting that removes a graph break
        (``capture_scalar_outputs``, ``capture_dynamic_output_shape_ops``), what to do when the canonical
        IR was unavailable. Built from ``summary()``'s data (``explain_dict()`` is the same as data).
        """
        return explain(self.summary())

    def explain_dict(self) -> dict[str, Any]:
        """``explain()`` as plain data: graph breaks with hints, and per pass the graphs where it applied
        (what it did) and where it did not (reasons, fixes)."""
        return explain_dict(self.summary())

    def clear_reports(self) -> None:
        """Forget the reports of the graphs compiled so far (later graphs count from 0 again) and the graph
        breaks counted so far."""
        self.graphs.clear()
        self._breaks.reset()

    def pre_grad_passes(self) -> list[GraphPass]:
        """The requested pre-grad passes, in their declared pipeline order."""
        if self._pre is None:
            from moe_passes.pipeline.order import build_pipeline

            self._pre = build_pipeline([load_pass(name, self.config) for name in self.config.passes])
        return self._pre

    def post_grad_passes(self) -> list[GraphPass]:
        if self._post is None:
            self._post = [load_pass(name, self.config) for name in post_grad_pass_names(self.config)]
        return self._post

    def __call__(self, gm: fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        from torch._inductor.compile_fx import compile_fx

        report = GraphReport(index=len(self.graphs), num_nodes=len(gm.graph.nodes))
        report.ended_by = ended_by(gm)
        report.graph_breaks = self._breaks.take(gm)
        self.graphs.append(report)
        pre = self.pre_grad_passes()
        self.post_grad_passes()
        original = copy_graph_module(gm) if self.config.verify and pre else None
        manager = PassManager(
            pre,
            strict=self.config.strict,
            snapshot=self.keep_graphs or _tracing_enabled(),
            graph_name=f"graph_{report.index}",
            order=False,  # already in pipeline order
        )
        had_collectives = bool(collective_nodes(gm.graph))
        run = manager.apply(gm, example_inputs)
        report.pre_grad, report.ir, report.canonical_error = run.records, run.ir, run.canonical_error
        if original is not None:
            report.verify = verify_graphs(original, run.gm, example_inputs, self.config.verify_rtol, self.config.verify_atol)
        elif self.config.verify:
            report.verify = "skipped: no pre-grad passes to verify"
        if self.config.lowering == "aot_eager":
            compiled = torch._dynamo.lookup_backend("aot_eager")(run.gm, example_inputs)
            from moe_passes.inductor.rank_check import wrap_if_needed

            return wrap_if_needed(compiled, run.gm, had_collectives, pre, run.records, f"graph_{report.index}",
                                  getattr(self.config, "rank_check", True))
        aot_hits = _cache_hits("aot_autograd", "autograd_cache_hit")
        compiled = compile_fx(run.gm, example_inputs, inner_compile=functools.partial(_inner_compile, report=report),
                              config_patches=self.inductor_patches(report))
        if _cache_hits("aot_autograd", "autograd_cache_hit") > aot_hits:
            _note_cache(report, ("forward", "backward"), CACHE_NOTE.replace("FX graph cache", "AOTAutograd cache"))
        # Ranks must run graphs with the same collectives: agree on it before every call (rank_check.py).
        from moe_passes.inductor.rank_check import wrap_if_needed

        return wrap_if_needed(compiled, run.gm, had_collectives, pre, run.records, f"graph_{report.index}",
                              getattr(self.config, "rank_check", True))

    def inductor_patches(self, report: GraphReport) -> dict[str, Any]:
        """Inductor config for one compile: the post-grad pipeline plus what its passes need.

        A post-grad pass module may declare ``INDUCTOR_CONFIG`` (e.g. the
        overlap scheduler needs ``reorder_for_peak_memory`` off, or Inductor
        undoes its order); those settings are applied with the pass.
        """
        post = self.post_grad_passes()
        patches: dict[str, Any] = {}
        for graph_pass in post:
            patches.update(getattr(sys.modules[type(graph_pass).__module__], "INDUCTOR_CONFIG", {}))
        if post or self.keep_graphs:
            patches["post_grad_custom_post_pass"] = PostGradPipeline(post, report, self.keep_graphs, self.config.strict)
        return patches


def make_backend(
    num_chunks: NumChunks = "auto",
    passes: Sequence[str] = DEFAULT_PASSES,
    strict: bool = False,
    verify: bool = False,
    keep_graphs: bool = False,
    **kwargs: Any,
) -> DominoBackend:
    """A configured backend: ``torch.compile(model, backend=make_backend(...))``.

    Every option is checked here, before any compile: a bad name or value is a ``ValueError`` naming
    the option and its valid choices. Options (the fields of ``moe_passes.BackendConfig`` plus
    ``keep_graphs``):

    num_chunks: "auto" (default) or an int >= 1: token chunks per MoE region for Domino EP.
    domino_mode: "moe" (default): token chunks of each MoE region; "layer": micro-batches of whole
        sequences through whole decoder layers (attention too), token chunks where the batch cannot be split.
    passes: pre-grad passes to run, any of "layerwise_aux_loss", "domino_ep", "async_offload"
        (default: all three); their order is declared by the passes, not by this list.
    strict: False (default): a pass that fails is rolled back and one that finds nothing where its
        trigger is present logs why; True: both raise.
    verify: False (default); True: run the original and the transformed graph on the example inputs
        and raise ``VerificationError`` naming each output or input gradient (by parameter path or
        argument name) that differs.
    keep_graphs: False (default); True: keep readable pre/post-grad graph texts in the reports.
    schedule_overlap: True (default): the post-grad overlap schedule runs after ``domino_ep``, on the
        forward and backward graphs (with activation checkpointing Domino's peak stays within 1.1x of
        checkpointing alone: the recomputation runs just in time); "forward": on the forward graphs only;
        False: off.
    max_chunks_in_flight: int >= 1 (default 2): row all-to-alls issued but not yet waited (count exchanges not counted).
    defer_weight_grads: False (default); True: the backward schedule runs weight-gradient GEMMs (those feeding
        parameter gradients only) inside open all-to-all windows, else late; needs schedule_overlap=True.
        The report gives per backward graph where each went and the bytes held for them.
    offload_targets: "auto" (default: every router tensor among the graph outputs) or a tuple of
        kinds: "router_logits", "selected_experts".
    verify_rtol, verify_atol: None (default): per compared tensor from its dtype (torch's
        ``assert_close`` table: bf16 1.6e-2 / 1e-5, fp16 1e-3 / 1e-5; fp32 1e-4 / 1e-5), relative to
        the tensor's largest value; numbers >= 0: used as given, element by element.
    rank_check: True (default): before every call of a graph whose collectives a pass changed, the
        ranks agree (one 32-byte all_gather) that they run the same collective sequence and raise
        ``RankDivergenceError`` naming each rank's pass decisions otherwise (never a hang); False: off.
    lowering: "inductor" (default); "aot_eager": AOTAutograd without Inductor (no post-grad passes),
        to tell the passes' numerics apart from Inductor's.
    extra: (name, value) pairs or a dict of experimental options (hashable values).
    """
    known = {f.name for f in dataclasses.fields(BackendConfig)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ValueError(f"unknown backend option(s) {unknown}; known options: {sorted(known | {'keep_graphs'})}")
    if not isinstance(keep_graphs, bool):
        raise ValueError(f"keep_graphs must be True or False, got {keep_graphs!r}")
    config = BackendConfig(num_chunks=num_chunks, passes=passes,  # type: ignore[arg-type]
                           strict=strict, verify=verify, **kwargs)
    return DominoBackend(config, keep_graphs=keep_graphs)


domino_backend = make_backend()
"""The process-wide backend with the default config (``backend="domino"``); see ``DominoBackend`` about
its shared reports and ``clear_reports()``."""
