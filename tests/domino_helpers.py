"""Tiny MoE test model and compile helpers shared by the Domino and schedule tests.

Two pre-norm MoE layers (``SparseMoeBlock`` as written, no hints for the
passes) plus the stacked balancing loss: the smallest model that has two EP
regions, per-token router outputs leaving the regions, and a backward.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from moe_passes.config import BackendConfig
from moe_passes.models.stacks import MoEStack
from moe_passes.testing import run_pass

log = logging.getLogger(__name__)

HIDDEN, INTER, EXPERTS, TOP_K = 16, 8, 8, 2


def TinyMoEStack(ep_group: dist.ProcessGroup | None, layers: int = 2, experts: int = EXPERTS) -> MoEStack:  # noqa: N802 (was a class)
    """LayerNorm -> block -> residual per layer; returns (mean(h^2) + 0.1 * balancing, stacked selected experts).

    The balancing loss is computed before the main loss (the node order the Domino goldens were recorded with).
    The experts' weights start as ``torch.empty``: ``init_biased`` sets them.
    """
    return MoEStack(layers, HIDDEN, INTER, experts, TOP_K, ep_group=ep_group, norm=nn.LayerNorm, blocks_name="blocks",
                    aux_coef=0.1, loss_order="router_then_main", returns="selected")


def init_biased(model: MoEStack, seed: int, world_size: int) -> None:
    """Deterministic weights on every rank; the router never picks the last experts (uneven, some ranks idle)."""
    g = torch.Generator().manual_seed(seed)
    for block in model.blocks:
        ep_rank = block.ep_rank
        full_up = torch.randn(block.num_experts, 2 * INTER, HIDDEN, generator=g) * 0.3
        full_down = torch.randn(block.num_experts, HIDDEN, INTER, generator=g) * 0.3
        local = block.num_local_experts
        with torch.no_grad():
            block.experts.gate_up_proj.copy_(full_up[ep_rank * local : (ep_rank + 1) * local])
            block.experts.down_proj.copy_(full_down[ep_rank * local : (ep_rank + 1) * local])
            w = torch.randn(block.num_experts, HIDDEN, generator=g)
            w[:, 0] = 0.0
            w[-2:, 0] = -20.0  # feature 0 of the normed input is pushed positive: the last 2 experts starve
            block.gate.weight.copy_(w)


def make_inputs(seed: int, rank: int, tokens: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    h = torch.randn(1, tokens, HIDDEN, generator=g)
    h[..., 0] += 6.0
    return h


def domino_backend(num_chunks: int | str, schedule: bool = True, results: list[Any] | None = None, **kwargs: Any) -> Callable[..., Any]:
    """Domino + Inductor with our post-grad scheduler; pass reports are appended to ``results``."""
    return local_backend(BackendConfig(num_chunks=num_chunks, passes=("domino_ep",), schedule_overlap=schedule, **kwargs), results)


def local_backend(config: BackendConfig, results: list[Any] | None = None) -> Callable[..., Any]:
    """Domino pre-grad pass, then Inductor with the schedule pass as post-grad custom pass (or, with
    ``config.lowering == "aot_eager"``, AOTAutograd alone)."""
    from torch._inductor.compile_fx import compile_fx

    from moe_passes.fx.domino import DominoEPPass
    from moe_passes.inductor.schedule import INDUCTOR_CONFIG, ScheduleOverlapPass, as_custom_pass

    def backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        if "domino_ep" in config.passes:
            result = run_pass(DominoEPPass(config), gm)
            if results is not None:
                results.append(result)
        if config.lowering == "aot_eager":  # the pass's numerics without Inductor (no post-grad schedule)
            return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)
        patch = (
            {"post_grad_custom_post_pass": as_custom_pass(ScheduleOverlapPass(config)), **INDUCTOR_CONFIG}
            if config.schedule_overlap
            else {}
        )
        with torch._inductor.config.patch(patch):
            return compile_fx(gm, example_inputs)

    return backend


class _StopAfterCapture(Exception):
    """Raised by the capturing backend: fake process groups cannot run dropless EP, only trace it."""


def capture_without_running(
    fn: Callable[..., Any], *args: Any, compile_with: Callable[..., Any] | None = None
) -> list[torch.fx.GraphModule]:
    """Dynamo graphs of ``fn`` (optionally compiled by ``compile_with``), never executed."""
    graphs: list[torch.fx.GraphModule] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        graphs.append(gm)
        if compile_with is not None:
            compile_with(gm, example_inputs)
        raise _StopAfterCapture

    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        try:
            torch.compile(fn, backend=backend, fullgraph=True)(*args)
        except Exception as e:  # Dynamo wraps the backend's exception
            if not graphs or "_StopAfterCapture" not in repr(e):
                raise
    torch._dynamo.reset()
    return graphs
