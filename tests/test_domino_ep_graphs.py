"""Domino EP on captured canonical graphs (fake process group, nothing runs): what it rewrites and what it refuses."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist

from moe_passes.config import BackendConfig
from moe_passes.fx.domino import DominoEPPass, chunk_sizes
from moe_passes.ir.canonical import canonicalize_in_place
from moe_passes.ir.facts import is_collective, is_wait, op_namespace_and_name
from moe_passes.ir.graph_text import graph_text
from moe_passes.models.interns1_vl.moe import SparseMoeBlock
from moe_passes.testing import run_pass
from tests.domino_helpers import HIDDEN, INTER, capture_without_running
from tests.golden import check_golden

aten = torch.ops.aten

#: Ops whose order per chunk the golden event trace records (names stable across torch versions).
_EVENT_OPS = {"linear", "softmax", "topk", "argsort", "index", "scatter_add", "item", "grouped_mm", "_grouped_mm",
              "index_copy", "split_with_sizes", "cat", "add"}


def _block_graph(group: dist.ProcessGroup | None, tokens: int = 5, root: bool = False) -> torch.fx.GraphModule:
    block = SparseMoeBlock(HIDDEN, INTER, 4, 2, ep_group=group)
    x = torch.randn(1, tokens, HIDDEN, requires_grad=True)
    if root:  # regional compile: the MoE block itself is the compiled root (no nn_module_stack on its own nodes)
        (gm,) = capture_without_running(block, x)
    else:

        def fn(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            out = block(x)
            return out.hidden_states.sum(), out.router_logits, out.selected_experts

        (gm,) = capture_without_running(fn, x)
    assert canonicalize_in_place(gm) is None
    return gm


def event_trace(gm: torch.fx.GraphModule) -> str:
    """Per-chunk collective / compute events in graph order: a golden that survives torch upgrades."""
    lines = []
    for n in gm.graph.nodes:
        parsed = op_namespace_and_name(n.target) if n.op == "call_function" else None
        if parsed is None:
            continue
        name = parsed[1]
        if not (is_collective(n) or is_wait(n) or name in _EVENT_OPS):
            continue
        chunk = n.meta.get("domino_chunk")
        where = f"chunk {chunk}" if chunk is not None else "shared "
        lines.append(f"{where}: {parsed[0]}.{name}")
    return "\n".join(lines) + "\n"


def test_chunk_sizes_follow_tensor_split() -> None:
    for tokens in range(0, 9):
        for n in range(1, 5):
            expected = [len(c) for c in torch.tensor_split(torch.arange(tokens), n)]
            assert chunk_sizes(tokens, n) == expected


def test_rewritten_graph_golden(trace_group: dist.ProcessGroup, update_goldens: bool) -> None:
    gm = _block_graph(trace_group, tokens=5)
    result = run_pass(DominoEPPass(BackendConfig(num_chunks=3)), gm)
    assert result.changed and list(result.stats["chunks"].values()) == [[2, 2, 1]]
    a2a = [n for n in gm.graph.nodes if is_collective(n)]
    assert len(a2a) == 9  # counts, dispatch, combine per chunk
    assert [n.meta["domino_chunk"] for n in a2a] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    check_golden("domino_pre_grad_block_n3.txt", event_trace(gm), update_goldens)


def test_block_as_compiled_root_is_chunked(trace_group: dist.ProcessGroup) -> None:
    """Regional compile: the block is the root, its own nodes carry no nn_module_stack; regions come from data flow."""
    gm = _block_graph(trace_group, tokens=6, root=True)
    result = run_pass(DominoEPPass(BackendConfig(num_chunks=2)), gm)
    assert result.changed and list(result.stats["chunks"].values()) == [[3, 3]], result.as_dict()


def test_trigger_describes_the_all_to_alls(trace_group: dist.ProcessGroup) -> None:
    assert DominoEPPass().trigger(_block_graph(trace_group)) == "3 x _c10d_functional.all_to_all_single"
    assert DominoEPPass().trigger(_block_graph(None)) is None


def test_fewer_tokens_than_chunks(trace_group: dist.ProcessGroup) -> None:
    gm = _block_graph(trace_group, tokens=2)
    result = run_pass(DominoEPPass(BackendConfig(num_chunks=4)), gm)
    assert list(result.stats["chunks"].values()) == [[1, 1, 0, 0]]
    gm.graph.lint()


def test_auto_reports_its_choice(trace_group: dist.ProcessGroup, monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """``num_chunks="auto"``: the cost model's N, with the work it counted and the rates it used."""
    monkeypatch.setenv("MOE_PASSES_CALIBRATION", str(tmp_path / "none.json"))  # built-in rates
    gm = _block_graph(trace_group)
    result = run_pass(DominoEPPass(BackendConfig(num_chunks="auto")), gm)
    (why,) = result.stats["auto"].values()
    (pred,) = result.stats["predicted"].values()
    assert why.startswith(f"{pred['chunks']} chunks: predicted exposed all-to-all") and "built-in CPU" in why
    assert len(next(iter(result.stats["chunks"].values()))) == pred["chunks"]
    # per token: router H*E, and top-k copies through the experts' gate/up [2I, H] and down [H, I] GEMMs
    assert pred["flops_per_token"] == 2 * (HIDDEN * 4 + 2 * (2 * INTER * HIDDEN + HIDDEN * INTER))
    # dispatch + combine of top-k fp32 rows, half of which stay on this rank (2 ranks, uniform routing)
    assert pred["bytes_per_token"] == 2 * HIDDEN * 4 * 2 * 0.5
