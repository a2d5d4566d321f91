"""Runs the pre-grad pipeline on one Dynamo graph: canonical IR, validation, fail-closed.

The passes run in the order ``moe_passes.fx.pipeline`` derives from their
declarations. Before the first pass that declares ``ir = "aten"`` the graph is
re-traced once to the canonical pre-dispatch ATen IR
(``moe_passes.ir.canonical.canonicalize``); that pass and every later one run on
the canonical graph, which is what the backend hands to Inductor. If the
re-trace is impossible the ``"aten"`` passes are skipped with its reason.

A pass that leaves a malformed graph must fail *here*, naming the pass, not
three layers down inside AOT autograd or Inductor. After each pass the manager
checks: ``graph.lint()``; no dangling users; the placeholders (the calling
convention Dynamo fixed) are untouched; no node the pass created is dead;
fake-tensor re-propagation of the whole graph **in the graph's own fake mode**
succeeds and the outputs keep their dtypes and ranks.

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
emitted as structured-trace artifacts (``TORCH_TRACE=dir`` + ``tlparse``).
"""

from __future__ import annotations

import copy
import logging
import time
import traceback
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv, rebind_unbacked
from torch.utils._pytree import tree_leaves

from moe_passes.config import BackendConfig
from moe_passes.fx.graph_text import graph_text
from moe_passes.fx.pass_base import GraphPass, PassResult
from moe_passes.fx.pipeline import PassUnavailableError, build_pipeline, load_pass
from moe_passes.ir.canonical import canonicalize, graph_fake_mode, is_canonical
from moe_passes.ir.facts import node_value

log = logging.getLogger(__name__)

__all__ = [
    "PassFailedError",
    "PassManager",
    "PassRecord",
    "PassUnavailableError",
    "PassValidationError",
    "PipelineRun",
    "StrictModeError",
    "copy_graph_module",
    "load_pass",
    "repropagate",
    "run_post_grad",
    "validate",
]


class PassValidationError(RuntimeError):
    """A pass left a graph that fails validation; names the pass and every problem found."""


class PassFailedError(RuntimeError):
    """A pass raised while rewriting a graph; names the pass and the graph (the original error is the cause)."""


class StrictModeError(RuntimeError):
    """``strict=True`` and a requested pass found nothing it could safely apply in a graph holding its trigger."""


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule with a copy of ``gm``'s graph, sharing its parameters and submodules (and keeping
    the node attributes Dynamo sets outside ``meta``)."""
    graph = copy.deepcopy(gm.graph)
    _copy_node_attributes(gm.graph, graph)
    copied = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    copied.meta = dict(getattr(gm, "meta", {}))
    for attr in ("_param_name_to_source",):
        if hasattr(gm, attr):
            setattr(copied, attr, getattr(gm, attr))
    return copied


def _dead_nodes(graph: fx.Graph) -> set[str]:
    return {
        n.name
        for n in graph.nodes
        if n.op not in ("placeholder", "output") and not n.users and not n.is_impure()
    }


class _Repropagate(fx.Interpreter):
    """Fake-tensor interpreter that records results without overwriting the graph's metadata."""

    def __init__(self, gm: fx.GraphModule, mode: FakeTensorMode) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.mode = mode
        self.vals: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if self.mode.shape_env is not None and "unbacked_bindings" in n.meta:
            # Reuse the symbols Dynamo bound for this node so later sizes still line up.
            rebind_unbacked(self.mode.shape_env, n, result)
        self.vals[n] = result
        return result

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        value = super().get_attr(target, args, kwargs)
        if isinstance(value, torch.Tensor) and not isinstance(value, FakeTensor):
            return self.mode.from_tensor(value, static_shapes=True)
        return value


def _fake_inputs(gm: fx.GraphModule, example_inputs: Sequence[Any], mode: FakeTensorMode) -> list[Any]:
    inputs = []
    for i, node in enumerate(gm.graph.find_nodes(op="placeholder")):
        val = node_value(node)
        if val is None and i < len(example_inputs):
            val = example_inputs[i]
        if isinstance(val, FakeTensor) and val.fake_mode is not mode:
            val = mode.from_tensor(val, static_shapes=True)
        elif isinstance(val, torch.Tensor) and not isinstance(val, FakeTensor):
            val = mode.from_tensor(val, static_shapes=True)
        inputs.append(val)
    return inputs


