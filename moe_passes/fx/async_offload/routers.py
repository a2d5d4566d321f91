"""Which graph values are router tensors, decided from data flow, in Dynamo's torch IR and the canonical ATen IR.

No module, class or attribute name is read: a router called ``g``, one in the compiled root module and one
inside ``FooMoE.gate`` are found the same way, from what the ops compute.

* A **top-k routes** when its indices select experts: a value computed from them (through any ops; the
  walk stops at the next top-k, whose own indices decide there)

  - is an operand of an all-to-all (tokens dispatched by expert, or the counts exchanged for it),
  - is the offsets of a grouped GEMM, or the sizes of a split,
  - enters an opaque op (a custom op or higher-order op: a fused expert or dispatch kernel) together with a
    tensor computed from the graph inputs that is neither computed from the indices nor the ranked scores,
  - or is the index of a gather / ``index`` / ``index_select`` / ``take`` / ``embedding`` (or of a
    ``scatter*`` / ``index_copy`` / ``index_add`` / ``index_put`` write) that moves a tensor computed from
    the graph's inputs (tokens, expert weights) which is itself neither computed from those indices nor the
    scores the top-k ranked (``scores.gather(1, idx)`` picks routing weights: it selects nothing).

  ``one_hot``/``bincount``/``histc``/``scatter_add`` counters and ``sort``/``argsort`` permutations are
  on the way to those uses; alone (a balancing loss, a histogram for logging) they do not route.
* **Selected experts**: the indices of a routing top-k, and index arithmetic of them (group offsets added).
* **Router logits**: the value reached walking back from a routing top-k's input through casts and views,
  ``softmax``/``log_softmax``/``sigmoid``, a broadcast bias added (DeepSeek-V3's expert bias), a broadcast
  or scalar scale/normalisation and ``masked_fill`` (group-limited routing), provided the graph computes it
  (not a graph input). Values on that walk after its first non-view op are routing scores (internal label).
* A value that is a view, detach, cast, ``cat`` or ``stack`` of labelled values keeps their label; so does
  a graph output.

``analyse`` also keeps every top-k that does not route and why (with its source line), so a pass that
finds nothing can say what it looked for and why each top-k-related output was rejected.
"""

from __future__ import annotations

import logging
import operator
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from moe_passes.config import OFFLOAD_TARGET_KINDS
from moe_passes.ir.facts import (
    is_all_to_all,
    is_softmax,
    is_topk,
    known_equal,
    normalize_dim,
    op_arg,
    op_meaning,
    op_namespace_and_name,
    tensor_value,
)

log = logging.getLogger(__name__)

TARGET_KINDS: tuple[str, ...] = OFFLOAD_TARGET_KINDS  # the kinds users may name (moe_passes.config)
_SCORES = "routing_scores"  # softmax/sigmoid/bias of router logits on the way to the top-k: internal label

#: What the pass looks for, in the words of its skip reasons.
LOOKED_FOR = (
    "looked for router logits (the values whose top-k, directly or after softmax/sigmoid/bias/casts, gives "
    "indices that select experts: a value computed from the indices feeds an all-to-all, grouped-GEMM "
    "offsets or split sizes, or indexes tokens or expert weights) and selected experts (those indices)"
)

_SHAPE_OPS = frozenset({"detach", "view", "reshape", "contiguous", "clone", "to", "flatten", "squeeze", "unsqueeze"})
_SCORE_OPS = frozenset({"softmax", "sigmoid", "log_softmax"})
_JOIN_OPS = frozenset({"cat", "stack"})
_INDEX_ARITHMETIC = frozenset({"add", "sub"})
#: Ops on the way from router logits to the ranked scores, beside views/casts and score functions:
#: the follow-through operand is the one with the result's full shape (the other is a bias, scale or mask).
_BROADCAST_OPS = frozenset({"add", "sub", "mul", "div", "true_divide"})
_MASK_OPS = frozenset({"masked_fill"})
#: torch-IR spellings ``op_meaning`` leaves out.
_TORCH_EXTRA = {operator.truediv: "div", operator.mul: "mul", operator.floordiv: "floor_divide",
                operator.setitem: "setitem", F.embedding: "embedding", F.one_hot: "one_hot"}
