"""Replace a proven region by N copies on row slices of X, reassembled after the last copy.

Copy k reads ``split_with_sizes(X, sizes)[k]``; every value leaving the region
is reassembled from the copies: token rows by ``cat`` along dim 0 (token-major,
so the pieces are exactly the rows of the unchunked value) and per-expert
counts by a sum.  Token counts baked into the graph as literal sizes (static
shapes) are retargeted to the chunk's own rows: dim 0 of a size list whose
result is ``row(m)``, and bounds ``T*m`` in comparisons that only feed runtime
assertions.  Shapes are then re-propagated in the graph's own fake mode (fresh
unbacked symbols for each chunk's split sizes) and every copy is checked: a
``row(m)`` copy has ``c*m`` rows, counts keep their shape.  A failed check
refuses the rewrite (nothing of it is kept).
"""

from __future__ import annotations

import logging
import operator
from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import compute_unbacked_bindings

from moe_passes.fx.domino.kinds import Kind
from moe_passes.fx.domino.regions import MoERegion
from moe_passes.ir.facts import is_mutation, node_value, op_label, tensor_value
from moe_passes.ir.fake_mode import single_fake_mode

log = logging.getLogger(__name__)

aten = torch.ops.aten

_SIZE_ARG = {"aten.view": 1, "aten.reshape": 1, "aten._unsafe_view": 1, "aten.expand": 1, "aten.new_zeros": 1,
             "aten.new_empty": 1, "aten.new_ones": 1, "aten.new_full": 1, "aten.zeros": 0, "aten.empty": 0,
             "aten.ones": 0, "aten.full": 0}
_COMPARISONS = (operator.le, operator.ge, operator.lt, operator.gt, operator.eq, operator.ne)
ASSERT = torch.ops.aten._assert_scalar.default


def chunk_sizes(num_tokens: int, num_chunks: int) -> list[int]:
    """Row counts of ``torch.tensor_split(x, num_chunks)``: the first ``T % N`` chunks get one more row."""
    q, r = divmod(num_tokens, num_chunks)
    return [q + 1] * r + [q] * (num_chunks - r)


def _multiplicities(region: MoERegion) -> set[int]:
    ms = {1}
    for k in region.kinds.values():
        if isinstance(k, Kind) and k.tag in ("row", "perm", "tokidx", "bag"):
            ms.add(k.m)
    return ms


def _retarget(new: fx.Node, old: fx.Node, region: MoERegion, c: int) -> None:
    T = region.num_tokens
    kind = region.kinds.get(old)
    name = op_label(old)
    if isinstance(kind, Kind) and kind.tag == "row" and name in _SIZE_ARG:
        pos = _SIZE_ARG[name]
        if len(new.args) > pos and isinstance(new.args[pos], (list, tuple)) and len(new.args[pos]) >= kind.lead:
            sizes = list(new.args[pos])
            lead = sizes[:kind.lead]
            if all(isinstance(s, int) for s in lead):
                if -1 in lead:  # the -1 absorbs the chunk's rows; the other token dims collapse to 1
                    sizes[:kind.lead] = [-1 if s == -1 else 1 for s in lead]
                elif _prod(lead) == T * kind.m:
                    sizes[:kind.lead] = [1] * (kind.lead - 1) + [c * kind.m]
                new.args = (*new.args[:pos], type(new.args[pos])(sizes), *new.args[pos + 1:])
    elif old.target in _COMPARISONS and old.users and all(u.target is ASSERT for u in old.users):
        scale = {T * m: c * m for m in _multiplicities(region)}
        new.args = tuple(scale.get(a, a) if isinstance(a, int) and not isinstance(a, bool) and a != 0 else a for a in new.args)


def _prod(xs: list[int]) -> int:
    out = 1
    for x in xs:
        out *= x
    return out


