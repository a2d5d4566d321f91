"""Vision tower of Qwen3-VL-MoE / InternS1-VL, following transformers' ``Qwen3VLMoeVisionModel``.

Patches of every image are packed into one sequence ``[num_patches, C*T*P*P]``;
``grid_thw`` ([num_images, 3]: frames, patch rows, patch columns) says where each
image starts. All per-patch bookkeeping (which image/frame a patch belongs to,
its row and column in spatial-merge-block order) is computed with fixed-shape
tensor ops from ``grid_thw``, so the tower traces into a single graph; frames
attend only to themselves through a block-diagonal mask.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import VisionConfig


class PatchLayout(NamedTuple):
    """Per-patch position inside its image (spatial-merge-block order) and its attention segment."""

    row: torch.Tensor
    col: torch.Tensor
    height: torch.Tensor
    width: torch.Tensor
    segment: torch.Tensor


def patch_layout(grid_thw: torch.Tensor, num_patches: int, merge: int) -> PatchLayout:
    """Decode every packed patch index into (image frame, row, column).

    Patches arrive frame by frame, and inside a frame in ``merge x merge``
    blocks (block row, block column, row in block, column in block), the
    order the processor emits and the patch merger consumes.
    """
    t, h, w = grid_thw[:, 0], grid_thw[:, 1], grid_thw[:, 2]
    counts = t * h * w
    ends = counts.cumsum(0)
    index = torch.arange(num_patches, device=grid_thw.device)
    image = torch.bucketize(index, ends, right=True)
    within_image = index - (ends - counts)[image]
    height, width = h[image], w[image]
    frame = within_image // (height * width)
    within = within_image % (height * width)
    blocks_w = width // merge
    row = (within // (merge * merge * blocks_w)) * merge + (within // merge) % merge
    col = ((within // (merge * merge)) % blocks_w) * merge + within % merge
    frame_offsets = t.cumsum(0) - t
    return PatchLayout(row, col, height, width, frame_offsets[image] + frame)


def bilinear_taps(index: torch.Tensor, size: torch.Tensor, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two taps and weights per position resampling a ``side``-long table to ``size`` (align_corners=True)."""
    src = index.float() * (side - 1) / torch.clamp(size - 1, min=1)
    floor = torch.floor(src)
    offsets = torch.arange(2, device=index.device)
    taps = (floor.long()[:, None] + offsets).clamp(0, side - 1)
    weights = (1 - (src[:, None] - floor[:, None] - offsets).abs()).clamp(min=0)
    return taps, weights


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class VisionPatchEmbed(nn.Module):
    """Conv3d over (temporal, row, column) patches: one token per ``T x P x P`` patch."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.in_channels = config.in_channels
        self.kernel = (config.temporal_patch_size, config.patch_size, config.patch_size)
        self.proj = nn.Conv3d(config.in_channels, config.hidden_size, kernel_size=self.kernel, stride=self.kernel)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = pixel_values.view(-1, self.in_channels, *self.kernel).to(self.proj.weight.dtype)
        return self.proj(x).view(x.shape[0], -1)


class VisionRotaryEmbedding(nn.Module):
    """Axial 2-D rotary: the same frequencies for rows and columns, each over half the head dim."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        spatial_dim = config.hidden_size // config.num_heads // 2
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, spatial_dim, 2, dtype=torch.float) / spatial_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, row: torch.Tensor, col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = torch.cat([row[:, None].float() * self.inv_freq, col[:, None].float() * self.inv_freq], dim=-1)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.hidden_size // config.num_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, same_frame: torch.Tensor) -> torch.Tensor:
        seq_len = x.shape[0]
        q, k, v = self.qkv(x).reshape(seq_len, 3, self.num_heads, self.head_dim).unbind(1)
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0),
            attn_mask=same_frame,
        )
        return self.proj(out.squeeze(0).transpose(0, 1).reshape(seq_len, -1))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        if config.hidden_act != "gelu_pytorch_tanh":
            raise ValueError(f"vision hidden_act={config.hidden_act!r} is not supported (only 'gelu_pytorch_tanh')")
        self.linear_fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.linear_fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(F.gelu(self.linear_fc1(x), approximate="tanh"))


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.attn = VisionAttention(config)
        self.mlp = VisionMLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, same_frame: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, same_frame)
        return x + self.mlp(self.norm2(x))


class VisionPatchMerger(nn.Module):
    """Concatenate each ``merge x merge`` block of patches into one token of the text width.

    The final merger normalises each patch before concatenation; the deepstack
    mergers (``use_postshuffle_norm``) normalise the concatenated vector.
    """

    def __init__(self, config: VisionConfig, use_postshuffle_norm: bool = False) -> None:
        super().__init__()
        self.merged_size = config.hidden_size * config.spatial_merge_size**2
        self.use_postshuffle_norm = use_postshuffle_norm
        self.norm = nn.LayerNorm(self.merged_size if use_postshuffle_norm else config.hidden_size, eps=1e-6)
        self.linear_fc1 = nn.Linear(self.merged_size, self.merged_size)
        self.linear_fc2 = nn.Linear(self.merged_size, config.out_hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_postshuffle_norm:
            x = self.norm(x.view(-1, self.merged_size))
        else:
            x = self.norm(x).view(-1, self.merged_size)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


class VisionModel(nn.Module):
    """ViT over packed patches; returns merged image tokens and one deepstack feature per level."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.spatial_merge_size = config.spatial_merge_size
        self.num_grid_per_side = int(config.num_position_embeddings**0.5)
        self.patch_embed = VisionPatchEmbed(config)
        self.pos_embed = nn.Embedding(config.num_position_embeddings, config.hidden_size)
        self.rotary_pos_emb = VisionRotaryEmbedding(config)
        self.blocks = nn.ModuleList([VisionBlock(config) for _ in range(config.depth)])
        self.merger = VisionPatchMerger(config, use_postshuffle_norm=False)
        self.deepstack_visual_indexes = list(config.deepstack_visual_indexes)
        self.deepstack_merger_list = nn.ModuleList(
            [VisionPatchMerger(config, use_postshuffle_norm=True) for _ in self.deepstack_visual_indexes]
        )

    def interpolated_pos_embed(self, layout: PatchLayout) -> torch.Tensor:
        """Bilinearly resample the square learned position table to each image's grid."""
        side = self.num_grid_per_side
        h_taps, h_weights = bilinear_taps(layout.row, layout.height, side)
        w_taps, w_weights = bilinear_taps(layout.col, layout.width, side)
        indices = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
        weights = (h_weights[:, :, None] * w_weights[:, None, :]).reshape(-1, 4)
        return (self.pos_embed(indices) * weights[:, :, None].to(self.pos_embed.weight.dtype)).sum(1)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.patch_embed(pixel_values)
        layout = patch_layout(grid_thw, x.shape[0], self.spatial_merge_size)
        x = x + self.interpolated_pos_embed(layout)
        cos, sin = self.rotary_pos_emb(layout.row, layout.col)
        same_frame = layout.segment[:, None] == layout.segment[None, :]

        deepstack_features = []
        for layer_idx, block in enumerate(self.blocks):
            x = block(x, cos, sin, same_frame)
            if layer_idx in self.deepstack_visual_indexes:
                merger = self.deepstack_merger_list[self.deepstack_visual_indexes.index(layer_idx)]
                deepstack_features.append(merger(x))
        return self.merger(x), deepstack_features
