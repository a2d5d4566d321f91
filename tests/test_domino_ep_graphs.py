"""Domino EP on captured graphs (fake process group, nothing runs): what it rewrites and what it refuses."""

from __future__ import annotations

from typing import Iterator

import pytest
import torch
import torch.distributed as dist

from models.interns1_vl.moe import SparseMoeBlock
from moe_passes.config import BackendConfig
from moe_passes.fx.domino_ep import DominoEPPass, chunk_sizes
from moe_passes.fx.graph_text import graph_text
from tests.golden import check_golden
from tests.test_domino_model import HIDDEN, INTER, capture_without_running, init_fake_group


@pytest.fixture(scope="module")
def ep_group() -> Iterator[dist.ProcessGroup]:
    init_fake_group(2)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def _block_graph(group: dist.ProcessGroup | None, tokens: int = 5) -> torch.fx.GraphModule:
    block = SparseMoeBlock(HIDDEN, INTER, 4, 2, ep_group=group)

    def fn(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = block(x)
        return out.hidden_states.sum(), out.router_logits, out.selected_experts

    (gm,) = capture_without_running(fn, torch.randn(1, tokens, HIDDEN, requires_grad=True))
    return gm


def test_chunk_sizes_follow_tensor_split() -> None:
    for tokens in range(0, 9):
        for n in range(1, 5):
            expected = [len(c) for c in torch.tensor_split(torch.arange(tokens), n)]
            assert chunk_sizes(tokens, n) == expected


def test_rewritten_graph_golden(ep_group: dist.ProcessGroup, update_goldens: bool) -> None:
    gm = _block_graph(ep_group, tokens=5)
    result = DominoEPPass(BackendConfig(num_chunks=3))(gm)
    assert result.changed and list(result.stats["chunks"].values()) == [[2, 2, 1]]
    text = graph_text(gm)
    assert text.count("all_to_all_single(") == 9  # counts, dispatch, combine per chunk
    check_golden("domino_pre_grad_block_n3.txt", text, update_goldens)


def test_fewer_tokens_than_chunks(ep_group: dist.ProcessGroup) -> None:
    gm = _block_graph(ep_group, tokens=2)
    result = DominoEPPass(BackendConfig(num_chunks=4))(gm)
    assert list(result.stats["chunks"].values()) == [[1, 1, 0, 0]]
    gm.graph.lint()


def test_auto_reports_its_choice(ep_group: dist.ProcessGroup) -> None:
    gm = _block_graph(ep_group)
    result = DominoEPPass(BackendConfig(num_chunks="auto"))(gm)
    (why,) = result.stats["auto"].values()
    assert "-> 2 chunks" in why and list(result.stats["chunks"].values()) == [[3, 2]]


def test_no_expert_parallelism_is_left_alone() -> None:
    gm = _block_graph(None)
    before = graph_text(gm)
    result = DominoEPPass(BackendConfig(num_chunks=2))(gm)
    assert not result.changed and result.stats["regions"] == 0
    assert graph_text(gm) == before


def test_region_with_in_place_update_is_skipped(ep_group: dist.ProcessGroup) -> None:
    gm = _block_graph(ep_group)
    softmax = next(n for n in gm.graph.nodes if n.target is torch.nn.functional.softmax)
    with gm.graph.inserting_after(softmax):
        mutation = gm.graph.call_method("mul_", (softmax, 1.0))
    mutation.meta["nn_module_stack"] = dict(softmax.meta["nn_module_stack"])
    gm.recompile()
    before = graph_text(gm)
    result = DominoEPPass(BackendConfig(num_chunks=2))(gm)
    assert not result.changed
    assert [s.reason for s in result.skipped] == ["mul_ mutates a tensor in place"]

    mutation.meta.pop("nn_module_stack")  # outside the MoE module, mutating a tensor the region produces
    result = DominoEPPass(BackendConfig(num_chunks=2))(gm)
    assert not result.changed
    assert [s.reason for s in result.skipped] == ["routing_weights leaves the region and is mutated in place by ['mul_']"]
    assert graph_text(gm) == before


def test_num_chunks_one_changes_nothing(ep_group: dist.ProcessGroup) -> None:
    gm = _block_graph(ep_group)
    before = graph_text(gm)
    result = DominoEPPass(BackendConfig(num_chunks=1))(gm)
    assert not result.changed and "num_chunks=1" in result.skipped[0].reason
    assert graph_text(gm) == before


def test_outside_reader_placed_inside_the_region_moves_after_the_concatenation(ep_group: dist.ProcessGroup) -> None:
    """Dynamo may list a node of another module between a region's nodes; it must end up after the chunk concat."""
    gm = _block_graph(ep_group, tokens=6)
    logits = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch._C._nn.linear)
    with gm.graph.inserting_after(logits):
        reader = gm.graph.call_function(torch.neg, (logits,))
    reader.meta["example_value"] = logits.meta["example_value"]
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out.args = ((*out.args[0], reader),)
    gm.recompile()
    result = DominoEPPass(BackendConfig(num_chunks=2))(gm)
    assert result.changed
    gm.graph.lint()
    (cat,) = reader.args
    assert cat.target is torch.cat
