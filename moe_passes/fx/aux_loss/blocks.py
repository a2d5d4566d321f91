"""The values the aux-loss interpreter computes with: rows of every layer (``Rows``), tuples of them
(``TupleRows``), where the rows come from (``Source``), and the one exception of the row analysis."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
import torch.fx as fx

from moe_passes.ir.facts import tensor_value
from moe_passes.ir.rows import NotRowLocal

aten = torch.ops.aten
TAG = "layerwise_aux_loss"

#: The loss region contains something the rewrite cannot prove equal: the one exception of the row analysis.
Unsupported = NotRowLocal
#: Reductions whose per-layer partials this interpreter emits (sums and means; what they mean for rows is
#: ``moe_passes.ir.rows``'s to say: ``reduce`` over dim 0 with ``linear`` "sum"/"mean", or ``keep``).
ROW_SUMS = frozenset({aten.sum.dim_IntList, aten.sum.default, aten.mean.dim, aten.mean.default})


@dataclass
class Rows:
    """A tensor whose dim 0 runs over every layer's rows, layer-major (``rows[l]`` rows of layer ``l``)."""

    rows: tuple[Any, ...]
    emit: Callable[[int], fx.Node]
    invariant: bool = False  # every layer's block is the same tensor (a mask broadcast over layers)
    narrow: Callable[[int], fx.Node] | None = None  # the block with its broadcast (size-1) dims kept narrow
    narrow_shape: tuple[Any, ...] = ()  # non-row dims of the narrow block
    onehot: tuple["Rows", int, fx.Node] | None = None  # value == one_hot(idx, n) (maybe cast): (idx, n, node)
    weighted: tuple["Rows", "Rows"] | None = None  # onehot * weight (weight with a narrow block)
    logits: bool = False  # each block is that layer's logits (same values and dtype)
    layer_src: tuple[fx.Node, ...] | None = None  # each block is a relayout of these per-layer tensors


@dataclass
class TupleRows:
    """A tuple-returning row-local op (top-k, sort, max over a dim): per-layer tuple nodes."""

    rows: tuple[Any, ...]
    emit: Callable[[int], fx.Node]


@dataclass
class Source:
    """Where the rows come from: a ``cat``/``stack`` of the layers' logits, or (loop form) one layer's logits."""

    node: fx.Node
    kind: str  # "cat" | "stack" | "layer"
    inputs: tuple[fx.Node, ...]  # per-layer tensors as the source reads them


def _shape(node: Any) -> tuple[Any, ...]:
    v = tensor_value(node)
    if v is None:
        raise Unsupported(f"{getattr(node, 'name', node)} has no tensor metadata")
    return tuple(v.shape)


def _name(node: fx.Node) -> str:
    return f"{node.name} ({node.target})"


class Emitter(Protocol):
    """What the per-layer statistics builder (``stats``) asks of the interpreter that calls it
    (``rewrite.Rewriter``): emit a node before the cursor. A protocol, so neither imports the other."""

    graph: fx.Graph
    cursor: fx.Node | None
    new_nodes: list[fx.Node]

    def new(self, target: Any, args: tuple, kwargs: dict | None = None, layer: int | None = None) -> fx.Node: ...

