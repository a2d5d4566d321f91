"""``async_offload``: router tensors leave the graph as host copies started where they are produced.

Specification:
* which outputs are offloaded ("auto" vs explicit kinds) and every skip with its reason;
* outputs are identical with the pass on or off (values, dtypes, host device), eager vs compiled, and
  gradients are unchanged;
* the device buffers of offloaded tensors die at their last device use, not at the end of the forward;
* in Inductor's output code the ops are extern calls, each start right after its producer, waits last.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_leaves

import moe_passes
from models.interns1_vl.moe import SparseMoeBlock
from moe_passes.bench.offload import RouterStack, device_liveness
from moe_passes.config import BackendConfig
from moe_passes.fx.async_offload import AsyncOffloadPass, classify
from moe_passes.fx.capture import capture_graphs
from moe_passes.fx.graph_text import graph_text
from moe_passes.fx.pass_manager import copy_graph_module
from moe_passes.inductor.ops import OFFLOAD_START, OFFLOAD_WAIT
from tests.golden import check_golden

BOTH = ("router_logits", "selected_experts")


@pytest.fixture(scope="module")
def model() -> RouterStack:
    torch.manual_seed(0)
    return RouterStack(layers=2, hidden=8, experts=4, top_k=2)


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, 8)


@pytest.fixture(scope="module")
def captured(model: RouterStack, x: torch.Tensor) -> fx.GraphModule:
    graphs = capture_graphs(model, x)
    assert len(graphs) == 1
    return graphs[0].gm


def run_pass(gm: fx.GraphModule, targets: Any = "auto") -> tuple[fx.GraphModule, Any]:
    gm = copy_graph_module(gm)
    return gm, AsyncOffloadPass(BackendConfig(offload_targets=targets))(gm)


def offload_ops(gm: fx.GraphModule) -> tuple[list[fx.Node], list[fx.Node]]:
    starts = [n for n in gm.graph.nodes if n.target is OFFLOAD_START]
    waits = [n for n in gm.graph.nodes if n.target is OFFLOAD_WAIT]
    return starts, waits


def test_classifies_router_logits_and_selected_experts(captured: fx.GraphModule) -> None:
    kinds = classify(captured.graph)
    outputs = [n for n in tree_leaves(captured.graph.output_node().args) if isinstance(n, fx.Node)]
    assert [kinds.get(n) for n in outputs] == [None, "router_logits", "router_logits", "selected_experts", "selected_experts"]


def test_auto_offloads_detached_router_logits_and_keeps_indices_backward_saves(captured: fx.GraphModule) -> None:
    gm, result = run_pass(captured)
    assert result.changed and result.stats["offloaded"] == 2
    assert all("(router_logits)" in m for m in result.matched)
    assert [s.region for s in result.skipped] == ["selected (selected_experts)", "selected_1 (selected_experts)"]
    assert all("backward keeps its device buffer" in s.reason for s in result.skipped)
    starts, waits = offload_ops(gm)
    assert len(starts) == 2 and len(waits) == 2


def test_explicit_kinds_offload_both_and_report_what_backward_keeps(captured: fx.GraphModule) -> None:
    gm, result = run_pass(captured, BOTH)
    assert result.stats["offloaded"] == 4 and not result.skipped
    assert result.stats["device_copy_kept_for_backward"] == ["selected", "selected_1"]
    outputs = [n for n in tree_leaves(gm.graph.output_node().args) if isinstance(n, fx.Node)]
    assert [n.target is OFFLOAD_WAIT for n in outputs] == [False, True, True, True, True]


def test_kinds_not_listed_are_skipped_with_the_reason(captured: fx.GraphModule) -> None:
    _, result = run_pass(captured, ("selected_experts",))
    assert result.stats["offloaded"] == 2
    assert all("not in offload_targets" in s.reason for s in result.skipped)


def test_starts_follow_their_producer_and_waits_sit_at_the_output(captured: fx.GraphModule) -> None:
    gm, _ = run_pass(captured, BOTH)
    nodes = list(gm.graph.nodes)
    starts, waits = offload_ops(gm)
    for start in starts:
        assert nodes[nodes.index(start) - 1] is start.args[0]
    first_wait = nodes.index(waits[0])
    assert all(n.target is OFFLOAD_WAIT or n.op == "call_method" and n.target == "detach" for n in nodes[first_wait:-1])
    assert max(nodes.index(s) for s in starts) < first_wait


def test_golden_graph(captured: fx.GraphModule, update_goldens: bool) -> None:
    gm, _ = run_pass(captured, BOTH)
    check_golden("offload_router_stack.txt", graph_text(gm), update_goldens)


def test_device_bytes_of_offloaded_tensors_are_released_at_their_last_device_use(captured: fx.GraphModule) -> None:
    gm, result = run_pass(captured)
    before, after = device_liveness(captured), device_liveness(gm)
    assert before.bytes_at_end() - after.bytes_at_end() == result.stats["offloaded_bytes"] == 2 * 6 * 4 * 4

    def by_name(g: fx.GraphModule, name: str) -> fx.Node:
        return next(n for n in g.graph.nodes if n.name == name)

    nodes = list(gm.graph.nodes)
    first_wait = min(nodes.index(n) for n in offload_ops(gm)[1])
    layer_ends = {"router_logits": nodes.index(by_name(gm, "router_logits_1")), "router_logits_1": first_wait}
    for name, layer_end in layer_ends.items():
        assert before.last[before.storage_of(by_name(captured, name))] is None  # pass off: a graph output
        released = after.last[after.storage_of(by_name(gm, name))]
        assert released is not None, f"{name} still lives at the end of the forward"
        start = next(s for s in offload_ops(gm)[0] if s.args[0].args[0] is by_name(gm, name))
        assert nodes.index(start) <= nodes.index(released) < layer_end


def test_inference_graph_offloads_everything_because_backward_keeps_nothing(model: RouterStack, x: torch.Tensor) -> None:
    with torch.no_grad():
        gm = capture_graphs(model, x)[0].gm
    _, result = run_pass(gm)
    assert result.stats["offloaded"] == 4 and not result.skipped


def test_reference_model_router_logits_feeding_the_aux_loss_are_not_offloaded_in_training() -> None:
    from models.interns1_vl import InternS1VLConfig, InternS1VLForConditionalGeneration

    torch.manual_seed(0)
    config = InternS1VLConfig.tiny()
    vlm = InternS1VLForConditionalGeneration(config)
    ids = torch.randint(0, config.text.vocab_size, (1, 6))

    def step(ids: torch.Tensor) -> tuple[Any, ...]:
        out = vlm(ids, labels=ids, output_router_logits=True)
        return out.loss, out.router_logits, tuple(r.detach() for r in out.router_logits)

    _, result = run_pass(capture_graphs(step, ids)[0].gm)
    skipped = [s for s in result.skipped if "requires grad" in s.reason]
    assert len(skipped) == len(result.matched) == config.text.num_hidden_layers
    assert all(m.startswith("detach") for m in result.matched)


class _ReturnsLiveLogits(nn.Module):
    """Returns router logits that still require grad (not detached) and mutated selected experts."""

    def __init__(self) -> None:
        super().__init__()
        self.block = SparseMoeBlock(8, 16, 4, 2)
        nn.init.normal_(self.block.gate.weight)
        nn.init.normal_(self.block.experts.gate_up_proj, std=0.2)
        nn.init.normal_(self.block.experts.down_proj, std=0.2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.block(x)
        selected = out.selected_experts.view(-1)
        selected.add_(0)
        return out.hidden_states.sum(), out.router_logits, selected


def test_never_offloads_outputs_that_require_grad_or_are_mutated_after_production(x: torch.Tensor) -> None:
    gm = capture_graphs(_ReturnsLiveLogits(), x)[0].gm
    gm, result = run_pass(gm, BOTH)
    assert not result.changed
    reasons = {s.region.split(" ")[1]: s.reason for s in result.skipped}
    assert reasons["(router_logits)"].startswith("requires grad")
    assert "mutated in place" in reasons["(selected_experts)"]


def test_graph_without_router_outputs_is_left_alone_with_a_reason(x: torch.Tensor) -> None:
    gm = capture_graphs(nn.Sequential(nn.Linear(8, 8), nn.ReLU()), x)[0].gm
    text = graph_text(gm)
    gm, result = run_pass(gm)
    assert not result.changed and graph_text(gm) == text
    assert result.skipped[0].reason == "no router logits or selected experts among the graph outputs"


def test_unknown_target_kind_is_a_value_error(captured: fx.GraphModule) -> None:
    with pytest.raises(ValueError, match="unknown kind"):
        run_pass(captured, ("router_probs",))


@pytest.fixture(scope="module")
def compiled_runs(model: RouterStack, x: torch.Tensor) -> dict[str, Any]:
    from torch._inductor.utils import run_and_get_code

    def run(fn: Any) -> tuple[Any, list[torch.Tensor]]:
        model.zero_grad()
        out = fn(x)
        out[0].backward()
        return out, [p.grad.clone() for p in model.parameters()]

    runs: dict[str, Any] = {"eager": run(model)}
    for label, passes in (("off", ()), ("on", ("async_offload",))):
        torch._dynamo.reset()
        backend = moe_passes.make_backend(passes=passes, offload_targets=BOTH)
        with torch._dynamo.config.patch(capture_scalar_outputs=True):
            compiled = torch.compile(model, backend=backend, fullgraph=True)
            (out, grads), codes = run_and_get_code(run, compiled)
        runs[label] = (out, grads)
        runs[f"{label}_code"] = codes[0]
        runs[f"{label}_report"] = backend.reports
    torch._dynamo.reset()
    return runs


@pytest.mark.parametrize("label", ["off", "on"])
def test_compiled_outputs_and_gradients_equal_eager(compiled_runs: dict[str, Any], label: str) -> None:
    (ref_out, ref_grads), (out, grads) = compiled_runs["eager"], compiled_runs[label]
    for got, want in zip(tree_leaves(out), tree_leaves(ref_out)):
        assert got.dtype == want.dtype and got.shape == want.shape and got.device.type == "cpu"
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_pass_on_and_off_return_the_same_values(compiled_runs: dict[str, Any]) -> None:
    off, on = tree_leaves(compiled_runs["off"][0]), tree_leaves(compiled_runs["on"][0])
    for a, b in zip(off[1:], on[1:]):
        assert a.dtype == b.dtype and torch.equal(a, b)
        assert a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
    report = compiled_runs["on_report"][0]["pre_grad"][0]
    assert report["name"] == "async_offload" and report["stats"]["offloaded"] == 4


_KERNEL = re.compile(r"(cpp_fused_\w+|extern_kernels\.\w+|(?:torch\.ops\.)?aten\.\w+\.\w+)\(")
_ALIAS = re.compile(r"^(buf\d+) = (?:reinterpret_tensor\()?(buf\d+)\b")


def test_inductor_code_starts_right_after_producers_and_waits_last(compiled_runs: dict[str, Any]) -> None:
    code = compiled_runs["on_code"]
    lines = [line.strip() for line in code[code.index("def call(") :].splitlines()]
    alias: dict[str, str] = {}
    last_kernel = ""
    starts = waits = 0
    for line in lines:
        if (m := _ALIAS.match(line)) and "torch.ops" not in line:
            alias[m.group(1)] = alias.get(m.group(2), m.group(2))
        if "moe_passes.offload_start" in line and "=" in line and "assert" not in line:
            arg = re.search(r"offload_start\.default\((buf\d+)\)", line).group(1)
            root = alias.get(arg, arg)
            assert re.search(rf"\b({arg}|{root})\b", last_kernel), f"start of {arg} does not follow its producer: {last_kernel}"
            starts += 1
        elif "moe_passes.offload_wait" in line and "assert" not in line and "#" not in line:
            waits += 1
        elif _KERNEL.search(line) and not line.startswith(("assert", "#")):
            assert waits == 0, f"compute after a blocking wait: {line}"
            last_kernel = line
    assert starts == 4 and waits == 4
    assert "moe_passes.offload" not in compiled_runs["off_code"]


def inductor_call_order(code: str) -> str:
    """The forward's calls in Inductor output order: kernel names and offload ops, one per line."""
    body = code[code.index("def call(") :]
    calls = []
    for line in body.splitlines():
        line = line.strip()
        if line.startswith(("assert", "#", "return")):
            continue
        if m := re.search(r"torch\.ops\.moe_passes\.(offload_\w+)\.default\((buf\d+)", line):
            calls.append(m.group(1))
        elif m := _KERNEL.search(line):
            calls.append(m.group(1))
    return "\n".join(calls) + "\n"


