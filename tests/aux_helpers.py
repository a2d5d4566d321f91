"""Helpers shared by the aux-loss test files (moved out of test_aux_loss_transformers.py: tests import
helpers, never other test modules)."""

from __future__ import annotations

import logging
from typing import Any, Callable

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from moe_passes.fx.aux_loss import LayerwiseAuxLossPass
from moe_passes.pipeline.pass_base import PassResult
from moe_passes.testing import run_pass
from tests.aux_models import seeded, tiny_qwen3_vl_moe

log = logging.getLogger(__name__)


transformers = pytest.importorskip("transformers")


E, K, H, LAYERS = 4, 2, 16, 2


class PassThenEager:
    """Backend: the pass on Dynamo's graph (re-traced to canonical ATen), then run as Python."""

    def __init__(self) -> None:
        self.results: list[PassResult] = []

    def __call__(self, gm: fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        self.results.append(run_pass(LayerwiseAuxLossPass(), gm))
        return gm.forward


def loss_and_grads(model: nn.Module, step: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = step()
    loss.backward()
    return loss.detach().float(), {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}


def distance(ref: tuple[torch.Tensor, dict], new: tuple[torch.Tensor, dict]) -> tuple[float, float]:
    """(|dloss|, max over parameters of max|dgrad| / max|grad|)."""
    assert ref[1].keys() == new[1].keys()
    rel = 0.0
    for name, r in ref[1].items():
        rel = max(rel, float((new[1][name] - r).abs().max()) / (float(r.abs().max()) + 1e-12))
    return float((new[0] - ref[0]).abs()), rel


def report_row(what: str, result: dict[str, Any], d: tuple[float, float], dtype: torch.dtype) -> str:
    line = (
        f"AUXROW | {what} | {'applied' if result['changed'] else 'skipped: ' + '; '.join(s['reason'] for s in result['skipped'])} "
        f"| {d[0]:.2e} | {d[1]:.2e} | {str(dtype).replace('torch.', '')}"
    )
    print(line)
    log.info(line)
    return line


def _tiny(kind: str) -> nn.Module:
    common = dict(
        vocab_size=64,
        hidden_size=H,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        output_router_logits=True,
        router_aux_loss_coef=0.05,
    )
    if kind == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(
            intermediate_size=32,
            moe_intermediate_size=8,
            num_experts=E,
            num_experts_per_tok=K,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            **common,
        )
        cls = transformers.Qwen3MoeForCausalLM
    elif kind == "mixtral":
        cfg = transformers.MixtralConfig(intermediate_size=8, num_local_experts=E, num_experts_per_tok=K, **common)
        cls = transformers.MixtralForCausalLM
    elif kind == "olmoe":
        common.pop("head_dim")
        cfg = transformers.OlmoeConfig(intermediate_size=8, num_experts=E, num_experts_per_tok=K, **common)
        cls = transformers.OlmoeForCausalLM
    elif kind == "qwen3_vl_moe":
        model = tiny_qwen3_vl_moe()
        model.config.text_config.output_router_logits = True
        return model
    else:
        raise ValueError(kind)
    cfg._attn_implementation = "eager"
    return seeded(cls, cfg)


def hf_step(model: nn.Module, padded: bool) -> Callable[[nn.Module], torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 59, (2, 6), generator=g)
    mask = torch.ones(2, 6, dtype=torch.long)
    if padded:
        mask[0, 4:] = 0

    def step(m: nn.Module) -> torch.Tensor:
        return m(input_ids=ids, attention_mask=mask, labels=ids, output_router_logits=True).loss

    return step


def load_balancing_loss_func_4x(
    gate_logits: Any, num_experts: int | None = None, top_k: int = 2, attention_mask: torch.Tensor | None = None
) -> Any:
    """transformers 4.x ``load_balancing_loss_func`` (Mixtral / Qwen2-MoE / Qwen3-MoE), its public form."""
    if gate_logits is None or not isinstance(gate_logits, tuple):
        return 0
    if isinstance(gate_logits, tuple):
        compute_device = gate_logits[0].device
        concatenated_gate_logits = torch.cat([layer_gate.to(compute_device) for layer_gate in gate_logits], dim=0)
    routing_weights = torch.nn.functional.softmax(concatenated_gate_logits, dim=-1)
    _, selected_experts = torch.topk(routing_weights, top_k, dim=-1)
    expert_mask = torch.nn.functional.one_hot(selected_experts, num_experts)
    if attention_mask is None:
        tokens_per_expert = torch.mean(expert_mask.float(), dim=0)
        router_prob_per_expert = torch.mean(routing_weights, dim=0)
    else:
        batch_size, sequence_length = attention_mask.shape
        num_hidden_layers = concatenated_gate_logits.shape[0] // (batch_size * sequence_length)
        expert_attention_mask = (
            attention_mask[None, :, :, None, None]
            .expand((num_hidden_layers, batch_size, sequence_length, top_k, num_experts))
            .reshape(-1, top_k, num_experts)
            .to(compute_device)
        )
        tokens_per_expert = torch.sum(expert_mask.float() * expert_attention_mask, dim=0) / torch.sum(expert_attention_mask, dim=0)
        router_per_expert_attention_mask = (
            attention_mask[None, :, :, None]
            .expand((num_hidden_layers, batch_size, sequence_length, num_experts))
            .reshape(-1, num_experts)
            .to(compute_device)
        )
        router_prob_per_expert = torch.sum(routing_weights * router_per_expert_attention_mask, dim=0) / torch.sum(
            router_per_expert_attention_mask, dim=0
        )
    overall_loss = torch.sum(tokens_per_expert * router_prob_per_expert.unsqueeze(0))
    return overall_loss * num_experts


def float_softmax_loss(gate_logits: tuple[torch.Tensor, ...], num_experts: int, top_k: int, attention_mask: Any = None) -> torch.Tensor:
    """The loss softmax over ``cat(...).float()`` (the router's softmax takes ``dtype=float``)."""
    cat = torch.cat(gate_logits, dim=0)
    probs = F.softmax(cat.float(), dim=-1)
    _, sel = torch.topk(probs, top_k, dim=-1)
    counts = F.one_hot(sel, num_experts).float().sum(dim=0) / cat.shape[0]
    return (counts * probs.mean(dim=0).unsqueeze(0)).sum() * num_experts


def stack_loss(gate_logits: tuple[torch.Tensor, ...], num_experts: int, top_k: int, attention_mask: Any = None) -> torch.Tensor:
    """``torch.stack`` of the layers, flattened, softmax in fp32."""
    stacked = torch.stack(gate_logits, dim=0)
    probs = F.softmax(stacked.reshape(-1, num_experts), dim=-1, dtype=torch.float32)
    _, sel = torch.topk(probs, top_k, dim=-1)
    counts = F.one_hot(sel, num_experts).float().mean(dim=0)
    return (counts * probs.mean(dim=0)).sum() * num_experts


def square_z_loss(gate_logits: tuple[torch.Tensor, ...], num_experts: int, top_k: int, attention_mask: Any = None) -> torch.Tensor:
    """A ``torch.square`` z-loss over ``cat(...)`` with ``.float()``."""
    z = torch.logsumexp(torch.cat(gate_logits, dim=0).float(), dim=-1)
    return torch.square(z).mean()


class TinyRouterStack(nn.Module):
    """``LAYERS`` dense-MoE layers: linear router, fp32 softmax, top-k, renormalised weights, every expert
    evaluated and weighted by a scatter of the top-k weights (no dispatch: compiles fast)."""

    def __init__(self, loss: Callable[..., Any], float_router: bool = False) -> None:
        super().__init__()
        self.gates = nn.ModuleList(nn.Linear(H, E, bias=False) for _ in range(LAYERS))
        self.experts = nn.ParameterList(nn.Parameter(torch.randn(E, H, H) * 0.3) for _ in range(LAYERS))
        self.loss = loss
        self.float_router = float_router

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        logits_all = []
        h = x.reshape(-1, H)
        for gate, w in zip(self.gates, self.experts):
            logits = gate(h)
            probs = F.softmax(logits.float(), dim=-1) if self.float_router else F.softmax(logits, dim=1, dtype=torch.float)
            top, sel = torch.topk(probs, K, dim=-1)
            top = (top / top.sum(-1, keepdim=True)).to(h.dtype)
            dense = torch.zeros(h.shape[0], E, dtype=h.dtype).scatter(1, sel, top)
            h = h + torch.einsum("te,teh->th", dense, torch.einsum("th,ehk->tek", h, w))
            logits_all.append(logits)
        return h.float().pow(2).mean() + 0.1 * self.loss(tuple(logits_all), E, K, mask)


def _stack_model(loss: Callable[..., Any], dtype: torch.dtype, float_router: bool = False) -> TinyRouterStack:
    torch.manual_seed(1)
    return TinyRouterStack(loss, float_router).to(dtype)


def _stack_inputs(dtype: torch.dtype, padded: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 6, H, generator=g).to(dtype)
    if not padded:
        return x, None
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 3:] = 0
    return x, mask


FORMS = {
    "4.x verbatim, padded": (load_balancing_loss_func_4x, True, False),
    "4.x verbatim": (load_balancing_loss_func_4x, False, False),
    ".float() softmax": (float_softmax_loss, False, True),
    "torch.stack": (stack_loss, False, False),
    "torch.square z-loss": (square_z_loss, False, False),
}
