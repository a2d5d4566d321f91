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


def capture_graphs(
    fn: Callable[..., Any], *args: Any, dynamic: bool | None = False, canonical: bool = False, **kwargs: Any
) -> list[CapturedGraph]:
    """Run ``fn(*args, **kwargs)`` under Dynamo and return every graph it captured (one per graph break).

    ``canonical=True`` returns each graph re-traced to the canonical pre-dispatch ATen IR
    (``moe_passes.ir.canonical``), as the backend hands it to the pre-grad passes.
    """
    graphs: list[CapturedGraph] = []

    def recorder(gm: fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        if canonical:
            from moe_passes.ir.canonical import canonicalize

            result = canonicalize(gm, example_inputs)
            if not result.canonical:
                raise RuntimeError(f"canonical IR unavailable: {result.reason}")
            gm = result.gm
        graphs.append(CapturedGraph(gm, list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        torch.compile(fn, backend=recorder, dynamic=dynamic)(*args, **kwargs)
    torch._dynamo.reset()
    return graphs