_ALL_TO_ALL_NAMES = frozenset({"all_to_all_single", "all_to_all_single_autograd"})
_GROUPED_MM_NAMES = frozenset({"_grouped_mm", "grouped_mm"})
_SPLIT_NAMES = frozenset({"split", "split_with_sizes", "tensor_split"})
#: Reads: (data argument, index argument), as (schema position, name).
_READS = {
    "index": ((0, "self"), (1, "indices")), "index_select": ((0, "self"), (2, "index")),
    "gather": ((0, "self"), (2, "index")), "take": ((0, "self"), (1, "index")),
    "take_along_dim": ((0, "self"), (1, "indices")), "embedding": ((0, "weight"), (1, "indices")),
}
#: Writes: (moved values argument, index argument).
_WRITES = {
    "index_copy": ((3, "source"), (2, "index")), "index_add": ((3, "source"), (2, "index")),
    "index_put": ((2, "values"), (1, "indices")), "scatter": ((3, "src"), (2, "index")),
    "scatter_add": ((3, "src"), (2, "index")), "scatter_reduce": ((3, "src"), (2, "index")),
}


_MEANING_BY_TARGET: dict[Any, str | None] = {}


def meaning(node: fx.Node) -> str | None:
    """``op_meaning`` plus the torch-IR functions it leaves out (by identity with torch's own function of that
    name) and custom ops by their op name; in-place spellings fold onto the functional one (``scatter_add_``).
    A call's meaning depends on its target only (cached per target)."""
    if node.op == "call_function" and _cacheable(node.target):
        if node.target not in _MEANING_BY_TARGET:
            _MEANING_BY_TARGET[node.target] = _meaning(node)
        return _MEANING_BY_TARGET[node.target]
    return _meaning(node)


def _meaning(node: fx.Node) -> str | None:
    name = op_meaning(node)
    if name is None and node.op == "call_function":
        target = node.target
        name = _TORCH_EXTRA.get(target) if _hashable(target) else None
        if name is None:
            parsed = op_namespace_and_name(target)
            if parsed is not None:
                name = parsed[1]
            else:
                fn = getattr(target, "__name__", None)
                if fn and any(getattr(ns, fn, None) is target for ns in (torch, F, torch.special, torch.linalg)):
                    name = fn
                elif fn in _ALL_TO_ALL_NAMES and "distributed" in (getattr(target, "__module__", "") or ""):
                    name = fn
    if name and name.endswith("_") and not name.endswith("__"):
        name = name[:-1]
    return name


def _cacheable(target: Any) -> bool:
    """Op overloads and torch's / operator's own functions (never a user's function: it would be kept alive)."""
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket, torch._ops.HigherOrderOperator)):
        return True
    module = getattr(target, "__module__", None) or ""
    return _hashable(target) and module.split(".", 1)[0] in ("torch", "_operator", "operator")


def _hashable(x: Any) -> bool:
    try:
        hash(x)
    except TypeError:
        return False
    return True


def is_shape_op(node: fx.Node) -> bool:
    """Ops that keep a router tensor's meaning: views, detach, copies, dtype casts."""
    return op_meaning(node) in _SHAPE_OPS


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if tensor_value(a) is not None]


def _same_shape(a: fx.Node, b: fx.Node) -> bool:
    va, vb = tensor_value(a), tensor_value(b)
    if va is None or vb is None or va.dim() != vb.dim():
        return False
    return all(known_equal(x, y) for x, y in zip(va.shape, vb.shape))


def _nodes_in(arg: Any) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.map_arg(arg, lambda n: found.append(n) or n)
    return found


def source_line(node: fx.Node) -> str:
    """Where the user wrote ``node``: ``file.py:LINE (code)`` from ``stack_trace``; the node's name without one."""
    trace = node.meta.get("stack_trace") or ""
    lines = trace.rstrip().splitlines()
    for i in range(len(lines) - 1, -1, -1):
        text = lines[i].strip()
        if text.startswith('File "') and ", line " in text:
            path = text[len('File "'):text.index('"', len('File "'))]
            line = text.split(", line ", 1)[1].split(",", 1)[0]
            try:
                rel = os.path.relpath(path)
                path = path if rel.startswith("..") else rel
            except ValueError:
                pass
            code = lines[i + 1].strip() if i + 1 < len(lines) else ""
            return f"{path}:{line}" + (f" (`{code}`)" if code else "") + f" [{node.name}]"
    return node.name


