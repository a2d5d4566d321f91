"""The canonical IR the analysis passes read: Dynamo's graph re-traced to pre-dispatch ATen.

Why: Dynamo's torch-level graph spells one op many ways (``F.softmax``,
``Tensor.softmax``, ``torch.softmax``; ``.float()``/``.to``/``.type`` casts),
hides writes in method names and keeps negative dims. Re-tracing the same
forward with ``make_fx(pre_dispatch=True)`` gives one ``OpOverload`` per op
with a schema (mutation visible as ``alias_info.is_write``; dims and defaults
explicit), before autograd, so AOT autograd still derives the backward of
whatever a pass rewrites.

How (verified on torch 2.13 CPU inside a real backend call):

* the re-trace runs in **Dynamo's own fake mode and shape env**
  (``torch._guards.detect_fake_mode(example_inputs)``); a fake mode of our
  own fails with "Mixing fake modes";
* ``torch.fx.traceback.preserve_node_meta()`` keeps ``nn_module_stack``,
  ``stack_trace`` and ``source_fn_stack`` on every ATen node (absent only on
  the root module's own nodes, as in Dynamo's graph);
* unbacked sizes from ``.item()``/``.tolist()`` stay unbacked symbols of the
  same shape env, so the all-to-all split sizes remain data-dependent;
* functional collectives appear as ``_c10d_functional.*.default``.

``torch.func.functionalize`` on top hit an internal functorch assert, so the
canonical graph is *not* functionalized: in-place ATen ops stay, and every
analysis reads them from schemas (``moe_passes.ir.facts.mutated_args``).

Higher-order ops are ops (``moe_passes.ir.hops``):

* an activation checkpoint (``tag_activation_checkpoint``: ``checkpoint(...,
  use_reentrant=False)``, ``checkpoint_wrapper``) is inlined the way AOT
  autograd traces one itself: every node recorded for its body carries
  ``meta["ac_graph_id"]`` and ``meta["recompute"]`` (``PREFER_RECOMPUTE``), which
  ``make_fx`` and AOT autograd copy onto the nodes they derive from it, so the
  passes analyse and rewrite the body and the min-cut partitioner still
  recomputes it in backward. A selective-checkpoint policy
  (``create_selective_checkpoint_contexts``, kept by Dynamo as the body's
  ``meta["_checkpoint_context_fn"]``) decides per op below autograd: such a body
  is recorded with autograd's own decompositions (``aten.mm``, not
  ``aten.linear``) and each node gets the policy's decision for its op. Any
  other ``context_fn`` refuses the re-trace with the reason;
* a user's ``torch.autograd.Function`` (``autograd_function_apply``) stays one
  node with its forward and backward bodies: its own backward survives, and an
  analysis that meets it meets an op it has no rule for;
* torch 2.11's identity-gradient wait Function is re-traced as the wait it
  means (``identity_gradient_wait``).

The re-trace is skipped (the Dynamo graph is used as is, and the reason is
returned) when no fake mode can be found (hand-built graphs), when tracing
raises, or when it would change what autograd does (``check_retrace_keeps_autograd``:
a higher-order op that did not survive, a checkpoint inlined without its
recompute tags, or a changed set of inputs that get a gradient); passes that
need the canonical form then decline with that reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode

from moe_passes.errors import error_summary
from moe_passes.ir import subclass_inputs
from moe_passes.ir.autograd import changed_gradient_inputs
from moe_passes.ir.facts import node_value, op_namespace_and_name
from moe_passes.ir.fake_mode import graph_fake_mode, placeholder_fakes
from moe_passes.ir.hops import (  # noqa: F401 - identity_gradient_wait and CheckpointRefused are part of this module's API
    CheckpointRefused,
    InlinedCheckpoint,
    _compute_nodes,
    _UnwrappingInterpreter,
    identity_gradient_wait,
)

log = logging.getLogger(__name__)

#: ``gm.meta`` key marking a graph module that is already in the canonical IR.
CANONICAL_META_KEY = "moe_passes_canonical"


@dataclass
class Canonicalized:
    gm: fx.GraphModule
    canonical: bool  # False: gm is the input graph unchanged, ``reason`` says why
    reason: str | None = None
    fake_mode: FakeTensorMode | None = None


def is_canonical(gm: fx.GraphModule) -> bool:
    return bool(getattr(gm, "meta", {}).get(CANONICAL_META_KEY))


def canonicalize(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Canonicalized:
    """Re-trace ``gm`` to pre-dispatch ATen in its own fake mode; metadata kept.

    Returns the input unchanged (``canonical=False`` and a reason) when that is not possible.
    """
    if is_canonical(gm):
        return Canonicalized(gm, True, fake_mode=graph_fake_mode(gm, example_inputs))
    mode = graph_fake_mode(gm, example_inputs)
    if mode is None:
        return Canonicalized(gm, False, "no fake mode on the graph or its example inputs (hand-built graph)")
    from torch.fx.experimental.proxy_tensor import make_fx

    try:  # DTensor parameters (FSDP2, transformers' EP): their .to_local() stays, the body is re-traced
        boundary = subclass_inputs.split(gm)
    except subclass_inputs.BoundaryRefused as e:
        log.warning("canonical IR unavailable: %s", e)
        return Canonicalized(gm, False, str(e), mode)
    source = boundary.body if boundary is not None else gm
    args = placeholder_fakes(source, example_inputs if boundary is None else (), mode)
    waits = {n: identity_gradient_wait(source, n) for n in source.graph.nodes}
    waits = {n: w for n, w in waits.items() if w is not None}
    checkpoints: dict[fx.Node, InlinedCheckpoint] = {}

    def run(*a: Any) -> Any:
        checkpoints.clear()  # one entry per checkpoint of this trace
        return _UnwrappingInterpreter(source, waits, checkpoints).run(*a)

    try:
        with mode, torch.fx.traceback.preserve_node_meta():
            traced = make_fx(run, pre_dispatch=True, tracing_mode="real")(*args)
    except CheckpointRefused as e:
        log.warning("canonical IR unavailable: %s", e)
        return Canonicalized(gm, False, str(e), mode)
    except Exception as e:  # noqa: BLE001 - any tracer failure means "use the Dynamo graph"
        reason = f"pre-dispatch re-trace failed ({error_summary(e)})"
        hops = _higher_order_nodes(source)
        if hops:
            reason += "; the graph holds higher-order ops: " + ", ".join(
                f"{nodes[0].name} (torch.ops.higher_order.{name})" for name, nodes in hops.items())
        log.warning("canonical IR unavailable: %s", reason)
        return Canonicalized(gm, False, reason, mode)
    try:
        carry_dynamo_attributes(source, traced)
        check_retrace_keeps_autograd(source, traced, unwrapped=set(waits), checkpoints=checkpoints)
        if boundary is not None:
            traced = subclass_inputs.join(boundary, traced)
            carry_dynamo_attributes(gm, traced)
    except (RuntimeError, subclass_inputs.BoundaryRefused) as e:
        log.warning("canonical IR unavailable: %s", e)
        return Canonicalized(gm, False, str(e), mode)
    traced.meta = dict(getattr(gm, "meta", {}))
    traced.meta[CANONICAL_META_KEY] = True
    log.debug("canonical IR: %d Dynamo nodes -> %d ATen nodes", len(gm.graph.nodes), len(traced.graph.nodes))
    return Canonicalized(traced, True, fake_mode=mode)


def _higher_order_nodes(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    out: dict[str, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        parsed = op_namespace_and_name(n.target) if n.op == "call_function" else None
        if parsed is not None and parsed[0] == "higher_order":
            out.setdefault(parsed[1], []).append(n)
    return out


def check_retrace_keeps_autograd(src: fx.GraphModule, traced: fx.GraphModule, unwrapped: set[fx.Node] = frozenset(),
                                 checkpoints: dict[fx.Node, InlinedCheckpoint] | None = None) -> None:
    """Raise (RuntimeError, with the reason) unless the re-trace keeps what autograd does with the graph.

    ``make_fx`` runs a higher-order op such as ``autograd_function_apply`` (a user's
    ``torch.autograd.Function``, or torch 2.11's functional-collective wait) or an activation
    checkpoint by running its body: the body's ATen ops are recorded and the op's own rules (a
    hand-written backward, recomputation) are gone, and a custom Function's forward is recorded
    under ``no_grad``, which cuts the gradient of everything before it. So a re-trace in which such
    an op did not survive is refused (``unwrapped``: identity-gradient waits, re-traced as the wait
    they mean), and as a check from autograd itself, the inputs each output's gradient reaches (a fake
    forward of both graphs, autograd's graph walked) must be the same.

    An activation checkpoint may be inlined (``checkpoints``: the ones ``canonicalize`` inlined) only
    with its recomputation kept: every node recorded for it carries its ``ac_graph_id`` and a
    ``recompute`` policy, which is what AOT autograd's partitioner recomputes in backward.
    """
    from torch.utils.checkpoint import CheckpointPolicy

    checkpoints = checkpoints or {}
    before, after = _higher_order_nodes(src), _higher_order_nodes(traced)
    tagged: dict[Any, list[fx.Node]] = {}
    for n in traced.graph.nodes:
        if "ac_graph_id" in n.meta:
            tagged.setdefault(n.meta["ac_graph_id"], []).append(n)
    for node in before.get("tag_activation_checkpoint", ()):
        inlined = checkpoints.get(node)
        if inlined is None:
            continue  # not inlined: it must have survived as a node (checked below)
        nodes = tagged.get(inlined.graph_id, [])
        body = src.get_submodule(node.args[0].target) if isinstance(node.args[0], fx.Node) else None
        if not nodes and (body is None or _compute_nodes(body)):
            raise RuntimeError(f"the ATen re-trace inlined activation checkpoint {node.name} "
                               f"(torch.ops.higher_order.tag_activation_checkpoint) but none of its nodes carries "
                               f"its recompute tag (ac_graph_id {inlined.graph_id}): its recomputation would be lost")
        untagged = [n.name for n in nodes if not isinstance(n.meta.get("recompute"), CheckpointPolicy)]
        if untagged:
            raise RuntimeError(f"the ATen re-trace inlined activation checkpoint {node.name} but {', '.join(untagged[:4])} "
                               "carry no recompute policy: their recomputation would be lost")
    for name, nodes in before.items():
        nodes = [n for n in nodes if n not in unwrapped and n not in checkpoints]  # re-traced as the op they mean
        if not nodes:
            continue
        if len(after.get(name, ())) < len(nodes):
            raise RuntimeError(
                f"the ATen re-trace would inline {nodes[0].name} (torch.ops.higher_order.{name}, e.g. a custom "
                "torch.autograd.Function or an activation checkpoint) and drop its own autograd rules")
    try:
        changed = changed_gradient_inputs(src, traced)
    except Exception as e:  # noqa: BLE001 - unverifiable means refused
        raise RuntimeError(f"cannot check that the ATen re-trace keeps every gradient path "
                           f"({error_summary(e)})") from e
    if changed is None:
        raise RuntimeError("cannot check that the ATen re-trace keeps every gradient path (inputs carry no fake values)")
    if changed:
        raise RuntimeError(f"the ATen re-trace changes which inputs get a gradient: {', '.join(changed[:4])}"
                           f"{' and %d more' % (len(changed) - 4) if len(changed) > 4 else ''}")


def carry_dynamo_attributes(src: fx.GraphModule, dst: fx.GraphModule) -> None:
    """Give a re-traced graph Dynamo's placeholder identity, by position: names, metadata and the node
    attributes Dynamo sets outside ``meta`` (``_dynamo_source``, which AOT autograd requires and uses
    to mark parameters as static inputs), plus the module-level parameter-source map where it still
    covers every parameter and buffer."""
    old_ph = list(src.graph.find_nodes(op="placeholder"))
    new_ph = list(dst.graph.find_nodes(op="placeholder"))
    if len(old_ph) != len(new_ph):
        raise RuntimeError(f"re-trace changed the number of graph inputs ({len(old_ph)} -> {len(new_ph)})")
    for new in new_ph:
        new._rename("moe_passes_tmp_" + new.name)
    for old, new in zip(old_ph, new_ph):
        new._rename(old.name)
        new.target = old.target
        for key, value in old.meta.items():
            new.meta.setdefault(key, value)
        for attr, value in vars(old).items():
            if attr.startswith("_dynamo"):
                setattr(new, attr, value)
    sources = getattr(src, "_param_name_to_source", None)
    if sources is not None:
        # AOT autograd requires a source for every parameter and buffer once the map exists; the
        # re-trace may lift tensor constants into buffers Dynamo never saw. Then leave the map out:
        # AOT takes its export path, which still marks parameters and buffers as static inputs.
        names = [n for n, _ in dst.named_parameters()] + [n for n, _ in dst.named_buffers()]
        if all(n in sources for n in names):
            dst._param_name_to_source = sources
    dst.recompile()


def canonicalize_in_place(gm: fx.GraphModule, example_inputs: Sequence[Any] = ()) -> str | None:
    """Re-trace ``gm`` to the canonical IR and swap the result into ``gm`` itself (same inputs, names,
    Dynamo attributes), for callers that hold on to the module. None on success, else the reason."""
    if is_canonical(gm):
        return None
    inputs = list(example_inputs) or [node_value(p) for p in gm.graph.find_nodes(op="placeholder")]
    res = canonicalize(gm, inputs)
    if not res.canonical:
        return res.reason
    traced = res.gm
    for n in traced.graph.nodes:
        if n.op == "get_attr" and not hasattr(gm, n.target):
            setattr(gm, n.target, getattr(traced, n.target))
    gm.graph = traced.graph  # its placeholders already carry Dynamo's attributes (see canonicalize)
    gm.meta[CANONICAL_META_KEY] = True
    gm.recompile()
    return None
