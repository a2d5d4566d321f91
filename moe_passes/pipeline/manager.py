"""Runs the pre-grad pipeline on one Dynamo graph: canonical IR, validation, fail-closed.

The passes run in the order ``moe_passes.pipeline.order`` derives from their
declarations. Before the first pass that declares ``ir = "aten"`` the graph is
re-traced once to the canonical pre-dispatch ATen IR
(``moe_passes.ir.canonical.canonicalize``); that pass and every later one run on
the canonical graph, which is what the backend hands to Inductor. If the
re-trace is impossible the ``"aten"`` passes are skipped with its reason.

A pass that leaves a malformed graph must fail *here*, naming the pass, not
three layers down inside AOT autograd or Inductor: after each pass the manager
runs ``moe_passes.pipeline.validation.validate`` (lint, calling convention, dead nodes,
fake-tensor re-propagation in the graph's own fake mode, output signature).

**Fail closed.** A pass that raises, returns something that is not a
``PassResult`` or leaves an invalid graph never takes the user's compile down:
the graph is restored from the copy taken before the pass, the graph compiles
without it, and the error (with its traceback) goes to the pass's record and to
the log at WARNING. ``strict=True`` raises instead.

**Strict.** A pass that changes nothing in a graph holding its trigger
(``GraphPass.trigger``) logs its skip reasons at WARNING; ``strict=True`` raises
``StrictModeError`` for such graphs only (never for a graph without the trigger,
e.g. the first graph of a model with a graph break).

Before/after texts are snapshotted, logged under this module's logger and
emitted as structured-trace artifacts (``TORCH_TRACE=dir`` + ``tlparse``):
``moe_passes_<graph>_<pass>_before`` / ``_after`` (graph text) and, for every
pass, pre- and post-grad, ``moe_passes_<graph>_<pass>_report`` (JSON: matched,
changed, skipped with reasons, stats, validation notes, IR, trigger, error).
"""

from __future__ import annotations

import copy
import json
import logging
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from moe_passes.config import BackendConfig
from moe_passes.errors import error_summary, first_line
from moe_passes.ir.canonical import canonicalize, is_canonical
from moe_passes.ir.facts import copy_node_attributes, static_nbytes
from moe_passes.ir.graph_text import graph_text
from moe_passes.pipeline.order import PassUnavailableError, build_pipeline, load_pass
from moe_passes.pipeline.pass_base import GraphPass, PassResult
from moe_passes.pipeline.validation import (
    REPROPAGATION_UNAVAILABLE,
    GraphState,
    copy_graph_module,
    repropagate,
    validate,
)

log = logging.getLogger(__name__)

__all__ = [
    "PassFailedError",
    "PassManager",
    "PassRecord",
    "PassUnavailableError",
    "PassValidationError",
    "PipelineRun",
    "REPROPAGATION_UNAVAILABLE",
    "GraphState",
    "StrictModeError",
    "copy_graph_module",
    "load_pass",
    "repropagate",
    "run_post_grad",
    "trace_json_artifact",
    "trace_text_artifact",
    "validate",
]


class PassValidationError(RuntimeError):
    """A pass left a graph that fails validation; names the pass and every problem found."""


class PassFailedError(RuntimeError):
    """A pass raised while rewriting a graph; names the pass and the graph (the original error is the cause)."""


class StrictModeError(RuntimeError):
    """``strict=True`` and a requested pass found nothing it could safely apply in a graph holding its trigger."""


def _trace_artifact(name: str, text: str) -> None:
    torch._logging.trace_structured(
        "artifact",
        metadata_fn=lambda: {"name": name, "encoding": "string"},
        payload_fn=lambda: text,
    )


