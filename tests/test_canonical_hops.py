"""Higher-order ops are ops: a checkpointed block or a custom autograd Function no longer switches the
ATen passes off for the whole graph (issue 19 items 3 and 4).

* Activation checkpointing (``checkpoint_wrapper``, non-reentrant): the canonical IR inlines each
  checkpoint body with ``meta["recompute"]``/``meta["ac_graph_id"]`` on every node, as AOT autograd
  tags a checkpoint it traces itself. The passes rewrite the body's ops; the partitioner still
  recomputes them: forward-only ops (top-k, argsort) appear in the compiled backward graph.
* Selective checkpointing (``create_selective_checkpoint_contexts``, a policy saving matmuls): each
  node carries the policy's decision for its op (recorded at autograd's granularity, ``aten.mm``), so
  the saved matmuls are not recomputed while the rest of the body is.
* A custom ``torch.autograd.Function`` stays one ``autograd_function_apply`` node with its bodies: the
  rest of the graph is rewritten; a Domino region that crosses the Function is declined with a reason.

Every compiled check compares loss and every parameter gradient with the same model run eagerly.
"""

from __future__ import annotations

import collections
import functools
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import fx, nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from moe_passes import make_backend
from moe_passes.config import BackendConfig
from moe_passes.fx.domino import DominoEPPass
from moe_passes.ir.canonical import Canonicalized, canonicalize
from moe_passes.models.interns1_vl import moe as moe_module
from moe_passes.models.interns1_vl.moe import GroupedExperts, SparseMoeBlock
from moe_passes.models.stacks import MoEStack
from moe_passes.testing import run_pass
from tests.domino_helpers import HIDDEN, INTER, capture_without_running

LAYERS, EXPERTS, TOP_K = 2, 4, 2
MATMULS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default)


def save_matmuls(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """The SAC policy of the issue: keep every matmul's output, recompute everything else."""
    return CheckpointPolicy.MUST_SAVE if op in MATMULS else CheckpointPolicy.PREFER_RECOMPUTE


def stack(checkpointing: str = "none", block: Callable[[], nn.Module] | None = None) -> MoEStack:
    """``LAYERS`` MoE blocks, loss = mean(h^2) + 0.1 balancing + 0.01 z-loss (the stacked aux loss the
    layer-wise pass rewrites); each block wrapped by ``checkpoint_wrapper`` (``"ac"``), with the
    matmul-saving SAC policy (``"sac"``), or not (``"none"``)."""
    torch.manual_seed(0)

    def wrapped() -> nn.Module:
        b = block() if block is not None else SparseMoeBlock(HIDDEN, INTER, EXPERTS, TOP_K)
        if checkpointing == "ac":
            return checkpoint_wrapper(b)
        if checkpointing == "sac":
            return checkpoint_wrapper(b, context_fn=functools.partial(create_selective_checkpoint_contexts, save_matmuls))
        return b

    return MoEStack(LAYERS, HIDDEN, INTER, EXPERTS, TOP_K, block=wrapped, main_loss="pow2_mean", aux_coef=0.1,
                    z_coef=0.01, init_std=0.2)


def inputs() -> torch.Tensor:
    return torch.randn(2, 6, HIDDEN, generator=torch.Generator().manual_seed(1))


def dynamo_graph(model: nn.Module) -> tuple[fx.GraphModule, list[Any]]:
    seen: list[tuple[fx.GraphModule, list[Any]]] = []

    def recorder(gm: fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        seen.append((gm, example_inputs))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=recorder, fullgraph=True)(inputs())
    torch._dynamo.reset()
    assert len(seen) == 1
    return seen[0]


def canonical_of(model: nn.Module) -> Canonicalized:
    res = canonicalize(*dynamo_graph(model))
    assert res.canonical, res.reason
    return res


def higher_order_ops(gm: fx.GraphModule) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if isinstance(n.target, torch._ops.HigherOrderOperator)]


