"""Capture the graphs Dynamo would hand a backend, without compiling them.

Used by tests, goldens and the diff CLI: the passes are pure functions of
these graphs, so they can be exercised without running Inductor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx


@dataclass
class CapturedGraph:
    gm: fx.GraphModule
    example_inputs: list[Any]


def capture_graphs(fn: Callable[..., Any], *args: Any, dynamic: bool | None = False, **kwargs: Any) -> list[CapturedGraph]:
    """Run ``fn(*args, **kwargs)`` under Dynamo and return every graph it captured (one per graph break)."""
    graphs: list[CapturedGraph] = []

    def recorder(gm: fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        graphs.append(CapturedGraph(gm, list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        torch.compile(fn, backend=recorder, dynamic=dynamic)(*args, **kwargs)
    torch._dynamo.reset()
    return graphs
