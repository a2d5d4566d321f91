"""Static memory and communication estimates of an FX graph.

Why static: the diff CLI and the pass reports must say "this pass lowered the
peak by X bytes" without running the model on real ranks. The estimate walks
the graph in order, allocating each node's fresh storages and freeing a
storage after its last use (aliasing/views via Inductor's own
``GraphAliasTracker`` on ``meta['val']`` fake tensors). Graph inputs
(placeholders, attributes) stay live throughout: the caller owns them.

Symbolic sizes use their hint. Unbacked sizes (``.tolist()`` split sizes) have
none; they are estimated by assuming *uniform routing*: every runtime assert
``Eq(u0 + u1 + ..., total)`` the graph carries (``torch._check(sum(splits) ==
n)``) splits its known total evenly over its unknowns, and every all-to-all
receives what it sends, repeatedly, so split sizes derive from token counts
(exact rationals, rounded up per tensor). Whatever stays unknown uses
``UNBACKED_FALLBACK`` elements. The estimate reports how many symbols
were guessed (``unhinted_sizes``), so nobody mistakes a guess for a fact.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import sympy
import torch
import torch.fx as fx
from torch._inductor.fx_passes.memory_estimator import GraphAliasTracker
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols
from torch.utils._pytree import tree_leaves

from moe_passes.ir.facts import all_to_all_split_args, collective_kind, is_collective, is_wait, node_value

UNBACKED_FALLBACK = 8192  # same default as torch._inductor.config.unbacked_symint_fallback


@dataclass
class GraphEstimate:
    """Peak live bytes and communicated bytes of one graph."""

    peak_live_bytes: int = 0
    peak_node: str | None = None
    input_bytes: int = 0
    bytes_communicated: int = 0
    bytes_by_collective: dict[str, int] = field(default_factory=dict)
    num_collectives: int = 0
    num_waits: int = 0
    num_nodes: int = 0
    nodes_without_val: int = 0
    unhinted_sizes: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _backed_values(shape_env: Any) -> dict[sympy.Symbol, Any]:
    """Hints of backed symbols (``backed_var_to_val`` in torch 2.13, ``var_to_val`` before)."""
    if hasattr(shape_env, "backed_var_to_val"):
        return shape_env.backed_var_to_val
    return shape_env.var_to_val


def _symbol_of(value: Any) -> sympy.Expr | None:
    if isinstance(value, torch.SymInt):
        return value.node.expr
    if isinstance(value, int):
        return sympy.Integer(value)
    return None


def mirrored_split_sizes(graph: fx.Graph | None) -> list[tuple[sympy.Expr, sympy.Expr]]:
    """(output split, input split) pairs of every all-to-all: uniform routing receives what it sends."""
    pairs: list[tuple[sympy.Expr, sympy.Expr]] = []
    if graph is None:
        return pairs
    for node in graph.nodes:
        splits = all_to_all_split_args(node)
        if splits is None:
            continue
        outs, ins = splits
        if not isinstance(outs, (list, tuple)) or not isinstance(ins, (list, tuple)) or len(outs) != len(ins):
            continue
        for o, i in zip(outs, ins):
            o_expr = _symbol_of(node_value(o) if isinstance(o, fx.Node) else o)
            i_expr = _symbol_of(node_value(i) if isinstance(i, fx.Node) else i)
            if o_expr is not None and i_expr is not None:
                pairs.append((o_expr, i_expr))
    return pairs


def uniform_unbacked_values(shape_env: Any, graph: fx.Graph | None = None) -> dict[sympy.Symbol, sympy.Expr]:
    """Values for unbacked symbols under *uniform routing*, as exact rationals.

    Two rules, applied until nothing changes: a runtime assert
    ``Eq(u0 + u1 + ..., total)`` with a known total splits it evenly over its
    unknowns; an all-to-all's unknown output split equals its known input
    split (every rank receives what it sends).
    """
    known: dict[sympy.Symbol, sympy.Expr] = {
        s: sympy.Integer(int(v)) for s, v in _backed_values(shape_env).items() if isinstance(v, (int, sympy.Integer))
    }
    eqs = [
        ra.expr
        for asserts in shape_env.deferred_runtime_asserts.values()
        for ra in asserts
        if isinstance(ra.expr, sympy.Eq)
    ]
    pairs = mirrored_split_sizes(graph)
    values: dict[sympy.Symbol, sympy.Expr] = {}

    def resolve(expr: sympy.Expr) -> sympy.Expr:
        return sympy.expand(expr.xreplace({**known, **values}))

    def solve_sums() -> bool:
        progress = False
        for eq in eqs:
            expr = resolve(eq.lhs - eq.rhs)
            unknowns = sorted(expr.free_symbols, key=str)
            if not unknowns or not expr.is_polynomial(*unknowns):
                continue
            coeffs = [expr.coeff(u) for u in unknowns]
            const = expr.xreplace({u: 0 for u in unknowns})
            linear = sympy.expand(sum(c * u for c, u in zip(coeffs, unknowns)) + const - expr) == 0
            if not linear or not const.is_Number or not all(c.is_Integer for c in coeffs):
                continue
            if len({sympy.sign(c) for c in coeffs}) == 1:
                share = sympy.Max(-const / sum(coeffs), 0)
                values.update({u: share for u in unknowns})
                progress = True
        return progress

    def mirror() -> bool:
        progress = False
        for out_expr, in_expr in pairs:
            out_r, in_r = resolve(out_expr), resolve(in_expr)
            if isinstance(out_r, sympy.Symbol) and in_r.is_Number:
                values[out_r] = in_r
                progress = True
        return progress

    for _ in range(2 * (len(eqs) + len(pairs)) + 1):
        if not (solve_sums() or mirror()):
            break
    return values


class _Sizer:
    """Concrete byte counts for possibly symbolic sizes; records which symbols were guessed."""

    def __init__(self, fallback: int, graph: fx.Graph | None = None) -> None:
        self.fallback = fallback
        self.graph = graph
        self.unhinted: set[str] = set()
        self._uniform: dict[int, dict[sympy.Symbol, sympy.Expr]] = {}

    def __call__(self, value: int | torch.SymInt) -> int:
        if isinstance(value, int):
            return value
        node = value.node
        if node.has_hint():
            return int(node.hint)
        shape_env = node.shape_env
        if id(shape_env) not in self._uniform:
            self._uniform[id(shape_env)] = uniform_unbacked_values(shape_env, self.graph)
        guesses = self._uniform[id(shape_env)]
        expr = shape_env.replace(node.expr)
        unbacked = free_unbacked_symbols(expr)
        self.unhinted.update(str(s) for s in unbacked)
        hints = {s: int(v) for s, v in _backed_values(shape_env).items() if s in expr.free_symbols}
        substituted = expr.xreplace({**hints, **{s: guesses.get(s, self.fallback) for s in unbacked}})
        if substituted.is_Number:
            return int(sympy.ceiling(substituted))
        return int(shape_env.optimization_hint(node.expr, fallback=self.fallback))


def _tensors(val: Any) -> list[torch.Tensor]:
    return [t for t in tree_leaves(val) if isinstance(t, torch.Tensor)]


def _tensor_bytes(t: torch.Tensor, size_of: _Sizer) -> int:
    numel = 1
    for s in t.shape:
        numel *= size_of(s)
    return numel * t.element_size()


def _ensure_val(graph: fx.Graph) -> list[fx.Node]:
    """Dynamo graphs keep fake values in ``example_value``; the alias tracker reads ``val``."""
    filled = []
    for node in graph.nodes:
        if "val" not in node.meta and "example_value" in node.meta:
            node.meta["val"] = node.meta["example_value"]
            filled.append(node)
    return filled


def estimate_graph(gm: fx.GraphModule | fx.Graph, unbacked_fallback: int = UNBACKED_FALLBACK) -> GraphEstimate:
    """Liveness walk: peak of live fresh storages over the graph order, plus collective traffic."""
    graph = gm.graph if isinstance(gm, fx.GraphModule) else gm
    filled = _ensure_val(graph)
    try:
        return _estimate(graph, _Sizer(unbacked_fallback, graph))
    finally:
        for node in filled:
            node.meta.pop("val", None)


def _estimate(graph: fx.Graph, size_of: _Sizer) -> GraphEstimate:
    nodes = list(graph.nodes)
    alias = GraphAliasTracker(nodes)
    est = GraphEstimate(num_nodes=len(nodes))

    def storage_bytes(key: Any) -> int:
        return size_of(key.storage.nbytes())

    current = 0
    for node in nodes:
        if node.op in ("placeholder", "get_attr"):
            for key in alias.get_fresh_allocations(node):
                current += storage_bytes(key)
    est.input_bytes = current
    est.peak_live_bytes = current
    inputs = {n for n in nodes if n.op in ("placeholder", "get_attr")}

    for node in nodes:
        if node.op not in ("placeholder", "get_attr", "output") and node_value(node) is None:
            est.nodes_without_val += 1
        if is_wait(node):
            est.num_waits += 1
        if is_collective(node):
            est.num_collectives += 1
            kind = collective_kind(node) or "collective"
            sent = sum(_tensor_bytes(t, size_of) for a in node.args for t in _tensors(node_value(a) if isinstance(a, fx.Node) else a))
            est.bytes_communicated += sent
            est.bytes_by_collective[kind] = est.bytes_by_collective.get(kind, 0) + sent
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        for key in alias.get_fresh_allocations(node):
            current += storage_bytes(key)
        if current > est.peak_live_bytes:
            est.peak_live_bytes, est.peak_node = current, node.name
        for key in alias.get_storages_last_used(node):
            if alias.storage_to_allocator[key] not in inputs:
                current -= storage_bytes(key)
    est.unhinted_sizes = len(size_of.unhinted)
    return est
