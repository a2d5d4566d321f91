"""The one vocabulary of graph facts every pass imports.

Passes, the memory estimate, the scheduler and the CLI all ask the same
questions of an FX graph: what value does this node carry, is it a
collective (and which), where is its wait, does it write one of its inputs,
which module does it belong to, what does a (possibly negative) dim mean.
They are answered here, once, by meaning rather than by spelling, in both IRs
a pass can meet:

* torch IR (Dynamo's graph: ``torch.softmax``, ``Tensor.softmax`` methods,
  ``OpOverloadPacket`` targets, ``example_value`` metadata), and
* ATen IR (the canonical pre-dispatch re-trace of ``moe_passes.ir.canonical``
  and Inductor's post-grad graphs: ``OpOverload`` targets with schemas,
  ``val`` metadata).

Mutation is read from schemas (``alias_info.is_write``) where there is one;
for torch-IR methods it falls back to PyTorch's naming rule (a trailing
underscore) and to the in-place operator functions.
"""

from __future__ import annotations

import operator
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef

# ---------------------------------------------------------------- node values


def node_value(node: Any) -> Any:
    """The (fake) value a node carries: ``meta["val"]`` first (ATen / re-propagated), else Dynamo's
    ``meta["example_value"]``; ``None`` for non-nodes and nodes without metadata."""
    if not isinstance(node, fx.Node):
        return None
    if "val" in node.meta:
        return node.meta["val"]
    return node.meta.get("example_value")


def tensor_value(node: Any) -> torch.Tensor | None:
    v = node_value(node)
    return v if isinstance(v, torch.Tensor) else None


def has_node(x: Any) -> bool:
    """Whether an argument structure contains an fx.Node."""
    found = False

    def visit(a: fx.Node) -> fx.Node:
        nonlocal found
        found = True
        return a

    fx.map_arg(x, visit)
    return found


def normalize_dim(dim: Any, ndim: int) -> int | None:
    """A dim argument as a non-negative int for a tensor of rank ``ndim``; None if not an int."""
    if isinstance(dim, bool) or not isinstance(dim, int):
        return None
    if ndim == 0:
        return 0 if dim in (0, -1) else None
    return dim + ndim if dim < 0 else dim


# ---------------------------------------------------------------- op identity


def op_namespace_and_name(target: Any) -> tuple[str, str] | None:
    """(namespace, op name) of an OpOverload / OpOverloadPacket / HigherOrderOperator target."""
    if isinstance(target, torch._ops.OpOverload):
        return target.namespace, target._opname
    if isinstance(target, torch._ops.OpOverloadPacket):
        ns, _, name = target._qualified_op_name.partition("::")
        return ns, name
    if isinstance(target, torch._ops.HigherOrderOperator):
        return "higher_order", target.name()
    return None


def op_label(node: fx.Node) -> str | None:
    """``"aten.softmax"`` style name of a call on an OpOverload / packet (overload dropped); None otherwise."""
    parsed = op_namespace_and_name(node.target) if node.op == "call_function" else None
    return f"{parsed[0]}.{parsed[1]}" if parsed else None


def schema_of(node: fx.Node) -> torch.FunctionSchema | None:
    """The ATen schema of a ``call_function`` node on an OpOverload (None otherwise)."""
    if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
        return node.target._schema
    return None


