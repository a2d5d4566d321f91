"""schedule_overlap: chunk k+1's all-to-all is in flight during chunk k's expert matmuls.

Checked where it matters, in Inductor's final output code, forward and
backward, for the 2-layer test model with 2 chunks (compiled once on a fake
process group: nothing runs, so no ranks are needed).  Numerics of the
scheduled graphs are covered by tests/test_domino_ep.py (the equivalence
runs compile with this pass on).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterator
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.fx as fx

from moe_passes.config import BackendConfig
from moe_passes.fx.domino import DominoEPPass
from moe_passes.inductor.schedule import (
    INDUCTOR_CONFIG,
    ScheduleOverlapPass,
    as_custom_pass,
    is_heavy,
    overlap_order,
    overlap_stats,
    plan_overlap,
    sizing_exchanges,
)
from moe_passes.ir.canonical import canonicalize
from moe_passes.ir.facts import is_all_to_all as is_a2a
from moe_passes.ir.facts import is_wait
from moe_passes.ir.graph_text import normalize_text
from moe_passes.testing import run_pass
from tests.distributed import fake_group
from tests.domino_helpers import TinyMoEStack, capture_without_running, init_biased, make_inputs
from tests.golden import check_golden

_A2A = re.compile(r"(\w+) = torch\.ops\._c10d_functional\.all_to_all_single\.default\((\w+), \[([^\]]*)\], \[([^\]]*)\]")
_WAIT = re.compile(r"torch\.ops\._c10d_functional\.wait_tensor\.default\((\w+)\)")
# expert compute: ATen matmuls (extern kernels) and grouped-GEMM expert ops (``bufN = torch.ops.ns.grouped_mm...``)
_MM = re.compile(r"(extern_kernels\.(mm|addmm|bmm)|\w+ = torch\.ops\.\w+\.\w*grouped_mm\w*\.default)\(")


@dataclass
class Compiled:
    codes: list[str]  # Inductor output code: forward, backward
    graphs: list[str]  # scheduled post-grad graphs (a2a / wait / matmul listing)
    reports: list[Any]


def _listing(graph: fx.Graph) -> str:
    """The scheduled post-grad order as a compact listing: collectives, waits, runs of matmuls."""
    lines: list[str] = []
    for n in graph.nodes:
        if is_a2a(n):
            lines.append(f"all_to_all {n.name}({n.args[0].name})")
        elif is_wait(n):
            lines.append(f"wait {n.args[0].name}")
        elif is_heavy(n):
            if lines and lines[-1].startswith("matmul x"):
                lines[-1] = f"matmul x{int(lines[-1][8:]) + 1}"
            else:
                lines.append("matmul x1")
    return normalize_text("\n".join(lines))


@pytest.fixture(scope="module")
def compiled() -> Iterator[Compiled]:
    with fake_group(2, values_matter=False):  # graphs are compiled, never run
        model = TinyMoEStack(dist.group.WORLD)
        init_biased(model, seed=1, world_size=2)
        config = BackendConfig(num_chunks=2, passes=("domino_ep",))
        out = Compiled([], [], [])
        scheduler = ScheduleOverlapPass(config)

        class Recording(ScheduleOverlapPass):
            def __call__(self, gm: fx.GraphModule) -> Any:
                result = scheduler(gm)
                out.reports.append(result)
                out.graphs.append(_listing(gm.graph))
                return result

        def compile_graph(gm: fx.GraphModule, example_inputs: list[Any]) -> None:
            from torch._inductor.compile_fx import compile_fx

            canon = canonicalize(gm, example_inputs)  # as the backend does before an "aten" pass
            assert canon.canonical, canon.reason
            gm = canon.gm
            run_pass(DominoEPPass(config), gm)
            patch = {"post_grad_custom_post_pass": as_custom_pass(Recording(config)), "fx_graph_cache": False, **INDUCTOR_CONFIG}
            with torch._inductor.config.patch(patch), torch._functorch.config.patch(force_non_lazy_backward_lowering=True):
                compile_fx(gm, example_inputs)

        from torch._inductor.graph import GraphLowering

        with mock.patch.object(GraphLowering, "save_output_code", out.codes.append):
            capture_without_running(model, make_inputs(0, 0, 12), compile_with=compile_graph)
        yield out


def code_events(code: str) -> list[tuple[str, str]]:
    """(kind, buffer) per all-to-all issue, wait and matmul in the output code's call()."""
    events: list[tuple[str, str]] = []
    for line in code[code.index("def call(") :].splitlines():
        line = line.strip()
        if m := _A2A.match(line):
            events.append(("a2a", m.group(1), m.group(3), m.group(4)))  # type: ignore[arg-type]
        elif m := _WAIT.match(line):
            events.append(("wait", m.group(1)))
        elif _MM.match(line):
            events.append(("mm", ""))
    return events


