"""Expert-parallel MoE regions, found by data flow (no module grouping, no hints).

A region starts from the EP token all-to-all pair: a *dispatch* whose split
sizes are graph values and a later *combine* whose split sizes are the same
values mirrored (output <-> input).  From the dispatch input we walk back to
the row gather ``src[index]`` whose index comes from an ``argsort``/``sort`` of
the flattened top-k expert ids; the *token matrix* X is the latest value on
the gather source's chain that also feeds the router's top-k (so router,
gather and counts all descend from it, whichever modules hold them: parent,
child, a dispatcher object, or the compiled root itself).

The region's nodes: every descendant of X that is an ancestor of the combine
(routing, counts, count exchange, split sizes, dispatch, experts, combine),
then, in graph order, every descendant of X whose inputs are region nodes or
values independent of X and whose row-locality is proven (un-permute,
top-k weighting, reduction over the K copies...).  Everything it reads from
outside is independent of X (weights, buffers, constants) and is shared by
the chunks; everything that leaves it must be token rows (concatenated) or
per-expert counts (summed).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from moe_passes.fx.domino.kinds import Kind, Unproven, positive_quotient, token_prefix
from moe_passes.fx.domino.row_analysis import RowAnalysis, at_source
from moe_passes.ir.facts import (
    all_to_all_split_args,
    ancestors,
    descendants,
    has_node,
    is_all_to_all,
    is_allocation,
    is_inplace_c10d,
    is_topk,
    is_wait,
    known_equal,
    module_path,
    mutated_args,
    op_label,
    op_namespace_and_name,
    source_line,
    storage_aliases,
    tensor_value,
)
from moe_passes.ir.rows import prod

log = logging.getLogger(__name__)


class RegionError(Exception):
    """The candidate region cannot be chunked safely; the message says why."""


@dataclass
class MoERegion:
    """One expert-parallel MoE region of a canonical graph."""

    path: str  # module path of the dispatch (reports only)
    tokens: fx.Node  # X: the [T, ...] token matrix
    dispatch: fx.Node
    combine: fx.Node
    count_exchange: fx.Node | None
    num_tokens: Any  # int, or a SymInt expression when the graph's token count is symbolic
    top_k: int
    nodes: list[fx.Node] = field(default_factory=list)  # graph order, X excluded
    outputs: list[fx.Node] = field(default_factory=list)  # nodes read outside the region
    kinds: dict[fx.Node, Any] = field(default_factory=dict)
    extra: list[str] = field(default_factory=list)  # proven extension nodes, for reports
    #: "moe": X is the token matrix, chunks are token rows; "layer": X is the decoder layer's [B, S, ...]
    #: input, chunks are whole sequences (micro-batches) through attention, norms, router, experts
    mode: str = "moe"
    #: outside values read by row (per-sequence rotary tables, masks) -> their kind: each chunk reads its rows
    row_inputs: dict[fx.Node, Any] = field(default_factory=dict)
    #: the MoE-mode token matrix, kept for reports (the layer region contains it)
    token_matrix: fx.Node | None = None
    topk: fx.Node | None = None  # the router's top-k the expert ids come from
    #: graph inputs that are token rows from the start (the router's ``top_k_index`` when it is not in this graph)
    seeds: tuple[fx.Node, ...] = ()
    #: size guards installed so the inputs' rows are the token matrix's (``_guard_same_rows``), for the report
    guards: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.path} ({self.dispatch.name}/{self.combine.name})"


def _split_list(arg: Any) -> list[Any] | None:
    return list(arg) if isinstance(arg, (list, tuple)) else None


def token_all_to_alls(graph: fx.Graph) -> list[fx.Node]:
    """All-to-alls whose split sizes are graph values (data-dependent: token exchanges)."""
    out = []
    for n in graph.nodes:
        if is_all_to_all(n):
            splits = all_to_all_split_args(n)
            if splits is not None and any(has_node(s) for s in splits):
                out.append(n)
    return out


def pair_all_to_alls(graph: fx.Graph) -> tuple[list[tuple[fx.Node, fx.Node]], list[fx.Node]]:
    """(dispatch, combine) pairs with mirrored split sizes, and the unpaired token all-to-alls."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    token = token_all_to_alls(graph)
    pairs: list[tuple[fx.Node, fx.Node]] = []
    used: set[fx.Node] = set()
    for d in token:
        if d in used:
            continue
        od, idd = all_to_all_split_args(d)
        for c in token:
            if c in used or c is d or order[c] <= order[d]:
                continue
            oc, ic = all_to_all_split_args(c)
            if _split_list(oc) == _split_list(idd) and _split_list(ic) == _split_list(od):
                pairs.append((d, c))
                used.update((d, c))
                break
    return pairs, [n for n in token if n not in used]