def chain_root(node: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """Walk back from a ranked value to the logits it was computed from (see the module docstring).

    Returns (root, the nodes walked through in graph order, the ranked value last; root not included)."""
    chain: list[fx.Node] = []
    cur = node
    for _ in range(256):
        nxt = _chain_input(cur)
        if nxt is None:
            break
        chain.append(cur)
        cur = nxt
    return cur, chain[::-1]


def _chain_input(node: fx.Node) -> fx.Node | None:
    if node.op not in ("call_function", "call_method"):
        return None
    m = meaning(node)
    first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if m in _SHAPE_OPS or m in _SCORE_OPS or m in _MASK_OPS or is_softmax(node):
        return first if tensor_value(first) is not None else None
    if m in _BROADCAST_OPS:
        full = [a for a in _tensor_inputs(node) if _same_shape(a, node)]
        if len(full) == 1 and (m in ("add", "mul") or full[0] is first):
            return full[0]
    return None


def _from_inputs(graph: fx.Graph) -> set[fx.Node]:
    """Values computed from the graph's inputs or attributes (tokens, weights), as opposed to constants."""
    out: set[fx.Node] = set()
    for n in graph.nodes:
        if n.op in ("placeholder", "get_attr") or any(a in out for a in n.all_input_nodes):
            out.add(n)
    return out


def _topk_parts(topk: fx.Node) -> tuple[fx.Node | None, fx.Node | None]:
    """(values, indices) getitems of a top-k."""
    values = indices = None
    for u in topk.users:
        if u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int):
            if u.args[1] == 0 and values is None:
                values = u
            elif u.args[1] == 1 and indices is None:
                indices = u
    return values, indices


@dataclass
class TopkFinding:
    """One top-k: whether its indices select experts (``evidence``) or why not (``reason``)."""

    node: fx.Node
    ranked: fx.Node | None
    root: fx.Node | None
    chain: list[fx.Node]
    values: fx.Node | None
    indices: fx.Node | None
    evidence: str | None = None
    reason: str | None = None

    @property
    def routes(self) -> bool:
        return self.evidence is not None

    def describe(self) -> str:
        k = op_arg(self.node, 1, "k")
        val = tensor_value(self.ranked)
        dim = normalize_dim(op_arg(self.node, 2, "dim", -1), val.dim()) if val is not None else None
        over = f" over {val.shape[dim]} values" if val is not None and dim is not None and val.dim() > 0 else ""
        return f"the top-{k}{over} at {source_line(self.node)}"


@dataclass
class RouterAnalysis:
    """Labels of router tensors (``kinds``), every top-k found, and labels reached only from top-ks that do not
    route (``rejected``: node -> (what it is, the top-k))."""

    kinds: dict[fx.Node, str]
    topks: list[TopkFinding]
    rejected: dict[fx.Node, tuple[str, TopkFinding]] = field(default_factory=dict)


class _LazySource:
    """``source_line(node)`` computed only when a message is formatted (most visited nodes prove nothing)."""

    def __init__(self, node: fx.Node) -> None:
        self.node = node

    def __format__(self, spec: str) -> str:
        return format(source_line(self.node), spec)


