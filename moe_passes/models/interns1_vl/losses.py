"""Router losses in the classic *stacked* form.

Written exactly the way the Switch/Mixtral-era reference code writes them:
every layer's router logits are concatenated into one ``[L*T, E]`` tensor,
softmaxed, top-k'd and one-hot encoded into ``[L*T, K, E]``. That costs memory
that grows with the layer count, which is what the ``layerwise_aux_loss`` pass
removes from the captured graph. Keep this file plain: it is the pass's input.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed._functional_collectives import all_reduce


def load_balancing_loss(
    router_logits: tuple[torch.Tensor, ...],
    num_experts: int,
    top_k: int,
    attention_mask: torch.Tensor | None = None,
    global_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Switch-Transformer balancing loss over all layers' router logits.

    ``attention_mask`` ([B, S], 1 = real token) excludes padding from both the
    token fractions and the mean probabilities. With ``global_group`` the
    per-expert token counts and the token total are summed over that group
    (global-batch statistics), so every rank balances the same fractions.
    """
    concatenated = torch.cat(router_logits, dim=0)
    routing_weights = F.softmax(concatenated, dim=-1, dtype=torch.float)
    _, selected_experts = torch.topk(routing_weights, top_k, dim=-1)
    expert_mask = F.one_hot(selected_experts, num_experts)

    if attention_mask is None:
        token_counts = expert_mask.float().sum(dim=0)
        token_total = torch.full_like(token_counts, expert_mask.shape[0])
        prob_sum = routing_weights.sum(dim=0)
        prob_total = routing_weights.shape[0]
    else:
        batch_size, seq_len = attention_mask.shape
        num_layers = concatenated.shape[0] // (batch_size * seq_len)
        expert_attention_mask = (
            attention_mask[None, :, :, None, None]
            .expand(num_layers, batch_size, seq_len, top_k, num_experts)
            .reshape(-1, top_k, num_experts)
            .float()
        )
        token_counts = (expert_mask.float() * expert_attention_mask).sum(dim=0)
        token_total = expert_attention_mask.sum(dim=0)
        router_attention_mask = (
            attention_mask[None, :, :, None]
            .expand(num_layers, batch_size, seq_len, num_experts)
            .reshape(-1, num_experts)
            .float()
        )
        prob_sum = (routing_weights * router_attention_mask).sum(dim=0)
        prob_total = router_attention_mask.sum(dim=0)

    if global_group is not None:
        token_counts = all_reduce(token_counts, "sum", global_group)
        token_total = all_reduce(token_total, "sum", global_group)

    tokens_per_expert = token_counts / token_total
    router_prob_per_expert = prob_sum / prob_total
    return torch.sum(tokens_per_expert * router_prob_per_expert.unsqueeze(0)) * num_experts


def router_z_loss(
    router_logits: tuple[torch.Tensor, ...],
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """ST-MoE z-loss: mean over (non-padding) tokens of logsumexp(logits)^2."""
    concatenated = torch.cat(router_logits, dim=0).float()
    z = torch.logsumexp(concatenated, dim=-1) ** 2
    if attention_mask is None:
        return z.mean()
    num_layers = concatenated.shape[0] // attention_mask.numel()
    mask = attention_mask.reshape(1, -1).expand(num_layers, -1).reshape(-1).float()
    return (z * mask).sum() / mask.sum()