def _count_exchange(dispatch: fx.Node) -> fx.Node | None:
    """The all-to-all whose received counts give the dispatch's split sizes."""
    splits = all_to_all_split_args(dispatch) or ()
    starts: list[fx.Node] = []
    for s in splits:
        fx.map_arg(s, lambda a: starts.append(a) or a)
    for n in ancestors(starts):
        if is_wait(n) and isinstance(n.args[0], fx.Node) and is_all_to_all(n.args[0]):
            return n.args[0]
        if is_all_to_all(n) and not has_node((all_to_all_split_args(n) or (None, None))):
            return n
    return None


def _is_sort(n: fx.Node) -> bool:
    return op_label(n) in ("aten.argsort", "aten.sort")


def _row_gather(dispatch: fx.Node) -> fx.Node:
    """The ``src[index]`` row gather feeding the dispatch, index derived from a sort of expert ids."""
    stack = [dispatch.args[0]]
    seen: set[fx.Node] = set()
    while stack:
        n = stack.pop(0)
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        if op_label(n) in ("aten.index", "aten._unsafe_index") and isinstance(n.args[1], (list, tuple)):
            idx = [i for i in n.args[1] if i is not None]
            if len(idx) == 1 and isinstance(idx[0], fx.Node) and any(_is_sort(a) for a in ancestors([idx[0]])):
                return n
        if n.op == "call_function" and not is_all_to_all(n):
            stack.extend(n.all_input_nodes)
    raise RegionError("no row gather src[sorted index] feeds the dispatch all-to-all (tokens are not permuted by expert before it)")


def _routing_input(sort: fx.Node) -> fx.Node | None:
    """The graph input the sorted expert ids are read from (``top_k_index.reshape(-1)``), when the router
    is not in this graph: the end of the sort input's first-tensor-operand chain, if that is a placeholder."""
    n: Any = sort.args[0]
    while isinstance(n, fx.Node) and n.op == "call_function":
        tensors = [a for a in n.all_input_nodes if tensor_value(a) is not None]
        n = tensors[0] if tensors else None
    return n if isinstance(n, fx.Node) and n.op == "placeholder" and tensor_value(n) is not None else None


def _token_matrix(gather: fx.Node) -> tuple[fx.Node, fx.Node | None, fx.Node, fx.Node | None]:
    """(X, top-k node, sort, routing input): X is the latest value on the gather source's chain that also feeds
    the router's top-k. When the router is not in this graph (the experts module compiled on its own, or
    behind a graph break: transformers' own EP under FSDP2 hands it ``top_k_index`` and the weights), X is the
    gathered matrix and the ids come from a graph input, which becomes a token-row input of the region."""
    order = {n: i for i, n in enumerate(gather.graph.nodes)}
    index = next(i for i in gather.args[1] if i is not None)
    sorts = [a for a in ancestors([index]) if _is_sort(a) and tensor_value(a.args[0]) is not None and tensor_value(a.args[0]).dim() == 1]
    if not sorts:
        raise RegionError(f"the gather index {index.name} is not derived from a sort of 1-D expert ids")
    sort = max(sorts, key=order.__getitem__)
    topks = [a for a in ancestors([sort]) if is_topk(a)]
    if not topks:
        routing = _routing_input(sort)
        src = gather.args[0]
        if routing is None or not isinstance(src, fx.Node) or tensor_value(src) is None:
            raise RegionError(at_source(sort, f"the expert ids sorted by {sort.name} do not come from a top-k "
                                              "nor from a graph input (the router is not in this graph)"))
        return src, None, sort, routing
    topk = max(topks, key=order.__getitem__)
    router_inputs = ancestors([topk])
    n: Any = gather.args[0]
    while isinstance(n, fx.Node):
        if n in router_inputs:
            return n, topk, sort, None
        tensors = [a for a in n.all_input_nodes if tensor_value(a) is not None]
        n = tensors[0] if n.op == "call_function" and tensors else None
    raise RegionError(f"the gathered rows ({gather.args[0].name}) and the router's top-k ({topk.name}) share no token matrix")


