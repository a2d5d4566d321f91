"""Which graph values are router tensors, by meaning, in Dynamo's torch IR and the canonical ATen IR.

Router logits: the output of a linear/matmul whose innermost module is a router inside an MoE block;
routing scores: a softmax/sigmoid of them; selected experts: ``topk`` indices of those; and views,
detaches, dtype casts, concatenations and index arithmetic of each keep its label.
"""

from __future__ import annotations

import logging
import operator

import torch
import torch.fx as fx

from moe_passes.ir.facts import is_softmax, is_topk, module_types, node_value, op_meaning, type_name

log = logging.getLogger(__name__)

TARGET_KINDS: tuple[str, ...] = ("router_logits", "selected_experts")
_SCORES = "routing_scores"  # softmax/sigmoid of router logits: a label on the way to selected experts

_ROUTER_OPS = frozenset({"linear", "matmul", "mm", "addmm"})
_SHAPE_OPS = frozenset({"detach", "view", "reshape", "contiguous", "clone", "to", "flatten", "squeeze", "unsqueeze"})
_SCORE_OPS = frozenset({"softmax", "sigmoid", "log_softmax"})
_JOIN_OPS = frozenset({"cat", "stack"})
_INDEX_ARITHMETIC = frozenset({"add", "sub"})


def _is_router_linear(node: fx.Node) -> bool:
    """A linear/matmul whose innermost module is a router (``*.gate`` / ``*.router`` / ``*Router``) inside an MoE block."""
    if op_meaning(node) not in _ROUTER_OPS:
        return False
    stack = module_types(node)
    if not stack:
        return False
    path, mtype = stack[-1]
    is_router = path.rsplit(".", 1)[-1] in ("gate", "router") or type_name(mtype).lower().endswith("router")
    in_moe = any("moe" in type_name(t).lower() for _, t in stack[:-1])
    return is_router and in_moe


def is_shape_op(node: fx.Node) -> bool:
    """Ops that keep a router tensor's meaning: views, detach, copies, dtype casts."""
    return op_meaning(node) in _SHAPE_OPS


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if isinstance(node_value(a), torch.Tensor)]


def classify(graph: fx.Graph) -> dict[fx.Node, str]:
    """Label router tensors: ``router_logits``, ``routing_scores`` (internal), ``selected_experts``."""
    kinds: dict[fx.Node, str] = {}
    for node in graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        meaning = op_meaning(node)
        first = kinds.get(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
        if _is_router_linear(node):
            kinds[node] = "router_logits"
        elif meaning in _SHAPE_OPS:
            if first is not None:
                kinds[node] = first
        elif meaning in _SCORE_OPS or is_softmax(node):
            if first in ("router_logits", _SCORES):
                kinds[node] = _SCORES
        elif meaning in _JOIN_OPS:
            labels = {kinds.get(a) for a in _tensor_inputs(node)}
            if len(labels) == 1 and None not in labels:
                kinds[node] = labels.pop()
        elif node.target is operator.getitem and node.args[1] == 1 and isinstance(node.args[0], fx.Node):
            topk = node.args[0]
            source = topk.args[0] if topk.args else None
            if is_topk(topk) and kinds.get(source) in ("router_logits", _SCORES):
                kinds[node] = "selected_experts"
        elif meaning in _INDEX_ARITHMETIC:
            labels = [kinds.get(a) for a in _tensor_inputs(node)]
            if labels.count("selected_experts") == 1 and all(k in (None, "selected_experts") for k in labels):
                kinds[node] = "selected_experts"
    return kinds