def test_no_expert_parallelism_is_left_alone() -> None:
    gm = _block_graph(None)
    before = graph_text(gm)
    result = run_pass(DominoEPPass(BackendConfig(num_chunks=2)), gm)
    assert not result.changed and result.stats["regions"] == 0 and not result.skipped
    assert graph_text(gm) == before


def test_in_place_edit_of_a_region_value_is_chunked_with_it(trace_group: dist.ProcessGroup) -> None:
    """``probs.mul_(1.0)`` on the router's softmax, before its top-k reads it: a value the region computes,
    so each chunk edits its own rows (the functional op's rule decides, the layout is kept)."""
    gm = _block_graph(trace_group)
    softmax = next(n for n in gm.graph.nodes if n.target is aten.softmax.int)
    with gm.graph.inserting_after(softmax):
        mutation = gm.graph.call_function(aten.mul_.Tensor, (softmax, 1.0))
    mutation.meta["val"] = softmax.meta["val"]
    gm.recompile()
    result = run_pass(DominoEPPass(BackendConfig(num_chunks=2)), gm)
    assert result.changed and not result.skipped, result.as_dict()
    edits = [n for n in gm.graph.nodes if n.target is aten.mul_.Tensor]
    assert len(edits) == 2 and all(isinstance(e.args[0], torch.fx.Node) and e.args[0].target is aten.softmax.int for e in edits)


def test_in_place_edit_of_the_token_matrix_inside_the_region_is_skipped(trace_group: dist.ProcessGroup) -> None:
    """The token matrix written in place between the router (which read it before) and the gather (after):
    chunks would all read it after the write. Refused, graph unchanged."""
    gm = _block_graph(trace_group)
    softmax = next(n for n in gm.graph.nodes if n.target is aten.softmax.int)
    linear = next(n for n in softmax.all_input_nodes)
    while linear.op == "call_function" and not str(linear.target).startswith(("aten.linear", "aten.mm")):
        linear = linear.all_input_nodes[0]
    x = linear.args[0]
    with gm.graph.inserting_after(softmax):
        mutation = gm.graph.call_function(aten.mul_.Tensor, (x, 2.0))
    mutation.meta["val"] = x.meta["val"]
    gm.recompile()
    before = graph_text(gm)
    result = run_pass(DominoEPPass(BackendConfig(num_chunks=2)), gm)
    assert not result.changed, result.as_dict()
    assert len(result.skipped) == 1 and "in place" in result.skipped[0].reason, result.as_dict()
    assert graph_text(gm) == before


def test_region_output_mutated_outside_is_skipped(trace_group: dist.ProcessGroup) -> None:
    """The top-k ids (read by the region and returned) written in place after the region: refused, not chunked."""
    gm = _block_graph(trace_group)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    selected = out.args[0][2]
    with gm.graph.inserting_before(out):
        mutation = gm.graph.call_function(aten.add_.Tensor, (selected, 1))
    mutation.meta["val"] = selected.meta["val"]
    gm.recompile()
    before = graph_text(gm)
    result = run_pass(DominoEPPass(BackendConfig(num_chunks=2)), gm)
    assert not result.changed
    assert [s.reason for s in result.skipped] == [f"{mutation.name}: aten.add_ mutates {selected.name} in place"]
    assert graph_text(gm) == before


def test_num_chunks_one_changes_nothing(trace_group: dist.ProcessGroup) -> None:
    gm = _block_graph(trace_group)
    before = graph_text(gm)
    result = run_pass(DominoEPPass(BackendConfig(num_chunks=1)), gm)
    assert not result.changed and "num_chunks=1" in result.skipped[0].reason
    assert graph_text(gm) == before