def op_arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``name`` of a call: keyword, else positional, else its schema default, else ``default``.

    One reading for every analysis: ``softmax(x, dim=1)``, ``softmax(x, 1)`` and an omitted
    argument with a schema default all give the same answer. With a schema the position is the
    schema's (``dim`` is argument 2 of ``linalg_vector_norm(self, ord, dim, ...)``, argument 1 of
    ``sum.dim_IntList``), never assumed; ``index`` is used only for targets without one."""
    if name in node.kwargs:
        return node.kwargs[name]
    schema = schema_of(node)
    if schema is None:
        return node.args[index] if len(node.args) > index else default
    for position, a in enumerate(schema.arguments):
        if a.name != name:
            continue
        if not a.kwarg_only and len(node.args) > position:
            return node.args[position]
        return a.default_value if a.has_default_value() else default
    return default


def tensor_ndim(node: Any) -> int | None:
    v = tensor_value(node)
    return v.dim() if v is not None else None


def tensor_dtype(node: Any) -> torch.dtype | None:
    v = tensor_value(node)
    return v.dtype if v is not None else None


def normalize_dims(dims: Any, rank: int) -> tuple[int, ...] | None:
    """A dim list (None / [] = all dims, as ATen reductions read it) as a sorted tuple of non-negative
    ints; None if an entry is not an int."""
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return tuple(range(rank))
    if isinstance(dims, int):
        dims = [dims]
    out = []
    for d in dims:
        n = normalize_dim(d, rank)
        if n is None:
            return None
        out.append(n)
    return tuple(sorted(set(out)))


def static_nbytes(val: Any) -> int:
    """Bytes of a (fake) tensor value, symbolic sizes at their hint (0 without one); 0 for non-tensors."""
    if not isinstance(val, torch.Tensor):
        return 0
    numel = 1
    for s in val.shape:
        numel *= s if isinstance(s, int) else (s.node.hint if s.node.has_hint() else 0)
    return int(numel) * val.element_size()


def is_static_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def known_equal(a: Any, b: Any) -> bool:
    """``a == b`` for ints or SymInts, only when provable without adding a guard; False for None."""
    if a is None or b is None:
        return False
    if is_static_int(a) and is_static_int(b):
        return a == b
    try:
        from torch.fx.experimental.symbolic_shapes import statically_known_true

        return bool(statically_known_true(a == b))
    except Exception:  # noqa: BLE001 - unknown means not equal
        return False


def is_pointwise(node: fx.Node) -> bool:
    """An ATen op tagged ``torch.Tag.pointwise`` that writes none of its inputs."""
    return (node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
            and torch.Tag.pointwise in node.target.tags and not mutated_args(node))


def is_pure(node: fx.Node) -> bool:
    """A call that writes nothing and has no side effect (by schema; ``getitem`` of a result is pure)."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        return True
    if not isinstance(node.target, torch._ops.OpOverload):
        return False
    if mutated_args(node) or node.target._schema.is_mutable:
        return False
    return not node.is_impure()


def aten_name(node: fx.Node) -> str | None:
    """``"softmax"`` for ``aten.softmax.int`` / ``aten.softmax`` packets; None for other namespaces."""
    if node.op != "call_function":
        return None
    parsed = op_namespace_and_name(node.target)
    return parsed[1] if parsed is not None and parsed[0] == "aten" else None


# ---------------------------------------------------------------- one name per op, both IRs

#: torch-IR functions, by meaning (ATen ops are named by their schema; methods by their name).
_TORCH_FUNCTIONS: dict[Any, str] = {
    F.linear: "linear", torch._C._nn.linear: "linear", torch.matmul: "matmul", operator.matmul: "matmul",
    torch.mm: "mm", torch.addmm: "addmm",
    F.softmax: "softmax", torch.softmax: "softmax", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid",
    F.log_softmax: "log_softmax", torch.log_softmax: "log_softmax",
    torch.cat: "cat", torch.concat: "cat", torch.stack: "stack",
    operator.add: "add", torch.add: "add", operator.sub: "sub", torch.sub: "sub",
    torch.flatten: "flatten", torch.reshape: "reshape", torch.squeeze: "squeeze", torch.unsqueeze: "unsqueeze",
    torch.clone: "clone", torch.detach: "detach",
}
#: ATen/method spellings folded onto one meaning.
_SYNONYMS = {
    "_softmax": "softmax", "_safe_softmax": "softmax", "_log_softmax": "log_softmax", "_to_copy": "to",
    "_unsafe_view": "view", "concat": "cat", "concatenate": "cat", "alias": "detach", "float": "to",
    "type": "to", "type_as": "to", "view_as": "view", "reshape_as": "reshape", "lift_fresh_copy": "clone",
}


def op_meaning(node: fx.Node) -> str | None:
    """One name per op whatever its spelling: ``"softmax"`` for ``F.softmax``, ``.softmax``, ``aten.softmax.int``."""
    if node.op == "call_method":
        name = str(node.target)
    elif node.op == "call_function":
        name = aten_name(node) or _TORCH_FUNCTIONS.get(node.target)
        if name is None:
            return None
    else:
        return None
    return _SYNONYMS.get(name, name)



