"""The rewrite: a loss over every layer's rows becomes a sum of per-layer partial sums.

A stacked loss concatenates every layer's router logits into one ``[L*T, E]``
tensor (``cat`` on dim 0, or ``stack`` + reshape) and only ever (a) applies
row-local ops to it -- pointwise ops, casts, ops along a non-row dim (softmax,
log-softmax, logsumexp, top-k, one-hot ...), reshapes that keep each layer's
rows together -- and then (b) *sums over rows* (``sum``/``mean`` over dim 0 or
all dims, ``histc``, ``scatter_add`` of per-row values). Because of (a), layer
``l``'s rows of any such value depend only on layer ``l``'s logits; because of
(b), each reduction equals the sum of the same reduction over every layer's
block. ``Rewriter`` proves (a) and (b) op by op by abstract interpretation of
the ATen nodes below the stacking (every op not proven row-local is
``Unsupported``, with the reason) and emits each layer's block as it goes, so the
stacked tensors never exist.

The same interpreter, run on one layer's logits with one "layer", handles the
per-layer loop form (transformers >= 5): it proves that a loss softmax of one
layer's logits only feeds row reductions and re-emits it, so the statistics
module can reuse the router's own softmax / top-k and placement can move the
partial sums into their layer.

Values (``Rows``) carry per-layer row counts, so two operands are combined only
when their row blocks provably line up; a row count that is symbolic
(dynamic shapes) is compared with ``statically_known_true`` and never guarded on.
"""

from __future__ import annotations

import logging
import operator
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.fx as fx

from moe_passes.errors import error_summary
from moe_passes.fx.aux_loss.blocks import ROW_SUMS, TAG, Rows, Source, TupleRows, Unsupported, _name, _shape
from moe_passes.fx.aux_loss.reductions import RowReductions
from moe_passes.ir import rows
from moe_passes.ir.facts import (
    is_pointwise,
    is_pure,
    is_static_int,
    known_equal,
    mutated_args,
    op_arg,
    source_line,
    tensor_dtype,
    tensor_value,
)
from moe_passes.ir.fake_mode import fake_eval
from moe_passes.ir.rows import prod

if TYPE_CHECKING:  # stats calls back into the rewriter: types only, no import cycle
    from moe_passes.fx.aux_loss.stats import Statistics

__all__ = ["ROW_SUMS", "TAG", "Rewriter", "Rows", "Source", "TupleRows", "Unsupported"]

log = logging.getLogger(__name__)
aten = torch.ops.aten


