"""Layer-wise aux loss: the stacked router-logit losses become per-layer partial sums.

The classic balancing loss and z-loss concatenate every layer's router logits
into one ``[L*T, E]`` tensor and softmax / top-k / one-hot it as a whole. Every
one of those ops works row by row, and the loss only ever *sums over rows*, so
``sum_rows f(cat(X_0..X_L))`` equals ``sum_l sum_rows f(X_l)``. The pass finds
that structure with no hints (an abstract interpretation of the nodes below a
``cat``/``stack`` of logits, which fails closed on any op it does not
understand), emits each layer's partial sums within that layer (after its
router, before the next layer's router), accumulates them, and keeps the
original final combine on the accumulated sums.

Details that matter for value equality and memory:
- one-hot token counts become a ``scatter_add`` of the (mask) weights, so the
  ``[L*T, K, E]`` one-hot never exists, not even per layer;
- the loss's softmax / top-k are deduplicated against the router's own ones
  where they are the same computation (same input node, dim, effective dtype),
  so autograd saves nothing new for them;
- mask-derived rows come from the mask itself (a broadcast slice), never from
  a shape; a mask that is constant along the expert dim stays narrow ``[.., 1]``;
- global statistics: the original all-reduces the *summed* statistics; the
  pass keeps that (sums are linear, so reducing the layer-summed ``[K, E]``
  stats is exact and ``L`` times smaller than a stacked ``[L, E]``) and merges
  all of the loss's all-reduces into one collective of the flattened stats.
- the per-layer loop form (transformers >= 5: softmax / top-k / histc or
  scatter_add per layer, reduced at the end of the forward) is already
  layer-wise in value; there the pass deduplicates the loss's softmax/top-k
  against the router's and hoists each layer's partial sums into its layer.

A group of losses over the same logits (balancing + z-loss) is rewritten all
together or not at all, so a z-loss the pass cannot handle is never dropped.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx

from moe_passes.fx.pass_base import GraphPass, PassResult

log = logging.getLogger("moe_passes")

_ELEMENTWISE_BINARY = {operator.mul, operator.add, operator.sub, operator.truediv, operator.pow, torch.mul, torch.add, torch.sub, torch.div, torch.pow}
_ELEMENTWISE_METHODS = {"mul", "add", "sub", "div", "pow", "__mul__", "__add__", "__sub__", "__truediv__", "__pow__"}
_CAST_METHODS = {"float", "to", "type_as", "double", "half", "bfloat16", "contiguous"}
_RESHAPE_METHODS = {"reshape", "view", "flatten"}
_ALL_REDUCE = torch.ops._c10d_functional.all_reduce.default
_WAIT = torch.ops._c10d_functional.wait_tensor.default
_ALL_REDUCES = (_ALL_REDUCE, torch.ops._c10d_functional.all_reduce)
_WAITS = (_WAIT, torch.ops._c10d_functional.wait_tensor)


class Unsupported(Exception):
    """The loss region contains something the rewrite cannot prove equal."""


def _val(node: Any) -> Any:
    if not isinstance(node, fx.Node):
        return node
    return node.meta.get("example_value", node.meta.get("val"))


def _shape(node: fx.Node) -> tuple[int, ...]:
    v = _val(node)
    if not isinstance(v, torch.Tensor):
        raise Unsupported(f"{node.name} has no tensor metadata")
    shape = tuple(v.shape)
    if not all(isinstance(s, int) for s in shape):
        raise Unsupported(f"{node.name} has a symbolic shape {shape}; the pass needs static shapes for the loss")
    return shape


def _is(node: Any, op: str, targets: Iterable[Any]) -> bool:
    return isinstance(node, fx.Node) and node.op == op and node.target in set(targets)


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _norm_dim(dim: Any, ndim: int) -> Any:
    if isinstance(dim, int):
        return dim % ndim if ndim else dim
    if isinstance(dim, (tuple, list)):
        return tuple(sorted(d % ndim for d in dim))
    return dim


@dataclass
class Rows:
    """A tensor whose dim 0 runs over the stacked rows of all layers (layer-major).

    ``emit(l)`` builds layer ``l``'s slice; ``invariant`` rows (mask broadcasts)
    are the same for every layer; ``narrow(l)`` is the same slice with a size-1
    last dim when the rows are constant along it (mask weights per token).
    """

    emit: Callable[[int], fx.Node]
    invariant: bool = False
    narrow: Callable[[int], fx.Node] | None = None
    onehot: tuple[fx.Node, int] | None = None  # (index rows node, num_classes) for float(one_hot(i))
    weighted_onehot: tuple[Any, Any] | None = None  # (onehot Rows, weight Rows) for onehot * weight
    is_logits: bool = False  # each layer's slice is that layer's logits, unchanged (cat, no-op casts)


@dataclass
class Layers:
    """A tensor with a leading layer axis (``stack`` of logits, or a mask expanded over layers)."""

    emit: Callable[[int], fx.Node]  # slice keeps a leading dim of size 1
    invariant: bool
    narrow: Callable[[int], fx.Node] | None = None
    is_logits: bool = False  # a stack of the layers' logits


@dataclass
class TopK:
    emit: Callable[[int], fx.Node]


@dataclass
class Group:
    """cat/stack nodes over the same per-layer logits, rewritten together."""

    logits: tuple[fx.Node, ...]
    sources: list[fx.Node] = field(default_factory=list)


class _Rewriter:
    """Abstract interpretation of one group's region, emitting per-layer nodes as it goes."""

    def __init__(self, gm: fx.GraphModule, group: Group) -> None:
        self.gm = gm
        self.graph = gm.graph
        self.group = group
        self.layers = group.logits
        self.rows_per_layer = [_shape(x)[0] for x in self.layers]
        self.values: dict[fx.Node, Any] = {}
        self.replace: dict[fx.Node, fx.Node] = {}
        self.region: list[fx.Node] = []
        self.new_nodes: list[fx.Node] = []
        self.per_layer: list[list[fx.Node]] = [[] for _ in self.layers]
        self.counts_without_onehot = 0
        self.lse_reusing_softmax = 0
        self.onehots_kept = 0
        self.cursor: fx.Node | None = None
        self._memo: dict[tuple[int, Any], fx.Node] = {}

    # -- emission -----------------------------------------------------------
    def _new(self, kind: str, target: Any, args: tuple, kwargs: dict | None = None, layer: int | None = None) -> fx.Node:
        assert self.cursor is not None
        with self.graph.inserting_before(self.cursor):
            node = self.graph.create_node(kind, target, args, kwargs or {})
        node.meta["moe_passes"] = "layerwise_aux_loss"
        self.new_nodes.append(node)
        if layer is not None:
            self.per_layer[layer].append(node)
        return node

    def _call(self, target: Any, *args: Any, layer: int | None = None, **kwargs: Any) -> fx.Node:
        return self._new("call_function", target, args, kwargs, layer)

    def _method(self, name: str, *args: Any, layer: int | None = None, **kwargs: Any) -> fx.Node:
        return self._new("call_method", name, args, kwargs, layer)

    def _memoised(self, key: Any, layer: int, invariant: bool, build: Callable[[], fx.Node]) -> fx.Node:
        k = (None if invariant else layer, key)
        if k not in self._memo:
            self._memo[k] = build()
        return self._memo[k]

    # -- helpers ------------------------------------------------------------
    def _slice(self, value: Any, layer: int, narrow: bool = False) -> Any:
        if isinstance(value, fx.Node) and value in self.values:
            value = self.values[value]
        if isinstance(value, (Rows, Layers)):
            if narrow and value.narrow is not None:
                return value.narrow(layer)
            return value.emit(layer)
        if isinstance(value, fx.Node):
            return self.replace.get(value, value)
        return value

    def _abstract(self, arg: Any) -> Any:
        return self.values.get(arg) if isinstance(arg, fx.Node) else None

    def _check_broadcast(self, node: fx.Node, row_arg: fx.Node, other: Any) -> None:
        """A plain operand must not vary along the row dim (it would mix layers)."""
        if not isinstance(other, fx.Node):
            return
        other_val = _val(other)
        if not isinstance(other_val, torch.Tensor):
            return
        row_ndim = len(_shape(node)) if isinstance(_val(node), torch.Tensor) else 0
        other_shape = tuple(other_val.shape)
        if len(other_shape) >= row_ndim and row_ndim > 0 and other_shape[len(other_shape) - row_ndim] != 1:
            raise Unsupported(f"{node.name}: operand {other.name} varies along the stacked row dim")

    # -- the interpreter ----------------------------------------------------
    def run(self) -> None:
        order = {n: i for i, n in enumerate(self.graph.nodes)}
        first = min(order[s] for s in self.group.sources)
        for source in self.group.sources:
            self.values[source] = self._source_value(source)
            self.region.append(source)
        for node in list(self.graph.nodes):
            if order.get(node, -1) <= first or node in self.values:
                continue
            if not any(i in self.values for i in node.all_input_nodes):
                if node.op == "call_method" and node.target == "expand":
                    self.cursor = node
                    try:
                        self.values[node] = self._expand(node)
                    except Unsupported:
                        continue
                    self.region.append(node)
                continue
            self.cursor = node
            value = self._interpret(node)
            if not isinstance(value, fx.Node):  # reductions are real nodes now, in self.replace
                self.values[node] = value
            self.region.append(node)
        handled = set(self.region)
        for node in self.region:
            value = self.values.get(node)
            if isinstance(value, (Rows, Layers, TopK)) and not getattr(value, "invariant", False):
                outside = [u for u in node.users if u not in handled]
                if outside or node.op == "output":
                    raise Unsupported(f"{node.name} (stacked rows) is used by {[u.name for u in outside]}, which the pass cannot split by layer")

    def _source_value(self, source: fx.Node) -> Any:
        if source.target is torch.cat:
            return Rows(emit=lambda layer: self.layers[layer], is_logits=True)
        return Layers(emit=lambda layer: self._memoised(("stack", source), layer, False, lambda: self._method("unsqueeze", self.layers[layer], 0, layer=layer)), invariant=False, is_logits=True)

    def _interpret(self, node: fx.Node) -> Any:
        args = node.args
        if node.op == "output":
            raise Unsupported("stacked rows reach the graph output")
        first = args[0] if args else None
        a0 = self._abstract(first)
        # reductions over rows ------------------------------------------------
        if node.op in ("call_method", "call_function") and node.target in ("sum", "mean", torch.sum, torch.mean):
            return self._reduction(node)
        if _is(node, "call_function", [torch.histc]) or (node.op == "call_method" and node.target == "histc"):
            if not isinstance(a0, Rows):
                raise Unsupported(f"{node.name}: histc of a non-row operand")
            return self._linear_reduction(node, lambda layer: self._new(node.op, node.target, (a0.emit(layer), *args[1:]), dict(node.kwargs), layer))
        if node.op == "call_method" and node.target == "scatter_add" or _is(node, "call_function", [torch.scatter_add]):
            return self._scatter_add(node)
        if any(isinstance(self._abstract(a), TopK) for a in node.all_input_nodes) and node.target is not operator.getitem:
            raise Unsupported(f"{node.name}: unexpected use of a top-k tuple")
        # row-preserving ops ---------------------------------------------------
        if node.target is operator.getitem and isinstance(a0, TopK):
            idx = args[1]
            return Rows(emit=lambda layer: self._memoised(("getitem", node), layer, False, lambda: self._call(operator.getitem, a0.emit(layer), idx, layer=layer)))
        if node.target is torch.nn.functional.softmax or node.target is torch.softmax or (node.op == "call_method" and node.target == "softmax"):
            return self._lastdim_op(node, a0, "softmax")
        if node.target is torch.logsumexp or (node.op == "call_method" and node.target == "logsumexp"):
            return self._lastdim_op(node, a0, "logsumexp")
        if node.target is torch.topk or (node.op == "call_method" and node.target == "topk"):
            if not isinstance(a0, Rows) or a0.invariant:
                raise Unsupported(f"{node.name}: top-k of something that is not the stacked logits")
            ndim = len(_shape(first))
            dim = _arg(node, 2, "dim", -1)
            if _norm_dim(dim, ndim) == 0:
                raise Unsupported(f"{node.name}: top-k over the stacked row dim")
            return TopK(emit=lambda layer: self._memoised(("topk", node), layer, False, lambda: self._new(node.op, node.target, (a0.emit(layer), *args[1:]), dict(node.kwargs), layer)))
        if node.target is torch.nn.functional.one_hot:
            if not isinstance(a0, Rows):
                raise Unsupported(f"{node.name}: one_hot of a non-row operand")
            return Rows(emit=self._plain(node, a0), onehot=(node, _arg(node, 1, "num_classes", -1)))
        if node.op == "call_method" and node.target in _CAST_METHODS:
            if not isinstance(a0, (Rows, Layers)):
                raise Unsupported(f"{node.name}: cast of an unexpected value")
            return self._cast(node, a0)
        if node.op == "call_method" and node.target in _RESHAPE_METHODS:
            return self._reshape(node, a0)
        if node.op == "call_method" and node.target == "expand":
            return self._expand(node)
        if node.target in _ELEMENTWISE_BINARY or (node.op == "call_method" and node.target in _ELEMENTWISE_METHODS):
            return self._binary(node)
        raise Unsupported(f"{node.name}: {node.op} {getattr(node.target, '__name__', node.target)} on stacked rows is not understood")

    def _plain(self, node: fx.Node, a0: Rows) -> Callable[[int], fx.Node]:
        args, kwargs = node.args, dict(node.kwargs)
        return lambda layer: self._memoised(("plain", node), layer, a0.invariant, lambda: self._new(node.op, node.target, (a0.emit(layer), *args[1:]), kwargs, None if a0.invariant else layer))

    def _lastdim_op(self, node: fx.Node, a0: Any, what: str) -> Rows:
        if not isinstance(a0, Rows) or a0.invariant:
            raise Unsupported(f"{node.name}: {what} of something that is not the stacked logits")
        ndim = len(_shape(node.args[0]))
        dim = _arg(node, 1, "dim", None)
        if dim is None or ndim < 2 or _norm_dim(dim, ndim) == 0:
            raise Unsupported(f"{node.name}: {what} over dim {dim} mixes stacked rows")
        keepdim = _arg(node, 2, "keepdim", False)
        if what == "logsumexp" and a0.is_logits and not keepdim and _norm_dim(dim, ndim) == ndim - 1:
            return Rows(emit=lambda layer: self._memoised(("lse", node), layer, False, lambda: self._logsumexp(node, layer)))
        return Rows(emit=self._plain(node, a0))

    def _logsumexp(self, node: fx.Node, layer: int) -> fx.Node:
        """logsumexp of a layer's logits whose gradient reuses the router's fp32 softmax.

        d logsumexp(x)/dx = softmax(x): written as ``lse(x.detach()) + sum(p.detach() * (x - x.detach()))``
        (the second term is exactly 0 in value) the backward needs only ``p``, which autograd already
        keeps for the router's softmax, instead of saving every layer's logits for the loss.
        """
        x = self.layers[layer]
        probs = [u for u in _users_through_noops(x) if _effective_softmax_key(u) == (x, _val(x).dim() - 1, torch.float32)]
        if _val(x).dtype != torch.float32 or not probs:
            return self._new(node.op, node.target, (x, *node.args[1:]), dict(node.kwargs), layer)
        detached = self._method("detach", x, layer=layer)
        lse = self._call(torch.logsumexp, detached, -1, layer=layer)
        zero = self._call(operator.sub, x, detached, layer=layer)
        weighted = self._call(operator.mul, self._method("detach", probs[0], layer=layer), zero, layer=layer)
        self.lse_reusing_softmax += 1
        return self._call(operator.add, lse, self._method("sum", weighted, -1, layer=layer), layer=layer)

    def _cast(self, node: fx.Node, a0: Any) -> Any:
        rest, kwargs = node.args[1:], dict(node.kwargs)
        for r in list(rest) + list(kwargs.values()):
            if isinstance(r, fx.Node) and r in self.values:
                raise Unsupported(f"{node.name}: cast target depends on stacked rows")
        def emit(layer: int, narrow: bool = False) -> fx.Node:
            key = ("cast", node, narrow)
            return self._memoised(key, layer, a0.invariant, lambda: self._new(node.op, node.target, (self._slice(a0, layer, narrow), *rest), kwargs, None if a0.invariant else layer))
        narrow = (lambda layer: emit(layer, True)) if a0.narrow is not None else None
        onehot = a0.onehot if isinstance(a0, Rows) else None
        if isinstance(a0, Layers):
            return Layers(emit=emit, invariant=a0.invariant, narrow=narrow)
        same = isinstance(_val(node), torch.Tensor) and _val(node).dtype == _val(node.args[0]).dtype
        return Rows(emit=emit, invariant=a0.invariant, narrow=narrow, onehot=onehot,
                    is_logits=a0.is_logits and same and node.target in ("float", "to", "contiguous"))

    def _reshape(self, node: fx.Node, a0: Any) -> Rows:
        in_shape, out_shape = _shape(node.args[0]), _shape(node)
        if isinstance(a0, Layers):
            num = len(self.layers)
            if in_shape[0] != num or out_shape[0] != sum(self.rows_per_layer):
                raise Unsupported(f"{node.name}: reshape of the layer axis does not give layer-major rows")
            per = out_shape[0] // num
            if any(r != per for r in self.rows_per_layer):
                raise Unsupported(f"{node.name}: layers have different token counts; a layer broadcast cannot be aligned")
            rest = out_shape[1:]
            def emit(layer: int) -> fx.Node:
                return self._memoised(("reshape", node), layer, a0.invariant, lambda: self._method("reshape", a0.emit(layer), (-1, *rest), layer=None if a0.invariant else layer))
            narrow = None
            if a0.narrow is not None and rest:
                narrow = lambda layer: self._memoised(("reshape_n", node), layer, a0.invariant, lambda: self._method("reshape", a0.narrow(layer), (-1, *rest[:-1], 1)))
            is_logits = a0.is_logits and all(tuple(rest) == _shape(x)[1:] for x in self.layers)
            return Rows(emit=lambda layer: self.layers[layer] if is_logits else emit(layer), invariant=a0.invariant,
                        narrow=narrow, is_logits=is_logits)
        if not isinstance(a0, Rows):
            raise Unsupported(f"{node.name}: reshape of an unexpected value")
        row_elems = 1
        for s in in_shape[1:]:
            row_elems *= s
        new_row = 1
        for s in out_shape[1:]:
            new_row *= s
        if not out_shape or any((t * row_elems) % new_row for t in self.rows_per_layer):
            raise Unsupported(f"{node.name}: reshape {in_shape}->{out_shape} moves data across layer boundaries")
        rest = out_shape[1:]
        return Rows(emit=lambda layer: self._memoised(("reshape", node), layer, a0.invariant, lambda: self._method("reshape", a0.emit(layer), (-1, *rest), layer=None if a0.invariant else layer)), invariant=a0.invariant)

    def _expand(self, node: fx.Node) -> Layers:
        base = node.args[0]
        if base in self.values:
            raise Unsupported(f"{node.name}: expand of stacked rows")
        sizes = node.args[1:] if not isinstance(node.args[1], (tuple, list)) else tuple(node.args[1])
        base_shape = _shape(base)
        if not sizes or sizes[0] != len(self.layers) or len(base_shape) != len(sizes) or base_shape[0] != 1:
            raise Unsupported(f"{node.name}: expand is not a broadcast over the {len(self.layers)} layers")
        # Only reached when a user reshapes it into rows; until then it is a plain layer broadcast.
        one = (1, *sizes[1:])
        emit = lambda layer: self._memoised(("expand", node), layer, True, lambda: self._method("expand", base, one))
        narrow = None
        if base_shape[-1] == 1 and len(sizes) > 2:
            narrow_sizes = (1, *sizes[1:-1], 1)
            narrow = lambda layer: self._memoised(("expand_n", node), layer, True, lambda: self._method("expand", base, narrow_sizes))
        return Layers(emit=emit, invariant=True, narrow=narrow)

    def _binary(self, node: fx.Node) -> Rows:
        if len(node.args) != 2 or node.kwargs:
            raise Unsupported(f"{node.name}: elementwise op with unexpected arguments")
        a, b = node.args
        va, vb = self._abstract(a), self._abstract(b)
        for v in (va, vb):
            if v is not None and not isinstance(v, Rows):
                raise Unsupported(f"{node.name}: elementwise op on a layer axis")
        if va is None:
            self._check_broadcast(node, b, a)
        if vb is None:
            self._check_broadcast(node, a, b)
        invariant = all(v is None or v.invariant for v in (va, vb))
        # A narrow (per-token) mask multiplies a full-width row by broadcasting: same values, no [T, K, E] mask.
        narrow_a = va is not None and vb is not None and va.narrow is not None and vb.narrow is None and not vb.invariant
        narrow_b = va is not None and vb is not None and vb.narrow is not None and va.narrow is None and not va.invariant
        def emit(layer: int) -> fx.Node:
            return self._memoised(("binary", node), layer, invariant, lambda: self._new(
                node.op, node.target, (self._slice(a, layer, narrow_a), self._slice(b, layer, narrow_b)), {}, None if invariant else layer))
        weighted = None
        if node.target in (operator.mul, torch.mul, "mul", "__mul__") and va is not None and vb is not None:
            if va.onehot is not None and vb.narrow is not None and vb.onehot is None:
                weighted = (va, vb)
            elif vb.onehot is not None and va.narrow is not None and va.onehot is None:
                weighted = (vb, va)
        return Rows(emit=emit, invariant=invariant, weighted_onehot=weighted)

    # -- reductions -----------------------------------------------------------
    def _reduction(self, node: fx.Node) -> fx.Node:
        src = node.args[0]
        a0 = self._abstract(src)
        if not isinstance(a0, Rows):
            raise Unsupported(f"{node.name}: reduction of a layer axis")
        ndim = len(_shape(src))
        dim = _arg(node, 1, "dim", None)
        keepdim = _arg(node, 2, "keepdim", False)
        extra = {k: v for k, v in node.kwargs.items() if k not in ("dim", "keepdim")}
        if keepdim:
            raise Unsupported(f"{node.name}: keepdim reduction over rows")
        all_dims = dim is None or _norm_dim(dim, ndim) == tuple(range(ndim))
        if not all_dims and _norm_dim(dim, ndim) not in (0, (0,)):
            raise Unsupported(f"{node.name}: reduction over dim {dim} keeps the stacked rows")
        is_mean = node.target in ("mean", torch.mean)
        shape = _shape(src)
        count = 1
        for s in (shape if all_dims else shape[:1]):
            count *= s
        out_shape = _shape(node)

        def partial(layer: int) -> fx.Node:
            if not all_dims and a0.onehot is not None:
                return self._counts(layer, a0.onehot, None, out_shape, _val(node).dtype)
            if not all_dims and a0.weighted_onehot is not None:
                oh, weight = a0.weighted_onehot
                return self._counts(layer, oh.onehot, weight, out_shape, _val(node).dtype)
            if a0.invariant and a0.narrow is not None and not all_dims:
                n = self._memoised(("nsum", node), layer, True, lambda: self._method("sum", a0.narrow(layer), dim=0, **extra))
                return self._memoised(("nsum_x", node), layer, True, lambda: self._method("expand", n, out_shape))
            kwargs = dict(extra) if all_dims else {"dim": 0, **extra}
            return self._memoised(("sum", node), layer, a0.invariant, lambda: self._method("sum", a0.emit(layer), layer=None if a0.invariant else layer, **kwargs))

        total = self._accumulate(node, partial)
        if is_mean:
            self.cursor = node
            total = self._call(operator.truediv, total, count)
        self.replace[node] = total
        return total

    def _linear_reduction(self, node: fx.Node, partial: Callable[[int], fx.Node]) -> fx.Node:
        total = self._accumulate(node, partial)
        self.replace[node] = total
        return total

    def _accumulate(self, node: fx.Node, partial: Callable[[int], fx.Node]) -> fx.Node:
        self.cursor = node
        total: fx.Node | None = None
        for layer in range(len(self.layers)):
            p = partial(layer)
            total = p if total is None else self._call(operator.add, total, p, layer=layer)
        assert total is not None
        return total

    def _counts(self, layer: int, onehot: tuple[fx.Node, int], weight: Rows | None, out_shape: tuple[int, ...], out_dtype_of: torch.dtype) -> fx.Node:
        """sum over rows of one_hot(idx, E) [* w] as a scatter_add of the weights: no one-hot tensor."""
        oh_node, num_classes = onehot
        idx_rows: Rows = self.values[oh_node.args[0]]
        idx = idx_rows.emit(layer)
        idx_shape = _shape(oh_node.args[0])
        if num_classes is None or num_classes < 0 or out_shape[-1] != num_classes or len(idx_shape) not in (1, 2):
            raise Unsupported(f"{oh_node.name}: one_hot without an explicit class count")
        out_dtype = out_dtype_of
        if weight is None:
            src = self._call(torch.ones_like, idx, dtype=out_dtype, layer=layer)
        else:
            w = weight.narrow(layer)  # [T, (K,) 1]
            squeezed = self._method("squeeze", w, -1, layer=layer)
            src = self._method("expand_as", squeezed, idx, layer=layer) if len(idx_shape) == 2 else self._method("reshape", w, (-1,), layer=layer)
            src = self._method("to", src, out_dtype, layer=layer)
        if len(idx_shape) == 2:
            zeros = self._method("new_zeros", idx, out_shape, dtype=out_dtype, layer=layer)
            self.counts_without_onehot += 1
            return self._method("scatter_add", zeros, 1, self._method("t", idx, layer=layer), self._method("t", src, layer=layer), layer=layer)
        zeros = self._method("new_zeros", idx, out_shape, dtype=out_dtype, layer=layer)
        self.counts_without_onehot += 1
        return self._method("scatter_add", zeros, 0, idx, src, layer=layer)

    def _scatter_add(self, node: fx.Node) -> fx.Node:
        """``base.scatter_add(0, idx_rows, src_rows)``: a histogram over rows, linear in the rows."""
        if len(node.args) != 4 or node.kwargs:
            raise Unsupported(f"{node.name}: scatter_add with unexpected arguments")
        base, dim, index, src = node.args
        vi, vs = self._abstract(index), self._abstract(src)
        if base in self.values or dim != 0 or not isinstance(vi, Rows) or not isinstance(vs, Rows):
            raise Unsupported(f"{node.name}: scatter_add that is not a histogram of per-row values")

        def partial(layer: int) -> fx.Node:
            # The first layer starts from ``base``; later layers from zeros, so base is added once.
            start = base if layer == 0 else self._call(torch.zeros_like, base, layer=layer)
            return self._new(node.op, node.target, (start, 0, vi.emit(layer), vs.emit(layer)), {}, layer)

        return self._linear_reduction(node, partial)