def token_pairs(events: list[tuple[str, ...]]) -> list[tuple[str, str]]:
    """(first, second) all-to-all buffers of each chunk's token exchange, in issue order.

    Token all-to-alls have data-dependent splits (unbacked symbols); a chunk's
    second exchange mirrors its first's split sizes (dispatch/combine in the
    forward, their gradients in the backward).
    """
    token = [e for e in events if e[0] == "a2a" and re.search(r"\bu\d+", e[2])]
    pairs = []
    used: set[str] = set()
    for i, a in enumerate(token):
        if a[1] in used:
            continue
        b = next(b for b in token[i + 1 :] if b[2] == a[3] and b[3] == a[2] and b[1] not in used)
        used.update((a[1], b[1]))
        pairs.append((a[1], b[1]))
    return pairs


def assert_next_chunk_overlaps(code: str, label: str) -> int:
    """For every consecutive pair of chunks: chunk k+1's first all-to-all brackets chunk k's expert matmuls."""
    events = code_events(code)
    pos = {(e[0], e[1]): i for i, e in enumerate(events) if e[0] != "mm"}
    pairs = token_pairs(events)
    assert len(pairs) == 4, f"{label}: expected 2 layers x 2 chunks of token exchanges, found {pairs}"
    checked = 0
    for layer in range(2):
        (first0, second0), (first1, _) = pairs[2 * layer], pairs[2 * layer + 1]
        experts = [i for i in range(pos[("wait", first0)], pos[("a2a", second0)]) if events[i][0] == "mm"]
        assert experts, f"{label}: no expert matmul of chunk 0 between its exchanges"
        assert pos[("a2a", first1)] < experts[0], f"{label} layer {layer}: chunk 1 issued after chunk 0's experts started"
        assert pos[("wait", first1)] > experts[-1], f"{label} layer {layer}: chunk 1 waited before chunk 0's experts finished"
        checked += 1
    return checked


def test_forward_and_backward_graphs_are_scheduled(compiled: Compiled) -> None:
    assert len(compiled.reports) == 2, "one forward and one backward post-grad graph"
    for r in compiled.reports:
        assert r.changed
        before, after = r.stats["before"], r.stats["after"]
        assert after["all_to_all"] == before["all_to_all"]
        assert after["overlapped"] > before["overlapped"]
        assert after["max_in_flight"] <= 2  # config.max_chunks_in_flight


def test_scheduled_graph_goldens(compiled: Compiled, update_goldens: bool) -> None:
    check_golden("domino_schedule_fw.txt", compiled.graphs[0], update_goldens)
    check_golden("domino_schedule_bw.txt", compiled.graphs[1], update_goldens)


def test_forward_output_code_overlaps_chunks(compiled: Compiled) -> None:
    assert len(compiled.codes) == 2
    assert assert_next_chunk_overlaps(compiled.codes[0], "forward") == 2


def test_backward_output_code_overlaps_chunks(compiled: Compiled) -> None:
    assert assert_next_chunk_overlaps(compiled.codes[1], "backward") == 2


def test_output_code_golden(compiled: Compiled, update_goldens: bool) -> None:
    for name, code in zip(("fw", "bw"), compiled.codes):
        events = code_events(code)
        names: dict[str, str] = {}
        lines = []
        for e in events:
            if e[0] == "mm":
                if lines and lines[-1].startswith("matmul x"):
                    lines[-1] = f"matmul x{int(lines[-1][8:]) + 1}"
                else:
                    lines.append("matmul x1")
                continue
            label = names.setdefault(e[1], f"comm{len(names)}")
            lines.append(f"issue {label} splits [{e[2]}] [{e[3]}]" if e[0] == "a2a" else f"wait {label}")
        check_golden(f"domino_output_code_{name}.txt", normalize_text("\n".join(lines)), update_goldens)


