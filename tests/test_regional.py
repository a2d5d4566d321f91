"""Regional compile: every block of one class reuses one compiled graph; loss and every gradient equal eager's."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from moe_passes.models.interns1_vl import InternS1VLConfig, InternS1VLForConditionalGeneration
from moe_passes.models.interns1_vl.losses import load_balancing_loss
from moe_passes.models.interns1_vl.moe import SparseMoeBlock
from moe_passes.models.interns1_vl.text import DecoderLayer, RMSNorm
from moe_passes.regional import compile_regions, find_regions

HIDDEN, EXPERTS, TOP_K = 16, 8, 2


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = RMSNorm(HIDDEN)
        self.mlp = SparseMoeBlock(HIDDEN, 8, EXPERTS, TOP_K)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.mlp(self.norm(h))
        return h + out.hidden_states, out.router_logits


class Stack(nn.Module):
    def __init__(self, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Layer() for _ in range(layers))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logits = []
        for layer in self.layers:
            h, layer_logits = layer(h)
            logits.append(layer_logits)
        return h.square().mean() + 0.1 * load_balancing_loss(tuple(logits), EXPERTS, TOP_K)


def make_stack(layers: int) -> Stack:
    torch.manual_seed(0)
    model = Stack(layers)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    return model


def loss_and_grads(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(x)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same(compiled: nn.Module, eager: nn.Module, x: torch.Tensor) -> None:
    loss, grads = loss_and_grads(compiled, x)
    ref_loss, ref_grads = loss_and_grads(eager, x)
    torch.testing.assert_close(loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_find_regions_picks_the_layers_of_the_reference_model() -> None:
    model = InternS1VLForConditionalGeneration(InternS1VLConfig.tiny())
    names = [name for name, _ in find_regions(model)]
    text = [n for n in names if ".language_model.layers." in n]
    assert len(text) == model.config.text.num_hidden_layers
    assert all(isinstance(m, DecoderLayer) for n, m in find_regions(model) if n in text)
    assert not any(a != b and b.startswith(a + ".") for a in names for b in names)  # outermost only
    only = find_regions(model, block_types=(SparseMoeBlock,))
    assert only and all(isinstance(m, SparseMoeBlock) for _, m in only)


def test_nothing_to_compile_is_an_error() -> None:
    with pytest.raises(ValueError, match="no nn.ModuleList"):
        compile_regions(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no modules of type"):
        compile_regions(make_stack(1), block_types=(nn.Conv1d,))


def test_every_layer_reuses_one_graph_and_matches_eager() -> None:
    """4 layers, one Dynamo graph (AOT autograd, eager kernels): the later layers hit the first layer's cache entry."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    compiled_graphs: list[Any] = []

    def fw(gm: torch.fx.GraphModule, _: Any) -> Any:
        compiled_graphs.append(gm)
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    eager = make_stack(4)
    model = copy.deepcopy(eager)
    names = compile_regions(model, aot_autograd(fw_compiler=fw, bw_compiler=lambda gm, _: make_boxed_func(gm.forward)), fullgraph=True)
    assert names == [f"layers.{i}" for i in range(4)]
    x = torch.randn(1, 10, HIDDEN, requires_grad=True)
    assert_same(model, eager, x)
    assert len(compiled_graphs) == 1, f"{len(compiled_graphs)} forward graphs for 4 identical layers"
    assert_same(model, eager, torch.randn(1, 10, HIDDEN, requires_grad=True))  # fresh inputs, no recompile
    assert len(compiled_graphs) == 1
    torch._dynamo.reset()


@pytest.mark.slow
def test_domino_backend_with_default_passes_compiles_one_graph_for_all_layers() -> None:
    """The moe_passes backend (default passes, Inductor) under regional compile: one report, eager's loss and gradients."""
    from moe_passes import make_backend

    torch._dynamo.reset()
    eager = make_stack(3)
    model = copy.deepcopy(eager)
    backend = make_backend()
    compile_regions(model, backend, block_types=(Layer,), fullgraph=True)
    assert_same(model, eager, torch.randn(1, 10, HIDDEN, requires_grad=True))
    assert len(backend.reports) == 1, backend.reports
    ran = [r["name"] for r in backend.reports[0]["pre_grad"]]
    assert sorted(ran) == sorted(backend.config.passes)
    torch._dynamo.reset()


class _AuxBackend:
    """An eager AOT backend that looks like a DominoBackend carrying the aux-loss pass (``config.passes``)
    and records the Dynamo graphs it is handed."""

    def __init__(self) -> None:
        from types import SimpleNamespace

        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        self.config = SimpleNamespace(passes=("layerwise_aux_loss",))
        self.graphs: list[torch.fx.GraphModule] = []
        self._aot = aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm.forward),
                                 bw_compiler=lambda gm, _: make_boxed_func(gm.forward))

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        self.graphs.append(gm)
        return self._aot(gm, example_inputs)


class LossStack(Stack):
    """``Stack`` whose forward finds its aux loss by attribute lookup on ``LOSSES`` (as a modeling module's
    forward finds a module-level function)."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logits = []
        for layer in self.layers:
            h, layer_logits = layer(h)
            logits.append(layer_logits)
        return h.square().mean() + 0.1 * LOSSES.aux(tuple(logits))


def _aux(logits: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return load_balancing_loss(logits, EXPERTS, TOP_K)


LOSSES = type("Losses", (), {"aux": staticmethod(_aux)})


def test_functions_are_compiled_with_the_same_backend_and_no_warning(caplog: pytest.LogCaptureFixture) -> None:
    """``functions=`` compiles the aux-loss function where the model looks it up: the backend sees a graph
    holding the stacked loss (the ``cat`` of every layer's logits), loss and grads equal eager's, no warning."""
    torch._dynamo.reset()
    eager = make_stack(3)
    model = LossStack(3)
    model.load_state_dict(eager.state_dict())
    backend = _AuxBackend()
    try:
        with caplog.at_level("WARNING", logger="moe_passes.regional"):
            names = compile_regions(model, backend, block_types=(Layer,), functions=[(LOSSES, "aux")], fullgraph=True)
        assert names == ["layers.0", "layers.1", "layers.2", "Losses.aux"]
        assert getattr(LOSSES.aux, "_torchdynamo_orig_callable", None) is not None
        assert not [r for r in caplog.records if "layerwise_aux_loss" in r.getMessage()], caplog.text
        assert_same(model, eager, torch.randn(1, 10, HIDDEN, requires_grad=True))
        loss_graphs = [g for g in backend.graphs if any(n.target in (torch.cat, torch.ops.aten.cat.default) for n in g.graph.nodes)]
        assert len(backend.graphs) == 2 and len(loss_graphs) == 1, [g.graph for g in backend.graphs]
        again = compile_regions(model, backend, block_types=(Layer,), functions=[(LOSSES, "aux")], fullgraph=True)
        assert again == names and LOSSES.aux._torchdynamo_orig_callable is _aux  # compiled once, not twice
    finally:
        LOSSES.aux = staticmethod(_aux)
        torch._dynamo.reset()


def test_aux_loss_backend_without_functions_warns_and_bad_function_is_an_error(caplog: pytest.LogCaptureFixture) -> None:
    backend = _AuxBackend()
    with caplog.at_level("WARNING", logger="moe_passes.regional"):
        compile_regions(make_stack(1), backend, block_types=(Layer,))
    assert "aux loss stays stacked and eager" in caplog.text
    with pytest.raises(ValueError, match="Losses.missing is not a function"):
        compile_regions(make_stack(1), backend, block_types=(Layer,), functions=[(LOSSES, "missing")])