def _find_groups(gm: fx.GraphModule) -> list[Group]:
    groups: dict[tuple[fx.Node, ...], Group] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in (torch.cat, torch.stack):
            continue
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = _arg(node, 1, "dim", 0)
        if not isinstance(tensors, (list, tuple)) or len(tensors) < 2 or dim not in (0,):
            continue
        if not all(isinstance(t, fx.Node) and isinstance(_val(t), torch.Tensor) and _val(t).dim() == 2 and _val(t).is_floating_point() for t in tensors):
            continue
        if not all(any(_is(u, "call_function", [torch.nn.functional.softmax]) for u in t.users) for t in tensors):
            continue  # not router logits: every input must also feed the router's own softmax
        key = tuple(tensors)
        groups.setdefault(key, Group(logits=key)).sources.append(node)
    return list(groups.values())


def _effective_softmax_key(node: fx.Node) -> tuple[Any, ...] | None:
    """(input, dim, dtype) of a softmax, with dtype=None resolved to the input's dtype."""
    if not (_is(node, "call_function", [torch.nn.functional.softmax, torch.softmax]) or (node.op == "call_method" and node.target == "softmax")):
        return None
    x = _strip_noop(node.args[0])
    xv = _val(x)
    if not isinstance(xv, torch.Tensor):
        return None
    dim = _arg(node, 1, "dim", None)
    if dim is None or len(node.args) > 3 or set(node.kwargs) - {"dim", "dtype", "_stacklevel"}:
        return None
    dtype = node.kwargs.get("dtype", node.args[3] if len(node.args) > 3 else None) or xv.dtype
    return (x, _norm_dim(dim, xv.dim()), dtype)


