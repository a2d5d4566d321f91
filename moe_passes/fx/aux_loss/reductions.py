"""Reductions over the rows of every layer: each becomes the sum of the same reduction over each
layer's block (sums and means over dim 0, ``histc``, ``scatter_add`` histograms).

A mixin of ``moe_passes.fx.aux_loss.rewrite.Rewriter``: it emits through the interpreter's ``new`` /
``memo`` and reads its values; what an op does to rows was decided by ``moe_passes.ir.rows``.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.fx as fx

from moe_passes.fx.aux_loss.blocks import Rows, Unsupported, _name, _shape
from moe_passes.ir.facts import is_static_int, normalize_dim, normalize_dims, op_arg, tensor_dtype
from moe_passes.ir.rows import prod

if TYPE_CHECKING:
    from moe_passes.fx.aux_loss.stats import Statistics

aten = torch.ops.aten


class RowReductions:
    """Reductions over rows of every layer, emitted per layer and accumulated."""

    graph: fx.Graph
    layers: int
    cursor: fx.Node | None
    stats: "Statistics | None"
    replace: dict[fx.Node, fx.Node]
    erase: list[fx.Node]
    values: dict[fx.Node, Any]

    def accumulate(self, node: fx.Node, partial: Callable[[int], fx.Node], acc_dtype: torch.dtype | None = None) -> fx.Node:
        self.cursor = node
        total: fx.Node | None = None
        for layer in range(self.layers):
            p = partial(layer)
            total = p if total is None else self.new(aten.add.Tensor, (total, p), layer=layer)
        assert total is not None
        return total

    def row_sum(self, node: fx.Node) -> fx.Node:
        src = node.args[0]
        a0 = self.need_rows(node, self.value(src))
        shape = _shape(src)
        rank = len(shape)
        is_mean = node.target in (aten.mean.dim, aten.mean.default)
        if node.target in (aten.sum.default, aten.mean.default):
            dims, keepdim = tuple(range(rank)), False
        else:
            dims = normalize_dims(op_arg(node, 1, "dim"), rank)
            keepdim = bool(op_arg(node, 2, "keepdim", False))
        if dims is None:
            raise Unsupported(f"{_name(node)}: dims not understood")
        if 0 not in dims:
            return self.unary(node, a0)
        out_dtype = tensor_dtype(node)
        out_shape = _shape(node)
        low = out_dtype in (torch.float16, torch.bfloat16)
        counts = None
        if dims == (0,) and not keepdim and (a0.onehot is not None or a0.weighted is not None):
            onehot, weight = (a0.onehot, None) if a0.onehot is not None else (a0.weighted[0].onehot, a0.weighted[1])
            if self.stats is not None and self.stats.counts_apply(onehot, weight, out_shape, out_dtype):
                counts = lambda layer: self.stats.counts(self, onehot, weight, out_shape, out_dtype, layer)
        acc = (
            torch.float32 if low else op_arg(node, 3 if node.target is aten.sum.dim_IntList or node.target is aten.mean.dim else 1, "dtype")
        )
        kwargs = {"dtype": acc} if acc is not None else {}
        dim_list = list(dims)

        def partial(layer: int) -> fx.Node:
            if a0.invariant and a0.narrow is not None and dims == (0,) and not keepdim:
                n = self.memo(("nsum", node), layer, True, lambda: self.new(aten.sum.dim_IntList, (a0.narrow(layer), [0]), kwargs))
                return self.memo(("nsum_x", node), layer, True, lambda: self.new(aten.expand.default, (n, list(out_shape))))
            return self.memo(
                ("sum", node),
                layer,
                a0.invariant,
                lambda: self.new(aten.sum.dim_IntList, (a0.emit(layer), dim_list, keepdim), kwargs, None if a0.invariant else layer),
            )

        total = self.accumulate(node, counts or partial)
        self.cursor = node
        if is_mean:
            other = prod(shape[d] for d in dims[1:]) if len(dims) > 1 else 1
            count: Any = sum(a0.rows) * other
            if not is_static_int(count):
                if not is_static_int(other):
                    raise Unsupported(f"{_name(node)}: mean over symbolic non-row dims")
                # symbolic token count: the sum of each layer block's dim-0 size, read from the blocks
                count = None
                for layer in range(self.layers):
                    size = self.new(aten.sym_size.int, (a0.emit(layer), 0))
                    count = size if count is None else self.new(operator.add, (count, size))
                if other != 1:
                    count = self.new(operator.mul, (count, other))
            total = self.new(aten.div.Tensor, (total, count))
        if low:
            total = self.new(aten.to.dtype, (total, out_dtype))
        self.replace[node] = total
        return None  # type: ignore[return-value]

    def histc(self, node: fx.Node) -> None:
        a0 = self.need_rows(node, self.value(node.args[0]))
        lo, hi = op_arg(node, 2, "min", 0), op_arg(node, 3, "max", 0)
        if not (isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and lo < hi):
            raise Unsupported(f"{_name(node)}: histc with a data-dependent range (min >= max) is not a sum of per-layer histograms")
        rest = node.args[1:]
        self.replace[node] = self.accumulate(
            node, lambda layer: self.new(aten.histc.default, (a0.emit(layer), *rest), dict(node.kwargs), layer)
        )
        return None

    def scatter_add(self, node: fx.Node, inplace: bool) -> None:
        base, dim, index, src = node.args[:4]
        vi = self.value(index)
        if isinstance(base, fx.Node) and base in self.values or not isinstance(vi, Rows) or len(_shape(index)) != 1:
            raise Unsupported(f"{_name(node)}: scatter_add that is not a histogram of per-row values")
        if normalize_dim(dim, len(_shape(base))) != 0:
            raise Unsupported(f"{_name(node)}: scatter_add along dim {dim}")
        vs = self.value(src)
        if not isinstance(vs, Rows):
            vs = self.plain_operand(node, vi.rows, 1, src) if isinstance(src, fx.Node) else None
            if vs is None:
                raise Unsupported(f"{_name(node)}: scatter_add source not aligned with the rows")
        if not self.same_rows(vi.rows, vs.rows):
            raise Unsupported(f"{_name(node)}: index and source rows differ")
        if inplace:
            if (
                base.op != "call_function"
                or base.target not in (aten.zeros.default, aten.new_zeros.default, aten.zeros_like.default, aten.full.default)
                or set(base.users) != {node}
            ):
                raise Unsupported(f"{_name(node)}: in-place scatter_add into a buffer that is read elsewhere")
            self.erase.append(node)

        def partial(layer: int) -> fx.Node:
            start = base if layer == 0 else self.new(aten.zeros_like.default, (base,), layer=layer)
            return self.new(aten.scatter_add.default, (start, 0, vi.emit(layer), vs.emit(layer)), {}, layer)

        self.replace[node] = self.accumulate(node, partial)
        return None
