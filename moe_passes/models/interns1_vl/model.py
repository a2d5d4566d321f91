"""InternS1-VL (Qwen3-VL-MoE family) for conditional generation, with the training loss.

Module names mirror transformers' ``Qwen3VLMoeForConditionalGeneration``
(``model.visual``, ``model.language_model``, ``lm_head``) so its state dict
loads key for key. The loss is shifted cross-entropy plus the stacked
balancing loss and z-loss over every MoE layer's router logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .config import InternS1VLConfig
from .losses import load_balancing_loss, router_z_loss
from .text import TextModel, gather_by_mask_rank
from .vision import VisionModel


@dataclass
class InternS1VLOutput:
    """``loss`` is None without labels; router outputs are None unless ``output_router_logits``."""

    loss: torch.Tensor | None
    logits: torch.Tensor
    aux_loss: torch.Tensor | None
    z_loss: torch.Tensor | None
    router_logits: tuple[torch.Tensor, ...] | None = None
    selected_experts: tuple[torch.Tensor, ...] | None = None


def mrope_position_ids(
    input_ids: torch.Tensor,
    image_grid_thw: torch.Tensor,
    image_token_id: int,
    spatial_merge_size: int,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """[3, B, S] (time, row, column) positions, as transformers' ``get_rope_index`` for images.

    Text advances all three streams by one per token; an image's tokens share
    its start position plus their (frame, row, column) in the merged grid, and
    the image advances the position by max(rows, columns). Padding gets 0.
    Computed with cumulative sums instead of a Python loop over groups so the
    function traces into one graph.
    """
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    is_image = (input_ids == image_token_id) & valid
    t = image_grid_thw[:, 0]
    h = image_grid_thw[:, 1] // spatial_merge_size
    w = image_grid_thw[:, 2] // spatial_merge_size
    tokens_per_image = t * h * w
    ends = tokens_per_image.cumsum(0)
    rank = (is_image.reshape(-1).long().cumsum(0) - 1).clamp(min=0)
    image = torch.bucketize(rank, ends, right=True).clamp(max=image_grid_thw.shape[0] - 1)
    j = (rank - (ends - tokens_per_image)[image]).view_as(input_ids)
    image = image.view_as(input_ids)
    rows, cols = h[image], w[image]
    is_last = is_image & (j == tokens_per_image[image] - 1)
    advance = torch.where(is_image, torch.where(is_last, torch.maximum(rows, cols), 0), valid.long())
    start = advance.cumsum(-1) - advance
    offsets = torch.stack([j // (rows * cols), (j // cols) % rows, j % cols])
    positions = start + torch.where(is_image, offsets, 0)
    return torch.where(valid, positions, 0)


def causal_attention_bias(attention_mask: torch.Tensor | None, batch: int, seq_len: int, dtype: torch.dtype,
                          device: torch.device) -> torch.Tensor:
    """Additive [B, 1, S, S] bias: 0 where a query may attend (causal, non-padding key), dtype-min elsewhere.

    A large finite value rather than -inf keeps fully masked (padding) rows finite.
    """
    allowed = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, None, :]
    allowed = allowed.expand(batch, 1, seq_len, seq_len)
    return torch.zeros((), dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


class InternS1VLModel(nn.Module):
    """Vision tower + text decoder (HF's ``Qwen3VLMoeModel``)."""

    def __init__(self, config: InternS1VLConfig, ep_group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.config = config
        self.visual = VisionModel(config.vision)
        self.language_model = TextModel(config, ep_group)


class InternS1VLForConditionalGeneration(nn.Module):
    """The reference MoE VLM. ``ep_group``: experts are sharded over it (dropless all-to-all dispatch)."""

    def __init__(self, config: InternS1VLConfig, ep_group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.config = config
        self.ep_group = ep_group
        self.model = InternS1VLModel(config, ep_group)
        self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.language_model.embed_tokens.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        """Normal(0, std) weights, zero biases, unit norms (transformers' initialisation); RMSNorms start at one."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv3d)):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for name, param in self.named_parameters():
            if name.endswith(("mlp.gate.weight", "experts.gate_up_proj", "experts.down_proj")):
                nn.init.normal_(param, std=std)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_router_logits: bool = False,
    ) -> InternS1VLOutput:
        self.check_inputs(input_ids, attention_mask, pixel_values, image_grid_thw, labels)
        config = self.config
        batch, seq_len = input_ids.shape
        language_model = self.model.language_model
        inputs_embeds = language_model.embed_tokens(input_ids)

        visual_pos_masks = None
        deepstack_visual_embeds = None
        if pixel_values is not None:
            image_embeds, deepstack_visual_embeds = self.model.visual(pixel_values, image_grid_thw)
            visual_pos_masks = input_ids == config.image_token_id
            self.check_image_tokens(visual_pos_masks, image_embeds)
            image_embeds = image_embeds.to(inputs_embeds.dtype)
            inputs_embeds = torch.where(
                visual_pos_masks[..., None], gather_by_mask_rank(image_embeds, visual_pos_masks), inputs_embeds
            )
            position_ids = mrope_position_ids(
                input_ids, image_grid_thw, config.image_token_id, config.vision.spatial_merge_size, attention_mask
            )
        else:
            position_ids = torch.arange(seq_len, device=input_ids.device).expand(3, batch, seq_len)

        attn_bias = causal_attention_bias(attention_mask, batch, seq_len, inputs_embeds.dtype, inputs_embeds.device)
        hidden, router_logits, selected_experts = language_model(
            inputs_embeds, position_ids, attn_bias, visual_pos_masks, deepstack_visual_embeds
        )
        logits = self.lm_head(hidden)

        aux_loss = z_loss = None
        if router_logits:
            global_group = self.ep_group if config.aux_loss_global else None
            aux_loss = load_balancing_loss(
                router_logits, config.text.num_experts, config.text.num_experts_per_tok, attention_mask, global_group
            )
            z_loss = router_z_loss(router_logits, attention_mask)

        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
            )
            if aux_loss is not None:
                loss = loss + config.router_aux_loss_coef * aux_loss + config.router_z_loss_coef * z_loss

        return InternS1VLOutput(
            loss=loss,
            logits=logits,
            aux_loss=aux_loss,
            z_loss=z_loss,
            router_logits=router_logits if output_router_logits else None,
            selected_experts=selected_experts if output_router_logits else None,
        )

    def check_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        pixel_values: torch.Tensor | None,
        image_grid_thw: torch.Tensor | None,
        labels: torch.Tensor | None,
    ) -> None:
        """Shape and pairing checks that need no device sync; they cost nothing under tracing."""
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"input_ids must be an integer tensor [batch, seq], got {input_ids.dtype} {tuple(input_ids.shape)}")
        for name, tensor in (("attention_mask", attention_mask), ("labels", labels)):
            if tensor is not None and tensor.shape != input_ids.shape:
                raise ValueError(f"{name} must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(tensor.shape)}")
        if (pixel_values is None) != (image_grid_thw is None):
            raise ValueError("pixel_values and image_grid_thw must be given together (image_grid_thw says where each image's patches are)")
        if pixel_values is None:
            return
        vision = self.config.vision
        patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        if pixel_values.dim() != 2 or pixel_values.shape[1] != patch_dim:
            raise ValueError(f"pixel_values must be [num_patches, {patch_dim}] (C*T*P*P), got {tuple(pixel_values.shape)}")
        if image_grid_thw.dim() != 2 or image_grid_thw.shape[1] != 3:
            raise ValueError(f"image_grid_thw must be [num_images, 3] (t, h, w), got {tuple(image_grid_thw.shape)}")
        if torch.compiler.is_compiling():
            return
        merge = vision.spatial_merge_size
        if bool((image_grid_thw[:, 1:] % merge != 0).any()):
            raise ValueError(f"image_grid_thw rows/columns must be multiples of spatial_merge_size={merge}: {image_grid_thw.tolist()}")
        num_patches = int(image_grid_thw.prod(-1).sum())
        if num_patches != pixel_values.shape[0]:
            raise ValueError(f"image_grid_thw describes {num_patches} patches but pixel_values has {pixel_values.shape[0]}")

    def check_image_tokens(self, visual_pos_masks: torch.Tensor, image_embeds: torch.Tensor) -> None:
        if torch.compiler.is_compiling():
            return
        num_tokens = int(visual_pos_masks.sum())
        if num_tokens != image_embeds.shape[0]:
            raise ValueError(
                f"image-token count mismatch: input_ids has {num_tokens} image tokens (id {self.config.image_token_id}) "
                f"but the images give {image_embeds.shape[0]} features"
            )