def repropagate(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> dict[fx.Node, Any]:
    """Fake-tensor propagation of the whole graph; returns node -> fake value.

    Runs in the graph's own fake mode (``moe_passes.ir.canonical.graph_fake_mode``: inside a
    real compile, Dynamo's, so symbolic sizes keep their symbols); fresh unbacked symbols from
    ``.item()``/``.tolist()`` are rebound to Dynamo's where the node has bindings and otherwise
    tolerated. Without any fake mode (hand-built graphs) a fresh one with a ShapeEnv is used.
    """
    mode = graph_fake_mode(gm, example_inputs)
    if mode is None:
        mode = FakeTensorMode(shape_env=ShapeEnv(allow_scalar_outputs=True), allow_non_fake_inputs=True)
    interp = _Repropagate(gm, mode)
    with ExitStack() as stack:
        stack.enter_context(mode)
        if mode.shape_env is not None:
            stack.enter_context(mode.shape_env.ignore_fresh_unbacked_symbols())
        interp.run(*_fake_inputs(gm, example_inputs, mode), enable_io_processing=False)
    return interp.vals


def _output_signature(vals: Sequence[Any]) -> list[tuple[Any, ...]]:
    sig: list[tuple[Any, ...]] = []
    for v in vals:
        if isinstance(v, torch.Tensor):
            sig.append(("tensor", v.dtype, v.dim(), tuple(s if isinstance(s, int) else None for s in v.shape)))
        else:
            sig.append((type(v).__name__,))
    return sig


def _signature_mismatch(before: list[tuple[Any, ...]], after: list[tuple[Any, ...]]) -> str | None:
    if len(before) != len(after):
        return f"graph now returns {len(after)} values instead of {len(before)}"
    for i, (b, a) in enumerate(zip(before, after)):
        if b == ("NoneType",):  # no recorded value before the pass (hand-built graph): nothing to compare
            continue
        if b[0] != a[0] or (b[0] == "tensor" and (b[1] != a[1] or b[2] != a[2])):
            return f"output {i} changed from {b} to {a}"
        if b[0] == "tensor" and any(x is not None and y is not None and x != y for x, y in zip(b[3], a[3])):
            return f"output {i} changed shape from {b[3]} to {a[3]}"
    return None


def _flat_outputs(gm: fx.GraphModule, vals: dict[fx.Node, Any] | None = None) -> list[Any]:
    output = gm.graph.output_node()
    nodes = [a for a in tree_leaves(output.args) if isinstance(a, fx.Node)]
    if vals is None:
        return [node_value(n) for n in nodes]
    return [vals.get(n) for n in nodes]


@dataclass
class GraphState:
    """What validation compares against (and what a failed pass is rolled back to): the graph before a pass."""

    placeholders: list[str]
    dead: set[str]
    outputs: list[tuple[Any, ...]]
    gm: fx.GraphModule

    @classmethod
    def of(cls, gm: fx.GraphModule) -> "GraphState":
        return cls(
            placeholders=[n.name for n in gm.graph.find_nodes(op="placeholder")],
            dead=_dead_nodes(gm.graph),
            outputs=_output_signature(_flat_outputs(gm)),
            gm=copy_graph_module(gm),
        )

    def restore(self, gm: fx.GraphModule) -> None:
        """Put the graph back as it was (the pass's changes, including metadata it overwrote, are dropped)."""
        restored = copy.deepcopy(self.gm.graph)
        _copy_node_attributes(self.gm.graph, restored)
        gm.graph = restored


def _copy_node_attributes(src: fx.Graph, dst: fx.Graph) -> None:
    """Attributes set on nodes outside ``meta`` (Dynamo's ``_dynamo_source`` on placeholders, which AOT
    autograd requires) are not copied by ``Graph.__deepcopy__``; carry them over by node name."""
    by_name = {n.name: n for n in dst.nodes}
    for n in src.nodes:
        extra = getattr(n, "__dict__", None)
        if extra and n.name in by_name:
            for key, value in extra.items():
                setattr(by_name[n.name], key, value)


#: Note recorded when re-propagation cannot run even on the unmodified graph.
REPROPAGATION_UNAVAILABLE = "fake-tensor re-propagation unavailable for this graph even before the pass"


def validate(gm: fx.GraphModule, before: GraphState, example_inputs: Sequence[Any]) -> tuple[list[str], list[str]]:
    """Check a graph after a pass; returns (problems, notes). Fills ``meta['val']`` on nodes the pass added.

    A note ``"fake-tensor re-propagation ran (N nodes)"`` says the strongest check ran.
    """
    problems: list[str] = []
    notes: list[str] = []
    graph = gm.graph
    try:
        graph.lint()
    except Exception as e:  # lint raises RuntimeError/AssertionError with the offending node
        problems.append(f"graph.lint() failed: {e}")
        return problems, notes
    nodes = set(graph.nodes)
    for node in graph.nodes:
        for user in node.users:
            if user not in nodes:
                problems.append(f"node {node.name} has a dangling user {user.name} that is not in the graph")
    placeholders = [n.name for n in graph.find_nodes(op="placeholder")]
    if placeholders != before.placeholders:
        problems.append(f"graph inputs changed from {before.placeholders} to {placeholders}")
    new_dead = sorted(_dead_nodes(graph) - before.dead)
    if new_dead:
        problems.append(f"dead nodes (no users, no side effects): {new_dead}")
    if problems:
        return problems, notes
    try:
        vals = repropagate(gm, example_inputs)
    except Exception as e:
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        try:
            repropagate(before.gm, example_inputs)
        except Exception as e0:
            first = str(e0).splitlines()[0] if str(e0) else ""
            notes.append(f"{REPROPAGATION_UNAVAILABLE} ({type(e0).__name__}: {first})")
        else:
            problems.append(f"fake-tensor re-propagation failed: {reason}")
        return problems, notes
    notes.append(f"fake-tensor re-propagation ran ({len(vals)} nodes)")
    mismatch = _signature_mismatch(before.outputs, _output_signature(_flat_outputs(gm, vals)))
    if mismatch:
        problems.append(mismatch)
    for node, val in vals.items():
        if "val" not in node.meta and "example_value" not in node.meta and node.op != "output":
            node.meta["val"] = val
    return problems, notes


def _trace_artifact(name: str, text: str) -> None:
    torch._logging.trace_structured(
        "artifact",
        metadata_fn=lambda: {"name": name, "encoding": "string"},
        payload_fn=lambda: text,
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

    def as_dict(self, with_text: bool = False) -> dict[str, Any]:
        d = {
            **self.result.as_dict(),
            "ir": self.ir,
            "trigger": self.trigger,
            "seconds": round(self.seconds, 4),
            "validation_notes": list(self.notes),
        }
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


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]


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
                continue
            record = self._run_one(graph_pass, current, example_inputs, text, ir)
            records.append(record)
            text = record.after
        return PipelineRun(current, records, ir, canonical_error)

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
        result.skip("graph", f"pass failed, graph restored: {_first_line(error)}")
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
            err = PassFailedError(f"pass {name!r} failed on {self.graph_name}: {type(e).__name__}: {_first_line(e)}")
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
        return PassRecord(name, result, seconds, notes, before_text, after_text, ir, trigger)


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
        _copy_node_attributes(gm.graph, saved)
        try:
            result = graph_pass(gm)
            gm.graph.lint()
            if not isinstance(result, PassResult):
                raise PassValidationError(f"returned {type(result).__name__}, expected PassResult")
        except Exception as e:
            gm.graph = saved
            err = PassFailedError(f"post-grad pass {graph_pass.name!r} failed on {graph_name}: {type(e).__name__}: {_first_line(e)}")
            err.__cause__ = e
            if strict:
                raise err from e
            tb = "".join(traceback.format_exception(e))
            log.warning("%s on %s failed; compiled without it:\n%s", graph_pass.name, graph_name, tb)
            result = PassResult(graph_pass.name, error=tb)
            result.skip("graph", f"pass failed, graph restored: {_first_line(e)}")
        log.info("%s (post-grad, %s): changed=%s stats=%s skipped=%d", graph_pass.name, graph_name, result.changed,
                 result.stats, len(result.skipped))
        on_result(result)
