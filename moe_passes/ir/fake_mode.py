"""Running a graph again on fake tensors: which fake mode its inputs share, what a re-run enters, and
the one fake-value propagation every pass uses.

Several analyses re-run a graph in the fake mode it was traced in (shape re-propagation after a
pass, validation, autograd's facts, the re-trace's gradient-path check). They find that mode and
enter it here, in one way: the re-run may create fresh unbacked symbols (``.item()``,
``.tolist()``), which the shape env is told to ignore unless a rewrite wants them bound.
``repropagate`` re-runs a whole graph (validation; a rewrite's new shapes), ``fake_eval`` one new node
(the aux loss's emitted nodes).
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from moe_passes.ir.facts import node_value


def single_fake_mode(values: Iterable[Any]) -> FakeTensorMode | None:
    """The one fake mode the fake tensors among ``values`` belong to; None when there are none or several."""
    modes = {id(v.fake_mode): v.fake_mode for v in values if isinstance(v, FakeTensor)}
    return next(iter(modes.values())) if len(modes) == 1 else None


def enter_fake_rerun(stack: ExitStack, mode: FakeTensorMode, grad: bool = False) -> None:
    """Enter, on ``stack``, ``mode`` with its shape env ignoring the fresh unbacked symbols a re-run
    creates; ``grad``: with grad enabled too (a re-run that autograd must record)."""
    stack.enter_context(mode)
    if mode.shape_env is not None:
        stack.enter_context(mode.shape_env.ignore_fresh_unbacked_symbols())
    if grad:
        stack.enter_context(torch.enable_grad())


def graph_fake_mode(gm: fx.GraphModule, example_inputs: Sequence[Any] = ()) -> FakeTensorMode | None:
    """The fake mode the graph was traced in: its placeholders' values, else the example inputs'."""
    vals = [node_value(n) for n in gm.graph.find_nodes(op="placeholder")]
    return detect_fake_mode(vals) or detect_fake_mode(list(example_inputs))


def placeholder_fakes(
    gm: fx.GraphModule, example_inputs: Sequence[Any], mode: FakeTensorMode, static_shapes: bool = False
) -> list[Any]:
    """The graph's input values as fakes of ``mode``: Dynamo's own fakes where it recorded them in
    ``mode`` (symbols kept), else the example input, converted (``static_shapes`` as given)."""
    out: list[Any] = []
    for i, ph in enumerate(gm.graph.find_nodes(op="placeholder")):
        val = node_value(ph)
        if val is None and i < len(example_inputs):
            val = example_inputs[i]
        if isinstance(val, torch.Tensor) and not (isinstance(val, FakeTensor) and val.fake_mode is mode):
            val = mode.from_tensor(val, static_shapes=static_shapes)
        out.append(val)
    return out


def fake_eval(node: fx.Node, mode: FakeTensorMode | None = None) -> Any:
    """Evaluate one ``call_function`` node on its inputs' fake values and store it as ``meta['val']``.

    In ``mode``, by default the fake mode of the graph's placeholders; returns None (and stores nothing)
    when the graph has none. Raises whatever the op raises: callers decide what a failure means."""
    if mode is None:
        mode = graph_fake_mode(node.graph.owning_module) if node.graph.owning_module is not None else None
        if mode is None:
            mode = detect_fake_mode([node_value(n) for n in node.graph.find_nodes(op="placeholder")])
    if mode is None:
        return None
    args = fx.node.map_arg(node.args, node_value)
    kwargs = fx.node.map_arg(node.kwargs, node_value)
    with mode:
        node.meta["val"] = node.target(*args, **kwargs)
    return node.meta["val"]


class _FakeRerun(fx.Interpreter):
    """Runs a graph on fakes. ``record``: store each value in ``meta`` and bind fresh unbacked symbols
    (a rewrite's new shapes); else only collect the values, reusing Dynamo's bound symbols."""

    def __init__(self, gm: fx.GraphModule, mode: FakeTensorMode, record: bool) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.mode = mode
        self.record = record
        self.vals: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        from torch.fx.experimental.symbolic_shapes import compute_unbacked_bindings, rebind_unbacked

        result = super().run_node(n)
        env = self.mode.shape_env
        if self.record:
            if n.op not in ("placeholder", "output"):
                if env is not None:
                    bindings = compute_unbacked_bindings(env, result)
                    if bindings:
                        n.meta["unbacked_bindings"] = bindings
                if result is not None:
                    n.meta["val"] = result
                    if "example_value" in n.meta:
                        n.meta["example_value"] = result
        elif env is not None and "unbacked_bindings" in n.meta:
            rebind_unbacked(env, n, result)  # Dynamo's symbols for this node, so later sizes still line up
        self.vals[n] = result
        return result

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        value = super().get_attr(target, args, kwargs)
        if isinstance(value, torch.Tensor) and not isinstance(value, FakeTensor):
            return self.mode.from_tensor(value, static_shapes=True)
        return value


def repropagate(gm: fx.GraphModule, example_inputs: Sequence[Any] = (), *, record: bool = False) -> dict[fx.Node, Any]:
    """Fake-tensor propagation of the whole graph in its own fake mode; returns node -> fake value.

    The mode is the graph's (``graph_fake_mode``: inside a real compile, Dynamo's, so symbolic sizes keep
    their symbols); without one (hand-built graphs) a fresh one with a ShapeEnv. ``record=False``
    (validation) leaves the graph's metadata alone, rebinds Dynamo's unbacked symbols and ignores fresh
    ones; ``record=True`` (after a rewrite) writes every value into ``meta`` and binds the fresh unbacked
    symbols a rewrite creates (each chunk's split sizes) as the node's ``unbacked_bindings``.
    """
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    mode = graph_fake_mode(gm, example_inputs)
    if mode is None:
        if record:
            raise RuntimeError("graph placeholders do not carry fake tensors of one fake mode; cannot re-propagate shapes")
        mode = FakeTensorMode(shape_env=ShapeEnv(allow_scalar_outputs=True), allow_non_fake_inputs=True)
    interp = _FakeRerun(gm, mode, record)
    # A new epoch, as torch's FakeTensorProp starts one: a fake tensor's ``.item()`` memo from an earlier run
    # (torchtitan's route_scale under dynamic=True) must not be served for this run's fresh values.
    mode.epoch += 1
    with ExitStack() as stack:
        if record:
            stack.enter_context(mode)
        else:
            enter_fake_rerun(stack, mode)
        interp.run(*placeholder_fakes(gm, example_inputs, mode, static_shapes=True), enable_io_processing=False)
    return interp.vals