def _strip_noop(node: Any) -> Any:
    """Look through ``.to(same device/dtype)`` / ``.float()`` on fp32 / ``.contiguous()``: same tensor."""
    while (isinstance(node, fx.Node) and node.op == "call_method" and node.target in ("to", "float", "contiguous")
           and "copy" not in node.kwargs and isinstance(node.args[0], fx.Node)):
        v, src = _val(node), _val(node.args[0])
        if not (isinstance(v, torch.Tensor) and isinstance(src, torch.Tensor) and v.dtype == src.dtype
                and v.device == src.device and tuple(v.shape) == tuple(src.shape)):
            break
        node = node.args[0]
    return node


def _topk_key(node: fx.Node) -> tuple[Any, ...] | None:
    if not (_is(node, "call_function", [torch.topk]) or (node.op == "call_method" and node.target == "topk")):
        return None
    x = node.args[0]
    xv = _val(x)
    ndim = xv.dim() if isinstance(xv, torch.Tensor) else None
    names = ("input", "k", "dim", "largest", "sorted")
    defaults = (None, None, -1, True, True)
    values = [_arg(node, i, n, d) for i, (n, d) in enumerate(zip(names, defaults))]
    values[0] = _strip_noop(values[0])
    if ndim is None:
        return None
    values[2] = _norm_dim(values[2], ndim)
    return tuple(values)


