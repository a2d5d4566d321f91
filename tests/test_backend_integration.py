"""The default pipeline on an expert-parallel graph: the three passes must compose.

Each pass is proven on its own in its own tests; this checks what only the
backend sees, every pass running on the previous pass's output, validated
after each, on the EP MoE stack (fake 2-rank group, no compile).
"""

from __future__ import annotations

from typing import Iterator

import pytest
import torch.distributed as dist

from moe_passes import BackendConfig
from moe_passes.fx.capture import CapturedGraph, capture_graphs
from moe_passes.fx.match import collective_nodes
from moe_passes.fx.pass_manager import PassManager, copy_graph_module
from moe_passes.targets import moe_stack


@pytest.fixture(scope="module")
def ep_graph() -> Iterator[CapturedGraph]:
    from torch.testing._internal.distributed.fake_pg import FakeStore

    assert not dist.is_initialized(), "another test left a process group initialised; destroy it in its teardown"
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        target = moe_stack()
        (captured,) = capture_graphs(target.fn, *target.example_inputs)
        yield captured
    finally:
        dist.destroy_process_group()


def test_default_passes_compose_on_an_ep_graph(ep_graph: CapturedGraph) -> None:
    gm = copy_graph_module(ep_graph.gm)
    records = PassManager.from_config(BackendConfig(num_chunks=2)).run(gm, ep_graph.example_inputs)
    by_name = {r.name: r.result for r in records}
    assert list(by_name) == ["layerwise_aux_loss", "domino_ep", "async_offload"]
    assert by_name["layerwise_aux_loss"].changed and by_name["domino_ep"].changed
    assert len(collective_nodes(gm.graph)) == 12


@pytest.mark.parametrize("order", [("domino_ep", "layerwise_aux_loss")])
def test_domino_then_aux_loss_is_valid_even_when_the_aux_pass_declines(ep_graph: CapturedGraph, order: tuple[str, ...]) -> None:
    """Whatever a later pass decides, the pipeline output is a valid graph and every skip has a reason."""
    gm = copy_graph_module(ep_graph.gm)
    records = PassManager.from_config(BackendConfig(passes=order, num_chunks=2)).run(gm, ep_graph.example_inputs)
    assert records[0].result.changed
    for record in records:
        assert record.result.changed or record.result.skipped, f"{record.name} changed nothing and gave no reason"
