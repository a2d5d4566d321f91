"""Domino EP: split every expert-parallel MoE region into N token chunks.

Each chunk routes, exchanges counts, dispatches, computes and combines only
its own rows of the ``[T, H]`` token matrix, so dropless routing stays exact
and the all-to-all of one chunk can later be overlapped with the expert
matmuls of another (``schedule.py`` fixes that order after AOT autograd,
which derives the chunked backward by itself).

Regions are found without hints, from the functional collectives alone: a
token all-to-all pair whose split sizes mirror each other (dispatch and
combine), the count exchange feeding their split sizes, the row gather that
feeds the dispatch (its base is the token matrix) and the innermost module of
``nn_module_stack`` holding both.  A region is only rewritten after it is
shown safe: every node is a recognised functional op, nothing mutates in
place, and every tensor leaving the region is row-aligned with the token
matrix (proved by a small layout data-flow), so per-chunk results
concatenated along rows equal the unchunked ones.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch._inductor.pattern_matcher import stable_topological_sort
from torch.fx.experimental.symbolic_shapes import compute_unbacked_bindings

from moe_passes.fx.pass_base import GraphPass, PassResult

log = logging.getLogger("moe_passes")

A2A = torch.ops._c10d_functional.all_to_all_single
WAIT = torch.ops._c10d_functional.wait_tensor

# Ops a region may contain.  Anything else makes the region unsafe to chunk.
_SAFE_METHODS = frozenset(
    "reshape view sum mean amax to float contiguous item scatter_add split chunk index_copy unsqueeze "
    "squeeze softmax argsort new_zeros zeros_like transpose permute flatten tolist clone type".split()
)
_SAFE_FUNCTIONS: frozenset[Any] = frozenset(
    {
        torch._C._nn.linear,
        torch.nn.functional.linear,
        torch.nn.functional.softmax,
        torch.softmax,
        torch.nn.functional.silu,
        torch.nn.functional.gelu,
        torch.topk,
        torch.argsort,
        torch.sort,
        torch.zeros,
        torch.zeros_like,
        torch.ones_like,
        torch.cat,
        torch.stack,
        torch.arange,
        torch.sym_sum,
        torch.ops.aten._assert_scalar.default,
        operator.getitem,
        operator.floordiv,
        operator.truediv,
        operator.mul,
        operator.add,
        operator.sub,
        operator.le,
        operator.ge,
        operator.lt,
        operator.gt,
        operator.eq,
        operator.ne,
        A2A,
        A2A.default,
        WAIT,
        WAIT.default,
    }
)
_COMPARISONS = (operator.le, operator.ge, operator.lt, operator.gt, operator.eq, operator.ne)
_ROW_UNARY_FUNCTIONS = (torch.nn.functional.silu, torch.nn.functional.gelu)
_ROW_UNARY_METHODS = ("to", "float", "contiguous", "clone", "type")
_ARITH = (operator.mul, operator.truediv, operator.add, operator.sub)

ROW = "row"  # dim 0 is the token index
COPY = "copy"  # dim 0 is token-major (token, k) copies: T*K rows


def is_a2a(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in (A2A, A2A.default)


def _val(node: Any) -> Any:
    return node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None


def _dim0(node: Any) -> Any:
    v = _val(node)
    return v.shape[0] if isinstance(v, torch.Tensor) and v.dim() > 0 else None


def _has_node(x: Any) -> bool:
    found = False

    def visit(a: fx.Node) -> fx.Node:
        nonlocal found
        found = True
        return a

    fx.map_arg(x, visit)
    return found


@dataclass
class MoERegion:
    """One expert-parallel MoE region of a Dynamo graph."""

    module: str  # nn_module_stack key of the MoE module
    path: str  # its qualified module path, for reports
    tokens: fx.Node  # the [T, H] token matrix
    dispatch: fx.Node
    combine: fx.Node
    count_exchange: fx.Node
    num_tokens: int
    top_k: int
    nodes: list[fx.Node] = field(default_factory=list)  # topological order, starts with the first user of tokens
    outputs: list[fx.Node] = field(default_factory=list)
    layouts: dict[fx.Node, str] = field(default_factory=dict)  # ROW / COPY nodes (token-indexed dim 0)


class RegionError(Exception):
    """The candidate region cannot be chunked safely; the message says why."""


def _module_key(a: fx.Node, b: fx.Node) -> str:
    sa, sb = a.meta.get("nn_module_stack") or {}, b.meta.get("nn_module_stack") or {}
    common = [k for k in sa if k in sb]
    if not common:
        raise RegionError("dispatch and combine all-to-alls share no module in nn_module_stack")
    return common[-1]


def _count_exchange(dispatch: fx.Node) -> fx.Node:
    """The all-to-all whose received counts give the dispatch's output split sizes."""
    seen: set[fx.Node] = set()
    stack = [a for a in dispatch.args[1] if isinstance(a, fx.Node)]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "call_function" and n.target in (WAIT, WAIT.default) and is_a2a(n.args[0]):
            return n.args[0]
        stack.extend(n.all_input_nodes)
    raise RegionError("no count-exchange all-to-all feeds the dispatch split sizes")