def _selection(u: fx.Node, tainted: set[fx.Node], root: fx.Node | None, inputs: set[fx.Node]) -> tuple[str | None, str | None]:
    """Whether ``u`` (computed from the indices) selects experts: (evidence, None) or (None, why not) or (None, None)."""
    m = meaning(u)
    where = _LazySource(u)
    if is_all_to_all(u) or m in _ALL_TO_ALL_NAMES:
        return f"they feed the all-to-all at {where}", None
    if m in _GROUPED_MM_NAMES:
        offs = op_arg(u, 2, "offs", None)
        if offs is None:
            offs = op_arg(u, 2, "offsets", None)
        if any(a in tainted for a in _nodes_in(offs)):
            return f"they give the grouped-GEMM offsets at {where}", None
    if m in _SPLIT_NAMES and any(a in tainted for a in _nodes_in(u.args[1:]) + _nodes_in(dict(u.kwargs))):
        return f"they give the split sizes at {where}", None
    if _is_opaque(u):
        partners = [a for a in _tensor_inputs(u) if a not in tainted and a in inputs
                    and (root is None or chain_root(a)[0] is not root)]
        if partners:
            return (f"they enter the opaque op {_op_name(u)} at {where} with {partners[0].name} (computed from the "
                    "graph inputs): a fused expert or dispatch kernel"), None
    data: Any = None
    index: Any = None
    if u.op == "call_function" and u.target is operator.getitem and tensor_value(u.args[0]) is not None:
        m, data, index = "index", u.args[0], u.args[1]
    elif u.op == "call_function" and u.target is F.embedding:
        data, index = op_arg(u, 1, "weight"), op_arg(u, 0, "input")
    elif u.op == "call_function" and u.target is operator.setitem:
        m, data, index = "index_put", u.args[2], u.args[1]
    elif m in _READS or m in _WRITES:
        (dpos, dname), (ipos, iname) = (_READS.get(m) or _WRITES[m])
        data, index = op_arg(u, dpos, dname), op_arg(u, ipos, iname)
    if not isinstance(data, fx.Node) or not any(a in tainted for a in _nodes_in(index)):
        return None, None
    if data in tainted:
        return None, f"the {m} at {where} moves values computed from the indices themselves"
    if root is not None and chain_root(data)[0] is root:
        return None, f"the {m} at {where} reads the scores the top-k ranked (weights for the chosen entries, not a selection)"
    if data not in inputs:
        return None, f"the {m} at {where} reads a tensor built from constants"
    return f"they index {data.name} (computed from the graph inputs) in the {m} at {where}", None


#: Op namespaces whose ops are understood one by one (never opaque).
_TRANSPARENT_NAMESPACES = frozenset({"aten", "prims", "moe_passes", "_c10d_functional", "_c10d_functional_autograd",
                                     "c10d_functional", "c10d", "_operator", "profiler"})


def _is_opaque(u: fx.Node) -> bool:
    """A custom op or a higher-order op (its body unread here): a fused MoE / dispatch kernel, a custom Function."""
    if u.op != "call_function":
        return False
    parsed = op_namespace_and_name(u.target)
    if parsed is None:
        return False
    return parsed[0] == "higher_order" or parsed[0] not in _TRANSPARENT_NAMESPACES


def _op_name(u: fx.Node) -> str:
    parsed = op_namespace_and_name(u.target)
    return f"{parsed[0]}::{parsed[1]}" if parsed else u.name


def _judge(f: TopkFinding, inputs: set[fx.Node], nodes: list[fx.Node], order: dict[fx.Node, int]) -> None:
    """Scan forward from the indices in graph order (topological), growing the set of values computed from them
    (not through a later top-k), until one selects experts; usually within the same layer, so the scan is short."""
    if f.indices is None or not f.indices.users:
        f.reason = f"{f.describe()} has its values used, not its indices"
        return
    tainted = {f.indices}
    notes: list[str] = []
    for u in nodes[order[f.indices] + 1:]:
        if u.op == "output" or not any(a in tainted and not is_topk(a) for a in u.all_input_nodes):
            continue
        tainted.add(u)
        evidence, note = _selection(u, tainted, f.root, inputs)
        if evidence is not None:
            f.evidence = f"{f.describe()} selects experts: {evidence}"
            return
        if note is not None and note not in notes:
            notes.append(note)
    later = [u for u in sorted(tainted, key=order.__getitem__) if is_topk(u)]
    if tainted == {f.indices}:
        notes.insert(0, "its indices are only returned")
    if later:
        notes.append("they only shape what " + ", ".join(source_line(t) for t in later[:2]) + " ranks")
    if not notes:
        ops = list(dict.fromkeys(meaning(u) or u.name for u in sorted(tainted - {f.indices}, key=order.__getitem__)))
        notes.append("its indices only reach " + ", ".join(ops[:5]) + (", ..." if len(ops) > 5 else ""))
    why = "; ".join(notes[:4])
    f.reason = (f"{f.describe()} routes nothing: no value computed from its indices feeds an all-to-all, grouped-GEMM "
                f"offsets or split sizes, or indexes tokens or weights ({why})")