def test_golden_inductor_call_order(compiled_runs: dict[str, Any], update_goldens: bool) -> None:
    check_golden("offload_inductor_order.txt", inductor_call_order(compiled_runs["on_code"]), update_goldens)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: device memory and pinned host copies")
def test_cuda_offloaded_outputs_are_pinned_host_copies_and_free_device_memory(model: RouterStack, x: torch.Tensor) -> None:
    dev = torch.device("cuda")
    cuda_model = RouterStack(layers=2, hidden=8, experts=4, top_k=2).to(dev)
    cuda_model.load_state_dict(model.state_dict())
    xc = x.to(dev)
    ref = cuda_model(xc)
    held: dict[str, int] = {}
    outs: dict[str, Any] = {}
    for label, passes in (("off", ()), ("on", ("async_offload",))):
        torch._dynamo.reset()
        backend = moe_passes.make_backend(passes=passes)
        with torch._dynamo.config.patch(capture_scalar_outputs=True):
            compiled = torch.compile(cuda_model, backend=backend, fullgraph=True)
            compiled(xc)
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated(dev)
            outs[label] = compiled(xc)
            torch.cuda.synchronize()
            held[label] = torch.cuda.memory_allocated(dev) - before
    torch._dynamo.reset()
    for got, want in zip(tree_leaves(outs["on"][1]), tree_leaves(ref[1])):
        assert got.device.type == "cpu" and got.is_pinned()
        torch.testing.assert_close(got, want.cpu(), rtol=1e-5, atol=1e-6)
    for got, want in zip(tree_leaves(outs["on"][2]), tree_leaves(ref[2])):
        assert got.device == want.device and torch.equal(got, want)  # "auto": indices backward saves stay
    router_logit_bytes = sum(t.numel() * t.element_size() for t in ref[1])
    assert held["off"] - held["on"] >= router_logit_bytes