def rewrite_region(graph: fx.Graph, region: MoERegion, num_chunks: int) -> tuple[list[int], list[tuple[fx.Node, list[fx.Node], Any, Kind]]]:
    """Insert the chunk copies after the region's last node; reroute outside readers; erase the original."""
    sizes = chunk_sizes(region.num_tokens, num_chunks)
    members = set(region.nodes)
    last = region.nodes[-1]
    outside_users = {out: [u for u in out.users if u not in members] for out in region.outputs}
    copies: list[dict[fx.Node, fx.Node]] = []
    reassembled: list[tuple[fx.Node, list[fx.Node], Any, Kind]] = []
    stack = dict(region.tokens.meta.get("nn_module_stack") or {})
    with graph.inserting_before(last.next):
        xshape = tuple(tensor_value(region.tokens).shape)
        xkind = region.kinds[region.tokens]
        flat = region.tokens
        if xkind.lead > 1:  # [B, L, ...] tokens: split the flattened token dim, give each piece [1, c, ...]
            flat = graph.call_function(aten.reshape.default, (region.tokens, [region.num_tokens, *xshape[xkind.lead:]]))
        split = graph.call_function(aten.split_with_sizes.default, (flat, sizes, 0))
        split.meta["nn_module_stack"] = stack
        for k, c in enumerate(sizes):
            piece = graph.call_function(operator.getitem, (split, k))
            if xkind.lead > 1:
                piece = graph.call_function(aten.reshape.default, (piece, [1] * (xkind.lead - 1) + [c, *xshape[xkind.lead:]]))
            piece.meta["nn_module_stack"] = stack
            env: dict[fx.Node, fx.Node] = {region.tokens: piece}
            for n in region.nodes:
                new = graph.node_copy(n, lambda a: env.get(a, a))
                new.meta.pop("unbacked_bindings", None)
                new.meta["domino_chunk"] = k
                _retarget(new, n, region, c)
                env[n] = new
            copies.append(env)
        for out, users in outside_users.items():
            kind = region.kinds[out]
            pieces = [env[out] for env in copies]
            if kind.tag == "row" and kind.lead == 1:
                new = graph.call_function(aten.cat.default, (pieces, 0))
            elif kind.tag == "row":  # [B, L, ...]: flatten the token dims of each piece, concatenate, restore
                oshape = tuple(tensor_value(out).shape)
                rest = list(oshape[kind.lead:])
                flat_pieces = [graph.call_function(aten.reshape.default, (p, [c * kind.m, *rest])) for p, c in zip(pieces, sizes)]
                cat = graph.call_function(aten.cat.default, (flat_pieces, 0))
                new = graph.call_function(aten.reshape.default, (cat, list(oshape)))
            else:  # per-expert counts: the sum of the chunks' counts
                new = pieces[0]
                for p in pieces[1:]:
                    new = graph.call_function(aten.add.Tensor, (new, p))
            new.meta["nn_module_stack"] = dict(out.meta.get("nn_module_stack") or {})
            reassembled.append((new, pieces, tuple(tensor_value(out).shape), kind))
            for u in users:
                u.replace_input_with(out, new)
    for n in reversed(region.nodes):
        graph.erase_node(n)
    # A copy nobody reads (e.g. the top-k values when only the indices are used, torchtitan's router)
    # would be a new dead node per chunk: drop the pure ones.
    for env in copies:
        for n in reversed(region.nodes):
            new = env[n]
            if not new.users and not new.is_impure() and not is_mutation(new):
                graph.erase_node(new)
    return sizes, reassembled


def repropagate(gm: fx.GraphModule) -> None:
    """Recompute every node's fake value in the graph's own fake mode (fresh unbacked symbols per chunk)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    fake_inputs = [node_value(p) for p in placeholders]
    fake_mode = single_fake_mode(fake_inputs)
    if fake_mode is None:
        raise RuntimeError("graph placeholders do not carry fake tensors of one fake mode; cannot re-propagate shapes")
    shape_env = fake_mode.shape_env

    class _Prop(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            result = super().run_node(n)
            if n.op in ("placeholder", "output"):
                return result
            if shape_env is not None:
                bindings = compute_unbacked_bindings(shape_env, result)
                if bindings:
                    n.meta["unbacked_bindings"] = bindings
            if result is not None:
                n.meta["val"] = result
                if "example_value" in n.meta:
                    n.meta["example_value"] = result
            return result

    with fake_mode:
        _Prop(gm).run(*fake_inputs)


def check_rows(reassembled: list[tuple[fx.Node, list[fx.Node], Any, Kind]], sizes: list[int]) -> None:
    """Each chunk's piece has its own rows (counts: the full shape), the reassembled value the original shape."""
    for new, pieces, shape, kind in reassembled:
        got = [tuple(tensor_value(p).shape) for p in pieces]
        if kind.tag == "row":
            got = [(_prod(list(g[:kind.lead])), *g[kind.lead:]) for g in got]
            expected = [(c * kind.m, *shape[kind.lead:]) for c in sizes]
        else:
            expected = [shape] * len(sizes)
        if got != expected or tuple(tensor_value(new).shape) != shape:
            raise RuntimeError(f"chunked {new.name} has pieces {got} (expected {expected}); refusing the rewrite")


def refresh_assert_messages(graph: fx.Graph) -> None:
    """Copied runtime asserts name their chunk's own condition."""
    for n in graph.nodes:
        if "domino_chunk" in n.meta and n.target is ASSERT and isinstance(n.args[0], fx.Node):
            cond = n.args[0]
            n.args = (cond, f"Runtime assertion failed for expression {node_value(cond)} on node '{cond.name}'")
