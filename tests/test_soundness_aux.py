"""Soundness corpus of ``layerwise_aux_loss``: mutants that must never come out silently wrong.

Each mutant is a tiny MoE stack whose router or loss differs from the reference in one way
that a pattern-matcher can get wrong. For each: the pass either rewrites and the loss and
every gradient equal the unmodified model (fp32), or leaves the loss alone with a reason.
Never a changed graph with other numbers, never ``changed=False`` with nothing said.
Every future soundness bug of the aux pass adds its mutant here.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moe_passes.models.interns1_vl.losses import load_balancing_loss, router_z_loss
from tests.aux_helpers import LAYERS, E, H, K, PassThenEager, distance, loss_and_grads, report_row

log = logging.getLogger(__name__)


class MutantStack(nn.Module):
    """Dense-MoE layers (linear router, softmax, top-k, weighted experts); the router's details and
    the loss come from the mutant."""

    def __init__(self, router: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                 loss: Callable[[tuple[torch.Tensor, ...], torch.Tensor | None], torch.Tensor]) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.gates = nn.ModuleList(nn.Linear(H, E, bias=False) for _ in range(LAYERS))
        self.experts = nn.ParameterList(nn.Parameter(torch.randn(E, H, H) * 0.3) for _ in range(LAYERS))
        self.router, self.loss = router, loss

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = x.reshape(-1, H)
        logits_all = []
        for gate, w in zip(self.gates, self.experts):
            logits = gate(h)
            top, sel = self.router(logits)
            dense = torch.zeros(h.shape[0], E, dtype=h.dtype).scatter(1, sel, top)
            h = h + torch.einsum("te,teh->th", dense, torch.einsum("th,ehk->tek", h, w))
            logits_all.append(logits)
        return h.pow(2).mean() + 0.1 * self.loss(tuple(logits_all), mask)


def plain_router(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    probs = F.softmax(logits, dim=-1, dtype=torch.float)
    top, sel = torch.topk(probs, K, dim=-1)
    return top / top.sum(-1, keepdim=True), sel


def clamp_after_softmax(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The router writes its logits in place after its softmax: the loss reads the clamped logits."""
    out = plain_router(logits)
    logits.clamp_(-0.3, 0.3)
    return out


def mul_after_softmax(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = plain_router(logits)
    logits.mul_(0.5)
    return out


def router_softmax_over_tokens(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The router normalises over tokens (dim 0): not the loss's softmax, never to be reused."""
    probs = F.softmax(logits, dim=0, dtype=torch.float)
    top, sel = torch.topk(probs, K, dim=-1)
    return top, sel


def reference_losses(logits: tuple[torch.Tensor, ...], mask: torch.Tensor | None) -> torch.Tensor:
    return load_balancing_loss(logits, E, K, mask) + 0.1 * router_z_loss(logits, mask)


def loss_softmax_over_tokens(logits: tuple[torch.Tensor, ...], mask: torch.Tensor | None) -> torch.Tensor:
    """A balancing-style loss whose softmax runs over the stacked token dim (mixes layers)."""
    probs = F.softmax(torch.cat(logits, dim=0), dim=0)
    return (probs.mean(dim=0) * probs.sum(dim=0)).sum()


def loss_softmax_over_tokens_neg(logits: tuple[torch.Tensor, ...], mask: torch.Tensor | None) -> torch.Tensor:
    probs = F.softmax(torch.cat(logits, dim=0), dim=-2)
    return probs.pow(2).sum()


def max_reduction_loss(logits: tuple[torch.Tensor, ...], mask: torch.Tensor | None) -> torch.Tensor:
    """Not the balancing loss: the max over tokens of the router probabilities."""
    probs = F.softmax(torch.cat(logits, dim=0), dim=-1)
    return probs.amax(dim=0).sum() + load_balancing_loss(logits, E, K, mask)


def median_z_loss(logits: tuple[torch.Tensor, ...], mask: torch.Tensor | None) -> torch.Tensor:
    """A z-loss with a median over tokens: not a sum, cannot be split by layer."""
    return torch.logsumexp(torch.cat(logits, dim=0), dim=-1).pow(2).median() + load_balancing_loss(logits, E, K, mask)


def loop_form_after_clamp(logits: tuple[torch.Tensor, ...], mask: torch.Tensor | None) -> torch.Tensor:
    """The per-layer loop form (transformers 5) over logits clamped in place after the router."""
    counts, probs, rows = 0, 0, 0
    for layer_logits in logits:
        p = F.softmax(layer_logits.to(layer_logits.device), dim=-1)
        _, sel = torch.topk(p, K, dim=-1)
        counts = counts + torch.histc(sel.reshape(-1).float(), bins=E, min=0, max=E)
        probs = probs + p.float().sum(dim=0)
        rows = rows + p.shape[0]
    return (counts / rows * (probs / rows)).sum() * E


# (name, router, loss, padded, expected): "exact" = must rewrite and match; "skip" = must leave alone
# with a reason containing the given text.
MUTANTS: list[tuple[str, Any, Any, bool, tuple[str, str]]] = [
    (
        "in-place clamp_ of router logits after softmax",
        clamp_after_softmax,
        reference_losses,
        True,
        ("exact", "writes the router logits in place"),
    ),
    (
        "in-place mul_ of router logits after softmax",
        mul_after_softmax,
        reference_losses,
        False,
        ("exact", "writes the router logits in place"),
    ),
    ("router softmax over tokens (dim 0)", router_softmax_over_tokens, reference_losses, False, ("exact", "other numbers")),
    ("loss softmax over tokens (dim 0)", plain_router, loss_softmax_over_tokens, False, ("skip", "along the stacked row (token) dim")),
    ("loss softmax over tokens (dim -2)", plain_router, loss_softmax_over_tokens_neg, False, ("skip", "along the stacked row (token) dim")),
    ("max over tokens (not the balancing loss)", plain_router, max_reduction_loss, False, ("skip", "not a sum")),
    ("median z-loss", plain_router, median_z_loss, True, ("skip", "not a sum")),
    ("loop form after in-place clamp_", clamp_after_softmax, loop_form_after_clamp, False, ("exact", "writes the router logits in place")),
]


@pytest.mark.parametrize("name, router, loss, padded, expected", MUTANTS, ids=[m[0] for m in MUTANTS])
def test_mutant_is_exact_or_skipped_with_a_reason(name: str, router: Any, loss: Any, padded: bool, expected: tuple[str, str]) -> None:
    model = MutantStack(router, loss)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 6, H, generator=g)
    mask = None
    if padded:
        mask = torch.ones(2, 6, dtype=torch.long)
        mask[0, 4:] = 0
    ref = loss_and_grads(model, lambda: model(x, mask))
    backend = PassThenEager()
    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        compiled = torch.compile(model, backend=backend, fullgraph=True)
        new = loss_and_grads(model, lambda: compiled(x, mask))
    torch._dynamo.reset()
    assert len(backend.results) == 1
    result = backend.results[0].as_dict()
    d = distance(ref, new)
    report_row(f"mutant: {name}", result, d, torch.float32)
    kind, text = expected
    assert d[0] <= 1e-5 and d[1] <= 1e-4, (name, d, result)  # never silently wrong, either way
    if kind == "exact":
        assert result["changed"], result
        assert any(text in m for m in result["matched"]), result
    else:
        assert not result["changed"] and result["skipped"], result
        assert any(text in s["reason"] for s in result["skipped"]), result