def _chain(graph: fx.Graph, steps: int) -> list[fx.Node]:
    """A toy post-grad graph: per chunk, an all-to-all, its wait, then a matmul on the result."""
    x = graph.placeholder("x")
    w = graph.placeholder("w")
    outs = []
    for _ in range(steps):
        a = graph.call_function(torch.ops._c10d_functional.all_to_all_single.default, (x, [1, 1], [1, 1], "0"))
        t = graph.call_function(torch.ops._c10d_functional.wait_tensor.default, (a,))
        outs.append(graph.call_function(torch.ops.aten.mm.default, (t, w)))
    graph.output(tuple(outs))
    return outs


@pytest.mark.parametrize("bound", [1, 2, 3])
def test_in_flight_bound_is_respected(bound: int) -> None:
    graph = fx.Graph()
    _chain(graph, 4)
    order = overlap_order(graph, bound)
    graph2 = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in order:
        env[n] = graph2.node_copy(n, lambda a: env[a])
    graph2.lint()
    stats = overlap_stats(graph2)
    assert stats["max_in_flight"] == bound
    assert stats["overlapped"] >= 3  # every later chunk's all-to-all overlaps the previous chunk's matmul


def test_count_exchanges_are_not_held_back_by_the_in_flight_bound() -> None:
    """The bound limits receive buffers of rows; a count exchange holds a few counts and only sizes the next
    dispatch, so with one row all-to-all in flight the next chunks' counts are still exchanged (held back, they
    would hold back their dispatch: the 4-micro-batch decoder's third count exchange waited for the first
    dispatch to retire)."""
    a2a, wait = torch.ops._c10d_functional.all_to_all_single.default, torch.ops._c10d_functional.wait_tensor.default
    g = fx.Graph()
    x, w = g.placeholder("x"), g.placeholder("w")
    outs = []
    for k in range(3):
        h = g.call_function(torch.ops.aten.mm.default, (x, w), name=f"attn{k}")
        cnt = g.call_function(torch.ops.aten.sum.dim_IntList, (h, [1]), name=f"counts{k}")
        c = g.call_function(a2a, (cnt, [1, 1], [1, 1], "0"), name=f"count_exchange{k}")
        size = g.call_function(torch.ops.aten._local_scalar_dense.default, (g.call_function(wait, (c,)),))
        d = g.call_function(a2a, (h, [size, size], [size, size], "0"), name=f"dispatch{k}")
        outs.append(g.call_function(torch.ops.aten.mm.default, (g.call_function(wait, (d,), name=f"wait_dispatch{k}"), w)))
    g.output(tuple(outs))
    assert sorted(n.name for n in sizing_exchanges(list(g.nodes))) == ["count_exchange0", "count_exchange1", "count_exchange2"]
    order = overlap_order(g, 1)
    pos = {n.name: i for i, n in enumerate(order)}
    assert pos["count_exchange1"] < pos["wait_dispatch0"] and pos["count_exchange2"] < pos["wait_dispatch0"]
    assert pos["dispatch1"] > pos["wait_dispatch0"] and pos["dispatch2"] > pos["wait_dispatch1"]  # rows: one at a time
    g2 = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in order:
        env[n] = g2.node_copy(n, lambda a: env[a])
    assert overlap_stats(g2)["max_in_flight"] == 1


def test_graph_without_collectives_is_skipped() -> None:
    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_function(torch.ops.aten.mm.default, (x, x)))
    gm = fx.GraphModule({}, graph)
    result = ScheduleOverlapPass(BackendConfig())(gm)
    assert not result.changed and result.skipped[0].reason == "no all-to-all in this graph"


