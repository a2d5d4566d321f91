"""Test-only passes and small models for the backend tests (importable by name for the registry)."""

from __future__ import annotations

import operator
from typing import ClassVar

import pytest
import torch
import torch.fx as fx

from moe_passes.pipeline.pass_base import GraphPass, PassResult
from moe_passes.registry import POST_GRAD_PASSES, PRE_GRAD_PASSES

CALL_LOG: list[str] = []


def register(monkeypatch: pytest.MonkeyPatch, *classes: type[GraphPass]) -> None:
    """Make test passes requestable by name, for this test only."""
    for cls in classes:
        table = POST_GRAD_PASSES if cls.stage == "post_grad" else PRE_GRAD_PASSES
        monkeypatch.setitem(table, cls.name, f"{cls.__module__}:{cls.__qualname__}")


def _first_output(gm: fx.GraphModule) -> fx.Node:
    out = gm.graph.output_node()
    return out.args[0][0]


def _replace_first_output(gm: fx.GraphModule, new: fx.Node) -> None:
    out = gm.graph.output_node()
    values = list(out.args[0])
    values[0] = new
    out.args = (tuple(values),)


class _Logged(GraphPass):
    stage: ClassVar = "pre_grad"

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        CALL_LOG.append(self.name)
        return PassResult(self.name)


class InvalidatesRowsPass(_Logged):
    name: ClassVar[str] = "t_invalidates_rows"
    invalidates: ClassVar = ("whole_rows",)


class NeedsRowsPass(_Logged):
    name: ClassVar[str] = "t_needs_rows"
    needs: ClassVar = ("whole_rows",)


class AtenLoggedPass(_Logged):
    name: ClassVar[str] = "t_aten_logged"
    ir: ClassVar = "aten"


class AtenBeforeTorchPass(_Logged):
    """Contradicts the IR rule: an aten pass cannot run before a torch one."""

    name: ClassVar[str] = "t_aten_first"
    ir: ClassVar = "aten"
    runs_before: ClassVar = ("t_first",)


class FirstPass(_Logged):
    name: ClassVar[str] = "t_first"


class SecondPass(_Logged):
    name: ClassVar[str] = "t_second"


class ScaleByOnePass(GraphPass):
    """Semantically neutral: multiplies the first output by 1.0 (a real, valid graph change)."""

    name: ClassVar[str] = "t_scale_by_one"
    stage: ClassVar = "pre_grad"

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        result = PassResult(self.name)
        target = _first_output(gm)
        with gm.graph.inserting_before(gm.graph.output_node()):
            scaled = gm.graph.call_function(torch.mul, (target, 1.0))
        _replace_first_output(gm, scaled)
        result.changed = True
        result.matched.append(target.name)
        result.stats["inserted"] = 1
        return result


class WrongScalePass(GraphPass):
    """Valid graph, wrong numbers: multiplies the first output by 1.5 (verify must catch it)."""

    name: ClassVar[str] = "t_wrong_scale"
    stage: ClassVar = "pre_grad"

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        target = _first_output(gm)
        with gm.graph.inserting_before(gm.graph.output_node()):
            scaled = gm.graph.call_function(torch.mul, (target, 1.5))
        _replace_first_output(gm, scaled)
        return PassResult(self.name, changed=True)


class DeadNodePass(GraphPass):
    """Adds a node nobody uses."""

    name: ClassVar[str] = "t_dead_node"
    stage: ClassVar = "pre_grad"

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        with gm.graph.inserting_before(gm.graph.output_node()):
            gm.graph.call_function(torch.neg, (_first_output(gm),))
        return PassResult(self.name, changed=True)


class WrongShapePass(GraphPass):
    """Returns a stacked copy of the first output: shape changes, only fake propagation notices."""

    name: ClassVar[str] = "t_wrong_shape"
    stage: ClassVar = "pre_grad"

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        target = _first_output(gm)
        with gm.graph.inserting_before(gm.graph.output_node()):
            stacked = gm.graph.call_function(torch.stack, ([target, target],))
        _replace_first_output(gm, stacked)
        return PassResult(self.name, changed=True)


