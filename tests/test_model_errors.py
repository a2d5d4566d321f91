"""Bad input to the reference model is refused with a ValueError that names the problem."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from moe_passes.models.interns1_vl import (
    InternS1VLConfig,
    InternS1VLForConditionalGeneration,
    SparseMoeBlock,
    load_hf_state_dict,
    preset,
    shard_state_dict_for_ep,
)
from tests.distributed import run_distributed
from tests.model_inputs import make_batch


@pytest.fixture(scope="module")
def model() -> InternS1VLForConditionalGeneration:
    torch.manual_seed(0)
    return InternS1VLForConditionalGeneration(InternS1VLConfig.tiny())


@pytest.fixture(scope="module")
def image_batch(model) -> dict[str, torch.Tensor]:
    return make_batch(model.config, seed=0, images=True)


def build_with_ep(rank: int, world_size: int, num_experts: int) -> str:
    import torch.distributed as dist

    config = InternS1VLConfig.tiny(text={"num_experts": num_experts})
    try:
        InternS1VLForConditionalGeneration(config, ep_group=dist.group.WORLD)
    except ValueError as e:
        return str(e)
    return "no error"


def test_experts_not_divisible_by_ep_size() -> None:
    messages = run_distributed(build_with_ep, 2, 3)
    assert all("num_experts=3 is not divisible by the expert-parallel size 2" in m for m in messages)


def test_shard_state_dict_rejects_indivisible_experts() -> None:
    sd = {"model.language_model.layers.0.mlp.experts.down_proj": torch.zeros(6, 4, 2)}
    with pytest.raises(ValueError, match="6 experts are not divisible by the expert-parallel size 4"):
        shard_state_dict_for_ep(sd, 0, 4)
    assert shard_state_dict_for_ep(sd, 1, 3)["model.language_model.layers.0.mlp.experts.down_proj"].shape == (2, 4, 2)


def test_grouped_routing_needs_divisible_groups() -> None:
    with pytest.raises(ValueError, match="divisible by the group count 3"):
        SparseMoeBlock(8, 4, num_experts=6, top_k=2, group_routing=True, num_groups=3)


def test_pixel_values_without_image_grid_thw(model, image_batch) -> None:
    with pytest.raises(ValueError, match="pixel_values and image_grid_thw must be given together"):
        model(image_batch["input_ids"], pixel_values=image_batch["pixel_values"])
    with pytest.raises(ValueError, match="pixel_values and image_grid_thw must be given together"):
        model(image_batch["input_ids"], image_grid_thw=image_batch["image_grid_thw"])


def test_image_token_count_must_match_image_features(model, image_batch) -> None:
    input_ids = image_batch["input_ids"].clone()
    input_ids[1, 0] = model.config.image_token_id  # one image token too many
    with pytest.raises(ValueError, match="image-token count mismatch: input_ids has 5 image tokens .* 4 features"):
        model(input_ids, pixel_values=image_batch["pixel_values"], image_grid_thw=image_batch["image_grid_thw"])


def test_grid_must_describe_the_pixel_values(model, image_batch) -> None:
    with pytest.raises(ValueError, match="describes 32 patches but pixel_values has 16"):
        model(image_batch["input_ids"], pixel_values=image_batch["pixel_values"], image_grid_thw=torch.tensor([[2, 4, 4]]))
    with pytest.raises(ValueError, match="multiples of spatial_merge_size=2"):
        model(image_batch["input_ids"], pixel_values=image_batch["pixel_values"], image_grid_thw=torch.tensor([[1, 1, 16]]))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"input_ids": torch.zeros(8, dtype=torch.long)}, r"input_ids must be an integer tensor \[batch, seq\]"),
        ({"input_ids": torch.zeros(2, 8)}, r"input_ids must be an integer tensor"),
        (
            {"input_ids": torch.zeros(2, 8, dtype=torch.long), "attention_mask": torch.ones(8)},
            "attention_mask must have the shape of input_ids",
        ),
        (
            {"input_ids": torch.zeros(2, 8, dtype=torch.long), "labels": torch.zeros(2, 7, dtype=torch.long)},
            "labels must have the shape of input_ids",
        ),
        (
            {
                "input_ids": torch.zeros(2, 8, dtype=torch.long),
                "pixel_values": torch.zeros(16, 3, 8),
                "image_grid_thw": torch.tensor([[1, 4, 4]]),
            },
            r"pixel_values must be \[num_patches, 24\]",
        ),
        (
            {
                "input_ids": torch.zeros(2, 8, dtype=torch.long),
                "pixel_values": torch.zeros(16, 24),
                "image_grid_thw": torch.tensor([1, 4, 4]),
            },
            r"image_grid_thw must be \[num_images, 3\]",
        ),
    ],
    ids=["input_ids_1d", "input_ids_float", "mask_shape", "labels_shape", "pixel_values_3d", "grid_1d"],
)
def test_wrong_rank_tensors(model, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        model(**kwargs)


@pytest.mark.parametrize("missing", ["text_config", "vision_config", "image_token_id"])
def test_config_top_level_keys_missing(missing: str) -> None:
    d = {"text_config": {}, "vision_config": {}, "image_token_id": 5}
    del d[missing]
    with pytest.raises(ValueError, match=f"config key missing: config.{missing}"):
        InternS1VLConfig.from_hf_dict(d)


def _text_config() -> dict[str, Any]:
    """A complete tiny ``text_config`` as a HF config.json holds it."""
    return dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, moe_intermediate_size=16,
                num_experts=8, num_experts_per_tok=2, rope_parameters={"rope_theta": 1e4, "mrope_section": [2, 1, 1]})


@pytest.mark.parametrize("missing", ["hidden_size", "num_experts_per_tok", "moe_intermediate_size"])
def test_config_text_keys_missing(missing: str) -> None:
    text = _text_config()
    del text[missing]
    with pytest.raises(ValueError, match=f"config key missing: text_config.{missing}"):
        InternS1VLConfig.from_hf_dict({"text_config": text, "vision_config": {}, "image_token_id": 5})


def test_config_vision_key_missing() -> None:
    text = _text_config()
    with pytest.raises(ValueError, match="config key missing: vision_config.depth"):
        InternS1VLConfig.from_hf_dict({"text_config": text, "vision_config": {"hidden_size": 16}, "image_token_id": 5})


def test_inconsistent_config_is_refused() -> None:
    with pytest.raises(ValueError, match=r"mrope_section=\[2, 2, 2\] must sum to head_dim/2=4"):
        InternS1VLConfig.tiny(text={"mrope_section": (2, 2, 2)})
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        preset("huge")


def test_state_dict_with_wrong_keys_is_refused(model) -> None:
    sd = dict(model.state_dict())
    sd["model.language_model.extra.weight"] = sd.pop("lm_head.weight")
    with pytest.raises(ValueError, match=r"missing keys \['lm_head.weight'\], unexpected keys \['model.language_model.extra.weight'\]"):
        load_hf_state_dict(InternS1VLForConditionalGeneration(model.config), sd)


def test_presets_are_consistent_without_building_the_large_model() -> None:
    pro = preset("interns1-pro")
    assert pro.text.num_experts == 512 and pro.text.num_experts_per_tok == 8 and pro.group_routing
    assert 0.8e12 < pro.num_parameters() < 1.2e12 and 15e9 < pro.num_parameters(active_only=True) < 30e9
    for name in ("tiny", "tiny-vl", "bench"):
        config = preset(name)
        model = InternS1VLForConditionalGeneration(config)
        assert config.num_parameters() == sum(p.numel() for p in model.parameters()), name
