"""A normalised, counter-free text of what the pass emitted (goldens, the diff CLI).

One line per node the pass created, in graph order: its op (``aten.scatter_add``,
overload dropped), its arguments as references to earlier lines (``%3``) or to the
model node it reads (``<softmax of layer 1>``), its dtype and shape, and the layer
boundary it sits before. No node names, no generated counters: the text stays the
same when node numbering or unrelated parts of the graph change.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from moe_passes.fx.aux_loss.recognise import find_routers
from moe_passes.fx.aux_loss.rewrite import TAG
from moe_passes.ir.facts import node_value

_DT = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16", torch.float16: "f16", torch.int64: "i64",
       torch.int32: "i32", torch.bool: "b8"}


def _op(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._opname}"
    return getattr(target, "__name__", str(target))


def _value_text(node: fx.Node) -> str:
    """``f32[4, 8]`` style text of a node's value (tuple values: each tensor), for the event trace."""
    v = node_value(node)
    if isinstance(v, torch.Tensor):
        return f"{_DT.get(v.dtype, str(v.dtype))}{list(v.shape)}"
    if isinstance(v, (tuple, list)):
        return "(" + ", ".join(f"{_DT.get(t.dtype, t.dtype)}{list(t.shape)}" for t in v if isinstance(t, torch.Tensor)) + ")"
    return ""


def emitted_trace(gm: fx.GraphModule) -> str:
    graph = gm.graph
    routers = find_routers(graph).logits
    layer_of = {x: i for i, x in enumerate(routers)}
    ids: dict[fx.Node, int] = {}
    lines: list[str] = []
    boundary = "start"
    model_names: dict[fx.Node, str] = {}

    def ref(a: Any) -> Any:
        if isinstance(a, fx.Node):
            if a in ids:
                return f"%{ids[a]}"
            if a not in model_names:
                model_names[a] = f"<{_op(a.target) if a.op == 'call_function' else a.op}#{len(model_names)}>"
            return model_names[a]
        if isinstance(a, (list, tuple)):
            return "[" + ", ".join(str(ref(x)) for x in a) + "]"
        if isinstance(a, torch.dtype):
            return _DT.get(a, str(a))
        return repr(a)

    for node in graph.nodes:
        if node in layer_of:
            boundary = f"router logits of layer {layer_of[node]}"
            continue
        if node.meta.get("moe_passes") != TAG:
            continue
        ids[node] = len(ids)
        args = ", ".join([str(ref(a)) for a in node.args] + [f"{k}={ref(v)}" for k, v in node.kwargs.items()])
        lines.append(f"%{ids[node]} = {_op(node.target)}({args}) -> {_value_text(node)}   # after {boundary}")
    return "\n".join(lines) + "\n"
