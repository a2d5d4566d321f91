"""``async_offload``: router tensors leave the graph as host copies started where they are produced.

Specification:
* router tensors are recognised by meaning, identically in Dynamo's torch IR and the canonical ATen IR;
* which outputs are offloaded ("auto" vs explicit kinds), what the report says about each (bytes, what
  happens to the device buffer) and every skip with its reason;
* outputs are identical with the pass on or off (values, dtypes, host device), eager vs compiled, and
  loss and gradients are unchanged, including the gradient through returned live router logits;
* the device buffers of offloaded tensors that nothing else keeps die at their last device use;
* in Inductor's output code the ops are extern calls, each start right after its producer, waits last.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import pytest
import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_leaves

import moe_passes
from moe_passes.bench.offload import device_liveness
from moe_passes.config import BackendConfig
from moe_passes.fx.async_offload import (
    KEPT_FOR_BACKWARD,
    KEPT_FOR_GRADIENT,
    RELEASED,
    AsyncOffloadPass,
    classify,
)
from moe_passes.harness.capture import capture_graphs
from moe_passes.ir.facts import module_path
from moe_passes.ir.graph_text import graph_text
from moe_passes.models.interns1_vl.moe import SparseMoeBlock
from moe_passes.models.stacks import MoEStack, router_stack
from moe_passes.ops.offload import OFFLOAD_START, OFFLOAD_WAIT
from moe_passes.pipeline.manager import copy_graph_module
from tests.golden import check_golden

log = logging.getLogger(__name__)

BOTH = ("router_logits", "selected_experts")


@pytest.fixture(scope="module")
def model() -> MoEStack:
    torch.manual_seed(0)
    return router_stack(layers=2, hidden=8, experts=4, top_k=2)


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, 8)


@pytest.fixture(scope="module")
def captured(model: MoEStack, x: torch.Tensor) -> fx.GraphModule:
    graphs = capture_graphs(model, x)
    assert len(graphs) == 1
    return graphs[0].gm


@pytest.fixture(scope="module")
def captured_aten(model: MoEStack, x: torch.Tensor) -> fx.GraphModule:
    """The same forward in the canonical pre-dispatch ATen IR (``aten.linear``/``aten.topk``/``aten.detach``)."""
    (graph,) = capture_graphs(model, x, canonical=True)
    return graph.gm


@pytest.fixture(scope="module")
def reference_graphs() -> dict[str, fx.GraphModule]:
    """The reference model as users run it, ``output_router_logits=True``, in both IRs (one capture each)."""
    from moe_passes.models.interns1_vl import InternS1VLConfig, InternS1VLForConditionalGeneration

    torch.manual_seed(0)
    config = InternS1VLConfig.tiny()
    vlm = InternS1VLForConditionalGeneration(config)
    ids = torch.randint(0, config.text.vocab_size, (1, 6))
    (graph,) = capture_graphs(lambda ids: vlm(ids, labels=ids, output_router_logits=True), ids)
    from moe_passes.ir.canonical import canonicalize

    canonical = canonicalize(graph.gm, graph.example_inputs)
    assert canonical.canonical, canonical.reason
    return {"torch": graph.gm, "aten": canonical.gm, "layers": config.text.num_hidden_layers, "inputs": graph.example_inputs}


def run_pass(gm: fx.GraphModule, targets: Any = "auto") -> tuple[fx.GraphModule, Any]:
    gm = copy_graph_module(gm)
    return gm, AsyncOffloadPass(BackendConfig(offload_targets=targets))(gm)


def offload_ops(gm: fx.GraphModule) -> tuple[list[fx.Node], list[fx.Node]]:
    starts = [n for n in gm.graph.nodes if n.target is OFFLOAD_START]
    waits = [n for n in gm.graph.nodes if n.target is OFFLOAD_WAIT]
    return starts, waits


def output_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in tree_leaves(gm.graph.output_node().args) if isinstance(n, fx.Node)]


def _layer(node: fx.Node) -> str:
    """The layer a router tensor belongs to: from its own module path, else its first input's (views at the root)."""
    while node is not None:
        m = re.search(r"(?:blocks|layers)\.(\d+)", module_path(node) or "")
        if m:
            return f"layer{m.group(1)}"
        node = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    return "-"


