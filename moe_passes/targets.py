"""Targets for ``moe-passes diff``: a model plus example inputs.

A target is either a preset name or ``package.module:function`` returning
``(model_or_fn, example_inputs)``. The built-in ``moe_stack`` preset (stacked
``SparseMoeBlock``s + the stacked balancing and z-losses) is the smallest
real input; other preset names go to the reference model,
``models.interns1_vl.preset(name)`` (``tiny``, ``tiny-vl``, ...), trained on
random token ids with labels.

The diff CLI runs on one process with the *fake* process group, whose
all-to-all hallucinates data (every rank "receives" what rank 0 would): the
shapes stay consistent as long as rank 0's experts get at least one token,
which random router weights and a few tokens give in practice.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

BUILTIN_PRESETS = ("moe_stack",)


@dataclass
class Target:
    """What the CLI compiles: ``fn(*example_inputs)`` returns a scalar loss."""

    name: str
    fn: Callable[..., Any]
    example_inputs: list[Any]


class MoEStack(nn.Module):
    """A small stack of residual MoE blocks with the stacked router losses: the passes' smallest real input."""

    def __init__(
        self,
        num_layers: int = 2,
        hidden_size: int = 16,
        intermediate_size: int = 32,
        num_experts: int = 4,
        top_k: int = 2,
        group_routing: bool = False,
        ep_group: dist.ProcessGroup | None = None,
        aux_coef: float = 0.01,
        z_coef: float = 0.001,
    ) -> None:
        super().__init__()
        from models.interns1_vl.moe import SparseMoeBlock

        self.layers = nn.ModuleList(
            SparseMoeBlock(hidden_size, intermediate_size, num_experts, top_k, group_routing=group_routing, ep_group=ep_group)
            for _ in range(num_layers)
        )
        self.num_experts, self.top_k = num_experts, top_k
        self.aux_coef, self.z_coef = aux_coef, z_coef
        for p in self.parameters():
            nn.init.normal_(p, std=0.2)

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        from models.interns1_vl.losses import load_balancing_loss, router_z_loss

        logits = []
        for layer in self.layers:
            out = layer(x)
            x = x + out.hidden_states
            logits.append(out.router_logits)
        main = torch.nn.functional.mse_loss(x, target)
        aux = load_balancing_loss(tuple(logits), self.num_experts, self.top_k)
        z = router_z_loss(tuple(logits))
        return main + self.aux_coef * aux + self.z_coef * z


def ep_group_or_none() -> dist.ProcessGroup | None:
    return dist.group.WORLD if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None


def moe_stack(seed: int = 0, batch: int = 2, seq: int = 4, **kwargs: Any) -> Target:
    """Built-in preset: 2 MoE layers, 4 experts, top-2, EP over the default group when there is one."""
    torch.manual_seed(seed)
    group = ep_group_or_none()
    model = MoEStack(ep_group=group, **kwargs)
    hidden = model.layers[0].hidden_size
    x = torch.randn(batch, seq, hidden, requires_grad=True)
    target = torch.randn(batch, seq, hidden)
    return Target("moe_stack", model, [x, target])


def _reference_model_preset(name: str) -> Target:
    """``models.interns1_vl.preset(name)``: the reference model, loss on random token ids."""
    try:
        ref = importlib.import_module("models.interns1_vl")
        preset = getattr(ref, "preset")
        presets = sorted(getattr(ref, "PRESETS"))
    except (ImportError, AttributeError) as e:
        raise ValueError(f"unknown preset {name!r}: built-in presets are {list(BUILTIN_PRESETS)} and the reference model is not importable ({e})") from e
    if name not in presets:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted([*BUILTIN_PRESETS, *presets])}")
    torch.manual_seed(0)
    config = preset(name)
    model = ref.InternS1VLForConditionalGeneration(config, ep_group=ep_group_or_none())
    ids = torch.randint(0, config.text.vocab_size, (2, 8))

    def loss_fn(input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return model(input_ids, labels=labels).loss

    return Target(name, loss_fn, [ids, ids.clone()])


def resolve_target(spec: str) -> Target:
    """``preset`` name or ``package.module:function``; a bad spec raises ValueError saying why."""
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ValueError(f"cannot import target module {module_name!r}: {e}") from e
        factory = getattr(module, attr, None)
        if not callable(factory):
            raise ValueError(f"target {spec!r}: module {module_name!r} has no callable {attr!r}")
        produced = factory()
        if isinstance(produced, Target):
            return produced
        try:
            fn, inputs = produced
        except (TypeError, ValueError) as e:
            raise ValueError(f"target {spec!r} must return (model, example_inputs), got {type(produced).__name__}") from e
        return Target(spec, fn, list(inputs))
    if spec in BUILTIN_PRESETS:
        return moe_stack()
    return _reference_model_preset(spec)
