"""InternS1-VL / Qwen3-VL-MoE reference model, written plainly (no hooks for the compiler passes)."""

from .config import PRESETS, InternS1VLConfig, TextConfig, VisionConfig, preset
from .hf_loading import load_hf_state_dict, shard_state_dict_for_ep
from .losses import load_balancing_loss, router_z_loss
from .model import InternS1VLForConditionalGeneration, InternS1VLOutput, mrope_position_ids
from .moe import MoEOutput, SparseMoeBlock

__all__ = [
    "PRESETS",
    "InternS1VLConfig",
    "InternS1VLForConditionalGeneration",
    "InternS1VLOutput",
    "MoEOutput",
    "SparseMoeBlock",
    "TextConfig",
    "VisionConfig",
    "load_balancing_loss",
    "load_hf_state_dict",
    "mrope_position_ids",
    "preset",
    "router_z_loss",
    "shard_state_dict_for_ep",
]