def _token_source(dispatch: fx.Node) -> fx.Node:
    src = dispatch.args[0]
    if not (isinstance(src, fx.Node) and src.op == "call_function" and src.target is operator.getitem):
        raise RegionError("dispatch input is not a row gather of the token matrix")
    base, index = src.args
    iv = _val(index)
    if not (isinstance(base, fx.Node) and isinstance(iv, torch.Tensor) and iv.dim() == 1):
        raise RegionError("dispatch input is not a row gather of the token matrix")
    bv = _val(base)
    if not isinstance(bv, torch.Tensor) or bv.dim() != 2:
        raise RegionError("token matrix feeding the dispatch is not 2-D")
    return base


def _layouts(region: MoERegion) -> dict[fx.Node, str]:
    """Which region nodes are row-aligned with the token matrix (or hold its token-major copies)."""
    T, K = region.num_tokens, region.top_k
    inside = set(region.nodes) | {region.tokens}
    lay: dict[fx.Node, str] = {region.tokens: ROW}
    argsorted_copy: set[fx.Node] = set()

    def dim_arg(n: fx.Node, pos: int, default: Any = None) -> Any:
        return n.kwargs.get("dim", n.args[pos] if len(n.args) > pos else default)

    for n in region.nodes:
        args = n.args
        a0 = args[0] if args else None
        l0 = lay.get(a0) if isinstance(a0, fx.Node) else None
        name = n.target if n.op == "call_method" else None
        out: str | None = None
        if n.target in (torch._C._nn.linear, torch.nn.functional.linear):
            if l0 == ROW and not any(a in inside for a in args[1:] if isinstance(a, fx.Node)):
                out = ROW
        elif n.target in (torch.nn.functional.softmax, torch.softmax) or name == "softmax":
            out = l0 if l0 == ROW and dim_arg(n, 1) not in (0, None) else None
        elif n.target in _ROW_UNARY_FUNCTIONS or name in _ROW_UNARY_METHODS:
            out = l0 if l0 == ROW else None
        elif n.target is torch.topk or name in ("sum", "mean", "amax", "chunk"):
            d = dim_arg(n, 2 if n.target is torch.topk or name == "chunk" else 1)
            out = ROW if l0 == ROW and d not in (0, None) else None
        elif name == "unsqueeze":
            out = ROW if l0 == ROW and dim_arg(n, 1) != 0 else None
        elif n.target is operator.getitem and isinstance(args[1], int):
            out = ROW if l0 == ROW and not isinstance(_val(n.args[0]), torch.Tensor) else None
        elif n.target in _ARITH:
            tensors = [a for a in args if isinstance(a, fx.Node) and isinstance(_val(a), torch.Tensor)]
            if tensors and all(lay.get(a) == ROW for a in tensors) and all(_dim0(a) == T for a in tensors):
                out = ROW
        elif name in ("view", "reshape"):
            shape = _val(n).shape
            src = _val(a0).shape if isinstance(_val(a0), torch.Tensor) else None
            if l0 == ROW and len(shape) >= 1 and shape[0] == T and src is not None and src[0] == T:
                out = ROW
            elif l0 == ROW and tuple(src or ()) == (T, K) and tuple(shape) == (T * K,):
                out = COPY
            elif l0 == COPY and tuple(shape[:2]) == (T, K):
                out = ROW
        elif n.target is torch.argsort and l0 == COPY:
            argsorted_copy.add(n)
        elif name == "index_copy" and len(args) == 4:
            dst, dim, index, src = args
            if (
                dim == 0
                and index in argsorted_copy
                and isinstance(dst, fx.Node)
                and dst.target is torch.zeros_like
                and dst.args[0] is src
            ):
                out = COPY
        if out is not None:
            lay[n] = out
    return lay


