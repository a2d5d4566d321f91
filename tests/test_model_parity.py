"""Parity with the public reference: transformers' Qwen3VLMoeForConditionalGeneration.

Random weights go into the transformers model; its state dict is loaded key for
key into ours (config via ``from_hf_dict``). Both must give the same logits,
cross-entropy and balancing loss, for text only and for image + text.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is the parity reference (pip install -e '.[test]')")

from moe_passes.models.interns1_vl import InternS1VLConfig, InternS1VLForConditionalGeneration, load_hf_state_dict  # noqa: E402

ATOL = 2e-5
RTOL = 1e-4
IMAGE_TOKEN = 90


def hf_config_dict() -> dict:
    text = dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
        rms_norm_eps=1e-6, decoder_sparse_step=1, mlp_only_layers=[1], router_aux_loss_coef=0.01,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1], "mrope_interleaved": True},
    )
    vision = dict(
        depth=3, hidden_size=16, intermediate_size=32, num_heads=2, in_channels=3, patch_size=2, temporal_patch_size=2,
        spatial_merge_size=2, out_hidden_size=32, num_position_embeddings=16, deepstack_visual_indexes=[0, 2],
    )
    cfg = transformers.Qwen3VLMoeConfig(
        text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN, vision_start_token_id=88,
        vision_end_token_id=89,
    )
    return cfg.to_dict()


@pytest.fixture(scope="module")
def models() -> tuple[torch.nn.Module, InternS1VLForConditionalGeneration]:
    torch.manual_seed(0)
    d = hf_config_dict()
    hf_cfg = transformers.Qwen3VLMoeConfig(**{k: v for k, v in d.items() if k not in ("transformers_version",)})
    hf_cfg._attn_implementation = "eager"
    hf_cfg.text_config._attn_implementation = "eager"
    hf_cfg.vision_config._attn_implementation = "eager"
    hf = transformers.Qwen3VLMoeForConditionalGeneration(hf_cfg).eval()
    with torch.no_grad():  # weights far from init so every path matters (norms, biases, routing)
        for name, p in hf.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 0.5) + (1.0 if name.endswith("norm.weight") else 0.0))
    ours = InternS1VLForConditionalGeneration(InternS1VLConfig.from_hf_dict(d, router_z_loss_coef=0.0)).eval()
    load_hf_state_dict(ours, hf.state_dict())
    return hf, ours


def image_batch() -> dict[str, torch.Tensor]:
    """Two sequences, three images (4x4 and 2x6 patch grids; one 2-frame image) between text."""
    g = torch.Generator().manual_seed(1)
    grid = torch.tensor([[1, 4, 4], [1, 2, 6], [2, 2, 2]])
    tokens = (grid.prod(-1) // 4).tolist()  # 4, 3, 2 merged tokens
    seq_a = [5, 88] + [IMAGE_TOKEN] * tokens[0] + [89, 7, 8, 88] + [IMAGE_TOKEN] * tokens[1] + [89, 3, 4, 6]
    seq_b = [9, 10, 88] + [IMAGE_TOKEN] * tokens[2] + [89] + torch.randint(0, 80, (11,), generator=g).tolist()
    input_ids = torch.tensor([seq_a, seq_b])
    pixel_values = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 2 * 2, generator=g)
    return dict(input_ids=input_ids, pixel_values=pixel_values, image_grid_thw=grid)


def compare(hf: torch.nn.Module, ours: InternS1VLForConditionalGeneration, batch: dict, attention_mask=None) -> dict:
    labels = batch["input_ids"].clone()
    labels[labels == IMAGE_TOKEN] = -100
    hf_kwargs = dict(batch)
    if "image_grid_thw" in batch:
        hf_kwargs["mm_token_type_ids"] = (batch["input_ids"] == IMAGE_TOKEN).int()
    with torch.no_grad():
        ref = hf(**hf_kwargs, attention_mask=attention_mask, labels=labels, output_router_logits=True)
        out = ours(**batch, attention_mask=attention_mask, labels=labels, output_router_logits=True)
    valid = slice(None) if attention_mask is None else attention_mask.bool()
    torch.testing.assert_close(out.logits[valid], ref.logits[valid], atol=ATOL, rtol=RTOL)
    ours_ce = out.loss - ours.config.router_aux_loss_coef * out.aux_loss
    torch.testing.assert_close(ours_ce, ref.loss - hf.config.text_config.router_aux_loss_coef * ref.aux_loss, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(out.aux_loss, ref.aux_loss, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(out.loss, ref.loss, atol=ATOL, rtol=RTOL)
    for ours_logits, ref_logits in zip(out.router_logits, ref.router_logits, strict=True):
        torch.testing.assert_close(ours_logits, ref_logits, atol=ATOL, rtol=RTOL)
    ref_ce = ref.loss - hf.config.text_config.router_aux_loss_coef * ref.aux_loss
    return {
        "max_abs_logit_diff": (out.logits[valid] - ref.logits[valid]).abs().max().item(),
        "ce_diff": (ours_ce - ref_ce).abs().item(),
        "aux_diff": (out.aux_loss - ref.aux_loss).abs().item(),
    }


def test_config_round_trips_from_hf_dict() -> None:
    config = InternS1VLConfig.from_hf_dict(hf_config_dict())
    assert config.text.num_experts == 8 and config.text.mrope_section == (2, 1, 1)
    assert config.text.mlp_only_layers == (1,) and not config.text.is_moe_layer(1)
    assert config.vision.deepstack_visual_indexes == (0, 2) and config.image_token_id == IMAGE_TOKEN


def test_text_only_logits_and_loss_match_transformers(models) -> None:
    hf, ours = models
    input_ids = torch.randint(0, 80, (2, 11), generator=torch.Generator().manual_seed(2))
    print(compare(hf, ours, {"input_ids": input_ids}))


def test_text_with_right_padding_matches_transformers(models) -> None:
    hf, ours = models
    input_ids = torch.randint(0, 80, (2, 11), generator=torch.Generator().manual_seed(3))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0
    print(compare(hf, ours, {"input_ids": input_ids}, attention_mask))


def test_image_and_text_logits_and_loss_match_transformers(models) -> None:
    hf, ours = models
    print(compare(hf, ours, image_batch()))


def test_image_positions_follow_transformers_rope_index(models) -> None:
    hf, ours = models
    from moe_passes.models.interns1_vl import mrope_position_ids

    batch = image_batch()
    mask = torch.ones_like(batch["input_ids"])
    mask[1, -3:] = 0
    ref, _ = hf.model.get_rope_index(
        batch["input_ids"], (batch["input_ids"] == IMAGE_TOKEN).int(), image_grid_thw=batch["image_grid_thw"],
        attention_mask=mask,
    )
    got = mrope_position_ids(batch["input_ids"], batch["image_grid_thw"], IMAGE_TOKEN, 2, mask)
    assert torch.equal(got, ref)