def loss_and_grads(model: nn.Module, fn: Callable[..., torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    model.zero_grad(set_to_none=True)
    loss = fn(inputs())
    loss.backward()
    return loss.detach(), {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def assert_matches_eager(model: nn.Module, compiled: Callable[..., torch.Tensor]) -> None:
    ref_loss, ref_grads = loss_and_grads(model, model)
    loss, grads = loss_and_grads(model, compiled)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name, ref in ref_grads.items():
        assert ref is not None and grads[name] is not None, f"{name} has no gradient"
        torch.testing.assert_close(grads[name], ref, rtol=1e-4, atol=1e-5, msg=name)


def op_counts(text: str) -> collections.Counter[str]:
    return collections.Counter(re.findall(r"\b(?:aten|moe_models|_c10d_functional)\.\w+", text))


@functools.cache
def compiled_run(checkpointing: str) -> dict[str, Any]:
    """The stack compiled with the backend (``layerwise_aux_loss``), forward+backward checked against
    eager; returns the pass reports and the ATen ops of the post-grad forward and backward graphs."""
    model = stack(checkpointing)
    backend = make_backend(passes=("layerwise_aux_loss",), keep_graphs=True)
    torch._dynamo.reset()
    with torch._inductor.config.patch(fx_graph_cache=False):  # post-grad graphs are kept on a real compile only
        assert_matches_eager(model, torch.compile(model, backend=backend, fullgraph=True))
    torch._dynamo.reset()
    (graph,) = backend.graphs
    return {"reports": {p["name"]: p for p in backend.reports[0]["pre_grad"]},
            "forward": op_counts(graph.post_grad_graphs["forward"]["before"]),
            "backward": op_counts(graph.post_grad_graphs["backward"]["before"])}


# ------------------------------------------------------------------ activation checkpointing


def test_checkpoint_bodies_are_inlined_with_their_recompute_tags() -> None:
    res = canonical_of(stack("ac"))
    assert higher_order_ops(res.gm) == [], res.gm.code
    by_checkpoint = collections.defaultdict(list)
    for n in res.gm.graph.nodes:
        if "ac_graph_id" in n.meta:
            by_checkpoint[n.meta["ac_graph_id"]].append(n)
    assert len(by_checkpoint) == LAYERS, by_checkpoint.keys()
    for nodes in by_checkpoint.values():
        assert {n.meta["recompute"] for n in nodes} == {CheckpointPolicy.PREFER_RECOMPUTE}
        ops = {n.target for n in nodes}
        assert {torch.ops.aten.topk.default, torch.ops.aten.linear.default} <= ops, ops  # the router is inside
        assert any(n.op == "call_function" and "grouped_mm" in str(n.target) for n in nodes)
    outside = [n for n in res.gm.graph.nodes if n.op == "call_function" and "ac_graph_id" not in n.meta]
    assert any(n.target is torch.ops.aten.logsumexp.default for n in outside)  # the z-loss is not checkpointed


# ------------------------------------------------------------------ selective checkpointing


def test_selective_checkpoint_policy_decides_each_node() -> None:
    res = canonical_of(stack("sac"))
    assert higher_order_ops(res.gm) == [], res.gm.code
    tagged = [n for n in res.gm.graph.nodes if "ac_graph_id" in n.meta]
    saved = {n.target for n in tagged if n.meta["recompute"] == CheckpointPolicy.MUST_SAVE}
    assert saved == {torch.ops.aten.mm.default}, saved  # the router's linear, recorded as autograd runs it
    assert sum(n.meta["recompute"] == CheckpointPolicy.MUST_SAVE for n in tagged) == LAYERS
    assert not any(n.target is torch.ops.aten.linear.default for n in tagged)  # decomposed inside the body only
    assert all(n.meta["recompute"] == CheckpointPolicy.PREFER_RECOMPUTE
               for n in tagged if n.target not in MATMULS), [n.name for n in tagged]


def test_checkpointed_stacks_are_rewritten_exact_and_recomputed_in_backward() -> None:
    """Inductor's partitioner recomputes what the tags above say, with the matmul-saving SAC policy saving
    the matmuls. One test for the three compiles (plain, AC, SAC: each checked exact against eager by
    ``compiled_run``); the AC-only checks were a separate slow test that compiled plain and AC again."""
    plain, ac, sac = compiled_run("none"), compiled_run("ac"), compiled_run("sac")
    for run in (plain, ac):
        aux = run["reports"]["layerwise_aux_loss"]
        assert aux["changed"] and aux["stats"]["layers"] == LAYERS, aux
    # Forward-only ops appear in the backward graph only when the forward is recomputed there.
    assert plain["backward"]["aten.topk"] == 0 and plain["backward"]["aten.sort"] == 0, plain["backward"]
    assert ac["backward"]["aten.topk"] == LAYERS and ac["backward"]["aten.sort"] == LAYERS, ac["backward"]
    # The router matmul (1 per layer) and both expert grouped_mms (2 per layer) are recomputed too.
    assert ac["backward"]["aten.mm"] == plain["backward"]["aten.mm"] + LAYERS, (ac["backward"], plain["backward"])
    assert ac["backward"]["moe_models.grouped_mm"] == plain["backward"]["moe_models.grouped_mm"] + 2 * LAYERS
    assert ac["forward"] == plain["forward"]
    # Selective checkpointing: the matmuls are saved, the rest of the body recomputed.
    assert sac["reports"]["layerwise_aux_loss"]["changed"], sac["reports"]
    assert sac["backward"]["aten.topk"] == LAYERS and sac["backward"]["aten.sort"] == LAYERS  # recomputed
    assert sac["backward"]["aten.mm"] == plain["backward"]["aten.mm"] == ac["backward"]["aten.mm"] - LAYERS  # saved
    assert sac["backward"]["moe_models.grouped_mm"] == ac["backward"]["moe_models.grouped_mm"]  # recomputed


class _Passthrough(torch.utils._python_dispatch.TorchDispatchMode):
    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return func(*args, **(kwargs or {}))


def test_a_context_fn_that_is_no_selective_policy_is_refused_with_the_reason() -> None:
    """Never silently dropped: a ``context_fn`` whose decisions cannot be read refuses the re-trace."""
    torch.manual_seed(0)
    model = MoEStack(LAYERS, HIDDEN, INTER, EXPERTS, TOP_K, main_loss="pow2_mean", aux_coef=0.1, init_std=0.2,
                     block=lambda: checkpoint_wrapper(SparseMoeBlock(HIDDEN, INTER, EXPERTS, TOP_K),
                                                      context_fn=lambda: (_Passthrough(), _Passthrough())))
    try:
        gm, example_inputs = dynamo_graph(model)
    except Exception as e:  # Dynamo may not capture such a context_fn at all: nothing to refuse then
        pytest.skip(f"Dynamo does not capture this context_fn ({type(e).__name__})")
    res = canonicalize(gm, example_inputs)
    assert not res.canonical
    assert "_Passthrough, not a selective-checkpoint policy" in (res.reason or ""), res.reason


# ------------------------------------------------------------------ custom autograd Functions


class Attention(torch.autograd.Function):
    """softmax(q k^T / sqrt(d)) v with a hand-written backward (a flash-attention stand-in)."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        scale = q.shape[-1] ** -0.5
        probs = torch.softmax(q @ k.transpose(-2, -1) * scale, dim=-1)
        ctx.save_for_backward(q, k, v, probs)
        return probs @ v

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v, probs = ctx.saved_tensors
        scale = q.shape[-1] ** -0.5
        grad_v = probs.transpose(-2, -1) @ grad
        grad_probs = grad @ v.transpose(-2, -1)
        grad_scores = probs * (grad_probs - (grad_probs * probs).sum(dim=-1, keepdim=True)) * scale
        return grad_scores @ k, grad_scores.transpose(-2, -1) @ q, grad_v


class AttentionThenStack(nn.Module):
    """x + Attention(qkv(x)), then the MoE stack with its stacked aux loss: the Function is far from it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.qkv = nn.Linear(HIDDEN, 3 * HIDDEN)
        self.stack = stack()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.stack(x + Attention.apply(q, k, v))


def test_attention_function_is_kept_and_the_aux_loss_still_rewritten() -> None:
    res = canonical_of(AttentionThenStack())
    kept = [n for n in res.gm.graph.nodes if "autograd_function_apply" in str(n.target)]
    assert len(kept) == 1, res.gm.code
    bodies = [res.gm.get_submodule(a.target) for a in kept[0].args[:2]]
    assert all(isinstance(b, fx.GraphModule) for b in bodies)
    assert not any(n.target is torch.ops.aten._softmax.default for n in res.gm.graph.nodes)  # not inlined
    model = AttentionThenStack()
    backend = make_backend(passes=("layerwise_aux_loss",))
    torch._dynamo.reset()
    assert_matches_eager(model, torch.compile(model, backend=backend, fullgraph=True))
    torch._dynamo.reset()
    (aux,) = backend.reports[0]["pre_grad"]
    assert aux["changed"] and aux["stats"]["layers"] == LAYERS, aux


class SiLU(torch.autograd.Function):
    """silu with a hand-written backward: an op the row analysis has no rule for."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return F.silu(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        return grad * s * (1 + x * (1 - s))


class FunctionExperts(GroupedExperts):
    """The reference experts with the activation as a custom Function: inside the EP region."""

    def forward(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        gate, up = moe_module.grouped_mm(x, self.gate_up_proj.transpose(-2, -1), offsets).chunk(2, dim=-1)
        return moe_module.grouped_mm(SiLU.apply(gate) * up, self.down_proj.transpose(-2, -1), offsets)


@pytest.mark.parametrize("where", ["before_the_block", "inside_the_region"])
def test_domino_declines_only_a_region_that_crosses_a_function(trace_group: dist.ProcessGroup, where: str) -> None:
    torch.manual_seed(0)
    block = SparseMoeBlock(HIDDEN, INTER, 4, 2, ep_group=trace_group)
    qkv = nn.Linear(HIDDEN, 3 * HIDDEN)
    if where == "inside_the_region":
        block.experts.__class__ = FunctionExperts

    def fn(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if where == "before_the_block":
            x = x + Attention.apply(*qkv(x).chunk(3, dim=-1))
        out = block(x)
        return out.hidden_states.sum(), out.router_logits, out.selected_experts

    (gm,) = capture_without_running(fn, torch.randn(1, 5, HIDDEN, requires_grad=True))
    result = run_pass(DominoEPPass(BackendConfig(num_chunks=2)), gm)
    assert not any("canonical ATen IR unavailable" in s.reason for s in result.skipped), result.skipped
    assert len([n for n in gm.graph.nodes if "autograd_function_apply" in str(n.target)]) == 1
    if where == "before_the_block":
        assert result.changed and not result.skipped, result.skipped
    else:
        assert not result.changed
        (skip,) = result.skipped
        assert "autograd_function_apply" in skip.reason and "inside the region" in skip.reason, skip


def test_domino_inside_a_checkpoint_body_tags_every_node_it_adds(trace_group: dist.ProcessGroup) -> None:
    """A chunked region inside a checkpoint body: the chunk copies and the glue around them (split, getitem,
    cat, reshape, chunk sizes) all carry the body's recompute tags, so the partitioner recomputes them with
    the body instead of saving them."""
    torch.manual_seed(0)
    block = SparseMoeBlock(HIDDEN, INTER, 4, 2, ep_group=trace_group)

    def fn(x: torch.Tensor) -> torch.Tensor:
        out = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        return out.hidden_states.sum()

    (gm,) = capture_without_running(fn, torch.randn(1, 5, HIDDEN, requires_grad=True))
    before = set(gm.graph.nodes)
    result = run_pass(DominoEPPass(BackendConfig(num_chunks=2)), gm)
    assert result.changed, result.skipped
    tagged = {n.meta.get("ac_graph_id") for n in gm.graph.nodes if n.meta.get("ac_graph_id") is not None}
    assert len(tagged) == 1, tagged
    added = [n for n in gm.graph.nodes if n.op == "call_function" and n not in before
             and any(u.meta.get("domino_chunk") is not None for u in n.users)]
    assert added, "the rewrite feeds its chunk copies through new nodes"
    untagged = [n.name for n in added if n.meta.get("ac_graph_id") is None or n.meta.get("recompute") is None]
    assert not untagged, untagged


# ------------------------------------------------------------------ the reference model, 2 gloo ranks


def checkpointed_reference_vs_eager(rank: int, world_size: int) -> dict[str, Any]:
    """The reference model (``compile_config``: images, padding, 2 MoE layers) with ``checkpoint_wrapper``
    on every decoder layer, compiled with Domino (2 chunks) vs the same checkpointed model run eagerly."""
    from moe_passes.models.interns1_vl import InternS1VLForConditionalGeneration, load_hf_state_dict
    from tests.model_inputs import compile_config, make_batch

    torch._dynamo.config.capture_scalar_outputs = True
    config = compile_config()
    torch.manual_seed(0)
    full_sd = InternS1VLForConditionalGeneration(config).state_dict()
    models = []
    for _ in range(2):
        model = InternS1VLForConditionalGeneration(config, ep_group=dist.group.WORLD)
        load_hf_state_dict(model, full_sd)
        layers = model.model.language_model.layers
        for i in range(len(layers)):
            layers[i] = checkpoint_wrapper(layers[i])
        models.append(model)
    eager, compiled = models
    backend = make_backend(passes=("domino_ep",), num_chunks=2, keep_graphs=True)
    step = torch.compile(compiled, backend=backend, fullgraph=True)
    batch = make_batch(config, seed=10 * world_size + rank, images=True, pad=True)
    out = step(**batch)
    out.loss.backward()
    ref = eager(**batch)
    ref.loss.backward()
    grads = dict(eager.named_parameters())
    errors = {name: ((p.grad - grads[name].grad).abs().max() / grads[name].grad.abs().max().clamp(min=1e-12)).item()
              for name, p in compiled.named_parameters()}
    (graph,) = backend.graphs
    return {"loss_diff": abs(out.loss.item() - ref.loss.item()), "grad_errors": errors,
            "domino": next(p for p in backend.reports[0]["pre_grad"] if p["name"] == "domino_ep"),
            "backward": op_counts(graph.post_grad_graphs.get("backward", {}).get("before", ""))}


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_reference_model_with_checkpointed_layers_is_chunked_and_exact_on_two_ranks() -> None:
    from tests.distributed import run_distributed

    for rank, r in enumerate(run_distributed(checkpointed_reference_vs_eager, 2, timeout_s=1000)):
        domino = r["domino"]
        print(f"rank {rank}: domino changed={domino['changed']} regions={domino['stats'].get('regions')} "
              f"|dloss|={r['loss_diff']:.2e} max grad rel err={max(r['grad_errors'].values()):.2e} "
              f"backward topk={r['backward'].get('aten.topk')} all_to_all={r['backward'].get('_c10d_functional.all_to_all_single')}")
        assert domino["changed"] and domino["stats"]["regions"] == 2, (rank, domino)
        assert r["loss_diff"] < 1e-5, (rank, r["loss_diff"])
        worst = max(r["grad_errors"], key=r["grad_errors"].get)
        assert r["grad_errors"][worst] < 1e-4, f"rank {rank}: gradient of {worst} off by {r['grad_errors'][worst]:.2e}"
        if r["backward"]:  # kept on a real compile (not an FX-graph-cache hit): the layers are recomputed
            assert r["backward"]["aten.topk"] >= 2, (rank, r["backward"])


@pytest.mark.parametrize("checkpointing", ["ac", "sac"])
def test_a_function_inside_a_checkpoint_body_stays_one_tagged_node_and_exact(checkpointing: str) -> None:
    """The experts' activation is a custom Function inside each checkpointed block: kept opaque, tagged
    with its checkpoint's ``ac_graph_id``; the aux loss is still rewritten; loss and grads exact."""

    def block() -> nn.Module:
        b = SparseMoeBlock(HIDDEN, INTER, EXPERTS, TOP_K)
        b.experts.__class__ = FunctionExperts
        return b

    res = canonical_of(stack(checkpointing, block=block))
    kept = [n for n in res.gm.graph.nodes if "autograd_function_apply" in str(n.target)]
    assert len(kept) == LAYERS and len({n.meta.get("ac_graph_id") for n in kept}) == LAYERS, res.gm.code
    assert all(n.meta["recompute"] == CheckpointPolicy.PREFER_RECOMPUTE for n in kept)
    model = stack(checkpointing, block=block)
    backend = make_backend(passes=("layerwise_aux_loss",))
    torch._dynamo.reset()
    assert_matches_eager(model, torch.compile(model, backend=backend, fullgraph=True))
    torch._dynamo.reset()
    assert backend.reports[0]["pre_grad"][0]["changed"], backend.reports