def _dedupe_router_ops(graph: fx.Graph, candidates: list[fx.Node]) -> dict[str, int]:
    """Replace the loss's softmax / top-k / getitem by the router's identical earlier node.

    Identical means same input node, same (normalised) dim and effective dtype
    (softmax), same k/dim/largest/sorted (top-k): the same computation, so
    reusing the router's tensor also reuses what autograd already saved.
    """
    order = {n: i for i, n in enumerate(graph.nodes)}
    reused = {"softmax": 0, "topk": 0}
    for node in candidates:
        if node.graph is not graph or not node.users and node.op != "output":
            continue
        for kind, key_fn in (("softmax", _effective_softmax_key), ("topk", _topk_key)):
            key = key_fn(node)
            if key is None:
                continue
            for other in _users_through_noops(key[0]):
                if other is node or order.get(other, 1 << 60) >= order.get(node, 1 << 60) or key_fn(other) != key:
                    continue
                node.replace_all_uses_with(other)
                reused[kind] += 1
                if kind == "topk":
                    _merge_getitems(other, order)
                break
    return reused


def _users_through_noops(node: fx.Node) -> list[fx.Node]:
    """Users of ``node`` and of its no-op aliases (``.to``/``.float`` that change nothing), in graph order."""
    out, stack = [], [node]
    while stack:
        n = stack.pop()
        for u in n.users:
            out.append(u)
            if _strip_noop(u) is not u:
                stack.append(u)
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return sorted(set(out), key=order.get)