def _token_inputs(graph: fx.Graph, X: fx.Node, T: Any, routing: fx.Node, combine: fx.Node) -> list[fx.Node]:
    """Router outside the graph: the other graph inputs the combine depends on whose leading dims are X's
    token rows, one row per token (``top_k_weights [T, K]``), become token rows of the region from the start,
    like the ids. The analysis then proves every use row by row (scaling the rows, gathered by the expert sort
    beside them: torchtitan's scores before the experts) and refuses any other (a contraction over the rows,
    rows read in another token's place); graph inputs that are parameters are never token rows."""
    back = ancestors([combine])
    out = []
    for p in graph.find_nodes(op="placeholder"):
        v = tensor_value(p)
        if p is X or p is routing or p not in back or v is None or v.dim() < 1:
            continue
        pre = token_prefix(tuple(v.shape), T)
        if pre is not None and pre[1] == 1 and not _is_parameter(p):
            out.append(p)
    return out


def _is_parameter(p: fx.Node) -> bool:
    """A graph input Dynamo lifted from a module's state: a parameter (its example is one) or a buffer (its
    source reads a module's ``_buffers``). Defence in depth: the row analysis alone decides soundness."""
    arg = p.meta.get("grapharg")
    example = getattr(arg, "example", None)
    source = getattr(arg, "source", None)
    return isinstance(example, torch.nn.Parameter) or (source is not None and "_buffers" in source.name)


def _guard_same_rows(graph: fx.Graph, X: fx.Node, T: Any) -> list[str]:
    """Router outside the graph: the hidden rows, the expert ids and the weights are separate graph inputs, and
    Dynamo may give each its own size symbol (``s47``, ``s67``, ``s95``: automatic dynamic shapes after a new
    length) although the caller builds all three from one hidden matrix. Nothing in the graph relates them, so
    no row rule could be proven. Each input whose leading size is a lone symbol with the same value as X's
    rows on this call is *guarded* equal to them: Dynamo checks the guard on every call and recompiles when it
    fails, so the region is analysed, and runs, only for equal sizes. The same program gives the same guards on
    every rank (each rank's inputs agree among themselves). Returns the guards, for the report."""
    import sympy
    from torch.fx.experimental.symbolic_shapes import guard_bool, guarding_hint_or_throw

    if not isinstance(T, torch.SymInt) or not isinstance(T.node.expr, sympy.Symbol):
        return []
    out = []
    for p in graph.find_nodes(op="placeholder"):
        v = tensor_value(p)
        if p is X or v is None or v.dim() < 1 or not isinstance(v.shape[0], torch.SymInt):
            continue
        s = v.shape[0]
        if not isinstance(s.node.expr, sympy.Symbol) or known_equal(s, T):
            continue
        try:
            if guarding_hint_or_throw(s) == guarding_hint_or_throw(T) and guard_bool(s == T):
                out.append(f"{p.name}.size(0) == {X.name}.size(0) ({s.node.expr} == {T.node.expr})")
        except Exception:  # noqa: BLE001 - no hint / no shape env: leave it unproven
            continue
    return out


