"""The default pipeline on an expert-parallel graph: the three passes must compose.

Each pass is proven on its own in its own tests; this checks what only the
backend sees, every pass running on the previous pass's output, validated
after each, on the EP MoE stack (fake 2-rank group, no compile).
"""

from __future__ import annotations

from typing import Iterator

import pytest

from moe_passes import BackendConfig
from moe_passes.cli.targets import moe_stack
from moe_passes.config import DEFAULT_PASSES
from moe_passes.harness.capture import CapturedGraph, capture_graphs
from moe_passes.ir.facts import collective_nodes
from moe_passes.pipeline.manager import PassManager, copy_graph_module
from moe_passes.pipeline.order import pipeline_names
from tests.distributed import fake_group


@pytest.fixture(scope="module")
def ep_graph() -> Iterator[CapturedGraph]:
    with fake_group(2):  # capture runs the stack: its split sizes come from the all-to-all's output
        target = moe_stack()
        (captured,) = capture_graphs(target.fn, *target.example_inputs)
        yield captured


def test_default_passes_compose_on_an_ep_graph(ep_graph: CapturedGraph) -> None:
    gm = copy_graph_module(ep_graph.gm)
    run = PassManager.from_config(BackendConfig(num_chunks=2)).apply(gm, ep_graph.example_inputs)
    by_name = {r.name: r.result for r in run.records}
    assert list(by_name) == pipeline_names(DEFAULT_PASSES, BackendConfig())
    assert not any(r.error for r in by_name.values()), {n: r.error for n, r in by_name.items()}
    assert by_name["layerwise_aux_loss"].changed and by_name["domino_ep"].changed
    assert run.ir == "aten"
    assert len(collective_nodes(run.gm.graph)) == 12


def test_listing_domino_before_the_aux_pass_changes_nothing(ep_graph: CapturedGraph) -> None:
    """The order is declared, not listed: naming domino_ep first still runs the aux pass first, and both apply
    (listed in that order, the aux pass used to decline: "cat on stacked rows is not understood")."""
    gm = copy_graph_module(ep_graph.gm)
    config = BackendConfig(passes=("domino_ep", "layerwise_aux_loss"), num_chunks=2)
    run = PassManager.from_config(config).apply(gm, ep_graph.example_inputs)
    assert [r.name for r in run.records] == ["layerwise_aux_loss", "domino_ep"]
    assert all(r.result.changed for r in run.records), [r.result.skipped for r in run.records]