def trace_json_artifact(name: str, payload: Callable[[], Any]) -> None:
    """A structured-trace artifact (``TORCH_TRACE=dir``; ``tlparse`` shows it) holding JSON.

    ``payload`` is called only when trace logging is on, so building a report costs nothing otherwise.
    """
    torch._logging.trace_structured(
        "artifact",
        metadata_fn=lambda: {"name": name, "encoding": "json"},
        payload_fn=lambda: json.dumps(payload(), default=str, indent=1),
    )


def trace_text_artifact(name: str, text: Callable[[], str]) -> None:
    """A structured-trace artifact holding text (a graph), built only when trace logging is on."""
    torch._logging.trace_structured(
        "artifact",
        metadata_fn=lambda: {"name": name, "encoding": "string"},
        payload_fn=text,
    )


@dataclass
class PassRecord:
    """One pass on one graph: its result, the IR it ran on, validation outcome and before/after text."""

    name: str
    result: PassResult
    seconds: float
    notes: list[str] = field(default_factory=list)
    before: str | None = None
    after: str | None = None
    ir: str = "torch"
    trigger: str | None = None
    #: Tensor values the pass removed from the graph (nodes before it that are gone after it): count and
    #: bytes at their size hints. For ``layerwise_aux_loss`` these are the stacked ``[L*T, ...]`` tensors.
    removed: dict[str, int] | None = None

    def as_dict(self, with_text: bool = False) -> dict[str, Any]:
        d = {
            **self.result.as_dict(),
            "ir": self.ir,
            "trigger": self.trigger,
            "seconds": round(self.seconds, 4),
            "validation_notes": list(self.notes),
        }
        if self.removed is not None:
            d["removed_values"] = dict(self.removed)
        if with_text:
            d["before"], d["after"] = self.before, self.after
        return d


@dataclass
class PipelineRun:
    """The outcome of the pre-grad pipeline on one graph: the graph to compile and one record per pass."""

    gm: fx.GraphModule
    records: list[PassRecord]
    ir: str  # "torch" or "aten": the IR ``gm`` is in
    canonical_error: str | None = None  # why the canonical re-trace was impossible, if it was