def _merge_getitems(topk: fx.Node, order: dict[fx.Node, int]) -> None:
    seen: dict[Any, fx.Node] = {}
    for user in sorted(topk.users, key=lambda n: order.get(n, 1 << 60)):
        if user.target is operator.getitem:
            index = user.args[1]
            if index in seen:
                user.replace_all_uses_with(seen[index])
            else:
                seen[index] = user


def _is_pure(node: fx.Node) -> bool:
    if node.op not in ("call_function", "call_method"):
        return False
    if node.op == "call_method":
        return not node.target.endswith("_")
    return not node.is_impure() and node.target not in (*_ALL_REDUCES, *_WAITS)


def _hoist(graph: fx.Graph, nodes: Iterable[fx.Node], routers: Iterable[fx.Node]) -> int:
    """Move each node (pure, in graph order) up to just before the first router after its inputs.

    That is the end of the layer that produced its inputs: the layer's logits die there, and
    nothing lands inside the layer's own dispatch (Inductor mis-orders unbacked split sizes
    when unrelated nodes sit between the router's top-k and the ``.item()`` calls).
    Nodes of the last layer stay where they are (after every router already).
    """
    moved = 0
    wanted = set(nodes)
    for node in [n for n in graph.nodes if n in wanted]:
        if not _is_pure(node) and not _is_fresh_inplace(node):
            continue
        inputs = node.all_input_nodes
        if any(_is_mutation(u) and u is not node for i in inputs for u in i.users):
            continue  # an in-place op writes an input: moving the read could cross the write
        order = {n: i for i, n in enumerate(graph.nodes)}
        ready = max((order[i] for i in inputs), default=-1)
        barrier = next((r for r in sorted(routers, key=order.get) if order[r] > ready), None)
        if barrier is not None and order[barrier] < order[node]:
            barrier.prepend(node)
            moved += 1
    return moved


