"""Load transformers' ``Qwen3VLMoeForConditionalGeneration`` state dicts key for key.

Our module tree uses the same names, fused expert tensors included
(``...mlp.experts.gate_up_proj`` [E, 2I, H], ``...mlp.experts.down_proj``
[E, H, I], ``...mlp.gate.weight`` [E, H]); under expert parallelism each rank
keeps the contiguous slice of experts it owns.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

EXPERT_SUFFIXES = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def is_expert_key(key: str) -> bool:
    return key.endswith(EXPERT_SUFFIXES)


def shard_state_dict_for_ep(sd: Mapping[str, torch.Tensor], ep_rank: int, ep_size: int) -> dict[str, torch.Tensor]:
    """The part of a full state dict that EP rank ``ep_rank`` of ``ep_size`` holds (experts sliced, rest as is)."""
    if ep_size < 1 or not 0 <= ep_rank < ep_size:
        raise ValueError(f"invalid expert-parallel position: rank {ep_rank} of {ep_size}")
    out: dict[str, torch.Tensor] = {}
    for key, tensor in sd.items():
        if is_expert_key(key):
            num_experts = tensor.shape[0]
            if num_experts % ep_size:
                raise ValueError(f"{key}: {num_experts} experts are not divisible by the expert-parallel size {ep_size}")
            local = num_experts // ep_size
            tensor = tensor[ep_rank * local : (ep_rank + 1) * local]
        out[key] = tensor
    return out


def load_hf_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor]) -> None:
    """Copy a transformers state dict into ``model`` (full experts are sliced to the model's EP rank).

    Raises ValueError naming every missing, unexpected or mis-shaped key rather
    than loading a partial model.
    """
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        raise ValueError(f"state dict does not match the model: missing keys {missing}, unexpected keys {unexpected}")
    ep_size, ep_rank = _ep_layout(model)
    converted: dict[str, torch.Tensor] = {}
    bad_shapes = []
    for key, tensor in sd.items():
        if is_expert_key(key) and tensor.shape[0] != own[key].shape[0]:
            tensor = shard_state_dict_for_ep({key: tensor}, ep_rank, ep_size)[key]
        if tensor.shape != own[key].shape:
            bad_shapes.append(f"{key}: got {tuple(tensor.shape)}, model has {tuple(own[key].shape)}")
        converted[key] = tensor
    if bad_shapes:
        raise ValueError("state dict shapes do not match the model: " + "; ".join(bad_shapes))
    model.load_state_dict(converted, strict=True)


def _ep_layout(model: nn.Module) -> tuple[int, int]:
    for module in model.modules():
        if hasattr(module, "ep_size") and hasattr(module, "ep_rank"):
            return module.ep_size, module.ep_rank
    return 1, 0