def test_outside_reader_placed_inside_the_region_reads_the_concatenation(trace_group: dist.ProcessGroup) -> None:
    """A reader of the router logits that is not row-local stays outside and reads the reassembled logits."""
    gm = _block_graph(trace_group, tokens=6)
    logits = next(n for n in gm.graph.nodes if n.target is aten.linear.default)
    with gm.graph.inserting_after(logits):
        reader = gm.graph.call_function(aten.cumsum.default, (logits, 0))  # crosses tokens: cannot join the region
    reader.meta["val"] = logits.meta["val"]
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out.args = ((*out.args[0], reader),)
    gm.recompile()
    result = run_pass(DominoEPPass(BackendConfig(num_chunks=2)), gm)
    assert result.changed
    gm.graph.lint()
    (reader,) = [n for n in gm.graph.nodes if n.target is aten.cumsum.default and n.args[1] == 0 and n.meta.get("domino_chunk") is None]
    (cat, _dim) = reader.args
    assert cat.target is aten.cat.default


def test_autograd_all_to_all_spelling_is_recognised(trace_group: dist.ProcessGroup) -> None:
    """torch 2.11 may leave the token all-to-alls as ``_c10d_functional_autograd.all_to_all_single``: same meaning."""
    gm = _block_graph(trace_group, tokens=4)
    autograd_a2a = torch.ops._c10d_functional_autograd.all_to_all_single.default
    token = [n for n in gm.graph.nodes if is_collective(n) and not isinstance(n.args[1], (list, tuple)) or
             (is_collective(n) and any(isinstance(a, torch.fx.Node) for a in n.args[1]))]
    assert len(token) == 2
    for n in token:
        n.target = autograd_a2a
    gm.recompile()
    assert DominoEPPass().trigger(gm) == "1 x _c10d_functional.all_to_all_single, 2 x _c10d_functional_autograd.all_to_all_single"
    result = run_pass(DominoEPPass(BackendConfig(num_chunks=2)), gm)
    assert result.changed and list(result.stats["chunks"].values()) == [[2, 2]], result.as_dict()
    assert sum(n.target is autograd_a2a for n in gm.graph.nodes) == 4


def test_dynamic_token_count_is_chunked(trace_group: dist.ProcessGroup) -> None:
    """``dynamic=True``: the token count is a symbol; the region is chunked with SymInt chunk sizes
    (issue 19; more in ``test_domino_symbolic``)."""
    block = SparseMoeBlock(HIDDEN, INTER, 4, 2, ep_group=trace_group)
    results = []

    class _Stop(Exception):
        pass

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> None:
        assert canonicalize_in_place(gm) is None
        results.append(run_pass(DominoEPPass(BackendConfig(num_chunks=2)), gm))
        raise _Stop

    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_scalar_outputs=True), pytest.raises(Exception, match="_Stop"):
        torch.compile(lambda x: block(x).hidden_states.sum(), backend=backend, fullgraph=True, dynamic=True)(torch.randn(1, 6, HIDDEN))
    torch._dynamo.reset()
    (result,) = results
    assert result.changed and not result.skipped, result.as_dict()
    (sizes,) = result.stats["chunks"].values()
    assert len(sizes) == 2 and all(isinstance(s, str) for s in sizes) and result.stats["symbolic"]


@pytest.mark.parametrize("experts, top_k, groups", [(8, 4, 2), (8, 8, 4)])
def test_grouped_router_is_chunked(trace_group: dist.ProcessGroup, experts: int, top_k: int, groups: int) -> None:
    """Intern-S1-Pro's grouped router: top-(K/G) inside each of G groups of a ``[T, G, E/G]`` view, then
    ``reshape(T, K)``. The token count comes from the token matrix, not from the top-k's k (K/G): on main
    at 8ffe8f9 every grouped layer was declined ("its leading dims do not flatten to the ... tokens")."""
    torch.manual_seed(0)
    block = SparseMoeBlock(HIDDEN, INTER, experts, top_k, group_routing=True, ep_group=trace_group, num_groups=groups)

    def fn(x: torch.Tensor) -> torch.Tensor:
        return block(x).hidden_states.sum()

    (gm,) = capture_without_running(fn, torch.randn(1, 5, HIDDEN, requires_grad=True))
    result = run_pass(DominoEPPass(BackendConfig(num_chunks=2)), gm)
    assert result.changed and not result.skipped, result.as_dict()
    assert list(result.stats["chunks"].values()) == [[3, 2]]
