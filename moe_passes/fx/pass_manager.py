"""Runs pre-grad passes in order and checks the graph after every one.

A pass that leaves a malformed graph must fail *here*, naming the pass, not
three layers down inside AOT autograd or Inductor. After each pass the manager
checks: ``graph.lint()``; no dangling users; the placeholders (the calling
convention Dynamo fixed) are untouched; no node the pass created is dead;
fake-tensor re-propagation of the whole graph succeeds and the outputs keep
their dtypes and ranks. It snapshots the readable graph before and after,
logs to ``moe_passes`` and emits both texts as structured-trace artifacts
(``TORCH_TRACE=dir`` + ``tlparse`` shows them beside Inductor's stages).
"""

from __future__ import annotations

import copy
import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv, rebind_unbacked
from torch.utils._pytree import tree_leaves

from moe_passes.config import BackendConfig
from moe_passes.fx.graph_text import graph_text
from moe_passes.fx.pass_base import GraphPass, PassResult
from moe_passes.fx.registry import PRE_GRAD_PASSES, POST_GRAD_PASSES, pass_class

log = logging.getLogger("moe_passes")


class PassUnavailableError(ValueError):
    """A requested pass is registered but its module cannot be imported (not written yet, or broken)."""


class PassValidationError(RuntimeError):
    """A pass left a graph that fails validation; names the pass and every problem found."""


class PassFailedError(RuntimeError):
    """A pass raised while rewriting a graph; names the pass and the graph (the original error is the cause)."""


class StrictModeError(RuntimeError):
    """``strict=True`` and a requested pass found nothing it could safely apply."""


def load_pass(name: str, config: BackendConfig) -> GraphPass:
    """Instantiate a registered pass; an unimportable pass module gives a clear error naming it."""
    table = {**PRE_GRAD_PASSES, **POST_GRAD_PASSES}
    if name not in table:
        raise ValueError(f"unknown pass {name!r}; known passes: {sorted(table)}")
    try:
        cls = pass_class(name)
    except (ImportError, AttributeError) as e:
        raise PassUnavailableError(
            f"pass {name!r} is registered as {table[name]} but cannot be loaded ({type(e).__name__}: {e}); "
            f"leave it out of passes=... until it is available"
        ) from e
    return cls(config)


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule with a copy of ``gm``'s graph, sharing its parameters and submodules."""
    copied = fx.GraphModule(gm, copy.deepcopy(gm.graph), class_name=type(gm).__name__)
    copied.meta = dict(getattr(gm, "meta", {}))
    return copied


def _node_val(node: fx.Node) -> Any:
    return node.meta.get("val", node.meta.get("example_value"))


def _dead_nodes(graph: fx.Graph) -> set[str]:
    return {
        n.name
        for n in graph.nodes
        if n.op not in ("placeholder", "output") and not n.users and not n.is_impure()
    }


