"""The row analysis's fallback: does DTensor's sharding rule for an op keep ``Shard(0)`` rows?

Asked only for ops without a rule in ``moe_passes.ir.rows``: DTensor's registered sharding
strategies are PyTorch's own statement of what an op does to a dim-0 sharding.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.fx as fx

from moe_passes.ir.facts import node_value, tensor_value

log = logging.getLogger(__name__)


_MESHES: dict[int, Any] = {}


def _mesh() -> Any:
    """A 1-D DeviceMesh over the world for sharding-rule queries (no communication)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    if not dist.is_available() or not dist.is_initialized():
        return None
    world = dist.get_world_size()
    if world not in _MESHES:
        _MESHES[world] = DeviceMesh("cpu", list(range(world)), _init_backend=False)
    return _MESHES[world]


def dtensor_keeps_rows(n: fx.Node, row_args: dict[fx.Node, int]) -> bool | str | None:
    """Ask DTensor's sharding propagation whether Shard(0) token rows stay Shard(0) without redistribution.

    Only for ops DTensor registers a strategy for, only when every row operand (``row_args``: operand ->
    its row dims) has ``lead == 1`` and static shapes (the other tensor operands are Replicate).  The op's
    ``RuntimeSchemaInfo`` must be passed: without it the propagator's cache ignores non-tensor arguments
    (measured: softmax / cumsum over dim 0 then answer "Shard(0) kept" from a cached dim -1 query).
    Returns True (rows kept), a reason string, or None (no opinion).
    """
    op = n.target
    if not isinstance(op, torch._ops.OpOverload):
        return None
    if not row_args or set(row_args.values()) != {1}:
        return None
    try:
        from torch.distributed.tensor import DTensor
        from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta
        from torch.distributed.tensor._op_schema import OpSchema
        from torch.distributed.tensor.placement_types import Replicate, Shard

        prop = DTensor._op_dispatcher.sharding_propagator
        if op not in prop.op_strategy_funcs and op not in getattr(prop, "op_single_dim_strategy_funcs", {}):
            return None
        mesh = _mesh()
        if mesh is None:
            return None

        def spec(a: Any) -> Any:
            if not isinstance(a, fx.Node):
                return a
            v = tensor_value(a)
            if v is None:
                return node_value(a)
            if any(not isinstance(d, int) for d in v.shape):
                raise ValueError("symbolic shape")
            placement = Shard(0) if a in row_args else Replicate()
            return DTensorSpec(mesh, (placement,), TensorMeta(v.shape, v.stride(), v.dtype))

        args = fx.node.map_aggregate(n.args, spec)
        kwargs = fx.node.map_aggregate(n.kwargs, spec)
        from torch.distributed.tensor._op_schema import RuntimeSchemaInfo

        # Every argument is part of the query (the cached entry point hashes only the arguments the op's
        # schema info names: roll(dims=1) and roll(dims=0) would share an answer), and the cache is bypassed.
        info = RuntimeSchemaInfo(static_argnum=0, static_kwargkey=list(kwargs), needs_pytree=True)
        schema = OpSchema(op, tuple(args), dict(kwargs), schema_info=info)
        query = getattr(prop, "propagate_op_sharding_non_cached", prop.propagate_op_sharding)
        out = query(schema)
    except Exception as e:  # noqa: BLE001 - no opinion
        log.debug("dtensor sharding query for %s failed: %s", n.name, e)
        return None
    if out.redistribute_schema is not None or getattr(out, "needs_redistribute", False):
        return f"DTensor's sharding rule for {op} redistributes Shard(0) token rows"
    specs = out.output_spec if isinstance(out.output_spec, (tuple, list)) else (out.output_spec,)
    if all(sp is not None and tuple(sp.placements) == (Shard(0),) for sp in specs):
        return True
    return f"DTensor's sharding rule for {op} gives {[getattr(sp, 'placements', None) for sp in specs]}"
