"""Models the aux-loss tests build (moved out of test_layerwise_aux_loss.py: tests import helpers, never other test modules)."""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist
from torch import nn

from moe_passes.models.interns1_vl.losses import router_z_loss
from moe_passes.models.stacks import MoEStack

HIDDEN, FFN, EXPERTS, TOP_K, LAYERS = 8, 8, 4, 2, 2


def aux_stack(ep_group: dist.ProcessGroup | None = None, global_stats: bool = False, layers: int = LAYERS,
              z_loss: Callable[..., torch.Tensor] | None = router_z_loss, return_stacked: bool = False) -> MoEStack:
    """``layers`` MoE blocks; loss = mean(h^2) + 0.1 * balancing + 0.01 * z-loss (stacked form); ``forward(x, mask)``.

    ``global_stats``: the balancing loss's statistics are summed over ``ep_group`` (default: the world);
    ``return_stacked``: also return every layer's logits concatenated.
    """
    return MoEStack(layers, HIDDEN, FFN, EXPERTS, TOP_K, ep_group=ep_group, main_loss="pow2_mean", aux_coef=0.1,
                    z_coef=0.0 if z_loss is None else 0.01, z_loss=z_loss or router_z_loss,
                    global_group=(ep_group or dist.group.WORLD) if global_stats else None,
                    returns="logits_cat" if return_stacked else "loss")


def make_model(seed: int, **kwargs: Any) -> MoEStack:
    """``aux_stack(**kwargs)`` with every parameter drawn from N(0, 0.4) after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    model = aux_stack(**kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.4)
    return model


def tiny_qwen3_vl_moe() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    text = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=8, moe_intermediate_size=8, num_experts=4, num_experts_per_tok=2,
                decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=0.05,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1], "mrope_interleaved": True})
    vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, in_channels=3, patch_size=2,
                  temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=16, num_position_embeddings=16,
                  deepstack_visual_indexes=[0])
    cfg = transformers.Qwen3VLMoeConfig(text_config=text, vision_config=vision, image_token_id=60,
                                        vision_start_token_id=61, vision_end_token_id=62)
    for c in (cfg, cfg.text_config, cfg.vision_config):
        c._attn_implementation = "eager"
    return seeded(transformers.Qwen3VLMoeForConditionalGeneration, cfg)


def seeded(cls: Any, cfg: Any) -> Any:
    """``cls(cfg)`` built under seed 0 with N(0, 0.3) weights: routers far from uniform, so the aux loss and
    top-k choices are not ties."""
    torch.manual_seed(0)
    model = cls(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model