def build_region(d: fx.Node, c: fx.Node) -> MoERegion:
    gather = _row_gather(d)
    X, topk, sort, routing = _token_matrix(gather)
    copies = tensor_value(sort.args[0]).shape[0]
    # The token count may be symbolic (dynamic shapes: ``dynamic=True``, ``mark_dynamic``, Dynamo's
    # automatic-dynamic recompile): every test below is decided from the expressions, never guarded,
    # so the decision does not depend on the length one rank happens to see.
    K = (topk.args[1] if len(topk.args) > 1 else None) if topk is not None else None
    if topk is not None and not isinstance(K, int):
        raise RegionError(f"top-k {K} of {topk.name} is not a constant")
    # Tokens are the rows of the token matrix (every dim but the hidden one); each token sends
    # ``copies / T`` copies. That is top-k's k for a plain router, and G * (K/G) for a grouped one
    # (Intern-S1-Pro: top-(K/G) inside each of G groups of a ``[T, G, E/G]`` view), whatever k says.
    xv = tensor_value(X)
    T = prod(xv.shape[:-1]) if xv is not None and xv.dim() >= 2 else None
    guarded = _guard_same_rows(d.graph, X, T) if routing is not None else []
    per_token = positive_quotient(copies, T) if T is not None else None
    if per_token is None:
        raise RegionError(f"{copies} sorted expert ids are not provably a whole number of copies per token "
                          f"of the token matrix {X.name}")
    if K is not None and per_token % K != 0:
        raise RegionError(f"{per_token} expert copies per token are not a multiple of top-k {K} of {topk.name}")
    K = per_token
    count = _count_exchange(d)
    if routing is not None:
        seeds = (routing, *_token_inputs(d.graph, X, T, routing, c))
        region = grow_region(d, c, X, T, K, count, None, row_inputs=True, seeds=seeds)
        region.guards = guarded
        return region
    return grow_region(d, c, X, T, K, count, topk)


def grow_region(d: fx.Node, c: fx.Node, X: fx.Node, T: Any, K: int, count: fx.Node | None, topk: fx.Node | None, *,
                row_inputs: bool = False, stop: frozenset[fx.Node] = frozenset(), mode: str = "moe",
                seeds: tuple[fx.Node, ...] = ()) -> MoERegion:
    """The region between X and the combine (plus its proven extension), its kinds proven by the row
    analysis with X's ``T`` rows as the chunked unit. ``stop``: nodes the extension must not take (the next
    whole-layer region); ``row_inputs``: outside values may be read by row (whole-layer mode, or a router
    outside the graph); ``seeds``: graph inputs that are token rows of X from the start (``top_k_index``
    arriving as an input: its dim 0 must be X's rows; the analysis proves the rest, jointly with X)."""
    graph = d.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    desc = descendants(X)
    for required, what in ((d, "dispatch"), (c, "combine"), (topk, "router top-k")):
        if required is not None and required not in desc:
            raise RegionError(f"{what} {required.name} does not depend on the token matrix {X.name}")
    roots = {X, *seeds}
    for s in seeds:
        desc |= descendants(s)
    core = (desc & ancestors([c])) - roots
    while True:  # in-place writers of core values (``buf[perm] = rows`` then ``buf`` is read) belong to the core
        writers = {u for n in core for u in n.users if u not in core and n in mutated_args(u)}
        if not writers:
            break
        core |= (desc & ancestors(list(writers))) - roots
    private = private_buffers(core, desc)
    core |= private
    for n in core:
        if n.op != "call_function":
            raise RegionError(at_source(n, f"{n.name}: {n.op} node inside the region"))
        if is_inplace_c10d(n):
            raise RegionError(at_source(n, f"{n.name}: traced in-place c10d collective inside the region"))
        parsed = op_namespace_and_name(n.target)
        if parsed is not None and parsed[0] == "higher_order":
            raise RegionError(at_source(n, f"{n.name}: higher-order op {parsed[1]} inside the region (not analysed)"))
    check_contexts(graph, core)
    region_set = set(core)
    try:
        analysis = RowAnalysis(X, T, region_set, private, row_inputs=row_inputs, from_rows=desc, seeds=seeds)
    except Unproven as e:
        raise RegionError(str(e)) from None
    try:
        analysis.run(sorted(core, key=order.__getitem__))
    except Unproven as e:
        raise RegionError(str(e)) from None
    # proven extension: descendants of X reading only the region or X-independent values
    extra: list[str] = []
    for n in graph.nodes:
        if n in region_set or n in roots or n not in desc or n.op != "call_function" or n in stop:
            continue
        if any(a not in region_set and a not in roots and a in desc for a in n.all_input_nodes):
            continue
        if is_all_to_all(n):
            continue
        written = mutated_args(n)
        if written and not all(isinstance(b, fx.Node) and b in region_set and b not in core for b in written):
            continue  # an in-place write joins only into a buffer the extension made (``out[order] = rows``)
        region_set.add(n)
        try:
            k = analysis.transfer(n)
        except Unproven:
            region_set.discard(n)
            continue
        analysis.kinds[n] = k
        extra.append(n.name)
    # retract extension nodes whose value would leave the region unprovably (and their region users)
    changed = True
    while changed:
        changed = False
        for n in sorted(region_set - core, key=order.__getitem__):
            if n not in region_set:
                continue
            k = analysis.kinds.get(n)
            if any(u not in region_set for u in n.users) and not (isinstance(k, Kind) and k.tag in ("row", "add")):
                doomed = [n]
                while doomed:
                    m = doomed.pop()
                    if m in region_set and m not in core:
                        region_set.discard(m)
                        doomed.extend(m.users)
                        doomed.extend(b for b in mutated_args(m) if isinstance(b, fx.Node))  # its buffer goes too
                changed = True
    nodes = sorted(region_set, key=order.__getitem__)
    path = module_path(d) or "<root>"
    region = MoERegion(path, X, d, c, count, T, (K or 1), nodes=nodes, kinds=analysis.kinds, mode=mode,
                       row_inputs={a: k for a, k in analysis.inputs.items() if any(u in region_set for u in a.users)},
                       topk=topk, seeds=tuple(seeds))
    region.extra = [e for e in extra if any(n.name == e for n in nodes)]
    region.outputs = [n for n in nodes if any(u not in region_set for u in n.users)]
    check_outputs(region)
    check_interleaved_writes(region)
    return region