@pytest.mark.slow
def test_bench_section_reports_device_bytes_at_end_of_forward_with_and_without_the_pass() -> None:
    from moe_passes.bench import BenchOptions
    from moe_passes.bench.offload import run

    section = run(BenchOptions(quick=True))
    off, on = section.rows
    assert (off["offload"], on["offload"]) == ("off", "on")
    assert off["router_device_bytes_returned"] > 0 and on["router_device_bytes_returned"] == 0
    assert off["static_device_bytes_at_end"] - on["static_device_bytes_at_end"] == off["router_device_bytes_returned"]
    assert 0 < off["router_bytes_saved_for_backward"] < off["router_device_bytes_returned"]
    assert off["measured_cpu_bytes_at_end"] > 0 and on["measured_cpu_bytes_at_end"] > 0


def _ep_rank(rank: int, world_size: int) -> dict[str, Any]:
    """One EP rank: eager vs compiled with the pass, forward and backward; returns the largest differences."""
    import torch.distributed as dist

    torch.manual_seed(0)
    ep_model = RouterStack(layers=2, hidden=8, experts=4, top_k=2, ep_group=dist.group.WORLD)
    x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(100 + rank))

    def step(fn: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        ep_model.zero_grad()
        out = fn(x)
        out[0].backward()
        return tree_leaves(out), [p.grad.clone() for p in ep_model.parameters()]

    ref_out, ref_grads = step(ep_model)
    backend = moe_passes.make_backend(passes=("async_offload",), offload_targets=BOTH)
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        out, grads = step(torch.compile(ep_model, backend=backend, fullgraph=True))
    return {
        "offloaded": backend.reports[0]["pre_grad"][0]["stats"].get("offloaded", 0),
        "dtypes_equal": all(a.dtype == b.dtype for a, b in zip(out, ref_out)),
        "output_diff": max((a.double() - b.double()).abs().max().item() for a, b in zip(out, ref_out)),
        "grad_diff": max((a - b).abs().max().item() for a, b in zip(grads, ref_grads)),
    }


@pytest.mark.slow
def test_expert_parallel_ranks_match_eager_with_the_pass() -> None:
    from tests.distributed import run_distributed

    for result in run_distributed(_ep_rank, 2):
        assert result["offloaded"] == 4 and result["dtypes_equal"]
        assert result["output_diff"] < 1e-5 and result["grad_diff"] < 1e-5


@pytest.mark.slow
def test_default_pipeline_on_the_reference_model_matches_eager_with_offloaded_router_outputs() -> None:
    from models.interns1_vl import InternS1VLConfig, InternS1VLForConditionalGeneration

    torch.manual_seed(0)
    config = InternS1VLConfig.tiny()
    vlm = InternS1VLForConditionalGeneration(config)
    ids = torch.randint(0, config.text.vocab_size, (2, 8))

    def step(fn: Any) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        vlm.zero_grad()
        out = fn(ids)
        out[0].backward()
        return tree_leaves(out), [p.grad for p in vlm.parameters()]

    def fwd(ids: torch.Tensor) -> tuple[Any, ...]:
        out = vlm(ids, labels=ids, output_router_logits=True)
        return out.loss, tuple(r.detach() for r in out.router_logits), out.selected_experts

    backend = moe_passes.make_backend(offload_targets=BOTH)
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        out, grads = step(torch.compile(fwd, backend=backend, fullgraph=True))
    ref_out, ref_grads = step(fwd)
    offload = next(r for r in backend.reports[0]["pre_grad"] if r["name"] == "async_offload")
    assert offload["stats"]["offloaded"] == 2 * config.text.num_hidden_layers
    for got, want in zip(out, ref_out):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
