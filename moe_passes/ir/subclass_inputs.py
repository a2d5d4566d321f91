"""Tensor-subclass graph inputs at the boundary of the canonical re-trace (FSDP2 / expert-parallel DTensors).

transformers' own expert parallelism and FSDP2 hand a compiled region its parameters as ``DTensor`` graph
inputs, which the model turns into plain tensors with ``.to_local()`` (transformers'
``_use_local_dtensor_params``). ``make_fx(pre_dispatch=True)`` cannot record that conversion: ``to_local``
is an ``autograd.Function`` whose forward reads the DTensor's ``_local_tensor`` attribute, so the re-trace
records the local shard *as a tensor constant* (``view_as(_tensor_constant0, _tensor_constant0)``): a
graph that would compute with the fake it was traced with instead of the parameter (it failed only by
luck, with "Mixing fake modes", in the gradient-path check).

So the re-trace stops at that boundary: every ``to_local()`` of a subclass input stays the node Dynamo
recorded, and only the body after it is re-traced, with the local tensors as its inputs (``split``);
then the two are joined again (``join``). A subclass input used any other way refuses the re-trace with
that reason (the Dynamo graph stays; ATen passes skip it and say why).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor

from moe_passes.ir.facts import node_value

log = logging.getLogger(__name__)


class BoundaryRefused(Exception):
    """A tensor-subclass input the re-trace cannot keep at its boundary; the message says why."""


@dataclass
class Boundary:
    """``gm`` cut at its subclass inputs: ``body`` reads each ``to_local()`` result as a placeholder."""

    gm: fx.GraphModule
    body: fx.GraphModule
    #: body placeholder -> the node of ``gm`` it stands for (a plain placeholder, or a ``to_local()`` call)
    sources: dict[fx.Node, fx.Node]


def _is_subclass_input(node: fx.Node) -> bool:
    v = node_value(node)
    # a wrapper subclass (DTensor, or an nn.Parameter of one); Dynamo's plain fakes are FakeTensors
    return isinstance(v, torch.Tensor) and not isinstance(v, FakeTensor) and type(v) is not torch.Tensor


def _is_to_local(node: fx.Node) -> bool:
    return node.op == "call_method" and node.target == "to_local"


def split(gm: fx.GraphModule) -> Boundary | None:
    """The body to re-trace when ``gm`` has subclass inputs read only through ``to_local()``; None when it has
    no subclass inputs. Raises ``BoundaryRefused`` for any other use of one."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    subclass = [p for p in placeholders if _is_subclass_input(p)]
    if not subclass:
        return None
    conversions: list[fx.Node] = []
    for p in subclass:
        others = [u for u in p.users if not _is_to_local(u)]
        if others:
            raise BoundaryRefused(
                f"graph input {p.name} is a {type(node_value(p)).__name__} used by {[u.name for u in others][:4]}, not only "
                "through .to_local(): the ATen re-trace would record its local shard as a constant")
        conversions.extend(p.users)
    body = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    sources: dict[fx.Node, fx.Node] = {}
    for p in placeholders:
        if p in subclass:
            continue
        env[p] = body.node_copy(p)
        sources[env[p]] = p
    for c in conversions:
        local = body.placeholder(c.name)
        local.meta = dict(c.meta)
        env[c] = local
        sources[local] = c
    for n in gm.graph.nodes:
        if n.op == "placeholder" or n in env:
            continue
        env[n] = body.node_copy(n, lambda a: env[a])
    body_gm = fx.GraphModule(gm, body)
    body_gm.meta = dict(getattr(gm, "meta", {}))
    log.debug("re-trace boundary: %d subclass input(s), %d to_local() kept", len(subclass), len(conversions))
    return Boundary(gm, body_gm, sources)


def join(boundary: Boundary, traced: fx.GraphModule) -> fx.GraphModule:
    """``boundary.gm``'s placeholders and ``to_local()`` calls, then ``traced`` (the re-traced body) reading them."""
    gm = boundary.gm
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for p in gm.graph.find_nodes(op="placeholder"):
        env[p] = graph.node_copy(p)
    for node in boundary.sources.values():
        if _is_to_local(node):
            env[node] = graph.node_copy(node, lambda a: env[a])
    body_inputs = list(traced.graph.find_nodes(op="placeholder"))
    originals = list(boundary.sources.values())  # body placeholders in order, as ``split`` made them
    if len(body_inputs) != len(originals):
        raise BoundaryRefused(f"the re-traced body has {len(body_inputs)} inputs, expected {len(originals)}")
    tenv = {b: env[o] for b, o in zip(body_inputs, originals)}
    for n in traced.graph.nodes:
        if n.op == "placeholder":
            continue
        tenv[n] = graph.node_copy(n, lambda a: tenv[a])
    joined = fx.GraphModule(traced, graph)
    joined.meta = dict(getattr(traced, "meta", {}))
    return joined