def find_regions(gm: fx.GraphModule, result: PassResult) -> list[MoERegion]:
    """Every expert-parallel MoE region that is safe to chunk; the others are reported as skipped."""
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    token_a2as = [n for n in nodes if is_a2a(n) and any(_has_node(a) for a in n.args[1:3])]
    regions: list[MoERegion] = []
    used: set[fx.Node] = set()
    for d in token_a2as:
        if d in used:
            continue
        partners = [c for c in token_a2as if order[c] > order[d] and c not in used and list(c.args[1]) == list(d.args[2]) and list(c.args[2]) == list(d.args[1])]
        if not partners:
            continue
        c = partners[0]
        used.update((d, c))
        label = f"all_to_all {d.name}/{c.name}"
        try:
            region = _build_region(d, c, order)
            _check_safe(region)
        except RegionError as e:
            result.skip(label, str(e))
            continue
        regions.append(region)
    unpaired = [n.name for n in token_a2as if n not in used]
    if unpaired:
        result.skip(f"all_to_all {unpaired}", "token all-to-all without a mirrored combine all-to-all")
    return regions


def _build_region(d: fx.Node, c: fx.Node, order: dict[fx.Node, int]) -> MoERegion:
    module = _module_key(d, c)
    tokens = _token_source(d)
    count = _count_exchange(d)
    T = _dim0(tokens)
    if not isinstance(T, int):
        raise RegionError(f"token count {T} is symbolic; only static token counts are chunked")
    dv = _dim0(d.args[0])
    if not isinstance(dv, int) or T == 0 or dv % T != 0:
        raise RegionError(f"dispatch rows {dv} are not a multiple of the {T} tokens")

    def in_module(n: fx.Node) -> bool:
        return module in (n.meta.get("nn_module_stack") or {})

    members: set[fx.Node] = set()
    stack = list(tokens.users)
    while stack:
        n = stack.pop()
        if n in members or not in_module(n):
            continue
        members.add(n)
        stack.extend(n.users)
    for required in (d, c, count):
        if required not in members:
            raise RegionError(f"{required.name} does not depend on the token matrix {tokens.name}")
    changed = True
    while changed:  # peel trailing reshapes back to [B, S, H]: they stay outside, on the concatenated result
        changed = False
        for n in list(members):
            if n.op == "call_method" and n.target in ("view", "reshape") and _dim0(n) != T and all(u not in members for u in n.users):
                members.discard(n)
                changed = True
    path = str((d.meta.get("nn_module_stack") or {})[module][0])
    region = MoERegion(module, path, tokens, d, c, count, T, dv // T)
    region.nodes = sorted(members, key=order.__getitem__)
    region.outputs = [n for n in region.nodes if any(u not in members for u in n.users)]
    return region


def _is_inplace(n: fx.Node) -> bool:
    if n.op == "call_method":
        return n.target.endswith("_") and not n.target.endswith("__")
    if isinstance(n.target, torch._ops.OpOverload):
        return n.target._schema.is_mutable
    return False


def _check_safe(region: MoERegion) -> None:
    for n in region.nodes:
        if _is_inplace(n):
            raise RegionError(f"{n.name} mutates a tensor in place")
        if n.op == "call_method" and n.target not in _SAFE_METHODS:
            raise RegionError(f"{n.name}: method {n.target!r} is not a recognised row-safe op")
        if n.op == "call_function" and n.target not in _SAFE_FUNCTIONS:
            raise RegionError(f"{n.name}: {getattr(n.target, '__name__', n.target)} is not a recognised row-safe op")
        if n.op not in ("call_method", "call_function"):
            raise RegionError(f"{n.name}: {n.op} nodes are not chunked")
    lay = region.layouts = _layouts(region)
    for out in region.outputs:
        mutators = [u.name for u in out.users if _is_inplace(u)]
        if mutators:
            raise RegionError(f"{out.name} leaves the region and is mutated in place by {mutators}")
        if not isinstance(_val(out), torch.Tensor):
            raise RegionError(f"{out.name} leaves the region but is not a tensor")
        if lay.get(out) != ROW:
            raise RegionError(f"{out.name} leaves the region but is not shown row-aligned with the tokens")


def chunk_sizes(num_tokens: int, num_chunks: int) -> list[int]:
    """Row counts of ``torch.tensor_split(x, num_chunks)``: the first ``T % N`` chunks get one more row."""
    q, r = divmod(num_tokens, num_chunks)
    return [q + 1] * r + [q] * (num_chunks - r)


def _retarget_sizes(n: fx.Node, token_input: bool, T: int, K: int, c: int) -> None:
    """Rewrite the token-count constants Dynamo baked into a copied node (static shapes).

    Only two places hold them: dim 0 of a view/reshape of a token-indexed
    tensor, and comparisons bounding unbacked split sizes (``u0 <= T*K``).
    """
    scale = {T: c} if K == 1 else {T: c, T * K: c * K}
    if n.op == "call_method" and n.target in ("view", "reshape") and len(n.args) > 1 and token_input:
        if isinstance(n.args[1], (tuple, list)):
            sizes = list(n.args[1])
            if sizes and isinstance(sizes[0], int) and sizes[0] in scale:
                sizes[0] = scale[sizes[0]]
                n.args = (n.args[0], type(n.args[1])(sizes), *n.args[2:])
        elif isinstance(n.args[1], int) and n.args[1] in scale:
            n.args = (n.args[0], scale[n.args[1]], *n.args[2:])
    elif n.target in _COMPARISONS:
        n.args = tuple(scale.get(a, a) if isinstance(a, int) and not isinstance(a, bool) and a != 0 else a for a in n.args)


def rewrite_region(gm: fx.GraphModule, region: MoERegion, num_chunks: int) -> tuple[list[int], list[fx.Node]]:
    """Replace the region by ``num_chunks`` copies on row slices, concatenated back.

    Returns the chunk sizes and the concatenation nodes (checked after shape propagation).
    """
    graph = gm.graph
    sizes = chunk_sizes(region.num_tokens, num_chunks)
    last = region.nodes[-1]
    members = set(region.nodes)
    outside_users = {out: [u for u in out.users if u not in members] for out in region.outputs}
    copies: list[dict[fx.Node, fx.Node]] = []
    cats: list[fx.Node] = []
    with graph.inserting_before(last.next):
        split = graph.call_function(torch.tensor_split, (region.tokens, num_chunks), {"dim": 0})
        split.meta["nn_module_stack"] = dict(region.tokens.meta.get("nn_module_stack") or {})
        for k, c in enumerate(sizes):
            env: dict[fx.Node, fx.Node] = {region.tokens: graph.call_function(operator.getitem, (split, k))}
            env[region.tokens].meta["nn_module_stack"] = dict(split.meta["nn_module_stack"])
            for n in region.nodes:
                new = graph.node_copy(n, lambda a: env.get(a, a))
                new.meta.pop("unbacked_bindings", None)
                new.meta["domino_chunk"] = k
                token_input = isinstance(n.args[0], fx.Node) and n.args[0] in region.layouts
                _retarget_sizes(new, token_input, region.num_tokens, region.top_k, c)
                env[n] = new
            copies.append(env)
        for out, users in outside_users.items():
            cat = graph.call_function(torch.cat, ([env[out] for env in copies],), {"dim": 0})
            cat.meta["nn_module_stack"] = dict(out.meta.get("nn_module_stack") or {})
            cat.meta["domino_rows"] = (sizes, tuple(_val(out).shape))
            cats.append(cat)
            for u in users:
                u.replace_input_with(out, cat)
    for n in reversed(region.nodes):
        graph.erase_node(n)
    return sizes, cats


def _check_rows(cats: list[fx.Node]) -> None:
    """Each chunk's output has its own row count and the concatenation the original shape: else the pass is wrong."""
    for cat in cats:
        sizes, shape = cat.meta.pop("domino_rows")
        pieces = [tuple(_val(p).shape) for p in cat.args[0]]
        expected = [(c, *shape[1:]) for c in sizes]
        if pieces != expected or tuple(_val(cat).shape) != shape:
            raise RuntimeError(f"domino_ep: chunked {cat.name} has pieces {pieces} (expected {expected}); refusing a wrong rewrite")


def repropagate(gm: fx.GraphModule) -> None:
    """Recompute ``example_value`` of every node under the graph's fake mode.

    Chunked copies have new shapes and their ``.item()`` nodes need fresh
    unbacked symbols (with ``unbacked_bindings``), exactly as Dynamo would
    have recorded them had it traced the chunked program.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    fake_inputs = [_val(p) for p in placeholders]
    modes = {id(v.fake_mode): v.fake_mode for v in fake_inputs if isinstance(v, torch._subclasses.FakeTensor)}
    fake_mode = next(iter(modes.values()), None)  # the mode Dynamo recorded example values in
    if fake_mode is None or len(modes) > 1:
        raise RuntimeError("graph placeholders do not carry fake tensors of one fake mode; cannot re-propagate shapes")
    shape_env = fake_mode.shape_env

    class _Prop(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            result = super().run_node(n)
            if n.op in ("placeholder", "output"):
                return result
            bindings = compute_unbacked_bindings(shape_env, result)
            if bindings:
                n.meta["unbacked_bindings"] = bindings
            if result is not None:
                n.meta["example_value"] = result
            return result

    with fake_mode:
        _Prop(gm).run(*fake_inputs)


def _refresh_assert_messages(gm: fx.GraphModule) -> None:
    """Copied runtime asserts name their chunk's own condition, not the unchunked one."""
    for n in gm.graph.nodes:
        if "domino_chunk" in n.meta and n.target is torch.ops.aten._assert_scalar.default and isinstance(n.args[0], fx.Node):
            cond = n.args[0]
            n.args = (cond, f"Runtime assertion failed for expression {_val(cond)} on node '{cond.name}'")
    gm.recompile()


def _auto_chunks(region: MoERegion, gm: fx.GraphModule) -> tuple[int, str]:
    """Pick N from rank-invariant sizes (expert weights held by this rank), never from local token counts."""
    weights = [
        _val(a)
        for n in region.nodes
        for a in n.all_input_nodes
        if a.op == "placeholder" and isinstance(_val(a), torch.Tensor) and _val(a).dim() == 3
    ]
    elems = sum(w.numel() for w in {id(w): w for w in weights}.values())
    n = 2 if elems < (1 << 20) else 4
    return n, f"{elems} local expert weight elements -> {n} chunks"


class DominoEPPass(GraphPass):
    """Chunk every safe expert-parallel MoE region into ``config.num_chunks`` token chunks."""

    name = "domino_ep"
    stage = "pre_grad"

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        result = PassResult(self.name)
        regions = find_regions(gm, result)
        result.stats["regions"] = len(regions)
        result.stats["chunks"] = {}
        cats: list[fx.Node] = []
        for region in regions:
            label = f"{region.path} ({region.dispatch.name}/{region.combine.name})"
            if self.config.num_chunks == "auto":
                n, why = _auto_chunks(region, gm)
                log.info("domino_ep: %s: auto num_chunks: %s", label, why)
                result.stats.setdefault("auto", {})[region.path] = why
            else:
                n = int(self.config.num_chunks)
            if n == 1:
                result.skip(label, "num_chunks=1: nothing to split")
                continue
            sizes, region_cats = rewrite_region(gm, region, n)
            cats.extend(region_cats)
            result.matched.append(region.path)
            result.stats["chunks"][region.path] = sizes
            log.info("domino_ep: %s: %d tokens split into chunks %s", label, region.num_tokens, sizes)
        if result.matched:
            # Chunk copies sit after the region's last node; a node outside the module that Dynamo
            # placed inside the region's span and reads a region output must now follow its concat.
            stable_topological_sort(gm.graph)
            gm.graph.lint()
            gm.recompile()
            repropagate(gm)
            _check_rows(cats)
            _refresh_assert_messages(gm)
            result.changed = True
        return result
