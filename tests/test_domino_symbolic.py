"""Domino EP chunks graphs whose token count is symbolic (one process, fake EP group).

Dynamo hands the backend a symbolic token count with ``dynamic=True``, with
``mark_dynamic`` and after its automatic-dynamic recompile (the second distinct
length). Domino must chunk those graphs like static ones, with the chunk sizes
computed in the graph as SymInt expressions ``(T + N - 1 - k) // N``: lengths
not divisible by N give smaller last chunks, lengths below N empty ones (which
still issue their collectives). A graph declined on one rank and chunked on
another would make the ranks' collectives mismatch (issue 19).

The graphs run eagerly on the fake group (ATen graph, no Inductor): the
chunked graph must compute what the unchunked one does.
"""

from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Any, Iterator

import pytest
import torch
import torch.distributed as dist

from moe_passes.config import BackendConfig
from moe_passes.fx.domino import DominoEPPass, chunk_sizes
from moe_passes.inductor.rank_check import collective_sequence, fingerprint
from moe_passes.ir.facts import is_all_to_all
from moe_passes.models.interns1_vl.moe import SparseMoeBlock
from moe_passes.testing import run_pass
from tests.distributed import fake_group
from tests.domino_helpers import HIDDEN, INTER


@pytest.fixture(scope="module")
def ep_group() -> Iterator[dist.ProcessGroup]:
    with fake_group(2) as group:  # the chunked graphs run: split sizes come from the all-to-all's output
        yield group


def _block(group: dist.ProcessGroup) -> SparseMoeBlock:
    torch.manual_seed(0)
    block = SparseMoeBlock(HIDDEN, INTER, 4, 2, ep_group=group)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return block


class _Recorder:
    """Backend: Domino on Dynamo's graph, then the (canonical ATen) graph runs eagerly; records each graph."""

    def __init__(self, num_chunks: int) -> None:
        self.num_chunks = num_chunks
        self.results: list[Any] = []
        self.graphs: list[torch.fx.GraphModule] = []
        self.symbolic: list[bool] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        self.symbolic.append(any(isinstance(x, torch.SymInt) for x in example_inputs))
        self.results.append(run_pass(DominoEPPass(BackendConfig(num_chunks=self.num_chunks)), gm, example_inputs))
        self.graphs.append(gm)
        return gm


def _outputs(block: SparseMoeBlock, lengths: list[int], backend: Any, mark: bool = False, **compile_kwargs: Any) -> list[torch.Tensor]:
    def fn(x: torch.Tensor) -> torch.Tensor:
        return block(x).hidden_states

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=backend, fullgraph=True, **compile_kwargs)
    outs = []
    with torch._dynamo.config.patch(capture_scalar_outputs=True), torch.no_grad():
        for length in lengths:
            x = torch.randn(1, length, HIDDEN, generator=torch.Generator().manual_seed(length))
            if mark:
                torch._dynamo.mark_dynamic(x, 1)
            outs.append(compiled(x))
    torch._dynamo.reset()
    return outs


def _run(block: SparseMoeBlock, lengths: list[int], num_chunks: int, mark: bool = False, **compile_kwargs: Any) -> _Recorder:
    """Compile and run at each length; each output equals the static chunked graph's at that length.

    (The fake group's all-to-all is no real exchange, so the reference is Domino on a static graph, which
    ``test_domino_ep`` proves exact on real ranks; the 2-rank proof of the symbolic graphs is
    ``test_rank_divergence``.)"""
    rec = _Recorder(num_chunks)
    outs = _outputs(block, lengths, rec, mark=mark, **compile_kwargs)
    static = _Recorder(num_chunks)
    refs = _outputs(block, lengths, static, dynamic=False)
    assert all(r.changed for r in static.results) and not any(static.symbolic)
    for length, out, ref in zip(lengths, outs, refs):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6, msg=lambda m: f"length {length}: {m}")
    return rec