class BadOpPass(GraphPass):
    """Inserts an op whose fake propagation fails (matmul of incompatible shapes)."""

    name: ClassVar[str] = "t_bad_op"
    stage: ClassVar = "pre_grad"

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        target = _first_output(gm)
        with gm.graph.inserting_before(gm.graph.output_node()):
            ones = gm.graph.call_function(torch.ones, (3, 5))
            bad = gm.graph.call_function(torch.matmul, (ones, ones))
            fixed = gm.graph.call_function(operator.add, (target, gm.graph.call_function(torch.sum, (bad,))))
        _replace_first_output(gm, fixed)
        return PassResult(self.name, changed=True)


class ForeignNodePass(GraphPass):
    """Uses a node of another graph as an argument: lint must reject it."""

    name: ClassVar[str] = "t_foreign_node"
    stage: ClassVar = "pre_grad"

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        other = fx.Graph()
        stranger = other.placeholder("stranger")
        with gm.graph.inserting_before(gm.graph.output_node()):
            added = gm.graph.call_function(operator.add, (_first_output(gm), stranger))
        _replace_first_output(gm, added)
        return PassResult(self.name, changed=True)


class NewInputPass(GraphPass):
    """Adds a placeholder: changes the calling convention Dynamo fixed."""

    name: ClassVar[str] = "t_new_input"
    stage: ClassVar = "pre_grad"

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        first = next(iter(gm.graph.nodes))
        with gm.graph.inserting_before(first):
            extra = gm.graph.placeholder("extra_input")
        with gm.graph.inserting_before(gm.graph.output_node()):
            added = gm.graph.call_function(operator.add, (_first_output(gm), extra))
        _replace_first_output(gm, added)
        return PassResult(self.name, changed=True)


class NothingToDoPass(GraphPass):
    """Finds candidates but declines them all, with reasons (what strict mode reports)."""

    name: ClassVar[str] = "t_nothing"
    stage: ClassVar = "pre_grad"

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        result = PassResult(self.name)
        result.skip("layers.0", "router output used by a side effect")
        return result


class NothingToDoWithoutTriggerPass(NothingToDoPass):
    """Declines everything, but the graph holds nothing it is for (strict must not raise)."""

    name: ClassVar[str] = "t_nothing_untriggered"

    def trigger(self, gm: fx.GraphModule) -> str | None:
        return None


class NotAResultPass(GraphPass):
    name: ClassVar[str] = "t_not_a_result"
    stage: ClassVar = "pre_grad"

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        return "done"  # type: ignore[return-value]


class AtenScaleByOnePass(GraphPass):
    """Neutral pass on the canonical ATen IR: multiplies the first output by 1.0 with ``aten.mul.Tensor``.

    Records whether every op it saw was an ATen ``OpOverload`` (the canonical form), in ``stats``.
    """

    name: ClassVar[str] = "t_aten_scale_by_one"
    stage: ClassVar = "pre_grad"
    ir: ClassVar = "aten"

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        result = PassResult(self.name)
        calls = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
        result.stats["all_overloads"] = all(
            isinstance(n.target, torch._ops.OpOverload) or n.target is operator.getitem for n in calls
        )
        result.stats["call_methods"] = sum(n.op == "call_method" for n in calls)
        target = _first_output(gm)
        with gm.graph.inserting_before(gm.graph.output_node()):
            scaled = gm.graph.call_function(torch.ops.aten.mul.Tensor, (target, 1.0))
        _replace_first_output(gm, scaled)
        result.changed = True
        return result


class RecordingPostGradPass(GraphPass):
    """Post-grad pass that changes nothing and reports the graph it saw."""

    name: ClassVar[str] = "t_post_record"
    stage: ClassVar = "post_grad"

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        result = PassResult(self.name)
        result.stats["nodes"] = len(gm.graph.nodes)
        result.stats["tangents"] = sum(n.name.startswith("tangents") for n in gm.graph.find_nodes(op="placeholder"))
        return result


class RaisingPostGradPass(GraphPass):
    """Post-grad pass that breaks the graph half-way and then raises (must be rolled back)."""

    name: ClassVar[str] = "t_post_raising"
    stage: ClassVar = "post_grad"

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        out = gm.graph.output_node()
        out.args = (tuple(None for _ in out.args[0]),)  # vandalise, then fail
        raise RuntimeError("post-grad pass bug")


class RaisingPass(GraphPass):
    """Breaks while rewriting (a bug inside the pass, not a bad graph)."""

    name: ClassVar[str] = "t_raising"
    stage: ClassVar = "pre_grad"

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        raise RuntimeError("Argument 'x' was used before it has been defined!\ngraph():\n    %x : ...")
