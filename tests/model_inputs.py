"""Random batches for the reference model tests (text, padding, images with their grids)."""

from __future__ import annotations

import torch

from moe_passes.models.interns1_vl import InternS1VLConfig


def make_batch(
    config: InternS1VLConfig, seed: int, batch: int = 2, seq_len: int = 16, images: bool = False, pad: bool = False
) -> dict[str, torch.Tensor]:
    """Labels mask image tokens (and padding) with -100; with ``images`` sequence 0 holds a 4x4-patch image."""
    g = torch.Generator().manual_seed(seed)
    text_vocab = min(config.image_token_id, config.vision_start_token_id or config.image_token_id)
    input_ids = torch.randint(0, text_vocab, (batch, seq_len), generator=g)
    out: dict[str, torch.Tensor] = {"input_ids": input_ids}
    if images:
        v = config.vision
        grid = torch.tensor([[1, 2 * v.spatial_merge_size, 2 * v.spatial_merge_size]])
        tokens = int(grid.prod()) // v.spatial_merge_size**2
        input_ids[0, 1 : 1 + tokens] = config.image_token_id
        patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size**2
        out["pixel_values"] = torch.randn(int(grid.prod()), patch_dim, generator=g)
        out["image_grid_thw"] = grid
    labels = input_ids.clone()
    labels[labels == config.image_token_id] = -100
    if pad:
        mask = torch.ones_like(input_ids)
        mask[-1, seq_len - 3 :] = 0
        labels[mask == 0] = -100
        out["attention_mask"] = mask
    out["labels"] = labels
    return out


def compile_config() -> InternS1VLConfig:
    """Every component (vision tower, deepstack, M-RoPE, 2 MoE layers, stacked losses), kept small:
    Inductor's C++ kernel compilation dominates this test's time."""
    return InternS1VLConfig.tiny(
        router_z_loss_coef=0.01, text={"num_experts": 4}, vision={"depth": 1, "deepstack_visual_indexes": (0,)}
    )