def test_in_place_writes_keep_their_readers_on_the_right_side() -> None:
    """A buffer written in place (``copy_``) is read before the write by a node the scheduler would otherwise delay."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    w = graph.placeholder("w")
    buf = graph.placeholder("buf")
    a = graph.call_function(torch.ops._c10d_functional.all_to_all_single.default, (x, [1, 1], [1, 1], "0"))
    t = graph.call_function(torch.ops._c10d_functional.wait_tensor.default, (a,))
    mm = graph.call_function(torch.ops.aten.mm.default, (t, w))
    read = graph.call_function(torch.ops.aten.add.Tensor, (buf, mm))  # reads the old buffer, after the wait
    write = graph.call_function(torch.ops.aten.copy_.default, (buf, x))  # ready at once: data flow alone would hoist it
    graph.output((read, write))
    order = overlap_order(graph, 2)
    assert order.index(read) < order.index(write)
    assert order.index(a) < order.index(t)


def _tangent(g: fx.Graph, name: str) -> fx.Node:
    """A placeholder AOTAutograd labels as a tangent (the incoming gradient of a backward graph)."""
    from torch._functorch._aot_autograd.descriptors import PlainAOTOutput, TangentAOTInput

    t = g.placeholder(name)
    t.meta["desc"] = TangentAOTInput(PlainAOTOutput(0))
    return t


def _a2a(g: fx.Graph, x: fx.Node) -> tuple[fx.Node, fx.Node]:
    a = g.call_function(torch.ops._c10d_functional.all_to_all_single.default, (x, [2, 2], [2, 2], "0"))
    return a, g.call_function(torch.ops._c10d_functional.wait_tensor.default, (a,))


def _recompute_graph(tagged: bool, tangent: bool) -> tuple[fx.Graph, fx.Node, list[fx.Node]]:
    """A backward graph: the incoming gradient's all-to-all, and the next layer's recomputed forward (three
    matmuls from a saved input, ready from the start) that only the gradient after the wait needs."""
    from torch.utils.checkpoint import CheckpointPolicy

    g = fx.Graph()
    x = _tangent(g, "grad") if tangent else g.placeholder("grad")
    saved, w = g.placeholder("saved_layer_input"), g.placeholder("weight")
    _, wait = _a2a(g, x)
    grad_in = g.call_function(torch.ops.aten.mm.default, (wait, w))
    recompute = []
    h = saved
    for _ in range(3):
        h = g.call_function(torch.ops.aten.mm.default, (h, w))
        if tagged:
            h.meta.update(recompute=CheckpointPolicy.PREFER_RECOMPUTE, ac_graph_id=1)
        recompute.append(h)
    g.output(g.call_function(torch.ops.aten.add.Tensor, (grad_in, h)))
    return g, wait, recompute


@pytest.mark.parametrize("tagged, tangent", [(True, True), (False, True), (True, False)],
                         ids=["checkpoint-tags", "gradient-independent", "tags-only-fallback"])
def test_checkpoint_recomputation_is_not_hoisted_above_a_pending_wait(tagged: bool, tangent: bool) -> None:
    """In a backward graph, recomputation (and any other work that does not depend on the incoming gradient)
    is ready from the start; the scheduler sinks waits below ready compute, so without a rule it would run
    every layer's recomputation first and keep it alive (measured 1.37x the checkpointed peak,
    ``moe-passes bench --section checkpointing``). It runs after the pending wait, in its own order. Found
    from data flow (no path from a tangent input, as AOTAutograd labels them) with or without checkpoint
    tags; from the tags alone where the graph has no tangent labels but is known to be a backward graph."""
    g, wait, recompute = _recompute_graph(tagged, tangent)
    order = [n.name for n in overlap_order(g, max_in_flight=2, backward=True)]
    assert order.index(wait.name) < min(order.index(r.name) for r in recompute), order
    assert [n for n in order if n in {r.name for r in recompute}] == [r.name for r in recompute], order


def test_forward_graphs_overlap_checkpointed_compute() -> None:
    """A forward graph carries the same checkpoint tags on everything a checkpointed layer computes; they
    must not hold its compute behind the wait (they did: 0 of 24 forward all-to-alls overlapped with
    per-layer checkpointing, bench --section checkpointing)."""
    g, wait, recompute = _recompute_graph(tagged=True, tangent=False)
    order = [n.name for n in overlap_order(g, max_in_flight=2)]  # no tangent: a forward graph
    assert order.index(recompute[0].name) < order.index(wait.name), order


def test_recomputation_feeding_the_next_all_to_alls_fills_the_open_window() -> None:
    """Backward of one checkpointed Domino layer, two chunks: each chunk's gradient all-to-all needs that
    chunk's recomputed routing. Chunk 1's recomputation is hoisted into chunk 0's all-to-all window (the
    next ``max_in_flight`` all-to-alls' inputs run early: the overlap), the next layer's only once an
    all-to-all before it has issued (bounded: nothing is recomputed for all-to-alls that cannot issue yet)."""
    g = fx.Graph()
    grad = _tangent(g, "grad")
    saved, w = g.placeholder("saved"), g.placeholder("w")
    recomputed: list[fx.Node] = []
    issues: list[fx.Node] = []
    waits: list[fx.Node] = []
    carry = grad
    for _layer in range(2):
        outs = []
        for _chunk in range(2):
            r = g.call_function(torch.ops.aten.mm.default, (saved, w))  # this chunk's recomputed routing
            recomputed.append(r)
            a, t = _a2a(g, g.call_function(torch.ops.aten.mul.Tensor, (carry, r)))
            issues.append(a)
            waits.append(t)
            outs.append(g.call_function(torch.ops.aten.mm.default, (t, w)))
        carry = g.call_function(torch.ops.aten.add.Tensor, tuple(outs))
    g.output(carry)
    plan = plan_overlap(g, max_in_flight=2)
    pos = {n: i for i, n in enumerate(plan.order)}
    assert plan.deferred == 4
    assert pos[issues[0]] < pos[recomputed[1]] < pos[waits[0]], "chunk 1's recompute runs in chunk 0's window"
    assert pos[recomputed[2]] > pos[issues[0]], "the next layer's recompute waits for an all-to-all to issue"
    assert pos[recomputed[3]] > pos[issues[1]], "... and the one after it for the next"


def test_weight_gradient_gemms_fill_all_to_all_windows() -> None:
    """``defer_weight_grads``: a GEMM that feeds only a parameter's gradient output runs inside an open
    all-to-all window instead of before the next issue; the report names the window and the bytes its
    inputs are held for. Parameter gradients come from AOTAutograd's output descriptors and the forward's
    static (parameter) input indices, here given by hand."""
    from torch._functorch._aot_autograd.descriptors import GradAOTOutput, PlainAOTInput
    from torch._guards import TracingContext, tracing
    from torch._subclasses.fake_tensor import FakeTensorMode

    from moe_passes.inductor.dw_deferral import deferral_report, parameter_gradient_outputs, weight_gradient_gemms

    mode = FakeTensorMode()
    g = fx.Graph()
    grad = _tangent(g, "grad")
    x, w = g.placeholder("x_saved"), g.placeholder("w")
    with mode:
        for n, shape in ((grad, (8, 4)), (x, (8, 4)), (w, (4, 4))):
            n.meta["val"] = torch.empty(shape)

    def op(target: Any, *args: Any) -> fx.Node:
        node = g.call_function(target, args)
        with mode:
            node.meta["val"] = target(*[a.meta["val"] if isinstance(a, fx.Node) else a for a in args])
        return node

    dgrad = op(torch.ops.aten.mm.default, grad, op(torch.ops.aten.permute.default, w, [1, 0]))  # dX = dY @ W^T
    x_in = op(torch.ops.aten.mul.Tensor, x, 2.0)  # the activation the weight gradient needs, freed after it
    a = op(torch.ops._c10d_functional.all_to_all_single.default, dgrad, [4, 4], [4, 4], "0")
    wgrad = op(torch.ops.aten.mm.default, op(torch.ops.aten.permute.default, x_in, [1, 0]), grad)  # dW = X^T @ dY
    t = op(torch.ops._c10d_functional.wait_tensor.default, a)
    out = g.output((op(torch.ops.aten.mm.default, t, w), None, wgrad))
    out.meta["desc"] = [GradAOTOutput(PlainAOTInput(0)), None, GradAOTOutput(PlainAOTInput(2))]
    ctx = TracingContext(mode)
    ctx.fw_metadata = type("Meta", (), {"static_input_indices": [2]})()  # input 2 is the parameter
    with tracing(ctx):
        params = parameter_gradient_outputs(g)
        assert params.positions == {2}
        assert weight_gradient_gemms(g, is_heavy) == [wgrad]
        plan = plan_overlap(g, 2, defer_weight_grads=True)
    pos = {n: i for i, n in enumerate(plan.order)}
    assert plan.weight_grads == [wgrad]
    assert pos[a] < pos[wgrad] < pos[t], [n.name for n in plan.order]
    report = deferral_report(plan.order, plan.weight_grads)
    assert report.in_windows == 1 and report.windows == {a.name: [wgrad.name]}
    assert report.held_bytes == 8 * 4 * 4  # x_in (8x4 fp32) kept past its last other use (there is none) until dW
    ctx.fw_metadata = type("Meta", (), {"static_input_indices": []})()  # no parameter: nothing is a dW GEMM
    with tracing(ctx):
        assert weight_gradient_gemms(g, is_heavy) == []