# ---------------------------------------------------------------- collectives

#: Namespaces of functional collectives across torch 2.11-2.13: plain, autograd-aware, legacy.
COLLECTIVE_NAMESPACES: tuple[str, ...] = ("_c10d_functional", "_c10d_functional_autograd", "c10d_functional")
#: Traced in-place c10d ops (``c10d.alltoall_base_`` ...): recognised so passes can refuse them by name.
INPLACE_C10D_NAMESPACE = "c10d"
WAIT_OPS: frozenset[str] = frozenset({"wait_tensor"})
ALL_TO_ALL_OPS: frozenset[str] = frozenset({"all_to_all_single"})


def _functional_collective_name(node: fx.Node) -> str | None:
    if node.op != "call_function":
        return None
    parsed = op_namespace_and_name(node.target)
    if parsed is None or parsed[0] not in COLLECTIVE_NAMESPACES:
        return None
    return parsed[1]


def is_wait(node: fx.Node) -> bool:
    """A ``wait_tensor`` on a functional collective's result."""
    return _functional_collective_name(node) in WAIT_OPS


def is_collective(node: fx.Node) -> bool:
    """A functional collective (all_to_all, all_reduce, all_gather, ...), not a wait."""
    name = _functional_collective_name(node)
    return name is not None and name not in WAIT_OPS


def is_all_to_all(node: fx.Node) -> bool:
    return _functional_collective_name(node) in ALL_TO_ALL_OPS


def is_inplace_c10d(node: fx.Node) -> bool:
    """A traced in-place c10d collective (not functional): its effects are not data flow."""
    if node.op != "call_function":
        return False
    parsed = op_namespace_and_name(node.target)
    return parsed is not None and parsed[0] == INPLACE_C10D_NAMESPACE


def collective_kind(node: fx.Node) -> str | None:
    """Op name of a collective ("all_to_all_single", "all_reduce", ...), else None."""
    return _functional_collective_name(node) if is_collective(node) else None


def collective_nodes(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if is_collective(n)]


def wait_nodes(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if is_wait(n)]


def waits_of(node: fx.Node) -> list[fx.Node]:
    """The ``wait_tensor`` nodes consuming a collective's output (directly or through getitem)."""
    waits: list[fx.Node] = []
    for user in node.users:
        if is_wait(user):
            waits.append(user)
        elif user.op == "call_function" and user.target is operator.getitem:
            waits.extend(u for u in user.users if is_wait(u))
    return waits


def all_to_all_split_args(node: fx.Node) -> tuple[Any, Any] | None:
    """(output_split_sizes, input_split_sizes) of an ``all_to_all_single`` node, either spelling."""
    if not is_all_to_all(node):
        return None
    args = list(node.args) + [None] * 4
    out_split = node.kwargs.get("output_split_sizes", args[1])
    in_split = node.kwargs.get("input_split_sizes", args[2])
    return out_split, in_split


# ---------------------------------------------------------------- mutation

#: In-place operator functions Dynamo may leave in a torch-IR graph.
INPLACE_FUNCTIONS: frozenset[Any] = frozenset(
    {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
     operator.iand, operator.ior, operator.ixor, operator.ipow, operator.imatmul}
)


def mutated_args(node: fx.Node) -> list[fx.Node]:
    """The input nodes a node writes in place.

    ATen: every argument whose schema entry has ``alias_info.is_write`` (``aten.clamp_``,
    ``aten.index_put_``, ``out=`` variants). torch IR: the ``self`` of a method ending in one
    underscore (``x.add_``, ``x.clamp_``), the target of ``operator.setitem``/``iadd``..., and
    the ``out=`` keyword of any call.
    """
    if node.op not in ("call_function", "call_method"):
        return []
    written: list[Any] = []
    schema = schema_of(node)
    if schema is not None:
        for i, arg in enumerate(schema.arguments):
            if arg.alias_info is not None and arg.alias_info.is_write:
                if arg.kwarg_only or i >= len(node.args):
                    written.append(node.kwargs.get(arg.name))
                else:
                    written.append(node.args[i])
    elif node.op == "call_method":
        name = node.target
        if isinstance(name, str) and name.endswith("_") and not name.endswith("__") and node.args:
            written.append(node.args[0])
    elif node.target in INPLACE_FUNCTIONS and node.args:
        written.append(node.args[0])
    if schema is None and "out" in node.kwargs:
        written.append(node.kwargs["out"])
    out: list[fx.Node] = []
    for w in written:
        fx.map_arg(w, lambda n: out.append(n) or n)
    return out