def offload_trace(gm: fx.GraphModule) -> str:
    """What the pass did, as events in graph order, with names normalised by meaning (kind, layer).

    Survives node renumbering, IR spelling (torch vs ATen) and changes inside the experts: one line per
    router tensor production, detach, offload start / wait (with its ``after`` count and gradient edge),
    and the output's entries (``host <kind> <layer>`` for offloaded ones).
    """
    kinds = classify(gm.graph)
    label: dict[fx.Node, str] = {}
    lines: list[str] = []
    for node in gm.graph.nodes:
        if node.target is OFFLOAD_START:
            lines.append(f"offload_start {label.get(node.args[0], '?')}")
            label[node] = label.get(node.args[0], "?")
        elif node.target is OFFLOAD_WAIT:
            grad = "grad_edge" if node.args[4] is not None else "detached"
            lines.append(f"offload_wait {label.get(node.args[0], '?')} after={len(node.args[3])} {grad}")
            label[node] = f"host {label.get(node.args[0], '?')}"
        elif node.op == "call_function" and node.target is torch.ops.aten.detach.default and node.args[0] in label:
            label[node] = label[node.args[0]]
            if any(u.target is OFFLOAD_START for u in node.users):
                lines.append(f"detach {label[node]}")
        elif kinds.get(node) in ("router_logits", "selected_experts") and node.op != "output":
            label[node] = f"{kinds[node]} {_layer(node)}"
            if node in output_nodes(gm) or any(u.target is torch.ops.aten.detach.default for u in node.users):
                lines.append(f"produce {label[node]}")
    lines.append("output " + ", ".join(label.get(n, "other") for n in output_nodes(gm)))
    return "\n".join(lines) + "\n"


def test_classifies_router_logits_and_selected_experts_in_both_irs(
    captured: fx.GraphModule, captured_aten: fx.GraphModule
) -> None:
    expected = [None, "router_logits", "router_logits", "selected_experts", "selected_experts"]
    for gm in (captured, captured_aten):
        kinds = classify(gm.graph)
        assert [kinds.get(n) for n in output_nodes(gm)] == expected
    aten_targets = {n.target for n in captured_aten.graph.nodes if n.op == "call_function"}
    assert {torch.ops.aten.linear.default, torch.ops.aten.topk.default, torch.ops.aten.detach.default} <= aten_targets


def test_auto_offloads_every_router_output_and_reports_what_happens_to_each_device_buffer(captured: fx.GraphModule) -> None:
    gm, result = run_pass(captured)
    assert result.changed and result.stats["offloaded"] == 4 and not result.skipped
    by_kind = {(r["kind"], r["name"]): r for r in result.stats["outputs"]}
    logits = [r for (k, _), r in by_kind.items() if k == "router_logits"]
    selected = [r for (k, _), r in by_kind.items() if k == "selected_experts"]
    assert all(r["device_buffer"] == RELEASED and not r["requires_grad"] for r in logits)  # detached by the model
    assert all(r["device_buffer"] == KEPT_FOR_BACKWARD for r in selected)  # topk saves its indices
    assert [r["bytes"] for r in logits] == [6 * 4 * 4] * 2 and [r["bytes"] for r in selected] == [6 * 2 * 8] * 2
    assert [r["module"].rsplit(".", 2)[-2:] for r in logits] == [["0", "gate"], ["1", "gate"]]
    assert result.stats["offloaded_bytes"] == 2 * 96 + 2 * 96
    assert result.stats["device_bytes_released"] == 2 * 96 and result.stats["device_bytes_kept_for_backward"] == 2 * 96
    assert result.stats["device_bytes_kept_for_gradient"] == 0
    starts, waits = offload_ops(gm)
    assert len(starts) == 4 and len(waits) == 4
    assert [n.target is OFFLOAD_WAIT for n in output_nodes(gm)] == [False, True, True, True, True]


def test_same_rewrite_and_report_in_torch_and_aten_ir(captured: fx.GraphModule, captured_aten: fx.GraphModule) -> None:
    (gm_t, res_t), (gm_a, res_a) = run_pass(captured), run_pass(captured_aten)
    assert offload_trace(gm_t) == offload_trace(gm_a)

    def strip(stats: dict[str, Any]) -> dict[str, Any]:
        return {k: v if k != "outputs" else [{**r, "name": None, "module": None} for r in v] for k, v in stats.items()}

    assert strip(res_t.stats) == strip(res_a.stats)
    gm_a.graph.lint()