def check_interleaved_writes(region: MoERegion) -> None:
    """The chunk copies run where the region ends; a node outside the region but inside its span (graph
    order) that writes a value the region reads (the token matrix, a row input, a weight, or a view
    sharing their storage) would then run before every chunk instead of between the region's own reads."""
    inside = set(region.nodes)
    read = {region.tokens, *region.row_inputs, *(a for n in region.nodes for a in n.all_input_nodes if a not in inside)}
    shared: set[fx.Node] = set()
    for a in read:
        shared |= storage_aliases(a)
    first, last = region.nodes[0], region.nodes[-1]
    span = False
    for n in first.graph.nodes:
        if n is first:
            span = True
        if span and n not in inside:
            hit = [b.name for b in mutated_args(n) if isinstance(b, fx.Node) and b in shared]
            if hit:
                raise RegionError(at_source(n, f"{n.name} writes {hit} in place between the region's reads (the chunks "
                                               "would all read it after the write)"))
        if n is last:
            break


def private_buffers(core: set[fx.Node], desc: set[fx.Node]) -> set[fx.Node]:
    """Buffers the region writes in place that were allocated outside X's data flow and are read by nobody
    else (``counts = torch.zeros(E).scatter_add_(0, ids, ones)``: ``zeros(E)`` does not depend on the
    tokens). Shared by the chunks they would accumulate every chunk's counts; each chunk gets its own
    copy instead, so they join the region (the row analysis still decides what the writes compute)."""
    out: set[fx.Node] = set()
    for n in core:
        for buf in mutated_args(n):
            if not isinstance(buf, fx.Node) or buf in core or buf in desc or buf.op != "call_function":
                continue
            if is_allocation(buf) and all(u in core for u in buf.users):
                out.add(buf)
    return out


_CONTEXT_FUNCTIONS = {"_enter_autocast", "_exit_autocast", "_set_grad_enabled"}


def _context_name(n: fx.Node) -> str | None:
    if n.op != "call_function":
        return None
    name = getattr(n.target, "__name__", None)
    return name if name in _CONTEXT_FUNCTIONS else None


def _autocast_active(args: tuple) -> bool:
    """Whether ``_enter_autocast(device, dtype, enabled, cache)`` changes anything (CPU autocast ignores fp32)."""
    device, dtype = (list(args) + [None, None])[:2]
    enabled = args[2] if len(args) > 2 else True
    if not enabled:
        return False
    if device == "cpu" and dtype not in (torch.bfloat16, torch.float16):
        return False  # "CPU Autocast only supports bfloat16/float16 ... Disabling autocast"
    return True


