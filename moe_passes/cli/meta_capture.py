"""Capture Dynamo graphs of a target built on the meta device: real shapes, nothing allocated.

``moe_passes.harness.capture.capture_graphs`` runs each captured graph eagerly so
the Python around it can go on; on the meta device that fails at the first
``.tolist()`` (EP split sizes). Here the recorder does not run the graph: it
returns meta tensors shaped like the graph's outputs (their fake values),
which is all a loss function's caller needs. A graph output whose shape is
data-dependent gets its size hint; where a graph break hands such a value
back to Python, the message says so.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx as fx
from torch.utils._pytree import tree_map


def _concrete(value: Any, shape_env: Any) -> int:
    if isinstance(value, int):
        return value
    if shape_env is not None:
        try:
            return int(shape_env.size_hint(value.node.expr, allow_none=False))
        except Exception:  # unbacked without a hint
            pass
    raise NotImplementedError(f"a graph output has data-dependent size {value}; it cannot be materialised on the meta device")


def _meta_like(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        env = getattr(getattr(value, "fake_mode", None), "shape_env", None)
        shape = [_concrete(s, env) for s in value.shape]
        return torch.empty(shape, dtype=value.dtype, device="meta", requires_grad=value.requires_grad)
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        raise NotImplementedError("a graph returns a symbolic scalar to Python; it cannot be materialised on the meta device")
    return value


def capture_graphs_meta(fn: Callable[..., Any], *args: Any) -> list[Any]:
    """Every graph Dynamo captures from ``fn(*args)`` (meta inputs), without executing any of them."""
    from moe_passes.harness.capture import CapturedGraph

    graphs: list[CapturedGraph] = []

    def recorder(gm: fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        graphs.append(CapturedGraph(gm, list(example_inputs)))
        (output,) = gm.graph.find_nodes(op="output")
        vals = tree_map(lambda n: n.meta.get("example_value", n.meta.get("val")) if isinstance(n, fx.Node) else n, output.args[0])

        def run(*_: Any) -> Any:
            return tree_map(_meta_like, vals)

        return run

    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        torch.compile(fn, backend=recorder, dynamic=False)(*args)
    torch._dynamo.reset()
    return graphs
