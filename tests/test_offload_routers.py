"""``async_offload`` finds router tensors from data flow, whatever the model's names.

Specification (``moe_passes/fx/async_offload/routers.py``):
* a top-k routes when a value computed from its indices selects experts (feeds an all-to-all, grouped-GEMM
  offsets or split sizes, or indexes tokens / expert weights); its indices are the selected experts and its
  input, walked back through softmax/sigmoid/expert bias/casts/normalisation, gives the router logits;
* a router attribute named ``g``, a router computed in the compiled root module (no "moe" class, a plain
  matmul) and a DeepSeek-V3 sigmoid router with an expert bias and group-limited selection are offloaded,
  in Dynamo's torch IR and the canonical ATen IR alike, and the rewritten graph returns the same values;
* a top-k that routes nothing (a vocabulary top-k kept for logging) is never offloaded: its outputs are
  skipped with the reason and the source line of the top-k; with no router output at all, the reason says
  what was looked for and why each top-k-related output was rejected.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_leaves

import moe_passes
from moe_passes.config import BackendConfig
from moe_passes.fx.async_offload import AsyncOffloadPass, analyse_routers, classify
from moe_passes.harness.capture import capture_graphs
from moe_passes.ops.offload import OFFLOAD_WAIT
from moe_passes.pipeline.manager import copy_graph_module

H, E, K, T = 8, 4, 2, 6


def outputs(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in tree_leaves(gm.graph.output_node().args) if isinstance(n, fx.Node)]


def run_pass(gm: fx.GraphModule, targets: Any = "auto") -> tuple[fx.GraphModule, Any]:
    gm = copy_graph_module(gm)
    return gm, AsyncOffloadPass(BackendConfig(offload_targets=targets))(gm)


def graphs(model: nn.Module, x: torch.Tensor) -> dict[str, fx.GraphModule]:
    (torch_ir,) = capture_graphs(model, x)
    (aten_ir,) = capture_graphs(model, x, canonical=True)
    return {"torch": torch_ir.gm, "aten": aten_ir.gm, "inputs": torch_ir.example_inputs, "aten_inputs": aten_ir.example_inputs}


class Block(nn.Module):
    """An MoE layer written from scratch: the router is an attribute named ``g`` in a class with no "moe" in its
    name; experts are a per-row expert-weight gather ``w[eid]`` + ``bmm`` (no grouped GEMM, no all-to-all)."""

    def __init__(self) -> None:
        super().__init__()
        self.g = nn.Linear(H, E, bias=False)
        self.w_in = nn.Parameter(torch.randn(E, H, 2 * H) * 0.3)
        self.w_out = nn.Parameter(torch.randn(E, 2 * H, H) * 0.3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = x.reshape(-1, H)
        logits = self.g(x)
        w, idx = logits.softmax(-1).topk(K, dim=-1)
        eid = idx.reshape(-1)
        rows = x.repeat_interleave(K, dim=0)
        h = F.silu(torch.bmm(rows.unsqueeze(1), self.w_in[eid]))
        y = torch.bmm(h, self.w_out[eid]).squeeze(1).view(-1, K, H)
        return (y * w.unsqueeze(-1)).sum(1), logits, idx


class GNamed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.b = Block()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        y, logits, idx = self.b(x)
        return y.pow(2).mean(), logits.detach(), idx


class RootRouted(nn.Module):
    """Everything in the compiled root module: router ``x @ self.r.T`` (a matmul, no submodule), fp32 softmax,
    tokens sorted by expert (``argsort`` + ``x[order // K]``), counts by ``scatter_add`` into zeros,
    per-row expert weights, combine by ``index_copy``."""

    def __init__(self) -> None:
        super().__init__()
        self.r = nn.Parameter(torch.randn(E, H))
        self.w = nn.Parameter(torch.randn(E, H, H) * 0.3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        x = x.reshape(-1, H)
        logits = x @ self.r.T
        top_w, top_i = torch.topk(torch.softmax(logits.float(), dim=-1), K)
        flat = top_i.flatten()
        order = flat.argsort(stable=True)
        counts = torch.zeros(E, dtype=torch.long).scatter_add(0, flat, torch.ones_like(flat))
        y = torch.bmm(x[order // K].unsqueeze(1), self.w[flat[order]]).squeeze(1)
        out = torch.zeros_like(y).index_copy(0, order, y).view(-1, K, H)
        out = (out * top_w.unsqueeze(-1)).sum(1)
        return out.square().mean(), logits, top_i, counts


class SigmoidBiasRouted(nn.Module):
    """DeepSeek-V3 style: scores = sigmoid(logits); group-limited top-k over scores + expert bias; weights
    gathered from the scores by the chosen indices and normalised; tokens routed by ``argsort`` + gather."""

    experts, groups, topk_groups = 8, 4, 2

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(self.experts, H))
        self.register_buffer("e_score_correction_bias", torch.randn(self.experts) * 0.1)
        self.w = nn.Parameter(torch.randn(self.experts, H, H) * 0.3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = x.reshape(-1, H)
        n = x.shape[0]
        logits = F.linear(x, self.weight)
        scores = logits.sigmoid()
        choice = scores + self.e_score_correction_bias
        group_scores = choice.view(n, self.groups, -1).topk(2, dim=-1)[0].sum(-1)
        group_idx = torch.topk(group_scores, k=self.topk_groups, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(n, self.groups, self.experts // self.groups).reshape(n, -1)
        choice = choice.masked_fill(~score_mask.bool(), 0.0)
        idx = torch.topk(choice, k=K, dim=-1, sorted=False)[1]
        weights = scores.gather(1, idx)
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        flat = idx.flatten()
        order = flat.argsort(stable=True)
        y = torch.bmm(x[order // K].unsqueeze(1), self.w[flat[order]]).squeeze(1)
        out = torch.zeros_like(y).index_copy(0, order, y).view(n, K, H)
        return (out * weights.unsqueeze(-1)).sum(1).pow(2).mean(), logits, idx


class WithVocabTopk(nn.Module):
    """A real router plus a decoy: the top-5 tokens of a vocabulary head, returned for logging."""

    def __init__(self, with_router: bool = True) -> None:
        super().__init__()
        self.b = Block() if with_router else None
        self.head = nn.Linear(H, 32, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        loss = x.square().mean()
        router: tuple[torch.Tensor, ...] = ()
        if self.b is not None:
            y, logits, idx = self.b(x)
            x = x.reshape(-1, H) + y
            router = (logits.detach(), idx)
        probs = self.head(x).softmax(-1)
        top_p, top_tok = probs.topk(5, dim=-1)  # decoy top-k: logged, routes nothing
        picked = probs.gather(-1, top_tok)
        return (loss + x.square().mean(), *router, top_tok, top_p.detach(), picked.detach())


def _x() -> torch.Tensor:
    return torch.randn(2, T // 2, H, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def g_named() -> dict[str, Any]:
    torch.manual_seed(0)
    return graphs(GNamed(), _x())


@pytest.fixture(scope="module")
def root_routed() -> dict[str, Any]:
    torch.manual_seed(0)
    return graphs(RootRouted(), _x())


@pytest.fixture(scope="module")
def sigmoid_bias() -> dict[str, Any]:
    torch.manual_seed(0)
    return graphs(SigmoidBiasRouted(), _x())


def _check_offloaded(gm: fx.GraphModule, expected: list[str | None], inputs: list[Any]) -> Any:
    kinds = classify(gm.graph)
    assert [kinds.get(n) for n in outputs(gm)] == expected
    rewritten, result = run_pass(gm)
    offloaded = sum(k is not None for k in expected)
    assert result.changed and result.stats["offloaded"] == offloaded and not result.skipped, result.skipped
    assert sum(n.target is OFFLOAD_WAIT for n in outputs(rewritten)) == offloaded
    with torch.no_grad():
        want, got = tree_leaves(gm(*inputs)), tree_leaves(rewritten(*inputs))
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.device.type == "cpu" and torch.equal(a, b)
    return result


@pytest.mark.parametrize("ir", ["torch", "aten"])
def test_router_attribute_named_g_in_a_class_without_moe_is_offloaded(g_named: dict[str, Any], ir: str) -> None:
    gm = g_named[ir]
    result = _check_offloaded(gm, [None, "router_logits", "selected_experts"], g_named["inputs" if ir == "torch" else "aten_inputs"])
    (finding,) = analyse_routers(gm.graph).topks
    # The evidence is the per-row expert-weight gather, named by its source line in this file.
    assert finding.routes and "test_offload_routers.py:" in finding.evidence and "self.w_in[eid]" in finding.evidence
    assert {r["kind"] for r in result.stats["outputs"]} == {"router_logits", "selected_experts"}


@pytest.mark.parametrize("ir", ["torch", "aten"])
def test_router_computed_in_the_compiled_root_module_is_offloaded(root_routed: dict[str, Any], ir: str) -> None:
    gm = root_routed[ir]
    # Logits (a plain matmul at the root) and the top-k indices; the expert counts are neither.
    _check_offloaded(gm, [None, "router_logits", "selected_experts", None], root_routed["inputs" if ir == "torch" else "aten_inputs"])
    (finding,) = analyse_routers(gm.graph).topks
    assert "x[order // K]" in finding.evidence


@pytest.mark.parametrize("ir", ["torch", "aten"])
def test_sigmoid_router_with_expert_bias_and_group_limited_selection_is_offloaded(sigmoid_bias: dict[str, Any], ir: str) -> None:
    gm = sigmoid_bias[ir]
    _check_offloaded(gm, [None, "router_logits", "selected_experts"], sigmoid_bias["inputs" if ir == "torch" else "aten_inputs"])
    findings = analyse_routers(gm.graph).topks
    assert len(findings) == 3  # top-2 per group (values only), top groups, top experts
    group_values, group_idx, experts = findings
    assert [f.routes for f in findings] == [False, False, True]
    assert "values used, not its indices" in group_values.reason
    # The group top-k's indices only mask what the expert top-k ranks: the expert top-k decides.
    assert "they only shape what" in group_idx.reason and "torch.topk(choice" in group_idx.reason
    # The weights gathered from the scores prove nothing; the token gather does.
    assert "x[order // K]" in experts.evidence
    kinds = classify(gm.graph)
    assert kinds[experts.root] == "router_logits" and "F.linear(x, self.weight)" in experts.root.meta.get("stack_trace", "")


def test_a_vocabulary_topk_beside_a_router_is_not_offloaded_and_the_report_says_why() -> None:
    torch.manual_seed(0)
    (captured,) = capture_graphs(WithVocabTopk(), _x())
    gm, result = run_pass(captured.gm)
    assert result.matched and {r["kind"] for r in result.stats["outputs"]} == {"router_logits", "selected_experts"}
    assert [n.target is OFFLOAD_WAIT for n in outputs(gm)] == [False, True, True, False, False, False]
    skips = {s.region: s.reason for s in result.skipped}
    assert len(skips) == 2, skips
    (idx_region,) = [r for r in skips if r.endswith("(top-k indices)")]
    reason = skips[idx_region]
    assert reason.startswith("not a router output: the top-5 over 32 values at ")
    assert "test_offload_routers.py:" in reason and "probs.topk(5, dim=-1)" in reason  # the user's source line
    assert "routes nothing" in reason and "reads the scores the top-k ranked" in reason


@pytest.mark.parametrize("ir", ["torch", "aten"])
def test_with_only_a_decoy_topk_the_skip_says_what_was_looked_for_and_why_each_output_was_rejected(ir: str) -> None:
    torch.manual_seed(0)
    (captured,) = capture_graphs(WithVocabTopk(with_router=False), _x(), canonical=ir == "aten")
    offload = AsyncOffloadPass(BackendConfig())
    assert offload.trigger(captured.gm) is None
    _, result = run_pass(captured.gm)
    assert not result.changed
    graph_skip = result.skipped[0]
    assert graph_skip.region == "graph"
    assert graph_skip.reason.startswith("no router logits or selected experts among the graph outputs (looked for router logits")
    assert "outputs " in graph_skip.reason and "(top-k indices), " in graph_skip.reason
    assert "(top-k values) rejected: the top-5 over 32 values at " in graph_skip.reason
    assert "probs.topk(5, dim=-1)" in graph_skip.reason
    assert [s.region.split(" ", 1)[1] for s in result.skipped[1:]] == ["(top-k indices)", "(top-k values)"]


def test_balancing_loss_topk_is_not_a_router_and_the_layers_routers_are() -> None:
    """The stacked balancing loss top-k's its own softmax of every layer's logits and one-hots the indices:
    counting alone routes nothing, so it is reported as such and never labelled."""
    from moe_passes.models.stacks import MoEStack

    torch.manual_seed(0)
    (captured,) = capture_graphs(MoEStack(2, H, 16, E, K, returns="router", aux_coef=0.01), _x())
    findings = analyse_routers(captured.gm.graph).topks
    assert [f.routes for f in findings] == [True, True, False]
    assert "losses.py:" in findings[2].reason and "one_hot" in findings[2].reason
    _, result = run_pass(captured.gm)
    assert result.stats["offloaded"] == 4 and not result.skipped


def test_routers_whose_tensors_are_not_returned_are_named_in_the_skip() -> None:
    from moe_passes.models.stacks import MoEStack

    torch.manual_seed(0)
    (captured,) = capture_graphs(MoEStack(2, H, 16, E, K, returns="loss"), _x())
    _, result = run_pass(captured.gm)
    (skip,) = result.skipped
    assert "2 top-k(s) route experts here (the top-2 over 4 values at " in skip.reason
    assert "moe.py:" in skip.reason and "is a graph output" in skip.reason


class MaskLoop(nn.Module):
    """transformers 4.x style: ``one_hot`` expert mask, a Python loop over experts, ``torch.where`` picks the
    tokens of each expert, ``index_add_`` combines (data-dependent shapes: ``capture_dynamic_output_shape_ops``)."""

    def __init__(self) -> None:
        super().__init__()
        self.router_proj = nn.Linear(H, E, bias=False)
        self.experts = nn.ModuleList(nn.Linear(H, H) for _ in range(E))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = x.reshape(-1, H)
        router_logits = self.router_proj(x)
        routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        routing_weights, selected_experts = torch.topk(routing_weights, K, dim=-1)
        routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
        final = torch.zeros_like(x)
        expert_mask = F.one_hot(selected_experts, num_classes=E).permute(2, 1, 0)
        for e in range(E):
            idx, top_x = torch.where(expert_mask[e])
            current = self.experts[e](x[None, top_x].reshape(-1, H)) * routing_weights[top_x, idx, None]
            final.index_add_(0, top_x, current.to(x.dtype))
        return final.square().mean(), router_logits, selected_experts


def test_one_hot_where_expert_loop_router_is_offloaded() -> None:
    torch.manual_seed(0)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        (captured,) = capture_graphs(MaskLoop(), _x())
    kinds = classify(captured.gm.graph)
    assert [kinds.get(n) for n in outputs(captured.gm)] == [None, "router_logits", "selected_experts"]
    (finding,) = analyse_routers(captured.gm.graph).topks
    assert "x[None, top_x]" in finding.evidence
    _, result = run_pass(captured.gm)
    assert result.stats["offloaded"] == 2 and not result.skipped


class CountsOnly(nn.Module):
    """The top-k indices reach the rest of the step only through per-expert counts, used one way (``use``):
    exchanged by an all-to-all, as grouped-GEMM offsets, as split sizes, or only logged (a histogram)."""

    def __init__(self, use: str, group: Any = None) -> None:
        super().__init__()
        self.use, self.group = use, group
        self.r = nn.Parameter(torch.randn(E, H))
        self.w = nn.Parameter(torch.randn(E, H, H) * 0.3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from moe_passes.models.interns1_vl.grouped_mm import grouped_mm

        x = x.reshape(-1, H)
        logits = F.linear(x, self.r)
        idx = logits.topk(K, dim=-1).indices
        counts = F.one_hot(idx.flatten(), E).sum(0)
        rows = x.repeat_interleave(K, dim=0)
        if self.use == "all_to_all":
            from torch.distributed._functional_collectives import all_to_all_single

            received = all_to_all_single(counts, [E // 2] * 2, [E // 2] * 2, self.group)
            loss = rows.square().mean() + received.sum()
        elif self.use == "grouped_mm":
            loss = grouped_mm(rows, self.w, counts.cumsum(0)).square().mean()
        elif self.use == "split":
            parts = torch.split(rows, counts.tolist())
            loss = sum(p.square().sum() for p in parts) / rows.shape[0]
        else:  # "histogram": logged, routes nothing
            loss = rows.square().mean() + 0 * counts.sum()
        return loss, logits, idx


@pytest.mark.parametrize("ir", ["torch", "aten"])
@pytest.mark.parametrize("use", ["all_to_all", "grouped_mm", "split", "histogram"])
def test_each_kind_of_expert_selection_alone_proves_routing_and_a_histogram_does_not(use: str, ir: str) -> None:
    from tests.distributed import fake_group

    torch.manual_seed(0)
    if use == "all_to_all":
        with fake_group(2) as group:
            (captured,) = capture_graphs(CountsOnly(use, group), _x(), canonical=ir == "aten")
    else:
        (captured,) = capture_graphs(CountsOnly(use), _x(), canonical=ir == "aten")
    (finding,) = analyse_routers(captured.gm.graph).topks
    kinds = classify(captured.gm.graph)
    labels = [kinds.get(n) for n in outputs(captured.gm)]
    if use == "histogram":
        assert not finding.routes and labels == [None, None, None]
        assert "its indices only reach" in finding.reason and "one_hot" in finding.reason
        _, result = run_pass(captured.gm)
        assert not result.changed
        assert [s.region.split(" ", 1)[1] for s in result.skipped[1:]] == ["(values ranked by a top-k)", "(top-k indices)"]
        return
    expected = {"all_to_all": "they feed the all-to-all at", "grouped_mm": "they give the grouped-GEMM offsets at",
                "split": "they give the split sizes at"}[use]
    assert finding.routes and expected in finding.evidence, finding.evidence
    assert labels == [None, "router_logits", "selected_experts"]


@torch.library.custom_op("offload_routers_test::fused_experts", mutates_args=())
def fused_experts(x: torch.Tensor, w: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """A fused MoE kernel as vendors ship them: tokens, expert weights, the router's choice in; combined rows out."""
    return torch.einsum("tk,tkh->th", topk_weights, torch.einsum("th,tkhg->tkg", x, w[topk_ids]))


@fused_experts.register_fake
def _(x: torch.Tensor, w: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[-1])


class FusedKernel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.route = nn.Linear(H, E, bias=False)
        self.w = nn.Parameter(torch.randn(E, H, H) * 0.3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = x.reshape(-1, H)
        logits = self.route(x)
        weights, ids = torch.topk(logits.softmax(-1), K)
        return fused_experts(x, self.w, ids, weights).pow(2).mean(), logits.detach(), ids


@pytest.mark.parametrize("ir", ["torch", "aten"])
def test_indices_handed_to_a_fused_expert_kernel_with_the_tokens_route(ir: str) -> None:
    torch.manual_seed(0)
    (captured,) = capture_graphs(FusedKernel(), _x(), canonical=ir == "aten")
    (finding,) = analyse_routers(captured.gm.graph).topks
    assert finding.routes and "opaque op offload_routers_test::fused_experts" in finding.evidence
    _, result = run_pass(captured.gm)
    assert result.stats["offloaded"] == 2 and not result.skipped


def test_transformers_mixtral_as_installed_router_logits_are_found_and_its_loss_topk_is_not_a_router() -> None:
    """transformers' own Mixtral (``output_router_logits=True``): the forward graph returns every layer's router
    logits, found by what its top-k's indices do (``torch.where`` rows of the hidden states); the loss graph's
    balancing-loss top-k routes nothing and is reported so, naming transformers' source line."""
    pytest.importorskip("transformers")
    from tests.aux_helpers import LAYERS, _tiny

    model = _tiny("mixtral")
    ids = torch.randint(0, 59, (2, 6), generator=torch.Generator().manual_seed(3))
    forward, loss = capture_graphs(lambda ids: model(input_ids=ids, output_router_logits=True), ids)
    _, result = run_pass(forward.gm)
    assert result.stats["offloaded"] == LAYERS and {r["kind"] for r in result.stats["outputs"]} == {"router_logits"}
    _, result = run_pass(loss.gm)
    assert not result.changed and "modeling_mixtral.py:" in result.skipped[0].reason
    assert "routes nothing" in result.skipped[0].reason


def test_compiled_g_named_router_returns_host_copies_with_eager_values_and_gradients() -> None:
    """The whole backend (Inductor), the router named ``g``: host copies, eager's values, eager's gradients."""
    torch.manual_seed(0)
    model = GNamed()
    x = _x()

    def step(fn: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        model.zero_grad()
        out = fn(x)
        out[0].backward()
        return tree_leaves(out), [p.grad.clone() for p in model.parameters()]

    ref_out, ref_grads = step(model)
    torch._dynamo.reset()
    backend = moe_passes.make_backend(passes=("async_offload",))
    try:
        out, grads = step(torch.compile(model, backend=backend, fullgraph=True))
    finally:
        torch._dynamo.reset()
    report = backend.reports[0]["pre_grad"][0]
    assert report["name"] == "async_offload" and report["stats"]["offloaded"] == 2
    for got, want in zip(out, ref_out):
        assert got.dtype == want.dtype and got.device.type == "cpu"
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