def check_contexts(graph: fx.Graph, core: set[fx.Node]) -> None:
    """Chunk copies are placed after the region: refuse floating-point region ops that run inside an
    active autocast or a no-grad span (their copies would run outside it)."""
    autocast: list[bool] = []
    grad = True
    for n in graph.nodes:
        name = _context_name(n)
        if name == "_enter_autocast":
            autocast.append(_autocast_active(n.args))
        elif name == "_exit_autocast":
            if autocast:
                autocast.pop()
        elif name == "_set_grad_enabled":
            grad = bool(n.args[0]) if n.args else True
        elif n in core:
            v = tensor_value(n)
            if v is None or not v.is_floating_point():
                continue
            if any(autocast):
                raise RegionError(at_source(n, f"{n.name} runs under autocast; its chunk copies would run outside the autocast block"))
            if not grad:
                raise RegionError(at_source(n, f"{n.name} runs under no_grad; its chunk copies would run with gradients enabled"))


def check_outputs(region: MoERegion) -> None:
    """Every value leaving the region is token rows (concatenated) or per-expert counts (summed)."""
    inside = set(region.nodes)
    for out in region.outputs:
        k = region.kinds.get(out)
        readers = [u for u in out.users if u not in inside]
        if not isinstance(k, Kind) or k.tag not in ("row", "add"):
            what = "split sizes / layout metadata" if isinstance(k, Kind) and k.tag == "meta" else str(k)
            where = next((w for w in map(source_line, readers) if w), None) or source_line(out)
            raise RegionError(f"{out.name} ({what}) leaves the region (read by {[u.name for u in readers]}"
                              f"{' at ' + where if where else ''}); only token rows and counts can be reassembled "
                              "from chunks")
        if tensor_value(out) is None:
            raise RegionError(at_source(out, f"{out.name} leaves the region but is not a tensor"))
        for u in readers:
            written = mutated_args(u)
            if out in written:
                raise RegionError(at_source(u, f"{out.name} leaves the region and is mutated in place by {u.name}"))
            for buf in written:  # e.g. tokens_per_expert.add_(counts): nobody else may read buf before the region ends
                early = [r.name for r in buf.users if r is not u and _before(r, region.nodes[-1])]
                if early:
                    raise RegionError(
                        f"{u.name} writes {buf.name} in place with region output {out.name}, and {early} read it inside the region's span"
                    )


def _before(a: fx.Node, b: fx.Node) -> bool:
    for n in a.graph.nodes:
        if n is a:
            return True
        if n is b:
            return False
    return False


def hop_all_to_alls(graph: fx.Graph) -> list[fx.Node]:
    """Higher-order ops (torch 2.11's ``autograd_function_apply``) whose subgraphs hold an all-to-all."""
    gm = graph.owning_module
    hits = []
    for n in graph.nodes:
        parsed = op_namespace_and_name(n.target) if n.op == "call_function" else None
        if parsed is None or parsed[0] != "higher_order":
            continue
        for a in n.args:
            if isinstance(a, fx.Node) and a.op == "get_attr" and gm is not None:
                sub = getattr(gm, a.target, None)
                if isinstance(sub, fx.GraphModule) and any(is_all_to_all(m) or hop_all_to_alls(sub.graph) for m in sub.graph.nodes):
                    hits.append(n)
                    break
    return hits


def describe_trigger(graph: fx.Graph) -> str | None:
    """What all-to-alls the graph holds (any spelling), or None: the backend's 'trigger present' test."""
    counts: dict[str, int] = {}
    for n in graph.nodes:
        if is_all_to_all(n):
            ns = op_namespace_and_name(n.target)[0]
            counts[f"{ns}.all_to_all_single"] = counts.get(f"{ns}.all_to_all_single", 0) + 1
        elif is_inplace_c10d(n) and "alltoall" in op_namespace_and_name(n.target)[1]:
            key = f"c10d.{op_namespace_and_name(n.target)[1]} (in-place)"
            counts[key] = counts.get(key, 0) + 1
    for n in hop_all_to_alls(graph):
        key = f"{op_namespace_and_name(n.target)[1]} around an all_to_all"
        counts[key] = counts.get(key, 0) + 1
    if not counts:
        return None
    return ", ".join(f"{v} x {k}" for k, v in counts.items())