def is_mutation(node: fx.Node) -> bool:
    """Whether the node writes any of its inputs in place."""
    return bool(mutated_args(node))


def writes_between(value: fx.Node, start: fx.Node, end: fx.Node) -> list[fx.Node]:
    """Nodes strictly after ``start`` and before ``end`` (graph order) that write ``value`` or a view
    of it (a node that aliases its input through a view op counts as the same storage)."""
    aliases = storage_aliases(value)
    hits: list[fx.Node] = []
    inside = False
    for n in value.graph.nodes:
        if n is start:
            inside = True
            continue
        if n is end:
            break
        if inside and any(a in aliases for a in mutated_args(n)):
            hits.append(n)
    return hits


def _is_view(node: fx.Node) -> bool:
    schema = schema_of(node)
    if schema is not None:
        return bool(schema.returns) and schema.returns[0].alias_info is not None and not schema.returns[0].alias_info.is_write
    if node.op == "call_method":
        return node.target in {"view", "reshape", "view_as", "expand", "expand_as", "transpose", "permute", "t",
                               "squeeze", "unsqueeze", "flatten", "unflatten", "narrow", "select", "__getitem__",
                               "split", "chunk", "unbind", "detach", "as_strided", "diagonal", "contiguous", "T"}
    if node.op == "call_function" and node.target is operator.getitem:
        # Indexing a tensor may view it; picking one output of a multi-output op (top-k's values vs
        # indices) does not alias the siblings.
        base = node.args[0] if node.args else None
        return isinstance(node_value(base), torch.Tensor)
    return node.op == "call_function" and node.target in (torch.reshape, torch.flatten,
                                                           torch.transpose, torch.squeeze, torch.unsqueeze,
                                                           torch.narrow, torch.select, torch.split, torch.chunk,
                                                           torch.unbind, torch.detach)


def storage_aliases(value: fx.Node) -> set[fx.Node]:
    """``value`` and every node that may share its storage through view ops, in both directions
    (views of it, its base if it is a view, views of that base, ...)."""
    seen = {value}
    stack = [value]
    while stack:
        n = stack.pop()
        linked = [u for u in n.users if _is_view(u) and u.all_input_nodes[:1] == [n]]
        if _is_view(n) and n.all_input_nodes:
            linked.append(n.all_input_nodes[0])
        for m in linked:
            if m not in seen:
                seen.add(m)
                stack.append(m)
    return seen


# ---------------------------------------------------------------- routers


def is_topk(node: fx.Node) -> bool:
    """``torch.topk`` / ``Tensor.topk`` (torch IR) or ``aten.topk`` (ATen IR)."""
    if node.op == "call_method":
        return node.target == "topk"
    if node.op != "call_function":
        return False
    return node.target is torch.topk or op_namespace_and_name(node.target) == ("aten", "topk")


def is_softmax(node: fx.Node) -> bool:
    """Any spelling of softmax: ``F.softmax``/``torch.softmax``/``.softmax``/``aten.softmax``/``aten._softmax``."""
    if node.op == "call_method":
        return node.target == "softmax"
    if node.op != "call_function":
        return False
    if node.target in (torch.softmax, torch.nn.functional.softmax, torch.special.softmax):
        return True
    return aten_name(node) in ("softmax", "_softmax", "_safe_softmax")


# ---------------------------------------------------------------- modules