def test_kinds_not_listed_are_skipped_with_the_reason(captured: fx.GraphModule) -> None:
    _, result = run_pass(captured, ("selected_experts",))
    assert result.stats["offloaded"] == 2
    assert len(result.skipped) == 2 and all("not in offload_targets" in s.reason for s in result.skipped)


def test_starts_follow_their_producer_and_waits_sit_at_the_output(captured: fx.GraphModule) -> None:
    gm, _ = run_pass(captured)
    nodes = list(gm.graph.nodes)
    starts, waits = offload_ops(gm)
    for start in starts:
        detach = start.args[0]
        assert detach.target is torch.ops.aten.detach.default
        assert nodes[nodes.index(start) - 1] is detach and nodes[nodes.index(detach) - 1] is detach.args[0]
    first_wait = nodes.index(waits[0])
    assert all(n.target in (OFFLOAD_WAIT, torch.ops.aten.detach.default) for n in nodes[first_wait:-1])
    assert max(nodes.index(s) for s in starts) < first_wait


def test_golden_offload_trace(captured: fx.GraphModule, update_goldens: bool) -> None:
    gm, _ = run_pass(captured)
    check_golden("offload_router_stack.txt", offload_trace(gm), update_goldens)


def test_device_bytes_of_offloaded_tensors_are_released_at_their_last_device_use(captured: fx.GraphModule) -> None:
    gm, result = run_pass(captured)
    before, after = device_liveness(captured), device_liveness(gm)
    assert before.bytes_at_end() - after.bytes_at_end() == result.stats["offloaded_bytes"] == 2 * 6 * 4 * 4 + 2 * 6 * 2 * 8

    def by_name(g: fx.GraphModule, name: str) -> fx.Node:
        return next(n for n in g.graph.nodes if n.name == name)

    nodes = list(gm.graph.nodes)
    first_wait = min(nodes.index(n) for n in offload_ops(gm)[1])
    layer_ends = {"router_logits": nodes.index(by_name(gm, "router_logits_1")), "router_logits_1": first_wait}
    for name, layer_end in layer_ends.items():
        assert before.last[before.storage_of(by_name(captured, name))] is None  # pass off: a graph output
        released = after.last[after.storage_of(by_name(gm, name))]
        assert released is not None, f"{name} still lives at the end of the forward"
        start = next(s for s in offload_ops(gm)[0] if s.args[0].args[0].args[0] is by_name(gm, name))
        assert nodes.index(start) <= nodes.index(released) < layer_end


def test_inference_graph_releases_every_device_buffer(model: MoEStack, x: torch.Tensor) -> None:
    with torch.no_grad():
        gm = capture_graphs(model, x)[0].gm
    _, result = run_pass(gm)
    assert result.stats["offloaded"] == 4 and not result.skipped
    assert all(r["device_buffer"] == RELEASED for r in result.stats["outputs"])


@pytest.mark.parametrize("ir", ["torch", "aten"])
def test_reference_model_as_users_run_it_offloads_live_logits_with_their_gradient_edge(
    reference_graphs: dict[str, Any], ir: str
) -> None:
    """``output_router_logits=True``: live logits (they require grad) and selected experts (saved by topk)."""
    layers = reference_graphs["layers"]
    gm, result = run_pass(reference_graphs[ir])
    assert result.changed and result.stats["offloaded"] == 2 * layers and not result.skipped
    records = result.stats["outputs"]
    logits = [r for r in records if r["kind"] == "router_logits"]
    selected = [r for r in records if r["kind"] == "selected_experts"]
    assert len(logits) == len(selected) == layers
    assert all(r["requires_grad"] and r["device_buffer"] == KEPT_FOR_GRADIENT for r in logits)
    assert all(r["device_buffer"] == KEPT_FOR_BACKWARD for r in selected)
    assert [int(re.search(r"layers\.(\d+)", r["module"]).group(1)) for r in logits] == list(range(layers))
    waits = offload_ops(gm)[1]
    edges = {w: w.args[4] for w in waits}
    assert sum(e is not None for e in edges.values()) == layers  # one gradient edge per live logits output
    for edge in edges.values():
        if edge is not None:
            assert classify(gm.graph).get(edge) == "router_logits"


