"""Text decoder of Qwen3-VL-MoE / InternS1-VL, following transformers' ``Qwen3VLMoeTextModel``.

GQA attention with per-head q/k RMSNorm and interleaved multimodal RoPE
(three position streams: time, row, column), RMSNorm, and MoE MLPs
(``SparseMoeBlock``) in every sparse layer. Deepstack visual features are
added to the hidden states at image-token positions after the first layers.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .config import InternS1VLConfig, TextConfig
from .moe import SparseMoeBlock


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class TextRotaryEmbedding(nn.Module):
    """Interleaved M-RoPE: frequency i rotates by the row position when i % 3 == 1 (first
    ``3*mrope_section[1]`` frequencies), by the column position when i % 3 == 2 (first
    ``3*mrope_section[2]``), and by the time / text position otherwise."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        dim = config.head_dim
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        axis = torch.zeros(dim // 2, dtype=torch.long)
        for stream, offset in ((1, 1), (2, 2)):
            axis[offset : 3 * config.mrope_section[stream] : 3] = stream
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("axis", axis, persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``position_ids`` [3, B, S] -> cos, sin [B, S, head_dim]."""
        freqs = position_ids[..., None].float() * self.inv_freq
        freqs = torch.where(self.axis == 1, freqs[1], torch.where(self.axis == 2, freqs[2], freqs[0]))
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


class Attention(nn.Module):
    """Grouped-query attention with RMSNorm on each query/key head before RoPE."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn_bias: torch.Tensor) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(batch, seq_len, -1, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(batch, seq_len, -1, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq_len, -1, self.head_dim).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        groups = self.num_heads // self.num_kv_heads
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        out = self.attend(q, k, v, attn_bias)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq_len, -1))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_bias: torch.Tensor) -> torch.Tensor:
        """The attention kernel on ``[B, heads, S, head_dim]``: SDPA (a subclass may use its own, e.g. a fused
        kernel behind a ``torch.autograd.Function``)."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias)


class MLP(nn.Module):
    """Dense SwiGLU MLP for the layers listed in ``mlp_only_layers``."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: InternS1VLConfig, layer_idx: int, ep_group: dist.ProcessGroup | None) -> None:
        super().__init__()
        text = config.text
        self.self_attn = Attention(text)
        self.is_moe = text.is_moe_layer(layer_idx)
        if self.is_moe:
            self.mlp = SparseMoeBlock(
                text.hidden_size,
                text.moe_intermediate_size,
                text.num_experts,
                text.num_experts_per_tok,
                norm_topk_prob=text.norm_topk_prob,
                group_routing=config.group_routing,
                num_groups=config.num_expert_groups,
                ep_group=ep_group,
            )
        else:
            self.mlp = MLP(text.hidden_size, text.intermediate_size)
        self.input_layernorm = RMSNorm(text.hidden_size, eps=text.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(text.hidden_size, eps=text.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn_bias: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Returns (hidden states, router logits, selected experts); the last two are None for dense layers."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_bias)
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            out, router_logits, selected = self.mlp(h)
            return x + out, router_logits, selected
        return x + self.mlp(h), None, None


class TextModel(nn.Module):
    """Embeddings, decoder layers, final norm. Collects every MoE layer's router outputs."""

    def __init__(self, config: InternS1VLConfig, ep_group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        text = config.text
        self.embed_tokens = nn.Embedding(text.vocab_size, text.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(config, i, ep_group) for i in range(text.num_hidden_layers)])
        self.norm = RMSNorm(text.hidden_size, eps=text.rms_norm_eps)
        self.rotary_emb = TextRotaryEmbedding(text)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        attn_bias: torch.Tensor,
        visual_pos_masks: torch.Tensor | None = None,
        deepstack_visual_embeds: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        cos, sin = self.rotary_emb(position_ids, inputs_embeds.dtype)
        x = inputs_embeds
        router_logits: list[torch.Tensor] = []
        selected_experts: list[torch.Tensor] = []
        for layer_idx, layer in enumerate(self.layers):
            x, logits, selected = layer(x, cos, sin, attn_bias)
            if logits is not None:
                router_logits.append(logits)
                selected_experts.append(selected)
            if deepstack_visual_embeds is not None and layer_idx < len(deepstack_visual_embeds):
                x = add_at_visual_positions(x, visual_pos_masks, deepstack_visual_embeds[layer_idx])
        return self.norm(x), tuple(router_logits), tuple(selected_experts)


def add_at_visual_positions(x: torch.Tensor, visual_pos_masks: torch.Tensor, visual_embeds: torch.Tensor) -> torch.Tensor:
    """``x[mask] += visual_embeds`` (k-th masked position gets row k), without data-dependent shapes."""
    return torch.where(visual_pos_masks[..., None], x + gather_by_mask_rank(visual_embeds, visual_pos_masks), x)


def gather_by_mask_rank(rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, S, D] tensor whose position p holds ``rows[k]`` if p is the k-th True of ``mask`` (row-major)."""
    rank = (mask.reshape(-1).long().cumsum(0) - 1).clamp(min=0)
    return rows[rank].view(*mask.shape, rows.shape[-1])
