"""Sparse MoE block with dropless expert parallelism, written plainly.

This is the code a researcher writes: no markers or hooks for the compiler
passes. The passes in ``moe_passes`` must find the route -> dispatch
all-to-all -> expert matmuls -> combine all-to-all -> unpermute region in the
captured graph on their own.

Parameter names follow transformers' ``Qwen3VLMoeTextSparseMoeBlock``
(``gate.weight``, ``experts.gate_up_proj``, ``experts.down_proj``) so state
dicts load key for key; under EP each rank holds a contiguous slice of the
experts (rank r owns experts ``[r*E_local, (r+1)*E_local)``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed._functional_collectives import (
    all_to_all_single,
    all_to_all_single_autograd,
)

from .grouped_mm import grouped_mm


class MoEOutput(NamedTuple):
    hidden_states: torch.Tensor
    router_logits: torch.Tensor
    selected_experts: torch.Tensor


def ep_world(ep_group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(size, rank) of the expert-parallel group; (1, 0) without one."""
    if ep_group is None or not dist.is_available() or not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(ep_group), dist.get_rank(ep_group)


class TopKRouter(nn.Module):
    """Linear router; returns raw logits (softmax/top-k happen in the block)."""

    def __init__(self, hidden_size: int, num_experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden_states, self.weight)


class GroupedExperts(nn.Module):
    """The local experts as 3-D weights (SwiGLU), all run as one grouped GEMM per projection.

    ``forward(x, offsets)``: ``x`` holds the token copies sorted by local
    expert, ``offsets`` the cumulative end row of each expert's group
    (``torch._grouped_mm``'s ``offs``). Rows in == rows out. No per-expert
    Python loop and no per-expert size reaches the compiler: the graph is the
    same for 8 or 512 experts.
    """

    def __init__(self, num_local_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.num_local_experts = num_local_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num_local_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_local_experts, hidden_size, intermediate_size))

    def forward(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        gate, up = grouped_mm(x, self.gate_up_proj.transpose(-2, -1), offsets).chunk(2, dim=-1)
        return grouped_mm(F.silu(gate) * up, self.down_proj.transpose(-2, -1), offsets)


class SparseMoeBlock(nn.Module):
    """Router -> fp32 softmax -> top-k -> (renormalise) -> dropless EP dispatch.

    ``group_routing`` is Intern-S1-Pro's grouped router: the experts form one
    group per EP rank and every token takes its top-(K/G) experts inside each
    group, so every rank receives exactly the same number of token copies.
    ``num_groups`` fixes G independently of the EP size (default: one group
    per EP rank), so one rank can reproduce a grouped multi-rank run.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        norm_topk_prob: bool = True,
        group_routing: bool = False,
        ep_group: dist.ProcessGroup | None = None,
        num_groups: int | None = None,
    ) -> None:
        super().__init__()
        ep_size, ep_rank = ep_world(ep_group)
        if num_experts % ep_size != 0:
            raise ValueError(
                f"num_experts={num_experts} is not divisible by the expert-parallel size {ep_size}"
            )
        groups = ep_size if num_groups is None else num_groups
        if group_routing and (top_k % groups != 0 or num_experts % groups != 0):
            raise ValueError(
                f"group_routing needs top_k={top_k} and num_experts={num_experts} divisible by the group count {groups}"
            )
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.group_routing = group_routing
        self.num_groups = groups
        self.ep_group = ep_group if ep_size > 1 else None
        self.ep_size = ep_size
        self.ep_rank = ep_rank
        self.num_local_experts = num_experts // ep_size
        self.gate = TopKRouter(hidden_size, num_experts)
        self.experts = GroupedExperts(self.num_local_experts, hidden_size, intermediate_size)

    def route(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        routing_weights = F.softmax(router_logits, dim=-1, dtype=torch.float)
        if self.group_routing:
            tokens = routing_weights.shape[0]
            groups = self.num_groups
            grouped = routing_weights.view(tokens, groups, self.num_experts // groups)
            weights, local_idx = torch.topk(grouped, self.top_k // groups, dim=-1)
            offsets = torch.arange(groups, device=local_idx.device).view(1, groups, 1) * (self.num_experts // groups)
            weights = weights.reshape(tokens, self.top_k)
            selected = (local_idx + offsets).reshape(tokens, self.top_k)
        else:
            weights, selected = torch.topk(routing_weights, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, selected

    def forward(self, hidden_states: torch.Tensor) -> MoEOutput:
        batch_size, seq_len, hidden_size = hidden_states.shape
        x = hidden_states.reshape(-1, hidden_size)
        num_tokens = x.shape[0]

        router_logits = self.gate(x)
        weights, selected = self.route(router_logits)
        weights = weights.to(x.dtype)

        flat_experts = selected.reshape(-1)
        order = torch.argsort(flat_experts, stable=True)
        permuted = x[order // self.top_k]
        counts = torch.zeros(self.num_experts, dtype=torch.int64, device=x.device)
        counts = counts.scatter_add(0, flat_experts, torch.ones_like(flat_experts))

        expert_out = self.dispatch_and_compute(permuted, counts)

        unpermuted = torch.zeros_like(expert_out).index_copy(0, order, expert_out)
        out = (unpermuted.view(num_tokens, self.top_k, hidden_size) * weights.unsqueeze(-1)).sum(dim=1)
        return MoEOutput(out.view(batch_size, seq_len, hidden_size), router_logits, selected)

    def dispatch_and_compute(self, permuted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Send each token copy to the rank owning its expert, run the experts, send results back.

        Without EP nothing is data-dependent: ``permuted`` is already sorted by
        expert and the grouped GEMM takes the count offsets as a tensor. With
        EP only the all-to-all split sizes (2 x EP numbers) become host values.
        """
        if self.ep_group is None:
            return self.experts(permuted, counts.cumsum(0))

        ep, local = self.ep_size, self.num_local_experts
        # counts laid out [dst_rank, local_expert]; after the exchange, [src_rank, local_expert].
        recv_counts = all_to_all_single(counts, [local] * ep, [local] * ep, self.ep_group)
        input_splits = counts.view(ep, local).sum(dim=1).tolist()
        recv_matrix = recv_counts.view(ep, local)
        output_splits = recv_matrix.sum(dim=1).tolist()
        for size in input_splits + output_splits:
            torch._check(size >= 0)
        torch._check(sum(input_splits) == permuted.shape[0])

        received = all_to_all_single_autograd(permuted, output_splits, input_splits, self.ep_group)
        offsets = recv_matrix.sum(dim=0).cumsum(0)  # end row of each local expert once rows are grouped by expert
        if local == 1:
            return all_to_all_single_autograd(self.experts(received, offsets), input_splits, output_splits, self.ep_group)
        # Received rows come in blocks [src_rank, local_expert]; a stable sort by expert groups them [expert, src_rank].
        block_ends = recv_counts.reshape(-1).cumsum(0)
        rows = torch.arange(received.shape[0], device=received.device)
        expert_of_row = torch.searchsorted(block_ends, rows, right=True) % local
        order = torch.argsort(expert_of_row, stable=True)
        results = self.experts(received[order], offsets)
        combined = torch.zeros_like(results).index_copy(0, order, results)
        return all_to_all_single_autograd(combined, input_splits, output_splits, self.ep_group)
