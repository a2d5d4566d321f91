"""Node values: what a node carries (fake tensor, SymInt, tuple), its shape facts, dims normalised."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
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


def storage_ref(val: Any) -> StorageWeakRef | None:
    """A weak reference to the storage of a (fake) tensor value; None for non-tensors and storage-less tensors."""
    if not isinstance(val, torch.Tensor):
        return None
    try:
        return StorageWeakRef(val.untyped_storage())
    except (NotImplementedError, RuntimeError):
        return None
