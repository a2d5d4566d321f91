"""A small model of our own around torchtitan 0.3.0's MoE layer, expert-parallel over gloo.

torchtitan is used as installed from PyPI (``torchtitan==0.3.0``); nothing of it is
copied here.  What this module builds:

* ``TitanMoEStack``: ``num_layers`` residual blocks ``x + MoE(rms_norm(x))`` around
  ``torchtitan.models.common.moe.MoE`` (``TokenChoiceTopKRouter`` with softmax
  scores, ``RoutedExperts`` = ``AllToAllTokenDispatcher`` + ``GroupedExperts``),
  an input projection and a simple loss (mean squared error against a target).
* Expert parallelism over a 1-D ``DeviceMesh`` of the whole world, wired the way
  torchtitan's trainer does it: ``RoutedExperts.parallelize(ParallelDims(...))``
  (which recurses into its children, then calls
  ``token_dispatcher.wire_meshes(ep_mesh=parallel_dims.get_optional_mesh("ep"))``).
  The routed-expert configs carry no ``sharding_config``, so ``parallelize``
  distributes no state; each rank builds ``GroupedExperts`` with only its
  ``num_experts / world`` local experts and loads its slice of the global
  expert weights itself (every rank draws the same global weights from one seed).
* torchtitan 0.3.0 defaults to its ``spmd_types`` SPMD backend; outside its
  trainer we select ``partial_dtensor`` (``set_spmd_backend``), under which the
  dispatcher uses ``torch.distributed._functional_collectives.all_to_all_single``
  on the EP mesh (eager and compiled alike).
* dtype: activations, router and loss are fp32; ``GroupedExperts`` casts tokens and
  expert weights to **bf16** for its three ``torch._grouped_mm`` calls and casts the
  result back (``.type_as(x)``), so expert outputs carry bf16 rounding.
* Training mode: ``MoE.forward`` does ``self.tokens_per_expert_E.add_(counts)``
  under ``no_grad`` (an in-place buffer write inside the compiled graph).

``per_block=True`` compiles each block on its own (``block.compile(backend=...)``,
regional compile) instead of the whole model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TitanConfig:
    num_layers: int = 2
    dim: int = 16
    hidden_dim: int = 32
    num_experts: int = 4
    top_k: int = 2
    batch: int = 2
    seq: int = 8


def _titan_spmd_backend() -> None:
    from torchtitan.distributed.utils import set_spmd_backend

    set_spmd_backend("partial_dtensor")


def build_moe(cfg: TitanConfig, ep_size: int) -> nn.Module:
    """torchtitan's ``MoE`` with the EP all-to-all dispatcher and ``ep_size``-way sharded experts."""
    from torchtitan.models.common.linear import Linear
    from torchtitan.models.common.moe import GroupedExperts, MoE, RoutedExperts, TokenChoiceTopKRouter
    from torchtitan.models.common.token_dispatcher import AllToAllTokenDispatcher

    if cfg.num_experts % ep_size:
        raise ValueError(f"num_experts {cfg.num_experts} not divisible by EP size {ep_size}")
    moe_cfg = MoE.Config(
        num_experts=cfg.num_experts,
        routed_experts=RoutedExperts.Config(
            inner_experts=GroupedExperts.Config(dim=cfg.dim, hidden_dim=cfg.hidden_dim, num_experts=cfg.num_experts // ep_size),
            token_dispatcher=AllToAllTokenDispatcher.Config(num_experts=cfg.num_experts, top_k=cfg.top_k),
        ),
        router=TokenChoiceTopKRouter.Config(
            num_experts=cfg.num_experts,
            gate=Linear.Config(in_features=cfg.dim, out_features=cfg.num_experts),
            top_k=cfg.top_k,
            score_func="softmax",
        ),
    )
    return moe_cfg.build()


class TitanBlock(nn.Module):
    def __init__(self, cfg: TitanConfig, ep_size: int) -> None:
        super().__init__()
        self.norm_weight = nn.Parameter(torch.ones(cfg.dim))
        self.moe = build_moe(cfg, ep_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.moe(F.rms_norm(x, (x.shape[-1],), self.norm_weight))


class TitanMoEStack(nn.Module):
    """``in_proj`` → ``num_layers`` × (x + MoE(rms_norm(x))) → MSE loss against ``target``."""

    def __init__(self, cfg: TitanConfig, ep_size: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.in_proj = nn.Linear(cfg.dim, cfg.dim)
        self.blocks = nn.ModuleList(TitanBlock(cfg, ep_size) for _ in range(cfg.num_layers))

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        h = self.in_proj(x)
        for block in self.blocks:
            h = block(h)
        return F.mse_loss(h, target)


def _init_weights(model: TitanMoEStack, rank: int, ep_size: int, seed: int) -> None:
    """Same global weights on every rank; each rank keeps its slice of the experts."""
    cfg = model.cfg
    gen = torch.Generator().manual_seed(seed)
    e_local = cfg.num_experts // ep_size
    with torch.no_grad():
        model.in_proj.weight.copy_(torch.randn(cfg.dim, cfg.dim, generator=gen) / cfg.dim**0.5)
        model.in_proj.bias.copy_(torch.randn(cfg.dim, generator=gen) * 0.1)
        for block in model.blocks:
            block.norm_weight.copy_(1.0 + 0.1 * torch.randn(cfg.dim, generator=gen))
            block.moe.router.gate.weight.copy_(torch.randn(cfg.num_experts, cfg.dim, generator=gen))
            experts = block.moe.routed_experts.inner_experts
            for name in ("w1_EFD", "w2_EDF", "w3_EFD"):
                param = getattr(experts, name)
                full = torch.randn(cfg.num_experts, *param.shape[1:], generator=gen) / param.shape[-1] ** 0.5
                param.copy_(full[rank * e_local:(rank + 1) * e_local])
            block.moe.tokens_per_expert_E.zero_()
            if block.moe.expert_bias_E is not None:
                block.moe.expert_bias_E.zero_()


def build_titan_model(rank: int, world_size: int, cfg: TitanConfig = TitanConfig(), seed: int = 0) -> TitanMoEStack:
    """The model on this rank of an initialised process group (gloo or fake), EP over the whole world."""
    from torchtitan.distributed.parallel_dims import ParallelDims

    _titan_spmd_backend()
    model = TitanMoEStack(cfg, world_size)
    _init_weights(model, rank, world_size, seed)
    if world_size > 1:
        parallel_dims = ParallelDims(
            dp_replicate=1, dp_shard=world_size, cp=1, tp=1, pp=1, ep=world_size,
            world_size=world_size, spmd_backend="partial_dtensor",
        )
        for block in model.blocks:
            block.moe.routed_experts.parallelize(parallel_dims)
            mesh = block.moe.routed_experts.token_dispatcher.ep_mesh
            assert mesh is not None and mesh.size() == world_size, mesh
    model.train()
    return model


def titan_inputs(rank: int, cfg: TitanConfig = TitanConfig(), step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Each rank its own tokens; ``step`` gives fresh inputs."""
    gen = torch.Generator().manual_seed(1000 + 97 * rank + step)
    x = torch.randn(cfg.batch, cfg.seq, cfg.dim, generator=gen)
    target = torch.randn(cfg.batch, cfg.seq, cfg.dim, generator=gen)
    return x, target


def compile_titan(model: TitanMoEStack, backend: Any, per_block: bool) -> Any:
    """The callable to run: eager (``backend=None``), whole-model or per-block compile (``fullgraph=True``)."""
    if backend is None:
        return model
    if per_block:
        for block in model.blocks:
            block.compile(backend=backend, fullgraph=True)
        return model
    return torch.compile(model, backend=backend, fullgraph=True)


def uncompile_titan(model: TitanMoEStack) -> None:
    """Undo ``block.compile`` (``nn.Module.compile`` sets ``_compiled_call_impl``)."""
    for block in model.blocks:
        block._compiled_call_impl = None


def step(fn: Any, model: TitanMoEStack, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward + backward; returns the loss and every gradient (parameters and the input)."""
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    loss = fn(x, target)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    if missing:
        raise AssertionError(f"parameters without a gradient: {missing}")
    grads["input"] = x.grad.detach().clone()
    return loss.detach().clone(), grads


def counters(model: TitanMoEStack) -> dict[str, torch.Tensor]:
    return {f"blocks.{i}.tokens_per_expert_E": b.moe.tokens_per_expert_E.clone() for i, b in enumerate(model.blocks)}


def reset_counters(model: TitanMoEStack) -> None:
    for block in model.blocks:
        block.moe.tokens_per_expert_E.zero_()