def module_path(node: fx.Node, depth: int | None = None) -> str | None:
    """Module path of a node from ``nn_module_stack``: innermost, or the entry at ``depth`` (0 = outermost)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    entries = list(stack.values())
    if depth is not None:
        if depth >= len(entries):
            return None
        entry = entries[depth]
    else:
        entry = entries[-1]
    return entry[0] if isinstance(entry, tuple) else str(entry)


def module_types(node: fx.Node) -> list[tuple[str, type | str]]:
    """(path, module type) pairs of a node's ``nn_module_stack``, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    return [(v[0], v[1]) if isinstance(v, tuple) else (str(v), "") for v in stack.values()]


def type_name(t: type | str) -> str:
    return t.__name__ if isinstance(t, type) else str(t).rsplit(".", 1)[-1].strip("'>")


def group_by_module(graph: fx.Graph, depth: int | None = None) -> "OrderedDict[str, list[fx.Node]]":
    """Nodes grouped by module path (first-appearance order); nodes outside any module are left out."""
    groups: OrderedDict[str, list[fx.Node]] = OrderedDict()
    for node in graph.nodes:
        path = module_path(node, depth)
        if path is not None:
            groups.setdefault(path, []).append(node)
    return groups


@dataclass
class ModuleRegion:
    """The nodes of one module that holds all-to-all collectives (for reports, estimates, the CLI).

    This is a grouping by ``nn_module_stack`` only; a pass that rewrites a region proves its own
    region by data flow (e.g. ``moe_passes.fx.domino``) and must not rely on this grouping.
    """

    path: str
    module_type: str
    nodes: list[fx.Node] = field(default_factory=list)
    all_to_alls: list[fx.Node] = field(default_factory=list)
    waits: list[fx.Node] = field(default_factory=list)

    def describe(self) -> str:
        return f"{self.path} ({self.module_type}: {len(self.all_to_alls)} all_to_all, {len(self.nodes)} nodes)"


def find_module_regions(graph: fx.Graph) -> list[ModuleRegion]:
    """Modules whose nodes contain all-to-all collectives: per collective, the innermost module on its
    ``nn_module_stack`` that also holds a top-k (the router), else its innermost module."""
    topk_paths: set[str] = set()
    for node in graph.nodes:
        if is_topk(node):
            topk_paths.update(p for p, _ in module_types(node))
    regions: OrderedDict[str, ModuleRegion] = OrderedDict()
    for node in graph.nodes:
        if not is_all_to_all(node):
            continue
        stack = module_types(node)
        chosen = next(((p, t) for p, t in reversed(stack) if p in topk_paths), stack[-1] if stack else None)
        if chosen is None:
            continue
        path, mtype = chosen
        region = regions.setdefault(path, ModuleRegion(path, type_name(mtype)))
        region.all_to_alls.append(node)
        region.waits.extend(waits_of(node))
    for node in graph.nodes:
        for p, _ in module_types(node):
            if p in regions:
                regions[p].nodes.append(node)
                break
    return list(regions.values())


def nodes_in_order(nodes: Iterable[fx.Node]) -> list[fx.Node]:
    """``nodes`` sorted by their position in their graph."""
    nodes = list(nodes)
    if not nodes:
        return []
    order = {n: i for i, n in enumerate(nodes[0].graph.nodes)}
    return sorted(nodes, key=order.__getitem__)


def copy_node_attributes(src: fx.Graph, dst: fx.Graph) -> None:
    """Carry the attributes set on nodes outside ``meta`` (Dynamo's ``_dynamo_source`` on placeholders,
    which AOT autograd requires) from ``src`` to the same-named nodes of ``dst``; ``Graph.__deepcopy__``
    and ``graph_copy`` do not copy them."""
    by_name = {n.name: n for n in dst.nodes}
    for n in src.nodes:
        extra = getattr(n, "__dict__", None)
        if extra and n.name in by_name:
            for key, value in extra.items():
                if key.startswith("_dynamo"):
                    setattr(by_name[n.name], key, value)


def storage_ref(val: Any) -> StorageWeakRef | None:
    """A weak reference to the storage of a (fake) tensor value; None for non-tensors and storage-less tensors."""
    if not isinstance(val, torch.Tensor):
        return None
    try:
        return StorageWeakRef(val.untyped_storage())
    except (NotImplementedError, RuntimeError):
        return None