def find_fake_mode(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> FakeTensorMode | None:
    """The fake mode the graph was traced in (placeholder values), else one of the example inputs."""
    vals = [_node_val(n) for n in gm.graph.find_nodes(op="placeholder")]
    return detect_fake_mode(vals) or detect_fake_mode(list(example_inputs))


class _Repropagate(fx.Interpreter):
    """Fake-tensor interpreter that records results without overwriting Dynamo's metadata."""

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
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    inputs = []
    for i, node in enumerate(placeholders):
        val = _node_val(node)
        if val is None and i < len(example_inputs):
            val = example_inputs[i]
        if isinstance(val, torch.Tensor) and not isinstance(val, FakeTensor):
            val = mode.from_tensor(val, static_shapes=True)
        inputs.append(val)
    return inputs


def repropagate(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> dict[fx.Node, Any]:
    """Fake-tensor propagation of the whole graph; returns node -> fake value.

    Runs in the graph's own fake mode (so symbolic input sizes keep their
    symbols); fresh unbacked symbols from ``.item()``/``.tolist()`` are
    rebound to Dynamo's where the node has bindings and otherwise tolerated.
    Without any fake mode (hand-built graphs) a fresh one with a ShapeEnv is used.
    """
    mode = find_fake_mode(gm, example_inputs)
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
        if b[0] != a[0] or (b[0] == "tensor" and (b[1] != a[1] or b[2] != a[2])):
            return f"output {i} changed from {b} to {a}"
        if b[0] == "tensor" and any(x is not None and y is not None and x != y for x, y in zip(b[3], a[3])):
            return f"output {i} changed shape from {b[3]} to {a[3]}"
    return None


def _flat_outputs(gm: fx.GraphModule, vals: dict[fx.Node, Any] | None = None) -> list[Any]:
    output = gm.graph.output_node()
    nodes = [a for a in tree_leaves(output.args) if isinstance(a, fx.Node)]
    if vals is None:
        return [_node_val(n) for n in nodes]
    return [vals.get(n) for n in nodes]


@dataclass
class GraphState:
    """What validation compares against: the graph as it was before a pass."""

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


def validate(gm: fx.GraphModule, before: GraphState, example_inputs: Sequence[Any]) -> tuple[list[str], list[str]]:
    """Check a graph after a pass; returns (problems, notes). Fills ``meta['val']`` on nodes the pass added."""
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
    try:
        vals = repropagate(gm, example_inputs)
    except Exception as e:
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        try:
            repropagate(before.gm, example_inputs)
        except Exception as e0:
            notes.append(f"fake-tensor re-propagation unavailable for this graph even before the pass ({type(e0).__name__})")
        else:
            problems.append(f"fake-tensor re-propagation failed: {reason}")
        return problems, notes
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
    """One pass on one graph: its result, validation outcome and before/after text."""

    name: str
    result: PassResult
    seconds: float
    notes: list[str] = field(default_factory=list)
    before: str | None = None
    after: str | None = None

    def as_dict(self, with_text: bool = False) -> dict[str, Any]:
        d = {**self.result.as_dict(), "seconds": round(self.seconds, 4), "validation_notes": list(self.notes)}
        if with_text:
            d["before"], d["after"] = self.before, self.after
        return d


class PassManager:
    """Runs passes in the given order, validating and snapshotting after each one."""

    def __init__(
        self,
        passes: Sequence[GraphPass],
        strict: bool = False,
        snapshot: bool = True,
        validate: bool = True,
        graph_name: str = "graph",
    ) -> None:
        self.passes = list(passes)
        self.strict = strict
        self.snapshot = snapshot
        self.validate = validate
        self.graph_name = graph_name

    @classmethod
    def from_config(cls, config: BackendConfig, **kwargs: Any) -> "PassManager":
        return cls([load_pass(name, config) for name in config.passes], strict=config.strict, **kwargs)

    def run(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> list[PassRecord]:
        records: list[PassRecord] = []
        text = graph_text(gm) if self.snapshot else None
        for graph_pass in self.passes:
            records.append(self._run_one(graph_pass, gm, example_inputs, text))
            text = records[-1].after
        return records

    def _run_one(self, graph_pass: GraphPass, gm: fx.GraphModule, example_inputs: Sequence[Any], before_text: str | None) -> PassRecord:
        name = graph_pass.name
        before = GraphState.of(gm) if self.validate else None
        start = time.perf_counter()
        try:
            result = graph_pass(gm)
        except Exception as e:
            first_line = (str(e).strip().splitlines() or [""])[0]
            raise PassFailedError(f"pass {name!r} failed on {self.graph_name}: {type(e).__name__}: {first_line}") from e
        gm.recompile()
        seconds = time.perf_counter() - start
        if not isinstance(result, PassResult):
            raise PassValidationError(f"pass {name!r} returned {type(result).__name__}, expected PassResult")
        notes: list[str] = []
        if before is not None:
            problems, notes = validate(gm, before, example_inputs)
            if problems:
                raise PassValidationError(
                    f"pass {name!r} left an invalid graph in {self.graph_name}:\n  - " + "\n  - ".join(problems)
                )
        after_text = graph_text(gm) if self.snapshot else None
        if before_text is not None and after_text is not None:
            _trace_artifact(f"moe_passes_{self.graph_name}_{name}_before", before_text)
            _trace_artifact(f"moe_passes_{self.graph_name}_{name}_after", after_text)
        log.info(
            "%s on %s: changed=%s matched=%s stats=%s skipped=%d (%.3fs)",
            name, self.graph_name, result.changed, result.matched, result.stats, len(result.skipped), seconds,
        )
        for note in notes:
            log.info("%s on %s: %s", name, self.graph_name, note)
        if self.strict and not result.changed:
            reasons = "; ".join(f"{s.region}: {s.reason}" for s in result.skipped) or "no candidate region found"
            raise StrictModeError(f"strict: pass {name!r} found nothing it can safely apply in {self.graph_name} ({reasons})")
        return PassRecord(name, result, seconds, notes, before_text, after_text)


def run_post_grad(passes: Sequence[GraphPass], gm: fx.GraphModule, on_result: Callable[[PassResult], None]) -> None:
    """Post-grad passes (ATen IR, inside Inductor): lint after each; results go to ``on_result``."""
    for graph_pass in passes:
        result = graph_pass(gm)
        try:
            gm.graph.lint()
        except Exception as e:
            raise PassValidationError(f"post-grad pass {graph_pass.name!r} left an invalid graph: {e}") from e
        log.info("%s (post-grad): changed=%s stats=%s skipped=%d", graph_pass.name, result.changed, result.stats, len(result.skipped))
        on_result(result)
