"""What a training step's autograd does with a graph's values: which nodes require grad, which storages
a backward formula saves.  Read from a fake re-run of the graph (or, when that is impossible, a safe
over-approximation that says why).  In both IRs; nothing here imports a pass or Inductor."""

from __future__ import annotations

import logging
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._pytree import tree_leaves

from moe_passes.errors import error_summary
from moe_passes.ir.facts import node_value, op_meaning, storage_ref
from moe_passes.ir.fake_mode import enter_fake_rerun, single_fake_mode

log = logging.getLogger(__name__)


@dataclass
class AutogradFacts:
    """What a training step's autograd does with the graph's values (from a fake re-run, or a safe estimate)."""

    saved: set[fx.Node]  # nodes whose storage some backward formula saves
    requires_grad: set[fx.Node]  # nodes whose value requires grad
    exact: bool = True  # False: the fake re-run failed; ``requires_grad`` over-approximates, ``saved`` is empty
    reason: str | None = None  # why not exact


def _input_value(node: fx.Node) -> Any:
    """A placeholder's value with its ``requires_grad`` as Dynamo saw it (ATen re-traces drop it in ``val``)."""
    example = node.meta.get("example_value")
    return example if isinstance(example, torch.Tensor) else node_value(node)


def _output_values(gm: fx.GraphModule) -> list[Any] | None:
    """Dynamo's values of the graph outputs (they record ``requires_grad``); None in an ATen re-trace."""
    outs = [a for a in tree_leaves(gm.graph.output_node().args) if isinstance(a, fx.Node)]
    computed = [n for n in outs if n.op in ("call_function", "call_method")]
    if not computed or any("example_value" not in n.meta for n in computed):
        return None
    return [n.meta["example_value"] for n in computed]


def _grad_dataflow(gm: fx.GraphModule) -> set[fx.Node]:
    """Over-approximation of which nodes require grad: floating values computed from inputs that do."""
    out: set[fx.Node] = set()
    for node in gm.graph.nodes:
        val = node_value(node) if node.op != "placeholder" else _input_value(node)
        if node.op in ("placeholder", "get_attr"):
            if isinstance(val, torch.Tensor) and val.requires_grad:
                out.add(node)
            continue
        if node.op not in ("call_function", "call_method") or op_meaning(node) == "detach":
            continue
        floating = any(isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()) for t in tree_leaves(val))
        if floating and any(a in out for a in node.all_input_nodes):
            out.add(node)
    return out


def autograd_facts(gm: fx.GraphModule) -> AutogradFacts:
    """Which nodes require grad and which storages backward saves, in either IR.

    Runs the graph on the placeholders' own fake values (so parameters require
    grad as in training, and everything stays in Dynamo's fake mode) with grad
    enabled, under ``saved_tensors_hooks`` recording what every backward node
    packs. A graph none of whose outputs requires grad (traced under
    ``no_grad``, inference) has no backward: nothing is saved. Dynamo's graph
    says so in its output values (not in its other values: views of parameters
    are recorded as requiring grad even under ``no_grad``); an ATen re-trace does
    not record ``requires_grad``, so there the current grad mode decides, as it
    does for AOT autograd.
    """
    outputs = _output_values(gm)
    if outputs is not None and not any(isinstance(t, torch.Tensor) and t.requires_grad for v in outputs for t in tree_leaves(v)):
        return AutogradFacts(set(), set())
    if outputs is None and not torch.is_grad_enabled():
        return AutogradFacts(set(), set())
    inputs = [_input_value(n) for n in gm.graph.find_nodes(op="placeholder")]
    mode = single_fake_mode(inputs)
    reason = None
    if mode is None or any(v is None for v in inputs):
        reason = "graph inputs carry no single fake mode"
    else:
        saved: list[torch.Tensor] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved.append(t)
            return t

        interp = fx.Interpreter(gm, garbage_collect_values=False)
        try:
            with ExitStack() as stack:
                enter_fake_rerun(stack, mode, grad=True)
                stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))
                interp.run(*inputs, enable_io_processing=False)
        except Exception as e:  # cannot re-run on fake tensors: fall back to a safe estimate, say why
            reason = f"fake re-run failed: {error_summary(e)}"
        else:
            storages = {s for s in (storage_ref(t) for t in saved) if s is not None}
            return AutogradFacts(
                saved={n for n, v in interp.env.items() if storage_ref(v) in storages},
                requires_grad={n for n, v in interp.env.items()
                               if any(isinstance(t, torch.Tensor) and t.requires_grad for t in tree_leaves(v))},
            )
    log.info("autograd facts estimated (%s)", reason)
    return AutogradFacts(set(), _grad_dataflow(gm), exact=False, reason=reason)


def differentiable_inputs(gm: fx.GraphModule, inputs: list[Any]) -> set[int]:
    """Positions of the graph inputs some output's gradient reaches: the graph is run on ``inputs``
    (fakes of one fake mode, ``requires_grad`` as in training) with grad enabled, and autograd's own
    graph is walked from every output back to the leaves it accumulates into.  Raises when the fake
    run is impossible (the caller decides what an unverifiable graph means)."""
    mode = single_fake_mode(inputs)
    if mode is None:
        raise RuntimeError("graph inputs carry no single fake mode")
    with ExitStack() as stack:
        enter_fake_rerun(stack, mode, grad=True)
        outputs = fx.Interpreter(gm).run(*inputs, enable_io_processing=False)
    leaf_position = {id(v): i for i, v in enumerate(inputs) if isinstance(v, torch.Tensor) and v.requires_grad}
    reached: set[int] = set()
    seen: set[int] = set()
    # Keep every visited node alive: a node's Python wrapper exists only while referenced, and a freed
    # wrapper's id() is reused by the next one (seen on torch 2.11: the walk stopped after 4 nodes).
    alive: list[Any] = []
    stack_fns = [t.grad_fn for t in tree_leaves(outputs) if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    reached.update(leaf_position[id(t)] for t in tree_leaves(outputs)
                   if isinstance(t, torch.Tensor) and id(t) in leaf_position)  # an input returned as is
    while stack_fns:
        fn = stack_fns.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        alive.append(fn)
        variable = getattr(fn, "variable", None)  # AccumulateGrad: the leaf it writes .grad of
        if variable is not None and id(variable) in leaf_position:
            reached.add(leaf_position[id(variable)])
        stack_fns.extend(next_fn for next_fn, _ in fn.next_functions)
    return reached


def changed_gradient_inputs(before: fx.GraphModule, after: fx.GraphModule) -> list[str] | None:
    """Names of ``before``'s inputs whose gradient path ``after`` (a re-trace with the same inputs) no
    longer has, or newly has; [] when the paths are the same; None when that cannot be checked (no
    fake values)."""
    placeholders = list(before.graph.find_nodes(op="placeholder"))
    inputs = [_input_value(n) for n in placeholders]
    if any(v is None for v in inputs):
        return None
    if not any(isinstance(v, torch.Tensor) for v in inputs):
        return []  # no tensor inputs (an empty graph Dynamo emitted between two breaks, or sizes only): no gradient paths
    if not any(isinstance(v, FakeTensor) for v in inputs):
        return None
    changed = differentiable_inputs(before, inputs) ^ differentiable_inputs(after, inputs)
    return [placeholders[i].name for i in sorted(changed)]
