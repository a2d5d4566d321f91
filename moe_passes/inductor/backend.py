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
import hashlib
import logging
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._pytree import tree_leaves

from moe_passes.config import DEFAULT_PASSES, BackendConfig, NumChunks
from moe_passes.ir.graph_text import graph_text
from moe_passes.cost.memory import estimate_graph
from moe_passes.pipeline.pass_base import GraphPass, PassResult
from moe_passes.pipeline.manager import PassManager, PassRecord, copy_graph_module, run_post_grad
from moe_passes.pipeline.order import load_pass, post_grad_pass_names
from moe_passes.ir.facts import collective_nodes

log = logging.getLogger(__name__)


class VerificationError(RuntimeError):
    """``verify=True`` and the transformed graph computes something else than the original."""


#: The AOT graph Inductor is compiling right now ("forward", "backward", "inference"), set by the
#: backend's ``compile_fx_inner`` wrapper from the ``is_backward``/``is_inference`` AOT passes it.
_GRAPH_KIND: contextvars.ContextVar[str | None] = contextvars.ContextVar("moe_passes_graph_kind", default=None)


def _inner_compile(gm: fx.GraphModule, example_inputs: Sequence[Any], *args: Any, **kwargs: Any) -> Any:
    """``compile_fx_inner`` that records which AOT graph it compiles, for the post-grad passes."""
    from torch._inductor.compile_fx import compile_fx_inner

    kind = "backward" if kwargs.get("is_backward") else "inference" if kwargs.get("is_inference") else "forward"
    token = _GRAPH_KIND.set(kind)
    try:
        return compile_fx_inner(gm, example_inputs, *args, **kwargs)
    finally:
        _GRAPH_KIND.reset(token)


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

    def as_dict(self) -> dict[str, Any]:
        return {
            "graph": self.index,
            "num_nodes": self.num_nodes,
            "pre_grad": [r.as_dict() for r in self.pre_grad],
            "post_grad": {k: [r.as_dict() for r in v] for k, v in self.post_grad.items()},
            "verify": self.verify,
            "ir": self.ir,
            "canonical_error": self.canonical_error,
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
        run_post_grad(passes, gm, self.report.post_grad.setdefault(kind, []).append, strict=self.strict,
                      graph_name=f"graph_{self.report.index} ({kind})")
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
        self._pre: list[GraphPass] | None = None
        self._post: list[GraphPass] | None = list(post_grad) if post_grad is not None else None

    def __repr__(self) -> str:
        return f"DominoBackend(passes={self.config.passes}, num_chunks={self.config.num_chunks!r})"

    @property
    def reports(self) -> list[dict[str, Any]]:
        """Per compiled graph: per pass what it matched, changed and skipped; post-grad results fw/bw."""
        return [g.as_dict() for g in self.graphs]

    def clear_reports(self) -> None:
        """Forget the reports of the graphs compiled so far (later graphs count from 0 again)."""
        self.graphs.clear()

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
        run = manager.apply(gm, example_inputs)
        report.pre_grad, report.ir, report.canonical_error = run.records, run.ir, run.canonical_error
        if original is not None:
            report.verify = verify_graphs(original, run.gm, example_inputs, self.config.verify_rtol, self.config.verify_atol)
        elif self.config.verify:
            report.verify = "skipped: no pre-grad passes to verify"
        return compile_fx(run.gm, example_inputs, inner_compile=_inner_compile,
                          config_patches=self.inductor_patches(report))

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


def _concrete_inputs(example_inputs: Sequence[Any]) -> tuple[list[Any], str | None]:
    """Example inputs with symbolic scalars replaced by their hints (dynamic shapes hand the backend
    ``SymInt`` sizes); the reason verification cannot run, if one is fake or has no hint."""
    out: list[Any] = []
    for i, x in enumerate(example_inputs):
        if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            if not x.node.has_hint():
                return [], f"example input {i} is a symbolic {type(x).__name__} without a hint"
            x = x.node.hint
        elif isinstance(x, FakeTensor):
            return [], f"example input {i} is fake ({type(x).__name__}); verification needs real values"
        elif isinstance(x, torch.Tensor) and x.is_meta:
            return [], f"example input {i} is on the meta device"
        out.append(x)
    return out, None


def _verify_skip_reason(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> str | None:
    if collective_nodes(gm.graph):
        if not dist.is_initialized():
            return "graph has collectives but no process group is initialised"
        if dist.get_backend() == "fake":
            return "graph has collectives on the fake process group, whose results are hallucinated"
    return None


def _clone_inputs(example_inputs: Sequence[Any]) -> list[Any]:
    return [
        x.detach().clone().requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) else x for x in example_inputs
    ]


@torch._dynamo.disable
def _run_with_grads(gm: fx.GraphModule, inputs: list[Any], seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(seed)
        outs = [t for t in tree_leaves(gm(*inputs)) if isinstance(t, torch.Tensor)]
    diff_outs = [o for o in outs if o.requires_grad and o.is_floating_point()]
    wrt = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    grads: list[torch.Tensor | None] = []
    if diff_outs and wrt:
        gen = torch.Generator().manual_seed(seed + 1)
        cotangents = [torch.randn(o.shape, generator=gen, dtype=o.dtype).to(o.device) for o in diff_outs]
        grads = list(torch.autograd.grad(diff_outs, wrt, cotangents, allow_unused=True))
    return [o.detach() for o in outs], grads


def verify_graphs(
    original: fx.GraphModule, transformed: fx.GraphModule, example_inputs: Sequence[Any], rtol: float, atol: float
) -> str:
    """Run both graphs on clones of the example inputs; compare outputs and input gradients.

    Every rank must verify (the config is the same everywhere), so collectives
    are issued in the same order on all ranks. Returns "ok" or the skip reason;
    raises ``VerificationError`` on a mismatch.
    """
    example_inputs, reason = _concrete_inputs(example_inputs)
    reason = reason or _verify_skip_reason(original, example_inputs)
    if reason is not None:
        log.info("verify skipped: %s", reason)
        return f"skipped: {reason}"
    seed = 1234
    ref_out, ref_grads = _run_with_grads(original, _clone_inputs(example_inputs), seed)
    new_out, new_grads = _run_with_grads(transformed, _clone_inputs(example_inputs), seed)
    problems: list[str] = []
    if len(ref_out) != len(new_out):
        problems.append(f"{len(new_out)} outputs instead of {len(ref_out)}")
    for what, refs, news in (("output", ref_out, new_out), ("gradient of input", ref_grads, new_grads)):
        for i, (r, n) in enumerate(zip(refs, news)):
            if r is None and n is None:
                continue
            try:
                torch.testing.assert_close(n, r, rtol=rtol, atol=atol, equal_nan=True)
            except (AssertionError, TypeError) as e:
                problems.append(f"{what} {i}: {str(e).strip().splitlines()[0]} ({str(e).strip().splitlines()[-1]})")
    if problems:
        raise VerificationError("transformed graph differs from the original:\n  - " + "\n  - ".join(problems))
    log.info("verify: transformed graph matches the original (%d outputs, %d gradients)", len(ref_out), len(ref_grads))
    return "ok"


def make_backend(
    num_chunks: NumChunks = "auto",
    passes: Sequence[str] = DEFAULT_PASSES,
    strict: bool = False,
    verify: bool = False,
    keep_graphs: bool = False,
    **kwargs: Any,
) -> DominoBackend:
    """A configured backend; keyword arguments are ``BackendConfig`` fields (validated here)."""
    known = {f.name for f in dataclasses.fields(BackendConfig)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ValueError(f"unknown backend option(s) {unknown}; known options: {sorted(known | {'keep_graphs'})}")
    config = BackendConfig(num_chunks=num_chunks, passes=passes,  # type: ignore[arg-type]
                           strict=strict, verify=verify, **kwargs)
    return DominoBackend(config, keep_graphs=keep_graphs)


domino_backend = make_backend()
"""The process-wide backend with the default config (``backend="domino"``); see ``DominoBackend`` about
its shared reports and ``clear_reports()``."""