_INPLACE_FUNCTIONS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv}


def _is_mutation(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target.endswith("_")
    return node.op == "call_function" and (node.target in _INPLACE_FUNCTIONS or getattr(getattr(node.target, "_schema", None), "is_mutable", False))


def _input_only(graph: fx.Graph) -> set[fx.Node]:
    """Nodes computed from graph inputs alone by pure ops (mask flattening, zero buffers)."""
    out: set[fx.Node] = set()
    for n in graph.nodes:
        if n.op in ("placeholder", "get_attr") or (_is_pure(n) and all(i in out for i in n.all_input_nodes)):
            out.add(n)
    return out


def _is_fresh_inplace(node: fx.Node) -> bool:
    """``torch.zeros(...).scatter_add_(...)``: in-place on a fresh buffer nobody else reads."""
    if node.op != "call_method" or not node.target.endswith("_") or not node.args:
        return False
    base = node.args[0]
    return isinstance(base, fx.Node) and len(base.users) == 1 and base.target in (torch.zeros, torch.zeros_like, torch.full, torch.empty)


def _merge_all_reduces(graph: fx.Graph, totals: list[fx.Node]) -> int:
    """All of the loss's all-reduces (same op and group) become one of the flattened stats."""
    below: set[fx.Node] = set()
    stack = list(totals)
    while stack:
        n = stack.pop()
        for u in n.users:
            if u not in below:
                below.add(u)
                stack.append(u)
    buckets: dict[tuple[Any, ...], list[fx.Node]] = {}
    for n in graph.nodes:
        if n in below and n.target in _ALL_REDUCES and len(n.users) == 1 and next(iter(n.users)).target in _WAITS:
            buckets.setdefault((n.args[1], n.args[2]), []).append(n)
    merged = 0
    for (op, group), reduces in buckets.items():
        vals = [_val(r) for r in reduces]
        if len(reduces) < 2 or any(not isinstance(v, torch.Tensor) for v in vals) or len({v.dtype for v in vals}) != 1:
            continue
        order = {n: i for i, n in enumerate(graph.nodes)}
        waits = [next(iter(r.users)) for r in reduces]
        first_wait = min(waits, key=order.get)
        if any(order[r.args[0]] >= order[first_wait] for r in reduces):
            log.info("layerwise_aux_loss: all-reduces %s kept separate: an input is computed after the first wait", [r.name for r in reduces])
            continue
        with graph.inserting_before(first_wait):
            flats = [graph.call_method("reshape", (r.args[0], (-1,))) for r in reduces]
            flat = graph.call_function(torch.cat, (flats, 0))
            reduced = graph.call_function(_ALL_REDUCE, (flat, op, group))
            waited = graph.call_function(_WAIT, (reduced,))
            pieces = graph.call_method("split", (waited, [v.numel() for v in vals]))
            shaped = [graph.call_method("view", (graph.call_function(operator.getitem, (pieces, i)), tuple(v.shape)))
                      for i, v in enumerate(vals)]
        for new in (*flats, flat, reduced, waited, pieces, *shaped, *(s.args[0] for s in shaped)):
            new.meta["moe_passes"] = "layerwise_aux_loss"
        for r, wait, new in zip(reduces, waits, shaped):
            wait.replace_all_uses_with(new)
            graph.erase_node(wait)
            graph.erase_node(r)
        merged += len(reduces)
    return merged


def _propagate_meta(gm: fx.GraphModule, nodes: list[fx.Node]) -> None:
    """Fake-tensor metadata for the new nodes, so later passes can read shapes."""
    from torch._guards import detect_fake_mode

    key = "example_value" if any("example_value" in n.meta for n in gm.graph.nodes) else "val"
    fake_mode = detect_fake_mode([_val(n) for n in gm.graph.nodes if isinstance(_val(n), torch.Tensor)])
    if fake_mode is None:
        return
    live = set(nodes)
    with fake_mode:
        for node in gm.graph.nodes:
            if node not in live or key in node.meta:
                continue
            args = fx.node.map_arg(node.args, _val)
            kwargs = fx.node.map_arg(node.kwargs, _val)
            try:
                if node.op == "call_method":
                    value = getattr(args[0], node.target)(*args[1:], **kwargs)
                else:
                    value = node.target(*args, **kwargs)
            except Exception as err:  # metadata is a courtesy to later passes; the backend re-propagates
                log.debug("layerwise_aux_loss: no metadata for %s: %s", node.name, err)
                continue
            node.meta[key] = value


def _layer_name(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path = list(stack.values())[-1][0]
        return str(path)
    return node.name


class LayerwiseAuxLossPass(GraphPass):
    """Stacked router-logit losses -> per-layer partial sums inside each layer."""

    name = "layerwise_aux_loss"
    stage = "pre_grad"

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        if not isinstance(gm, fx.GraphModule):
            raise ValueError(f"{self.name} needs a torch.fx.GraphModule, got {type(gm).__name__}")
        result = PassResult(self.name)
        graph = gm.graph
        stats = {"groups_rewritten": 0, "layers": 0, "counts_without_onehot": 0, "logsumexp_grad_from_router_softmax": 0,
                 "softmax_reused": 0,
                 "topk_reused": 0, "all_reduces_merged": 0, "loop_form_layers": 0, "nodes_hoisted": 0}
        for group in _find_groups(gm):
            region = f"{'/'.join(sorted({s.target.__name__ for s in group.sources}))} of {len(group.logits)} router logits ({', '.join(s.name for s in group.sources)})"
            rewriter = _Rewriter(gm, group)
            try:
                rewriter.run()
            except Unsupported as err:
                for node in reversed(rewriter.new_nodes):
                    if not node.users:
                        graph.erase_node(node)
                result.skip(region, f"left the whole loss group unchanged (balancing and z-loss alike): {err}")
                continue
            for old, new in rewriter.replace.items():
                old.replace_all_uses_with(new)
            for node in reversed(rewriter.region):
                if node.graph is graph and not node.users:
                    graph.erase_node(node)
            live = [n for n in rewriter.new_nodes if n.graph is graph]
            reused = _dedupe_router_ops(graph, live)
            graph.eliminate_dead_code()
            live = [n for n in rewriter.new_nodes if _alive(graph, n)]
            model = set().union(*(_ancestors(x) for x in group.logits))
            stats["nodes_hoisted"] += _hoist(graph, _pure_ancestors_after(graph, live, model) + live, group.logits)
            stats["all_reduces_merged"] += _merge_all_reduces(graph, list(rewriter.replace.values()))
            _propagate_meta(gm, [n for n in graph.nodes if n.meta.get("moe_passes") == self.name])
            stats["groups_rewritten"] += 1
            stats["layers"] += len(group.logits)
            stats["counts_without_onehot"] += rewriter.counts_without_onehot
            stats["logsumexp_grad_from_router_softmax"] += rewriter.lse_reusing_softmax
            stats["softmax_reused"] += reused["softmax"]
            stats["topk_reused"] += reused["topk"]
            result.matched.append(f"{region}: layers {[_layer_name(x) for x in group.logits]}")
        loop_layers = self._loop_form(gm, result, stats)
        stats["loop_form_layers"] = loop_layers
        result.changed = bool(stats["groups_rewritten"] or loop_layers)
        result.stats = stats
        if result.changed:
            graph.lint()
            gm.recompile()
        log.info("%s: %s", self.name, stats)
        return result

    def _loop_form(self, gm: fx.GraphModule, result: PassResult, stats: dict[str, int]) -> int:
        """Per-layer loop losses: dedupe the loss's softmax/top-k, hoist its per-layer sums."""
        graph = gm.graph
        order = {n: i for i, n in enumerate(graph.nodes)}
        duplicates: list[fx.Node] = []
        from_inputs: list[fx.Node] = []
        for node in graph.nodes:
            key = _effective_softmax_key(node)
            if key is None or node.meta.get("moe_passes"):
                continue
            earlier = [u for u in _users_through_noops(key[0]) if u is not node and order[u] < order[node] and _effective_softmax_key(u) == key]
            if earlier:
                duplicates.append(node)
            elif key[0].op == "placeholder" and _is_row_reduction_below(node):
                from_inputs.append(node)
        if from_inputs and not duplicates:
            result.skip(
                f"loop-form aux loss over {len(from_inputs)} router logits ({', '.join(n.args[0].name for n in from_inputs)})",
                "the router logits are inputs of this graph (a graph break separates routers and loss): the loss is already "
                "per layer and no router softmax here can be reused; nothing to rewrite",
            )
        if not duplicates:
            return 0
        routers = [_strip_noop(d.args[0]) for d in duplicates]
        model = set().union(*(_ancestors(r) for r in routers))
        region = _forward_closure(duplicates, model | _input_only(graph))
        if not any(_is_row_reduction(n) for n in region):
            result.skip(f"{len(duplicates)} repeated router softmaxes", "no per-layer reduction below them: not a loss in loop form")
            return 0
        for node in duplicates:
            node.meta["moe_passes"] = self.name
        reused = _dedupe_router_ops(graph, sorted(region | set(duplicates), key=order.get))
        graph.eliminate_dead_code()
        live = sorted((n for n in region if _alive(graph, n)), key=lambda n: order.get(n, 0))
        needed = _pure_ancestors_after(graph, live, model)
        moved = _hoist(graph, needed + live, routers)
        stats["softmax_reused"] += reused["softmax"]
        stats["topk_reused"] += reused["topk"]
        stats["nodes_hoisted"] += moved
        result.matched.append(f"loop-form aux loss over {len(duplicates)} layers (softmax reused {reused['softmax']}, top-k reused {reused['topk']}, {moved} nodes hoisted)")
        return len(duplicates)


def _alive(graph: fx.Graph, node: fx.Node) -> bool:
    return node.graph is graph and not node._erased


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, stack = {node}, [node]
    while stack:
        for i in stack.pop().all_input_nodes:
            if i not in seen:
                seen.add(i)
                stack.append(i)
    return seen


def _forward_closure(starts: list[fx.Node], allowed: set[fx.Node] | None = None) -> set[fx.Node]:
    """Pure users reachable from ``starts``; with ``allowed``, only users whose other inputs are
    allowed (the routers' inputs, graph-input-only values): the loss, not the model after it."""
    seen: set[fx.Node] = set()
    stack = list(starts)
    while stack:
        n = stack.pop()
        for u in n.users:
            if u in seen or not (_is_pure(u) or _is_fresh_inplace(u)):
                continue
            if allowed is not None and not all(i in seen or i in starts or i in allowed for i in u.all_input_nodes):
                continue
            seen.add(u)
            stack.append(u)
    return seen


def _is_row_reduction_below(node: fx.Node) -> bool:
    return any(_is_row_reduction(n) for n in _forward_closure([node]))


def _is_row_reduction(node: fx.Node) -> bool:
    return node.target in (torch.histc, "histc", "scatter_add_", "scatter_add", "sum", torch.sum)


def _pure_ancestors_after(graph: fx.Graph, nodes: list[fx.Node], model: set[fx.Node]) -> list[fx.Node]:
    """Inputs of the moved loss nodes computed from graph inputs alone (mask flattening, zero
    buffers) but placed late: they move too. Model computation (``model``, anything else) never moves."""
    early = _input_only(graph) - model
    closure = set(nodes)
    out: list[fx.Node] = []
    stack = [i for n in nodes for i in n.all_input_nodes]
    while stack:
        n = stack.pop()
        if n in closure or n not in early or n.op in ("placeholder", "get_attr"):
            continue
        closure.add(n)
        out.append(n)
        stack.extend(n.all_input_nodes)
    order = {n: i for i, n in enumerate(graph.nodes)}
    return sorted(out, key=order.get)