class PassManager:
    """Runs passes in their declared pipeline order, validating and snapshotting after each one."""

    def __init__(
        self,
        passes: Sequence[GraphPass],
        strict: bool = False,
        snapshot: bool = True,
        validate: bool = True,
        graph_name: str = "graph",
        order: bool = True,
    ) -> None:
        """``order=False`` keeps ``passes`` in the given order (tests of the manager itself)."""
        self.passes = build_pipeline(list(passes)) if order else list(passes)
        self.strict = strict
        self.snapshot = snapshot
        self.validate = validate
        self.graph_name = graph_name

    @classmethod
    def from_config(cls, config: BackendConfig, **kwargs: Any) -> "PassManager":
        return cls([load_pass(name, config) for name in config.passes], strict=config.strict, **kwargs)

    def run(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> list[PassRecord]:
        """Records only; if an ``"aten"`` pass re-traced the graph, the result lives in ``apply(...).gm``."""
        return self.apply(gm, example_inputs).records

    def apply(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> PipelineRun:
        records: list[PassRecord] = []
        current = gm
        ir = "aten" if is_canonical(gm) else "torch"
        canonical_error: str | None = None
        text = graph_text(current) if self.snapshot else None
        for graph_pass in self.passes:
            if graph_pass.ir == "aten" and ir == "torch" and canonical_error is None:
                start = time.perf_counter()
                canon = canonicalize(current, example_inputs)
                if canon.canonical:
                    current, ir = canon.gm, "aten"
                    text = graph_text(current) if self.snapshot else None
                    log.info("%s: re-traced to canonical ATen IR for %s (%.3fs)", self.graph_name, graph_pass.name,
                             time.perf_counter() - start)
                else:
                    canonical_error = canon.reason or "unknown reason"
            if graph_pass.ir == "aten" and ir != "aten":
                records.append(self._skip_no_canonical(graph_pass, current, canonical_error or ""))
                self._trace_report(records[-1], canonical_error)
                continue
            record = self._run_one(graph_pass, current, example_inputs, text, ir)
            records.append(record)
            self._trace_report(record, canonical_error)
            text = record.after
        return PipelineRun(current, records, ir, canonical_error)

    def _trace_report(self, record: PassRecord, canonical_error: str | None) -> None:
        """The pass's report as a structured-trace artifact beside its before/after graphs:
        ``moe_passes_<graph>_<pass>_report`` (matched, changed, skipped with reasons, stats, validation
        notes, the IR it ran on, its trigger, the error if it failed)."""
        trace_json_artifact(
            f"moe_passes_{self.graph_name}_{record.name}_report",
            lambda: {"graph": self.graph_name, "stage": "pre_grad", **record.as_dict(),
                     **({"canonical_error": canonical_error} if canonical_error else {})},
        )

    def _skip_no_canonical(self, graph_pass: GraphPass, gm: fx.GraphModule, reason: str) -> PassRecord:
        result = PassResult(graph_pass.name)
        result.skip("graph", f"canonical ATen IR unavailable: {reason}")
        trigger = self._trigger(graph_pass, gm)
        log.warning("%s on %s: not run, canonical ATen IR unavailable: %s", graph_pass.name, self.graph_name, reason)
        if self.strict and trigger is not None:
            raise StrictModeError(
                f"strict: pass {graph_pass.name!r} cannot run on {self.graph_name} ({trigger}): "
                f"canonical ATen IR unavailable: {reason}"
            )
        return PassRecord(graph_pass.name, result, 0.0, ir="unavailable", trigger=trigger)

    def _trigger(self, graph_pass: GraphPass, gm: fx.GraphModule) -> str | None:
        try:
            return graph_pass.trigger(gm)
        except Exception as e:  # a broken trigger must not take the compile down either
            log.warning("%s on %s: trigger() raised %s: %s", graph_pass.name, self.graph_name, type(e).__name__, e)
            return f"unknown (trigger() raised {type(e).__name__})"

    def _fail(self, graph_pass: GraphPass, gm: fx.GraphModule, before: GraphState | None, error: BaseException,
              start: float, before_text: str | None, ir: str, trigger: str | None) -> PassRecord:
        """Fail closed: restore the graph, report the error with its traceback, or raise under strict."""
        if before is not None:
            before.restore(gm)
        if self.strict:
            raise error
        tb = "".join(traceback.format_exception(error))
        log.warning("%s on %s failed; the graph compiles without it:\n%s", graph_pass.name, self.graph_name, tb)
        result = PassResult(graph_pass.name)
        result.error = tb
        result.skip("graph", f"pass failed, graph restored: {first_line(error)}")
        return PassRecord(graph_pass.name, result, time.perf_counter() - start, [], before_text, before_text, ir, trigger)

    def _run_one(self, graph_pass: GraphPass, gm: fx.GraphModule, example_inputs: Sequence[Any],
                 before_text: str | None, ir: str) -> PassRecord:
        name = graph_pass.name
        trigger = self._trigger(graph_pass, gm)
        # The copy is the roll-back point too, so it is taken even without validation.
        before = GraphState.of(gm)
        start = time.perf_counter()
        try:
            result = graph_pass(gm)
            gm.recompile()
        except Exception as e:
            err = PassFailedError(f"pass {name!r} failed on {self.graph_name}: {error_summary(e)}")
            err.__cause__ = e
            err.__traceback__ = e.__traceback__
            return self._fail(graph_pass, gm, before, err, start, before_text, ir, trigger)
        seconds = time.perf_counter() - start
        if not isinstance(result, PassResult):
            err = PassValidationError(f"pass {name!r} returned {type(result).__name__}, expected PassResult")
            return self._fail(graph_pass, gm, before, err, start, before_text, ir, trigger)
        notes: list[str] = []
        if self.validate:
            problems, notes = validate(gm, before, example_inputs)
            if problems:
                err = PassValidationError(
                    f"pass {name!r} left an invalid graph in {self.graph_name}:\n  - " + "\n  - ".join(problems)
                )
                return self._fail(graph_pass, gm, before, err, start, before_text, ir, trigger)
        after_text = graph_text(gm) if self.snapshot else None
        if before_text is not None and after_text is not None:
            _trace_artifact(f"moe_passes_{self.graph_name}_{name}_before", before_text)
            _trace_artifact(f"moe_passes_{self.graph_name}_{name}_after", after_text)
        log.info(
            "%s on %s (%s IR): changed=%s matched=%s stats=%s skipped=%d (%.3fs)",
            name, self.graph_name, ir, result.changed, result.matched, result.stats, len(result.skipped), seconds,
        )
        for note in notes:
            log.info("%s on %s: %s", name, self.graph_name, note)
        if not result.changed and trigger is not None:
            reasons = "; ".join(f"{s.region}: {s.reason}" for s in result.skipped) or "no candidate region found"
            if self.strict:
                raise StrictModeError(
                    f"strict: pass {name!r} found nothing it can safely apply in {self.graph_name} "
                    f"holding {trigger} ({reasons})"
                )
            log.warning("%s changed nothing in %s although it holds %s: %s", name, self.graph_name, trigger, reasons)
        removed = _removed_values(before.gm, gm) if result.changed else {"count": 0, "bytes": 0}
        return PassRecord(name, result, seconds, notes, before_text, after_text, ir, trigger, removed)


def _removed_values(before: fx.GraphModule, after: fx.GraphModule) -> dict[str, int]:
    """Tensor values computed in ``before`` whose nodes ``after`` no longer has (count, bytes at size hints)."""
    kept = {n.name for n in after.graph.nodes}
    gone = [n for n in before.graph.nodes if n.op == "call_function" and n.name not in kept]
    sizes = [static_nbytes(n.meta.get("val")) for n in gone]
    return {"count": sum(1 for b in sizes if b), "bytes": sum(sizes)}


def run_post_grad(
    passes: Sequence[GraphPass],
    gm: fx.GraphModule,
    on_result: Callable[[PassResult], None],
    strict: bool = False,
    graph_name: str = "post-grad graph",
) -> None:
    """Post-grad passes (ATen IR, inside Inductor), fail closed: lint after each; a pass that raises or
    leaves an invalid graph is rolled back (``strict=True`` raises). Results go to ``on_result``."""
    for graph_pass in passes:
        saved = copy.deepcopy(gm.graph)
        copy_node_attributes(gm.graph, saved)
        try:
            result = graph_pass(gm)
            gm.graph.lint()
            if not isinstance(result, PassResult):
                raise PassValidationError(f"returned {type(result).__name__}, expected PassResult")
        except Exception as e:
            gm.graph = saved
            err = PassFailedError(f"post-grad pass {graph_pass.name!r} failed on {graph_name}: {error_summary(e)}")
            err.__cause__ = e
            if strict:
                raise err from e
            tb = "".join(traceback.format_exception(e))
            log.warning("%s on %s failed; compiled without it:\n%s", graph_pass.name, graph_name, tb)
            result = PassResult(graph_pass.name, error=tb)
            result.skip("graph", f"pass failed, graph restored: {first_line(e)}")
        log.info("%s (post-grad, %s): changed=%s stats=%s skipped=%d", graph_pass.name, graph_name, result.changed,
                 result.stats, len(result.skipped))
        trace_json_artifact(f"moe_passes_{_artifact_stem(graph_name)}_{graph_pass.name}_report",
                            lambda result=result: {"graph": graph_name, "stage": "post_grad", **result.as_dict()})
        on_result(result)


def _artifact_stem(graph_name: str) -> str:
    """``graph_0 (forward)`` -> ``graph_0_forward``: artifact names without spaces or brackets."""
    return "_".join(part for part in graph_name.replace("(", " ").replace(")", " ").split())