def analyse(graph: fx.Graph) -> RouterAnalysis:
    """Find the top-ks that route, label their router tensors, and keep the others with why they do not route."""
    nodes = list(graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    inputs = _from_inputs(graph)
    findings: list[TopkFinding] = []
    for node in graph.nodes:
        if not is_topk(node):
            continue
        ranked = op_arg(node, 0, "self")
        if not isinstance(ranked, fx.Node):
            ranked = op_arg(node, 0, "input")
        root, chain = chain_root(ranked) if isinstance(ranked, fx.Node) else (None, [])
        values, indices = _topk_parts(node)
        finding = TopkFinding(node, ranked if isinstance(ranked, fx.Node) else None, root, chain, values, indices)
        _judge(finding, inputs, nodes, order)
        findings.append(finding)
        log.debug("top-k %s: %s", node.name, finding.evidence or finding.reason)

    seeds: dict[fx.Node, str] = {}
    rejected_seeds: dict[fx.Node, tuple[str, TopkFinding]] = {}
    for f in findings:
        if f.routes:
            _seed_router(f, seeds)
        else:
            for n, kind in ((f.indices, "top-k indices"), (f.values, "top-k values"), (f.ranked, "values ranked by a top-k")):
                if n is not None:
                    rejected_seeds.setdefault(n, (kind, f))
    kinds = _propagate(graph, seeds)
    rejected: dict[fx.Node, tuple[str, TopkFinding]] = {}
    for node in graph.nodes:  # views/casts/joins of what a non-routing top-k read or gave
        if node in kinds:
            continue
        if node in rejected_seeds:
            rejected[node] = rejected_seeds[node]
        elif node.op in ("call_function", "call_method") and (is_shape_op(node) or meaning(node) in _JOIN_OPS):
            labels = [rejected.get(a) for a in _tensor_inputs(node)]
            if labels and labels[0] is not None and (is_shape_op(node) or all(lab is labels[0] for lab in labels)):
                rejected[node] = labels[0]
    return RouterAnalysis(kinds, findings, rejected)


def _seed_router(f: TopkFinding, seeds: dict[fx.Node, str]) -> None:
    if f.indices is not None:
        seeds[f.indices] = "selected_experts"
    root = f.root
    if root is None or root.op not in ("call_function", "call_method"):
        return  # logits computed outside this graph: nothing here produces them
    seeds.setdefault(root, "router_logits")
    label = "router_logits"
    for n in f.chain:
        if label == "router_logits" and not is_shape_op(n):
            label = _SCORES
        seeds.setdefault(n, label)


def _propagate(graph: fx.Graph, seeds: dict[fx.Node, str]) -> dict[fx.Node, str]:
    kinds: dict[fx.Node, str] = {}
    for node in graph.nodes:
        if node in seeds:
            kinds[node] = seeds[node]
            continue
        if node.op not in ("call_function", "call_method"):
            continue
        m = meaning(node)
        first = kinds.get(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
        if m in _SHAPE_OPS:
            if first is not None:
                kinds[node] = first
        elif m in _SCORE_OPS or is_softmax(node):
            if first in ("router_logits", _SCORES):
                kinds[node] = _SCORES
        elif m in _JOIN_OPS:
            labels = {kinds.get(a) for a in _tensor_inputs(node)}
            if len(labels) == 1 and None not in labels:
                kinds[node] = labels.pop()
        elif m in _INDEX_ARITHMETIC:
            labels = [kinds.get(a) for a in _tensor_inputs(node)]
            if labels.count("selected_experts") == 1 and all(k in (None, "selected_experts") for k in labels):
                kinds[node] = "selected_experts"
    return kinds


def classify(graph: fx.Graph) -> dict[fx.Node, str]:
    """Label router tensors: ``router_logits``, ``routing_scores`` (internal), ``selected_experts``."""
    return analyse(graph).kinds
