"""Configuration of the InternS1-VL / Qwen3-VL-MoE reference model.

Field names follow transformers' ``Qwen3VLMoeConfig`` so a Hugging Face
``config.json`` maps onto it one to one (``from_hf_dict``). The extra fields
(z-loss coefficient, global balancing statistics, grouped routing) are
training options the HF config does not carry.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class TextConfig:
    """The language decoder (GQA attention with q/k RMSNorm, M-RoPE, MoE MLPs)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    moe_intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    intermediate_size: int = 0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 5_000_000.0
    mrope_section: tuple[int, int, int] = (24, 20, 20)
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    norm_topk_prob: bool = True
    attention_bias: bool = False
    hidden_act: str = "silu"

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Same rule as transformers' ``Qwen3VLMoeTextDecoderLayer``."""
        return (
            layer_idx not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )


@dataclass(frozen=True)
class VisionConfig:
    """The ViT tower (temporal patch embed, 2-D rotary, merger, deepstack mergers)."""

    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)
    rope_theta: float = 10000.0
    hidden_act: str = "gelu_pytorch_tanh"


@dataclass(frozen=True)
class InternS1VLConfig:
    """Whole model: vision tower + MoE text decoder + training-loss options.

    ``aux_loss_global``: sum the balancing loss's token counts over the
    expert-parallel group (global-batch statistics). ``group_routing``:
    Intern-S1-Pro's grouped router (top-(K/G) inside each of G expert groups);
    ``num_expert_groups`` is G, default one group per EP rank.
    """

    text: TextConfig
    vision: VisionConfig
    image_token_id: int
    vision_start_token_id: int | None = None
    vision_end_token_id: int | None = None
    tie_word_embeddings: bool = False
    router_aux_loss_coef: float = 0.001
    router_z_loss_coef: float = 0.0
    aux_loss_global: bool = False
    group_routing: bool = False
    num_expert_groups: int | None = None

    def __post_init__(self) -> None:
        t, v = self.text, self.vision
        problems = []
        if t.num_attention_heads % t.num_key_value_heads:
            problems.append(f"num_attention_heads={t.num_attention_heads} not divisible by num_key_value_heads={t.num_key_value_heads}")
        if 2 * sum(t.mrope_section) != t.head_dim:
            problems.append(f"mrope_section={list(t.mrope_section)} must sum to head_dim/2={t.head_dim // 2}")
        if t.num_experts_per_tok > t.num_experts:
            problems.append(f"num_experts_per_tok={t.num_experts_per_tok} exceeds num_experts={t.num_experts}")
        if t.hidden_act != "silu":
            problems.append(f"text hidden_act={t.hidden_act!r} is not supported (only 'silu')")
        if v.hidden_size % v.num_heads or (v.hidden_size // v.num_heads) % 4:
            problems.append(f"vision head dim {v.hidden_size}/{v.num_heads} must be an integer divisible by 4 (2-D rotary)")
        if v.out_hidden_size != t.hidden_size:
            problems.append(f"vision out_hidden_size={v.out_hidden_size} must equal text hidden_size={t.hidden_size}")
        if any(i >= v.depth for i in v.deepstack_visual_indexes):
            problems.append(f"deepstack_visual_indexes={list(v.deepstack_visual_indexes)} out of range for depth={v.depth}")
        if len(v.deepstack_visual_indexes) > t.num_hidden_layers:
            problems.append("more deepstack levels than decoder layers")
        if int(v.num_position_embeddings**0.5) ** 2 != v.num_position_embeddings:
            problems.append(f"num_position_embeddings={v.num_position_embeddings} is not a square")
        if self.num_expert_groups is not None and (
            t.num_experts % self.num_expert_groups or t.num_experts_per_tok % self.num_expert_groups
        ):
            problems.append(f"num_expert_groups={self.num_expert_groups} must divide num_experts and num_experts_per_tok")
        if problems:
            raise ValueError("invalid InternS1VLConfig: " + "; ".join(problems))

    def replace(self, **changes: Any) -> "InternS1VLConfig":
        """Copy with top-level fields changed; ``text=``/``vision=`` take dicts of sub-fields."""
        for key in ("text", "vision"):
            if isinstance(changes.get(key), dict):
                changes[key] = dataclasses.replace(getattr(self, key), **changes[key])
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], **overrides: Any) -> "InternS1VLConfig":
        """Build from a transformers ``Qwen3VLMoeConfig.to_dict()`` / ``config.json`` dict."""
        if not isinstance(d, dict):
            raise ValueError(f"expected a config dict, got {type(d).__name__}")
        text_d = _require(d, "text_config", "config")
        vision_d = _require(d, "vision_config", "config")
        image_token_id = _require(d, "image_token_id", "config")
        num_experts = text_d.get("num_experts", text_d.get("num_local_experts"))
        if num_experts is None:
            raise ValueError("config key missing: text_config.num_experts (or num_local_experts)")
        rope = text_d.get("rope_parameters") or text_d.get("rope_scaling") or {}
        rope_theta = rope.get("rope_theta", text_d.get("rope_theta"))
        if rope_theta is None:
            raise ValueError("config key missing: text_config.rope_parameters.rope_theta")
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"text rope_type={rope.get('rope_type')!r} is not supported (only 'default')")
        hidden = _require(text_d, "hidden_size", "text_config")
        heads = _require(text_d, "num_attention_heads", "text_config")
        text = TextConfig(
            vocab_size=_require(text_d, "vocab_size", "text_config"),
            hidden_size=hidden,
            num_hidden_layers=_require(text_d, "num_hidden_layers", "text_config"),
            num_attention_heads=heads,
            num_key_value_heads=text_d.get("num_key_value_heads") or heads,
            head_dim=text_d.get("head_dim") or hidden // heads,
            moe_intermediate_size=_require(text_d, "moe_intermediate_size", "text_config"),
            num_experts=num_experts,
            num_experts_per_tok=_require(text_d, "num_experts_per_tok", "text_config"),
            intermediate_size=text_d.get("intermediate_size", 0),
            rms_norm_eps=text_d.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            mrope_section=tuple(rope.get("mrope_section", (24, 20, 20))),
            decoder_sparse_step=text_d.get("decoder_sparse_step", 1),
            mlp_only_layers=tuple(text_d.get("mlp_only_layers") or ()),
            attention_bias=text_d.get("attention_bias", False),
            hidden_act=text_d.get("hidden_act", "silu"),
        )
        vrope = vision_d.get("rope_parameters") or {}
        vision = VisionConfig(
            depth=_require(vision_d, "depth", "vision_config"),
            hidden_size=_require(vision_d, "hidden_size", "vision_config"),
            intermediate_size=_require(vision_d, "intermediate_size", "vision_config"),
            num_heads=_require(vision_d, "num_heads", "vision_config"),
            out_hidden_size=_require(vision_d, "out_hidden_size", "vision_config"),
            in_channels=vision_d.get("in_channels", 3),
            patch_size=_require(vision_d, "patch_size", "vision_config"),
            temporal_patch_size=_require(vision_d, "temporal_patch_size", "vision_config"),
            spatial_merge_size=_require(vision_d, "spatial_merge_size", "vision_config"),
            num_position_embeddings=_require(vision_d, "num_position_embeddings", "vision_config"),
            deepstack_visual_indexes=tuple(vision_d.get("deepstack_visual_indexes") or ()),
            rope_theta=float(vrope.get("rope_theta", 10000.0)),
            hidden_act=vision_d.get("hidden_act", "gelu_pytorch_tanh"),
        )
        kwargs: dict[str, Any] = dict(
            text=text,
            vision=vision,
            image_token_id=image_token_id,
            vision_start_token_id=d.get("vision_start_token_id"),
            vision_end_token_id=d.get("vision_end_token_id"),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            router_aux_loss_coef=text_d.get("router_aux_loss_coef", 0.001),
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def tiny(cls, **overrides: Any) -> "InternS1VLConfig":
        """Two MoE layers, 8 experts top-2, a 2-block vision tower: the unit-test model."""
        text = TextConfig(
            vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2, intermediate_size=48,
            rope_theta=10000.0, mrope_section=(2, 1, 1),
        )
        vision = VisionConfig(
            depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, in_channels=3,
            patch_size=2, temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=16,
            deepstack_visual_indexes=(0, 1),
        )
        base = cls(text=text, vision=vision, image_token_id=90, vision_start_token_id=88, vision_end_token_id=89,
                   router_aux_loss_coef=0.01, router_z_loss_coef=0.001)
        return base.replace(**overrides)

    @classmethod
    def tiny_vl(cls, **overrides: Any) -> "InternS1VLConfig":
        """Three decoder layers and three deepstack levels: exercises every vision path."""
        base = cls.tiny()
        return base.replace(
            text={"num_hidden_layers": 3},
            vision={"depth": 3, "deepstack_visual_indexes": (0, 1, 2)},
        ).replace(**overrides)

    @classmethod
    def bench(cls, **overrides: Any) -> "InternS1VLConfig":
        """Small enough for 2 CPU ranks, big enough that expert matmuls and all-to-alls take real time."""
        text = TextConfig(
            vocab_size=1024, hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
            head_dim=32, moe_intermediate_size=256, num_experts=16, num_experts_per_tok=4, intermediate_size=512,
            rope_theta=10000.0, mrope_section=(8, 4, 4),
        )
        vision = VisionConfig(
            depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=256, patch_size=4,
            temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=64, deepstack_visual_indexes=(0, 1),
        )
        base = cls(text=text, vision=vision, image_token_id=1000, vision_start_token_id=998, vision_end_token_id=999,
                   router_aux_loss_coef=0.01, router_z_loss_coef=0.001)
        return base.replace(**overrides)

    @classmethod
    def interns1_pro(cls, **overrides: Any) -> "InternS1VLConfig":
        """Intern-S1-Pro class shape (Qwen3-235B backbone expanded to 512 experts, top-8, grouped routing).

        For arithmetic (parameter counts, memory estimates) and the CLI only:
        never instantiate it in a test.
        """
        text = TextConfig(
            vocab_size=151936, hidden_size=4096, num_hidden_layers=94, num_attention_heads=64, num_key_value_heads=4,
            head_dim=128, moe_intermediate_size=1536, num_experts=512, num_experts_per_tok=8,
            intermediate_size=12288, rope_theta=5_000_000.0, mrope_section=(24, 20, 20),
        )
        vision = VisionConfig(
            depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096, patch_size=16,
            temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=2304,
            deepstack_visual_indexes=(8, 16, 24),
        )
        base = cls(text=text, vision=vision, image_token_id=151655, vision_start_token_id=151652,
                   vision_end_token_id=151653, router_aux_loss_coef=0.001, group_routing=True)
        return base.replace(**overrides)

    def num_parameters(self, active_only: bool = False) -> int:
        """Parameter count from the shapes alone (no allocation); ``active_only`` counts top-k experts."""
        t, v = self.text, self.vision
        attn = t.hidden_size * t.head_dim * (2 * t.num_attention_heads + 2 * t.num_key_value_heads) + 2 * t.head_dim
        if t.attention_bias:
            attn += t.head_dim * (t.num_attention_heads + 2 * t.num_key_value_heads) + t.hidden_size
        experts = t.num_experts_per_tok if active_only else t.num_experts
        moe = t.num_experts * t.hidden_size + experts * 3 * t.hidden_size * t.moe_intermediate_size
        dense = 3 * t.hidden_size * t.intermediate_size
        layers = sum(attn + 2 * t.hidden_size + (moe if t.is_moe_layer(i) else dense) for i in range(t.num_hidden_layers))
        lm_head = 0 if self.tie_word_embeddings else t.vocab_size * t.hidden_size
        text_total = t.vocab_size * t.hidden_size + layers + t.hidden_size + lm_head
        vh = v.hidden_size
        patch = v.in_channels * v.temporal_patch_size * v.patch_size**2 * vh + vh
        block = 4 * vh + (3 * vh * vh + 3 * vh) + (vh * vh + vh) + 2 * vh * v.intermediate_size + v.intermediate_size + vh
        merged = vh * v.spatial_merge_size**2

        def merger(postshuffle: bool) -> int:
            norm = 2 * (merged if postshuffle else vh)
            return norm + merged * merged + merged + merged * v.out_hidden_size + v.out_hidden_size

        vision_total = (patch + v.num_position_embeddings * vh + v.depth * block + merger(False)
                        + len(v.deepstack_visual_indexes) * merger(True))
        return text_total + vision_total


PRESETS: dict[str, Callable[[], InternS1VLConfig]] = {
    "tiny": InternS1VLConfig.tiny,
    "tiny-vl": InternS1VLConfig.tiny_vl,
    "bench": InternS1VLConfig.bench,
    "interns1-pro": InternS1VLConfig.interns1_pro,
}


def preset(name: str, **overrides: Any) -> InternS1VLConfig:
    """Named preset lookup for the CLI and benchmarks."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]().replace(**overrides)


def _require(d: dict[str, Any], key: str, where: str) -> Any:
    if key not in d or d[key] is None:
        raise ValueError(f"config key missing: {where}.{key}")
    return d[key]