class Rewriter(RowReductions):
    """Abstract interpretation of one group's loss region, emitting per-layer nodes as it goes."""

    def __init__(self, graph: fx.Graph, sources: list[Source], layers: int, scope: set[fx.Node] | None = None,
                 stats: Statistics | None = None) -> None:
        self.graph = graph
        self.sources = sources
        self.layers = layers
        self.scope = scope
        self.stats = stats  # moe_passes.fx.aux_loss.stats.Statistics (per-layer statistics builder)
        self.values: dict[fx.Node, Any] = {}
        self.replace: dict[fx.Node, fx.Node] = {}
        self.erase: list[fx.Node] = []  # in-place reductions replaced (not dead-code-eliminable)
        self.region: list[fx.Node] = []
        self.new_nodes: list[fx.Node] = []
        self.layer_of: dict[fx.Node, int] = {}
        self.cursor: fx.Node | None = None
        self._memo: dict[Any, fx.Node] = {}
        self.counts_without_onehot = 0

    # -- emission ------------------------------------------------------------------
    def new(self, target: Any, args: tuple, kwargs: dict | None = None, layer: int | None = None) -> fx.Node:
        assert self.cursor is not None
        with self.graph.inserting_before(self.cursor):
            node = self.graph.call_function(target, args, kwargs or {})
        node.meta["moe_passes"] = TAG
        self._fake_value(node)
        if self.cursor.meta.get("nn_module_stack") is not None and layer is None:
            node.meta["nn_module_stack"] = self.cursor.meta["nn_module_stack"]
        self.new_nodes.append(node)
        if layer is not None:
            self.layer_of[node] = layer
        return node

    def _fake_value(self, node: fx.Node) -> None:
        """``meta['val']`` right away, in the graph's fake mode: later decisions read dtypes and shapes."""
        try:
            fake_eval(node)
        except Exception as err:  # noqa: BLE001 - a node we cannot evaluate: refuse the rewrite
            raise Unsupported(f"{node.name} ({node.target}) cannot be evaluated on fake tensors: {error_summary(err)}") from err

    def memo(self, key: Any, layer: int, invariant: bool, build: Callable[[], fx.Node]) -> fx.Node:
        k = (None if invariant else layer, key)
        if k not in self._memo:
            self._memo[k] = build()
        return self._memo[k]

    def redo(self, node: fx.Node, layer: int, invariant: bool, args: tuple, kwargs: dict | None = None,
             key: Any = None) -> fx.Node:
        """``node``'s op on layer ``layer``'s blocks (memoised; invariant values are emitted once)."""
        return self.memo(("redo", node, key), layer, invariant,
                         lambda: self.new(node.target, args, dict(node.kwargs) if kwargs is None else kwargs,
                                          None if invariant else layer))

    # -- values ----------------------------------------------------------------------
    def value(self, arg: Any) -> Any:
        """Abstract value of an argument: interpreted rows, or a layer-invariant broadcast, else None."""
        if not isinstance(arg, fx.Node):
            return None
        if arg in self.values:
            return self.values[arg]
        return None

    def block(self, arg: Any, layer: int, narrow: bool = False) -> Any:
        v = self.values.get(arg) if isinstance(arg, fx.Node) else None
        if isinstance(v, Rows):
            if narrow and v.narrow is not None:
                return v.narrow(layer)
            return v.emit(layer)
        if isinstance(arg, (list, tuple)):
            return type(arg)(self.block(a, layer, narrow) for a in arg)
        return arg

    def same_rows(self, a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
        return len(a) == len(b) and all(known_equal(x, y) for x, y in zip(a, b))

    def invariant_of(self, node: fx.Node) -> Rows | None:
        """A plain (non-rows) tensor seen as layer rows: a broadcast over the layer axis (``expand`` of a
        size-1 leading dim to ``L``, then reshapes/casts), or, with one layer, the tensor itself."""
        if node in self.values:
            v = self.values[node]
            return v if isinstance(v, Rows) else None
        v = self._invariant(node, depth=0)
        if v is not None:
            self.values[node] = v
            self.region.append(node)
        return v

    def _invariant(self, node: fx.Node, depth: int) -> Rows | None:
        if depth > 12 or node.op != "call_function" or not is_pure(node):
            return None
        if node.target is aten.expand.default and self.layers > 1:
            base, sizes = node.args[0], list(node.args[1])
            bshape = _shape(base)
            if len(bshape) != len(sizes) or not sizes or not known_equal(sizes[0], self.layers) \
                    or not known_equal(bshape[0], 1) or isinstance(base, fx.Node) and base in self.values:
                return None
            one = [1, *sizes[1:]]
            self.cursor = node
            emit = lambda layer, n=node: self.memo(("expand", n), layer, True, lambda: self.new(aten.expand.default, (base, one)))
            narrow, nshape = None, ()
            if any(known_equal(b, 1) and not known_equal(s, 1) for b, s in zip(bshape[1:], sizes[1:])):
                narrow, nshape = (lambda layer, b=base: b), tuple(bshape[1:])
            return Rows(rows=(1,) * self.layers, emit=emit, invariant=True, narrow=narrow, narrow_shape=nshape)
        if rows.family_of(node) in ("view", "identity") and isinstance(node.args[0], fx.Node):
            inner = self.values.get(node.args[0]) or self._invariant(node.args[0], depth + 1)
            if not isinstance(inner, Rows) or not inner.invariant:
                return None
            self.values.setdefault(node.args[0], inner)
            saved = self.cursor
            self.cursor = node
            try:
                return self.interpret(node)
            except Unsupported:
                return None
            finally:
                self.cursor = saved
        return None

    def plain_operand(self, node: fx.Node, out_rows: tuple[Any, ...], out_rank: int, operand: fx.Node) -> Rows | None:
        """A non-rows tensor operand of a pointwise op: a broadcast that is constant along the rows (None),
        a layer-invariant broadcast (Rows), or with one layer a tensor aligned with the rows (Rows)."""
        shape = _shape(operand)
        if len(shape) < out_rank or known_equal(shape[0], 1):
            return None
        inv = self.invariant_of(operand)
        if inv is not None and self.same_rows(inv.rows, out_rows):
            return inv
        if self.layers == 1 and len(shape) == out_rank and known_equal(shape[0], out_rows[0]):
            return Rows(rows=out_rows, emit=lambda layer: operand, invariant=True)
        raise Unsupported(f"{_name(node)}: operand {operand.name} varies along the stacked row dim")

    # -- the interpreter -------------------------------------------------------------
    def run(self) -> None:
        order = {n: i for i, n in enumerate(self.graph.nodes)}
        for source in self.sources:
            self.values[source.node] = self.source_value(source)
            self.region.append(source.node)
        start = min(order[s.node] for s in self.sources)
        for node in list(self.graph.nodes):
            if order.get(node, -1) <= start or node in self.values:
                continue
            if self.scope is not None and node not in self.scope:
                continue
            if self.layers == 1 and node.op != "call_function":
                continue  # one layer: its values may also leave the graph; the originals stay, unchanged
            abstract = [self.values[i] for i in node.all_input_nodes if i in self.values]
            if not abstract:
                continue
            only_invariant = all(isinstance(v, Rows) and v.invariant for v in abstract)
            self.cursor = node
            try:
                value = self.interpret(node)
            except Unsupported as err:
                if only_invariant:
                    continue  # a use of a mask broadcast outside the loss: the original stays, unchanged
                where = source_line(node)
                if where and "[at " not in str(err):
                    raise Unsupported(f"{err} [at {where}]") from None
                raise
            if value is not None:
                self.values[node] = value
            self.region.append(node)
        if self.layers == 1:
            return  # one layer's own values: users outside the loss keep reading the original nodes
        handled = set(self.region) | set(self.replace)
        own = {s.node for s in self.sources if s.kind == "layer"}  # one layer's logits: the model uses them too
        for node in self.region:
            if node in own:
                continue
            v = self.values.get(node)
            if isinstance(v, (Rows, TupleRows)) and not getattr(v, "invariant", False):
                outside = [u for u in node.users if u not in handled]
                if outside:
                    raise Unsupported(f"{node.name} (rows of every layer) is also used by "
                                      f"{[u.name for u in outside]}, which the pass cannot split by layer")

    def source_value(self, source: Source) -> Rows:
        inputs = source.inputs
        if source.kind in ("cat", "layer"):
            rows = tuple(_shape(x)[0] for x in inputs)
            return Rows(rows=rows, emit=lambda layer: inputs[layer], logits=True)
        self.cursor = source.node
        def emit(layer: int) -> fx.Node:
            build = lambda: self.new(aten.unsqueeze.default, (inputs[layer], 0), layer=layer)  # noqa: E731
            return self.memo(("stack", source.node), layer, False, build)

        return Rows(rows=(1,) * len(inputs), layer_src=tuple(inputs), emit=emit)

    def interpret(self, node: fx.Node) -> Any:
        if node.op != "call_function":
            raise Unsupported(f"{node.name}: {node.op} of rows of every layer (e.g. the graph output)")
        t = node.target
        a0 = self.value(node.args[0]) if node.args else None
        if t is operator.getitem:
            if isinstance(a0, TupleRows):
                idx = node.args[1]
                return Rows(
                    rows=a0.rows,
                    emit=lambda layer: self.memo(
                        ("getitem", node), layer, False, lambda: self.new(operator.getitem, (a0.emit(layer), idx), layer=layer)
                    ),
                )
            raise Unsupported(f"{node.name}: indexing a value of rows")
        if not isinstance(t, torch._ops.OpOverload):
            raise Unsupported(f"{_name(node)} is not an ATen op")
        if mutated_args(node):
            if t is aten.scatter_add_.default:
                return self.scatter_add(node, inplace=True)
            raise Unsupported(f"{_name(node)} writes in place into rows of every layer")
        # What the op does to the stacked rows (dim 0) comes from the one row analysis (moe_passes.ir.rows);
        # this interpreter adds only how each layer's block is emitted.
        eff = rows.effect(node, 1)
        if eff is not None and eff.family == "reduce" and t in ROW_SUMS:
            return self.row_sum(node)
        if t is aten.histc.default:
            return self.histc(node)
        if t is aten.scatter_add.default:
            return self.scatter_add(node, inplace=False)
        if t is aten.one_hot.default:
            return self.one_hot(node, a0)
        if any(isinstance(self.value(a), TupleRows) for a in node.all_input_nodes):
            raise Unsupported(f"{_name(node)}: unexpected use of a top-k/sort tuple")
        if eff is None:
            raise Unsupported(f"{_name(node)} on rows of every layer is not understood")
        fam = eff.family
        if fam == "identity" and tensor_value(node) is not None:
            return self.cast(node, a0)
        if fam == "view":
            return self.reshape(node, a0)
        if fam == "expand" and t is aten.expand.default:
            return self.expand(node, a0)
        if fam == "pointwise" and is_pointwise(node):
            return self.pointwise(node)
        if eff.kind == "reduce":
            raise Unsupported(f"{_name(node)} over dims {list(eff.dims)}: a reduction over the token rows that is not a sum")
        if fam in ("along", "shape", "reduce"):
            return self.row_local(node, a0, eff)
        raise Unsupported(f"{_name(node)} on rows of every layer is not understood")

    # -- row-local ops ---------------------------------------------------------------
    def need_rows(self, node: fx.Node, a0: Any) -> Rows:
        if not isinstance(a0, Rows):
            raise Unsupported(f"{_name(node)}: expected rows of every layer as its input")
        for a in node.all_input_nodes[1:]:
            if isinstance(self.values.get(a), (Rows, TupleRows)) and a is not node.args[0]:
                raise Unsupported(f"{_name(node)}: rows of every layer as a non-data argument")
        return a0

    def unary(self, node: fx.Node, a0: Rows, **extra: Any) -> Rows:
        rest = node.args[1:]
        emit = lambda layer: self.redo(node, layer, a0.invariant, (a0.emit(layer), *rest))
        return Rows(rows=a0.rows, emit=emit, invariant=a0.invariant, **extra)

    def cast(self, node: fx.Node, a0: Any) -> Rows:
        a0 = self.need_rows(node, a0)
        rest = node.args[1:]
        narrow = None
        if a0.narrow is not None:
            narrow = lambda layer: self.memo(
                ("cast_n", node), layer, True, lambda: self.new(node.target, (a0.narrow(layer), *rest), dict(node.kwargs))
            )
        same = tensor_dtype(node) == tensor_dtype(node.args[0])
        return self.unary(node, a0, narrow=narrow, narrow_shape=a0.narrow_shape, onehot=a0.onehot, logits=a0.logits and same)

    def row_local(self, node: fx.Node, a0: Any, eff: rows.Effect) -> Any:
        """An op that acts along a non-row dim, a shape op that keeps dim 0, or a reduction over other dims:
        each layer's block is the same op on that layer's block (``moe_passes.ir.rows`` decided it keeps rows)."""
        a0 = self.need_rows(node, a0)
        if not eff.keeps:
            raise Unsupported(f"{_name(node)}: {eff.reason} (along the stacked row (token) dim, not row by row)")
        t = node.target
        if (
            t is aten.logsumexp.default
            and self.stats is not None
            and a0.logits
            and len(_shape(node.args[0])) == 2
            and eff.dims == (1,)
            and not op_arg(node, 2, "keepdim", False)
        ):
            return Rows(
                rows=a0.rows,
                emit=lambda layer: self.memo(("lse", node), layer, False, lambda: self.stats.logsumexp(self, node, a0.emit(layer), layer)),
            )
        if eff.outputs:
            rest = node.args[1:]
            return TupleRows(rows=a0.rows, emit=lambda layer: self.redo(node, layer, False, (a0.emit(layer), *rest)))
        return self.unary(node, a0)

    def reshape(self, node: fx.Node, a0: Any) -> Rows:
        a0 = self.need_rows(node, a0)
        ishape, oshape = _shape(node.args[0]), _shape(node)
        if not oshape:
            raise Unsupported(f"{_name(node)}: reshape of rows to a scalar")
        ia, ob = ishape[1:], oshape[1:]
        lead = len(ia) - len(ob)
        if lead >= 0 and all(known_equal(a, b) for a, b in zip(ia[lead:], ob)):
            # leading non-row dims fold into the rows (symbolic sizes too): no divisibility question
            rows = tuple(r * prod(ia[:lead]) for r in a0.rows)
            pa = pb = None
        elif not all(is_static_int(s) for s in (*ia, *ob)):
            raise Unsupported(f"{_name(node)}: reshape {ishape}->{oshape} with symbolic non-row dims")
        else:
            pa, pb = prod(ia), prod(ob)
            if pb == 0 or pa == 0:
                raise Unsupported(f"{_name(node)}: empty rows")
        if pa is None:
            pass
        elif pa % pb == 0:
            rows = tuple(r * (pa // pb) for r in a0.rows)
        elif pb % pa == 0 and all(is_static_int(r) and r % (pb // pa) == 0 for r in a0.rows):
            rows = tuple(r // (pb // pa) for r in a0.rows)
        else:
            raise Unsupported(f"{_name(node)}: reshape {ishape}->{oshape} moves data across layer boundaries")
        new_shape = [-1, *ob]
        if a0.layer_src is not None and all(
            tuple(_shape(x)[1:]) == tuple(ob) and known_equal(_shape(x)[0], r) for x, r in zip(a0.layer_src, rows)
        ):
            src = a0.layer_src  # the stacking undone: each block is the layer's own tensor
            return Rows(rows=rows, emit=lambda layer: src[layer], logits=True)
        emit = lambda layer: self.memo(
            ("reshape", node),
            layer,
            a0.invariant,
            lambda: self.new(aten.reshape.default, (a0.emit(layer), new_shape), layer=None if a0.invariant else layer),
        )
        narrow, nshape = None, ()
        if a0.narrow is not None and len(a0.narrow_shape) == len(ia):
            na = a0.narrow_shape
            one = lambda v: known_equal(v, 1)
            j = 0
            while j < len(na) and one(na[len(na) - 1 - j]) and not one(ia[len(ia) - 1 - j]):
                j += 1
            lead = len(ia) - j
            same = lambda xs, ys: len(xs) == len(ys) and all(known_equal(x, y) for x, y in zip(xs, ys))
            if j and len(ob) >= j and same(ob[len(ob) - j :], ia[lead:]) and same(na[:lead], ia[:lead]):
                nshape = (*ob[: len(ob) - j], *([1] * j))
                nnew = [-1, *nshape]
                narrow = lambda layer: self.memo(
                    ("reshape_n", node), layer, True, lambda: self.new(aten.reshape.default, (a0.narrow(layer), nnew))
                )
        return Rows(
            rows=rows, emit=emit, invariant=a0.invariant, narrow=narrow, narrow_shape=nshape, logits=a0.logits and tuple(ob) == tuple(ia)
        )

    def expand(self, node: fx.Node, a0: Any) -> Rows:
        a0 = self.need_rows(node, a0)
        sizes = list(node.args[1])
        ishape = _shape(node.args[0])
        if len(sizes) != len(ishape) or not (sizes[0] == -1 or known_equal(sizes[0], ishape[0])):
            raise Unsupported(f"{_name(node)}: expand over the stacked row dim")
        new = [-1, *sizes[1:]]
        return Rows(rows=a0.rows, invariant=a0.invariant, emit=lambda layer: self.redo(node, layer, a0.invariant, (a0.emit(layer), new)))

    def one_hot(self, node: fx.Node, a0: Any) -> Rows:
        a0 = self.need_rows(node, a0)
        n = op_arg(node, 1, "num_classes", -1)
        if not is_static_int(n) or n <= 0:
            raise Unsupported(f"{_name(node)}: one_hot without an explicit class count (it would depend on every layer)")
        out = self.unary(node, a0)
        out.onehot = (a0, n, node)
        return out

    def pointwise(self, node: fx.Node) -> Rows:
        out_rank = len(_shape(node)) if tensor_value(node) is not None else 0
        row_args = [a for a in node.all_input_nodes if isinstance(self.values.get(a), Rows)]
        if any(len(_shape(a)) != out_rank for a in row_args):
            raise Unsupported(f"{_name(node)}: broadcasting moves the stacked row dim")
        rows = self.values[row_args[0]].rows
        for a in row_args[1:]:
            if not self.same_rows(self.values[a].rows, rows):
                raise Unsupported(f"{_name(node)}: operands with different row blocks")
        for a in node.all_input_nodes:
            if a in self.values or tensor_value(a) is None:
                continue
            inv = self.plain_operand(node, rows, out_rank, a)
            if inv is not None:
                self.values.setdefault(a, inv)
        vals = {a: self.values[a] for a in node.all_input_nodes if isinstance(self.values.get(a), Rows)}
        invariant = all(v.invariant for v in vals.values())
        out_shape = _shape(node)
        # an invariant operand with a narrow (broadcastable) block is used narrow when another operand
        # already has the full output shape: same values, no per-layer [T, ..., E] mask.
        wide = [a for a, v in vals.items() if not v.invariant and _shape(a) == out_shape]
        use_narrow = {a for a, v in vals.items() if v.invariant and v.narrow is not None and wide}

        def emit(layer: int) -> fx.Node:
            args = tuple(self.block(a, layer, narrow=a in use_narrow) if isinstance(a, fx.Node) else a for a in node.args)
            kwargs = {k: self.block(v, layer) if isinstance(v, fx.Node) else v for k, v in node.kwargs.items()}
            return self.redo(node, layer, invariant, args, kwargs)

        weighted = None
        if node.target is aten.mul.Tensor and len(vals) == 2:
            (xa, va), (xb, vb) = list(vals.items())
            if va.onehot is not None and vb.narrow is not None and vb.onehot is None:
                weighted = (va, vb)
            elif vb.onehot is not None and va.narrow is not None and va.onehot is None:
                weighted = (vb, va)
        return Rows(rows=rows, emit=emit, invariant=invariant, weighted=weighted)
