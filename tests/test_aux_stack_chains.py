"""A loss that stacks per-layer *derived* values (issue 23): ``torch.stack([softmax(l) for l in logits])`` and
``F.one_hot(torch.stack([topk(l).indices for l in logits])).sum(2)``. The pass computes the chain on the stack
of the logits instead (``fx/aux_loss/stack_chains.py``: the same numbers, row by row), then rewrites the
stacked loss per layer; loss and every gradient equal the model run eagerly. Where no rewrite follows, the
hoist is undone: the graph is left exactly as it was."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.aux_helpers import PassThenEager, distance, loss_and_grads

H, E, K, LAYERS, T = 16, 8, 2, 3, 12


def stacked_softmax_loss(logits: list[torch.Tensor]) -> torch.Tensor:
    probs = torch.stack([F.softmax(lg, dim=-1) for lg in logits])                # [L, T, E]
    idx = torch.stack([torch.topk(lg, K, dim=-1).indices for lg in logits])      # [L, T, K]
    mask = F.one_hot(idx, E).sum(2)                                             # [L, T, E]
    return E * (mask.float().mean(1) * probs.mean(1)).sum() / len(logits)


def max_over_layers_loss(logits: list[torch.Tensor]) -> torch.Tensor:
    """A max across layers is not a sum of per-layer parts: refused, so the per-layer chains must stay as written."""
    probs = torch.stack([F.softmax(lg, dim=-1) for lg in logits])
    return probs.amax(dim=0).sum()


class Routed(nn.Module):
    def __init__(self, loss: str) -> None:
        super().__init__()
        self.gates = nn.ModuleList(nn.Linear(H, E, bias=False) for _ in range(LAYERS))
        self.proj = nn.ModuleList(nn.Linear(H, H) for _ in range(LAYERS))
        self.loss = {"stacked_softmax": stacked_softmax_loss, "max_over_layers": max_over_layers_loss}[loss]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = []
        for gate, proj in zip(self.gates, self.proj):
            lg = gate(x)
            weights, _ = lg.softmax(dim=-1).topk(K, dim=-1)  # the model's own routing
            x = x + weights.sum(-1, keepdim=True) * torch.tanh(proj(x))
            logits.append(lg)
        return x.square().mean() + 0.05 * self.loss(logits)


@pytest.mark.parametrize("loss", ["stacked_softmax", "max_over_layers"])
def test_stack_of_per_layer_chains(loss: str) -> None:
    torch.manual_seed(0)
    model = Routed(loss)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(1))
    ref = loss_and_grads(model, lambda: model(x))
    backend = PassThenEager()
    compiled_code: list[str] = []
    run = backend.__call__

    def keep_code(gm: torch.fx.GraphModule, inputs: list) -> object:
        out = run(gm, inputs)
        compiled_code.append(gm.code)
        return out

    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend=keep_code, fullgraph=True)
        got = loss_and_grads(model, lambda: compiled(x))
    finally:
        torch._dynamo.reset()
    dloss, dgrad = distance(ref, got)
    assert dloss <= 1e-6 and dgrad <= 1e-5, (dloss, dgrad)
    (result,) = backend.results
    if loss == "stacked_softmax":
        assert result.changed and result.stats["layers"] == LAYERS, result.as_dict()
        assert any("computed on the stack of the router logits" in m for m in result.matched), result.matched
    else:
        assert not result.changed, result.as_dict()
        assert result.skipped, result.as_dict()
        code = compiled_code[0]
        assert code.count("aten.softmax") == 2 * LAYERS and "aten.stack.default(" in code, code  # as written


def test_a_returned_stack_of_the_routers_choices_is_not_hoisted_and_the_loss_still_rewritten() -> None:
    """The model returns ``torch.stack`` of each layer's selected experts (for logging) and its loss is the plain
    ``torch.cat`` form: the returned stack is left alone (it exists anyway), and the loss is rewritten."""

    class Logged(Routed):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits, chosen = [], []
            for gate, proj in zip(self.gates, self.proj):
                lg = gate(x)
                weights, idx = lg.softmax(dim=-1).topk(K, dim=-1)
                x = x + weights.sum(-1, keepdim=True) * torch.tanh(proj(x))
                logits.append(lg)
                chosen.append(idx)
            probs = torch.cat(logits).softmax(dim=-1)
            aux = E * (F.one_hot(probs.topk(K, dim=-1).indices, E).sum(1).float().mean(0) * probs.mean(0)).sum()
            return x.square().mean() + 0.05 * aux, torch.stack(chosen)

    torch.manual_seed(0)
    model = Logged("stacked_softmax")
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(2))
    backend = PassThenEager()
    torch._dynamo.reset()
    try:
        loss, chosen = torch.compile(model, backend=backend, fullgraph=True)(x)
    finally:
        torch._dynamo.reset()
    ref_loss, ref_chosen = model(x)
    assert torch.equal(chosen, ref_chosen) and torch.allclose(loss, ref_loss, rtol=1e-6, atol=1e-7)
    (result,) = backend.results
    assert result.changed and result.stats["layers"] == LAYERS, result.as_dict()
    assert not any("computed on the stack" in m for m in result.matched), result.matched