def _symbolic_sizes(result: Any) -> list[str]:
    (sizes,) = result.stats["chunks"].values()
    assert all(isinstance(s, str) for s in sizes), sizes
    assert result.stats["symbolic"], result.as_dict()
    return sizes


def _evaluate(sizes: list[str], tokens: int) -> list[int]:
    """The size expressions (``'((s27 + 1)//2)'``) at a concrete token count, their one free symbol."""
    symbols = {name for s in sizes for name in re.findall(r"\bs\d+\b", s)}
    assert len(symbols) <= 1, sizes
    return [int(eval(s, {}, dict.fromkeys(symbols, tokens))) for s in sizes]  # noqa: S307 - sympy's own integer arithmetic text


def test_dynamic_true_is_chunked_with_symbolic_sizes(ep_group: dist.ProcessGroup) -> None:
    """``dynamic=True``, N=3: lengths not divisible by N (7), divisible (6) and below N (2), all chunked.

    One graph serves every length, chunks of 1 or 0 rows (T < 2N) included: the pass propagates the
    rewritten graph's shapes size-obliviously, so the fake kernels' contiguity checks do not guard a
    chunk size against 1 (they did before whole-layer mode, where 1-sequence micro-batches are the rule:
    T < 2N then got a graph of its own), and nothing later needs that guard (outputs equal the static
    graph's at every length).
    """
    num_chunks = 3
    rec = _run(_block(ep_group), [7, 6, 9, 2], num_chunks, dynamic=True)
    assert rec.symbolic == [True], "one symbolic graph for every length"
    for result in rec.results:
        assert result.changed and not result.skipped, result.as_dict()
        (why,) = result.stats["symbolic"].values()
        assert "symbolic token count" in why and f"{num_chunks} chunks" in why
    sizes = _symbolic_sizes(rec.results[0])
    for tokens in (9, 7, 6, 2, 1, 0):  # tensor_split's sizes: the last ones smaller, empty below N
        assert _evaluate(sizes, tokens) == chunk_sizes(tokens, num_chunks)
    for gm in rec.graphs:  # counts, dispatch, combine per chunk, whatever the length
        a2a = [n for n in gm.graph.nodes if is_all_to_all(n)]
        assert len(a2a) == 3 * num_chunks
        assert sorted({n.meta["domino_chunk"] for n in a2a}) == list(range(num_chunks))


def test_mark_dynamic_is_chunked(ep_group: dist.ProcessGroup) -> None:
    rec = _run(_block(ep_group), [5, 8], 2, mark=True)  # both >= 2N: one graph
    assert rec.symbolic == [True]
    (result,) = rec.results
    assert result.changed, result.as_dict()
    assert _evaluate(_symbolic_sizes(result), 5) == [3, 2]


def test_automatic_dynamic_recompile_stays_chunked(ep_group: dist.ProcessGroup) -> None:
    """Default ``dynamic=None``: the first graph is static, the recompile at the second length symbolic; both chunked."""
    rec = _run(_block(ep_group), [6, 9, 13], 2)  # 9 and 13 >= 2N: one symbolic graph
    assert rec.symbolic == [False, True], "static graph, then one automatic-dynamic recompile"
    static, symbolic = rec.results
    assert static.changed and list(static.stats["chunks"].values()) == [[3, 3]], static.as_dict()
    assert "symbolic" not in static.stats
    assert symbolic.changed and not symbolic.skipped, symbolic.as_dict()
    assert _evaluate(_symbolic_sizes(symbolic), 13) == [7, 6]
    # What the backend's rank check agrees on is the same for both graphs: a rank still on the static
    # graph and a rank that recompiled issue the same collectives (sizes are not part of it).
    digests = [fingerprint(gm, [SimpleNamespace(name="domino_ep", result=r)])[0] for gm, r in zip(rec.graphs, rec.results)]
    assert digests[0] == digests[1]
    assert collective_sequence(rec.graphs[0]) == collective_sequence(rec.graphs[1])