@pytest.mark.parametrize("ir", ["torch", "aten"])
def test_rewritten_reference_graph_run_eagerly_keeps_loss_gradients_and_values(reference_graphs: dict[str, Any], ir: str) -> None:
    """The rewritten graph itself (no Inductor), both IRs: loss, the gradient of every parameter (with a loss
    term through the returned live logits) and every returned value equal the unmodified graph's."""
    original = reference_graphs[ir]
    rewritten, _ = run_pass(original)
    inputs = reference_graphs["inputs"]
    params = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    kinds = classify(original.graph)
    live = [i for i, n in enumerate(output_nodes(original)) if kinds.get(n) == "router_logits"]
    loss_index = len(output_nodes(original)) - 1  # the model's total loss is its last output

    def run(gm: fx.GraphModule) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        out = tree_leaves(gm(*inputs))
        loss = out[loss_index] + sum((out[i] * out[i]).mean() for i in live)
        return out, list(torch.autograd.grad(loss, params, allow_unused=True))

    (ref_out, ref_grads), (out, grads) = run(original), run(rewritten)
    for i, (got, want) in enumerate(zip(out, ref_out)):
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got.detach(), want.detach())
        assert got.requires_grad == want.requires_grad, f"output {i} changed requires_grad"
    assert all(out[i].requires_grad for i in live)
    for got, want in zip(grads, ref_grads):
        assert (got is None) == (want is None)
        if got is not None:
            assert torch.equal(got, want)


def test_default_pipeline_runs_offload_last_on_the_canonical_graph_and_keeps_loss_gradients_values(
    reference_graphs: dict[str, Any],
) -> None:
    """The declared pipeline (aux-loss rewrite, Domino, then offload on the canonical ATen graph), run eagerly."""
    from moe_passes.pipeline.manager import PassManager

    original = reference_graphs["torch"]
    inputs = reference_graphs["inputs"]
    run = PassManager.from_config(BackendConfig()).apply(copy_graph_module(original), inputs)
    names = [r.name for r in run.records]
    assert names[-1] == "async_offload" and names.index("layerwise_aux_loss") < names.index("async_offload")
    offload = run.records[-1].result
    assert offload.changed and offload.stats["offloaded"] == 2 * reference_graphs["layers"]
    params = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    kinds = classify(original.graph)
    live = [i for i, n in enumerate(output_nodes(original)) if kinds.get(n) == "router_logits"]

    def step(gm: fx.GraphModule) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        out = tree_leaves(gm(*inputs))
        loss = out[-1] + sum((out[i] * out[i]).mean() for i in live)
        return out, list(torch.autograd.grad(loss, params, allow_unused=True))

    (ref_out, ref_grads), (out, grads) = step(original), step(run.gm)
    for got, want in zip(out, ref_out):
        assert got.dtype == want.dtype and got.requires_grad == want.requires_grad
        torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, ref_grads):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_golden_reference_model_trace(reference_graphs: dict[str, Any], update_goldens: bool) -> None:
    traces = {ir: offload_trace(run_pass(reference_graphs[ir])[0]) for ir in ("torch", "aten")}
    assert traces["torch"] == traces["aten"]
    check_golden("offload_reference_model.txt", traces["torch"], update_goldens)


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


def test_never_offloads_outputs_mutated_after_production_and_keeps_live_logits_differentiable(x: torch.Tensor) -> None:
    gm = capture_graphs(_ReturnsLiveLogits(), x)[0].gm
    gm, result = run_pass(gm, BOTH)
    assert result.matched == ["router_logits (router_logits)"]
    assert result.stats["outputs"][0]["device_buffer"] == KEPT_FOR_GRADIENT
    (skip,) = result.skipped
    assert skip.region.endswith("(selected_experts)") and "mutated in place" in skip.reason


