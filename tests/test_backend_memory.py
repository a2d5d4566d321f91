"""Static estimates (cost/memory.py) and the shared vocabulary (ir/facts.py), checked by hand-computed numbers."""

from __future__ import annotations

from typing import Iterator

import pytest
import torch
import torch.fx as fx

from moe_passes.cli.targets import moe_stack
from moe_passes.cost.memory import estimate_graph
from moe_passes.harness.capture import CapturedGraph, capture_graphs
from moe_passes.ir.facts import (
    collective_kind,
    collective_nodes,
    is_all_to_all,
    is_collective,
    is_wait,
    wait_nodes,
    waits_of,
)
from moe_passes.testing import find_module_regions, group_by_module
from tests.distributed import fake_group


@pytest.fixture(scope="module")
def ep_graph() -> Iterator[CapturedGraph]:
    """The 2-layer MoE stack with EP over a fake 2-rank group (destroyed afterwards: other tests run without one)."""
    with fake_group(2):  # capture runs the stack: its split sizes come from the all-to-all's output
        target = moe_stack()
        (captured,) = capture_graphs(target.fn, *target.example_inputs)
        yield captured


def test_peak_counts_inputs_and_frees_after_last_use() -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        y = x * 2  # 4000 B
        z = y.view(10, 100) + 1  # the view is free, the add is 4000 B; y dies here
        return z.sum()

    (captured,) = capture_graphs(f, torch.randn(1000))
    est = estimate_graph(captured.gm)
    assert est.input_bytes == 4000
    assert est.peak_live_bytes == 4000 + 4000 + 4000
    assert est.peak_node == "z"
    assert est.bytes_communicated == 0 and est.num_collectives == 0


def test_collective_bytes_with_unbacked_split_sizes(ep_graph: CapturedGraph) -> None:
    est = estimate_graph(ep_graph.gm)
    # per layer: counts (4 experts x int64) + dispatch and combine of T*K = 2*4*2 = 16 rows x 16 fp32
    per_layer = 4 * 8 + 2 * (16 * 16 * 4)
    assert est.bytes_communicated == 2 * per_layer
    assert est.bytes_by_collective == {"all_to_all_single": 2 * per_layer}
    assert est.num_collectives == 6 and est.num_waits == 6
    assert est.unhinted_sizes > 0  # the split sizes were estimated (uniform routing), and it says so


def test_estimate_leaves_node_meta_untouched(ep_graph: CapturedGraph) -> None:
    before = {n.name: set(n.meta) for n in ep_graph.gm.graph.nodes}
    estimate_graph(ep_graph.gm)
    assert {n.name: set(n.meta) for n in ep_graph.gm.graph.nodes} == before


def test_moe_regions_are_found_per_layer(ep_graph: CapturedGraph) -> None:
    regions = find_module_regions(ep_graph.gm.graph)
    assert [r.path for r in regions] == ["L['self'].layers.0", "L['self'].layers.1"]
    for region in regions:
        assert region.module_type == "SparseMoeBlock"
        assert len(region.all_to_alls) == 3 and len(region.waits) == 3
        assert all(n in region.nodes for n in region.all_to_alls)


def test_collectives_and_waits_in_torch_ir(ep_graph: CapturedGraph) -> None:
    graph = ep_graph.gm.graph
    collectives = collective_nodes(graph)
    assert len(collectives) == 6 and all(is_all_to_all(n) for n in collectives)
    assert {collective_kind(n) for n in collectives} == {"all_to_all_single"}
    assert len(wait_nodes(graph)) == 6
    assert all(len(waits_of(n)) == 1 for n in collectives)
    assert not any(is_collective(n) for n in wait_nodes(graph))


def test_collectives_and_waits_in_aten_ir() -> None:
    graph = fx.Graph()
    x = graph.placeholder("x")
    reduced = graph.call_function(torch.ops._c10d_functional.all_reduce.default, (x, "sum", "0"))
    waited = graph.call_function(torch.ops._c10d_functional.wait_tensor.default, (reduced,))
    added = graph.call_function(torch.ops.aten.add.Tensor, (waited, x))
    graph.output(added)
    assert is_collective(reduced) and collective_kind(reduced) == "all_reduce" and not is_all_to_all(reduced)
    assert is_wait(waited) and not is_collective(waited)
    assert not is_collective(added) and not is_wait(added)
    assert waits_of(reduced) == [waited]


def test_group_by_module(ep_graph: CapturedGraph) -> None:
    groups = group_by_module(ep_graph.gm.graph)
    assert "L['self'].layers.0.gate" in groups and "L['self'].layers.1.gate" in groups
    outer = group_by_module(ep_graph.gm.graph, depth=0)
    assert list(outer) == ["L['self'].layers.0", "L['self'].layers.1"]


@pytest.mark.slow
def test_compiled_memory_rows_show_the_layerwise_saving() -> None:
    """The bench's Inductor view (profiler allocation events of the compiled step): stacked aux loss costs memory,
    the layer-wise one (backend passes=('layerwise_aux_loss',), loss checked equal inside) a fraction of it."""
    from moe_passes.bench.memory import measure_compiled

    row = measure_compiled(4, hidden=16, ffn=16, num_experts=32, top_k=4, tokens=512, device=torch.device("cpu"))
    assert row["view"] == "Inductor"
    assert row["aux_overhead_stacked_MiB"] > 0.5, row
    assert row["aux_overhead_layerwise_MiB"] <= 0.5 * row["aux_overhead_stacked_MiB"], row
    assert row["step_ms_off"] > 0 and row["step_ms_stacked"] > 0 and row["step_ms_layerwise"] > 0