class _ReturnsLogitsTwice(nn.Module):
    """Returns one layer's router logits live and detached: two outputs on one device buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.block = SparseMoeBlock(8, 16, 4, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.block(x)
        return out.hidden_states.sum(), out.router_logits, out.router_logits.detach()


def test_second_output_on_an_offloaded_buffer_stays_on_the_device_with_the_reason(x: torch.Tensor) -> None:
    gm = capture_graphs(_ReturnsLogitsTwice(), x)[0].gm
    gm, result = run_pass(gm)
    assert result.stats["offloaded"] == 1
    (skip,) = result.skipped
    assert "shares its device buffer with output" in skip.reason
    assert [n.target is OFFLOAD_WAIT for n in output_nodes(gm)] == [False, True, False]


def test_graph_without_router_outputs_is_left_alone_with_a_reason(x: torch.Tensor, captured: fx.GraphModule) -> None:
    gm = capture_graphs(nn.Sequential(nn.Linear(8, 8), nn.ReLU()), x)[0].gm
    offload = AsyncOffloadPass(BackendConfig())
    assert offload.trigger(gm) is None and offload.trigger(captured) == "4 router tensor(s) among the graph outputs"
    text = graph_text(gm)
    gm, result = run_pass(gm)
    assert not result.changed and graph_text(gm) == text
    # The reason says what was looked for (the data-flow rule) and why nothing qualified.
    reason = result.skipped[0].reason
    assert reason.startswith("no router logits or selected experts among the graph outputs (looked for router logits")
    assert reason.endswith("the graph has no top-k")


def test_unknown_target_kind_is_a_value_error(captured: fx.GraphModule) -> None:
    with pytest.raises(ValueError, match="unknown kind"):
        run_pass(captured, ("router_probs",))


def _logging_step(model: MoEStack) -> Any:
    """A training step's forward that returns layer 0's router logits live (the caller backpropagates
    through them), layer 1's detached (for logging), and every layer's selected experts.

    (Returning one tensor both live and detached makes the *baseline* compile fail in backward on torch
    2.13: "expected Tensor() for op: input" for the aliased output's tangent; not what is tested here.)
    """

    def step(x: torch.Tensor) -> tuple[Any, ...]:
        loss, logits, selected = model(x)
        return loss, logits[:1], tuple(r.detach() for r in logits[1:]), selected

    return step


@pytest.fixture(scope="module")
def compiled_runs(x: torch.Tensor) -> dict[str, Any]:
    """Eager, compiled without and with the pass; the loss backpropagates through the returned live logits too."""
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    model = router_stack(layers=2, hidden=8, experts=4, top_k=2, detach_logits=False)
    step = _logging_step(model)

    def run(fn: Any) -> tuple[Any, list[torch.Tensor]]:
        model.zero_grad()
        out = fn(x)
        loss = out[0] + sum((r * r).mean() for r in out[1])  # a gradient through the returned logits
        loss.backward()
        return out, [p.grad.clone() for p in model.parameters()]

    runs: dict[str, Any] = {"eager": run(step)}
    for label, passes in (("off", ()), ("on", ("async_offload",))):
        torch._dynamo.reset()
        backend = moe_passes.make_backend(passes=passes)
        with torch._dynamo.config.patch(capture_scalar_outputs=True):
            compiled = torch.compile(step, backend=backend, fullgraph=True)
            (out, grads), codes = run_and_get_code(run, compiled)
        runs[label] = (out, grads)
        runs[f"{label}_code"] = codes[0]
        runs[f"{label}_report"] = backend.reports
    torch._dynamo.reset()
    return runs


@pytest.mark.parametrize("label", ["off", "on"])
def test_compiled_loss_outputs_and_gradients_equal_eager(compiled_runs: dict[str, Any], label: str) -> None:
    (ref_out, ref_grads), (out, grads) = compiled_runs["eager"], compiled_runs[label]
    for got, want in zip(tree_leaves(out), tree_leaves(ref_out)):
        assert got.dtype == want.dtype and got.shape == want.shape and got.device.type == "cpu"
        assert got.requires_grad == want.requires_grad
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_pass_on_returns_host_copies_with_the_values_of_the_pass_off_outputs(compiled_runs: dict[str, Any]) -> None:
    off, on = tree_leaves(compiled_runs["off"][0]), tree_leaves(compiled_runs["on"][0])
    for a, b in zip(off[1:], on[1:]):
        assert a.dtype == b.dtype and torch.equal(a, b)
        assert a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
    live = tree_leaves(compiled_runs["on"][0][1])
    assert all(t.requires_grad and t.grad_fn is not None for t in live)  # gradient edge kept, like .cpu()
    report = compiled_runs["on_report"][0]["pre_grad"][0]
    assert report["name"] == "async_offload" and report["stats"]["offloaded"] == 4
    buffers = sorted(r["device_buffer"] for r in report["stats"]["outputs"])
    assert buffers == sorted([KEPT_FOR_GRADIENT, RELEASED] + [KEPT_FOR_BACKWARD] * 2)


_KERNEL = re.compile(r"(cpp_fused_\w+|extern_kernels\.\w+|(?:torch\.ops\.)?aten\.\w+\.\w+|torch\.ops\.(?!moe_passes)\w+\.\w+\.\w+)\(")
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
    """The forward's order in Inductor's output code, normalised: runs of compute collapse to ``compute``,
    each offload start names its producer's op family (``mm`` for the router, ``topk``), waits are listed.

    Kernel names and counts inside the experts are left out, so the golden survives expert-code changes.
    """
    body = code[code.index("def call(") :]
    calls: list[str] = []
    last = ""
    for line in body.splitlines():
        line = line.strip()
        if line.startswith(("assert", "#", "return")):
            continue
        if m := re.search(r"torch\.ops\.moe_passes\.(offload_\w+)\.default\((buf\d+)", line):
            producer = "mm" if re.search(r"\bmm\b|addmm|linear", last) else "topk" if "topk" in last else last
            calls.append(f"{m.group(1)} after {producer}" if m.group(1) == "offload_start" else m.group(1))
        elif m := _KERNEL.search(line):
            last = m.group(1)
            if not calls or calls[-1] != "compute":
                calls.append("compute")
    return "\n".join(calls) + "\n"


def test_golden_inductor_call_order(compiled_runs: dict[str, Any], update_goldens: bool) -> None:
    check_golden("offload_inductor_order.txt", inductor_call_order(compiled_runs["on_code"]), update_goldens)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: device memory and pinned host copies")
def test_cuda_offloaded_outputs_are_pinned_host_copies_and_free_device_memory(model: MoEStack, x: torch.Tensor) -> None:
    dev = torch.device("cuda")
    cuda_model = router_stack(layers=2, hidden=8, experts=4, top_k=2).to(dev)
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
    for got, want in zip(tree_leaves(outs["on"][1:]), tree_leaves(ref[1:])):
        assert got.device.type == "cpu" and got.is_pinned()  # "auto": logits and selected experts
        torch.testing.assert_close(got, want.cpu(), rtol=1e-5, atol=1e-6)
    router_logit_bytes = sum(t.numel() * t.element_size() for t in ref[1])  # selected: topk keeps them for backward
    assert held["off"] - held["on"] >= router_logit_bytes


@pytest.mark.slow
def test_bench_section_reports_router_bytes_offloaded_and_kept_on_both_workloads(monkeypatch: pytest.MonkeyPatch) -> None:
    """The section's four compiles lower with ``aot_eager`` here: its byte columns come from the pre-grad
    graph and the pass's report, and the measured column (only checked non-zero) from running the compiled
    step, none of which Inductor decides. Inductor on both workloads with the pass is proven by the default
    suite's ``compiled_runs`` (a router stack, pass off and on, checked against eager) and the slow
    routing-replay example (the reference model, 2 ranks)."""
    from moe_passes.bench import BenchOptions
    from moe_passes.bench.offload import run

    make_backend = moe_passes.make_backend
    monkeypatch.setattr(moe_passes, "make_backend", lambda **kw: make_backend(lowering="aot_eager", **kw))
    section = run(BenchOptions(quick=True))
    rows = {(r["workload"], r["offload"]): r for r in section.rows}
    assert list(rows) == [("router_stack", "off"), ("router_stack", "on"), ("interns1_vl", "off"), ("interns1_vl", "on")]
    for workload in ("router_stack", "interns1_vl"):
        off, on = rows[(workload, "off")], rows[(workload, "on")]
        assert off["router_device_bytes_returned"] > 0 and on["router_device_bytes_returned"] == 0
        assert off["router_bytes_offloaded"] == 0 and on["router_bytes_offloaded"] == off["router_device_bytes_returned"]
        assert 0 < on["router_device_bytes_kept"] < off["router_device_bytes_kept"]  # topk's indices stay for backward
        assert off["measured_cpu_bytes_at_end"] > 0 and on["measured_cpu_bytes_at_end"] > 0
    stack_off, stack_on = rows[("router_stack", "off")], rows[("router_stack", "on")]
    assert stack_off["static_device_bytes_at_end"] - stack_on["static_device_bytes_at_end"] == stack_off["router_device_bytes_returned"]


def _ep_rank(rank: int, world_size: int) -> dict[str, Any]:
    """One EP rank: eager vs compiled with the pass, forward and backward; returns the largest differences.
    Lowered with ``aot_eager`` (the pass runs pre-grad: its numerics on expert-parallel ranks); the 2-rank
    Inductor run with the pass is the routing-replay example's below (its replay checks the compiled step's
    routing against eager), Inductor's loss and gradients with the pass the default suite's ``compiled_runs``."""
    import torch.distributed as dist

    torch.manual_seed(0)
    ep_model = router_stack(layers=2, hidden=8, experts=4, top_k=2, ep_group=dist.group.WORLD)
    x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(100 + rank))

    def step(fn: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        ep_model.zero_grad()
        out = fn(x)
        out[0].backward()
        return tree_leaves(out), [p.grad.clone() for p in ep_model.parameters()]

    ref_out, ref_grads = step(ep_model)
    backend = moe_passes.make_backend(passes=("async_offload",), offload_targets=BOTH, lowering="aot_eager")
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
def test_default_pipeline_on_the_reference_model_as_users_run_it_keeps_loss_and_every_gradient() -> None:
    """``model(ids, labels=ids, output_router_logits=True)`` under the default backend: router logits and
    selected experts come back as host copies with eager's values; loss and every gradient, including one
    through the returned logits, equal eager's. Lowered with ``aot_eager``: the passes run before the
    lowering, so this is the whole pipeline's rewrite through Dynamo and AOTAutograd; Inductor on the
    reference model with ``async_offload`` is the routing-replay example's (2 ranks, below), after the
    default pipeline's three passes (on a stack) ``test_regional``'s slow
    ``test_domino_backend_with_default_passes_compiles_one_graph_for_all_layers``."""
    from moe_passes.models.interns1_vl import InternS1VLConfig, InternS1VLForConditionalGeneration

    torch.manual_seed(0)
    config = InternS1VLConfig.tiny()
    vlm = InternS1VLForConditionalGeneration(config)
    ids = torch.randint(0, config.text.vocab_size, (2, 8))

    def step(fn: Any) -> tuple[Any, list[torch.Tensor | None]]:
        vlm.zero_grad()
        out = fn(ids, labels=ids, output_router_logits=True)
        (out.loss + sum((r * r).mean() for r in out.router_logits)).backward()
        return out, [p.grad for p in vlm.parameters()]

    backend = moe_passes.make_backend(lowering="aot_eager")
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        out, grads = step(torch.compile(vlm, backend=backend, fullgraph=True))
    ref_out, ref_grads = step(vlm)
    offload = next(r for r in backend.reports[0]["pre_grad"] if r["name"] == "async_offload")
    assert offload["stats"]["offloaded"] == 2 * config.text.num_hidden_layers
    torch.testing.assert_close(out.loss, ref_out.loss, rtol=1e-5, atol=1e-5)
    for got, want in zip(out.router_logits + out.selected_experts, ref_out.router_logits + ref_out.selected_experts):
        assert got.dtype == want.dtype and got.requires_grad == want.requires_grad
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_routing_replay_example_logs_expert_load_from_host_copies_and_replays_exactly(tmp_path: Any) -> None:
    """``examples/routing_replay.py`` on 2 gloo ranks (compiles the tiny model on each rank: slow)."""
    import subprocess
    import sys
    from pathlib import Path

    from moe_passes.models.interns1_vl import InternS1VLConfig

    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, str(root / "examples" / "routing_replay.py"), "--steps", "2", "--record", str(tmp_path / "routing")],
        cwd=root, capture_output=True, text=True, timeout=1500,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    config = InternS1VLConfig.tiny()
    layers, top_k = config.text.num_hidden_layers, config.text.num_experts_per_tok
    out = proc.stdout
    assert f"async_offload: {2 * layers} router outputs to the host" in out
    loads = [eval(m.group(1)) for m in re.finditer(r"expert load (\[[\d, ]+\])", out)]  # noqa: S307 - our own printout
    assert len(loads) == 2 * layers
    assert all(len(row) == config.text.num_experts and sum(row) == 2 * 2 * 16 * top_k for row in loads)  # 2 ranks x 32 tokens
    assert "replay of step 1: " in out and "reproduced exactly" in out
    for rank in range(2):
        recorded = torch.load(tmp_path / f"routing.rank{rank}.pt")
        assert [r["step"] for r in recorded] == [1, 2]
        assert all(len(r["selected_experts"]) == layers and r["selected_experts"][0].shape == (32, top_k) for r in recorded)
