"""``DominoBackend.summary()``: the per-pass summary over every graph a backend compiled, as text and dict."""

from __future__ import annotations

import json
from typing import Any

import torch

from moe_passes import make_backend
from moe_passes.inductor.summary import BackendSummary, summarize
from moe_passes.models.interns1_vl.losses import load_balancing_loss, router_z_loss


def _pass(name: str, changed: bool, matched: list[str] = (), stats: dict[str, Any] | None = None,
          skipped: list[tuple[str, str]] = (), **extra: Any) -> dict[str, Any]:
    return {"name": name, "changed": changed, "matched": list(matched), "stats": stats or {},
            "skipped": [{"region": r, "reason": why} for r, why in skipped], **extra}


def reports() -> list[dict[str, Any]]:
    """Two graphs as ``DominoBackend.reports`` holds them: a decoder-layer graph (Domino chunked its MoE region,
    offload moved its router outputs) and a loss graph (the aux loss rewritten layer-wise)."""
    layer = {
        "graph": 0, "num_nodes": 120, "ir": "aten", "canonical_error": None, "verify": None,
        "pre_grad": [
            _pass("layerwise_aux_loss", False, stats={"groups_rewritten": 0, "layers": 0}),
            _pass("domino_ep", True, ["L['self'].mlp"], {"regions": 1, "chunks": {"L['self'].mlp": [24, 24]},
                                                        "auto": {"L['self'].mlp": "2 chunks: 48 tokens"}}),
            _pass("async_offload", True, ["linear_4 (router_logits)", "getitem_5 (selected_experts)"],
                  {"offloaded": 2, "offloaded_bytes": 2304}),
        ],
        "post_grad": {
            "forward": [_pass("schedule_overlap", True, ["6 all-to-alls"],
                              {"before": {"all_to_all": 6, "overlapped": 0}, "after": {"all_to_all": 6, "overlapped": 4}})],
            "backward": [_pass("schedule_overlap", False, skipped=[("graph", "no all-to-all in this graph")])],
        },
    }
    loss = {
        "graph": 1, "num_nodes": 18, "ir": "aten", "canonical_error": None, "verify": None,
        "pre_grad": [
            _pass("layerwise_aux_loss", True, ["cat of 2 router logits (cat)"],
                  {"groups_rewritten": 1, "layers": 2}, removed_values={"count": 5, "bytes": 4096}),
            _pass("domino_ep", False, stats={"regions": 0, "chunks": {}}),
            _pass("async_offload", False, skipped=[("graph", "no router logits among the graph outputs")]),
        ],
        "post_grad": {"forward": [], "backward": []},
    }
    return [layer, loss]


def test_summary_aggregates_every_graph_per_pass() -> None:
    s = summarize(reports())
    assert isinstance(s, BackendSummary) and s.graphs == 2
    assert list(s.passes) == ["layerwise_aux_loss", "domino_ep", "async_offload", "schedule_overlap"]
    domino = s.passes["domino_ep"]
    assert (domino.graphs, domino.applied, domino.skipped, domino.failed) == (2, 1, 1, 0)
    assert domino.matched == {"L['self'].mlp": 1}
    assert s.regions_chunked == 1 and s.chunking == {"graph 0 L['self'].mlp": "2 chunks (token chunks, auto: 2 chunks: 48 tokens)"}
    assert (s.aux_groups_rewritten, s.aux_layers_rewritten, s.stacked_bytes_removed) == (1, 2, 4096)
    assert (s.router_tensors_offloaded, s.offloaded_bytes) == (2, 2304)
    assert s.passes["async_offload"].skip_reasons == {"graph: no router logits among the graph outputs": 1}
    sched = s.passes["schedule_overlap"]
    assert sched.stage == "post_grad" and (sched.graphs, sched.applied) == (2, 1)
    assert (s.all_to_alls, s.all_to_alls_overlapped_before, s.all_to_alls_overlapped_after) == (6, 0, 4)
    assert s.passes["layerwise_aux_loss"].totals == {"groups_rewritten": 1, "layers": 2}


def test_summary_text_and_dict_say_the_same() -> None:
    s = summarize(reports())
    text = str(s)
    assert text.splitlines()[0] == "moe_passes summary: 2 graph(s) compiled"
    assert "domino_ep (pre-grad): applied in 1 of 2; 1 MoE region(s) chunked" in text
    assert "layerwise_aux_loss (pre-grad): applied in 1 of 2; 2 layer(s) rewritten in 1 loss group(s), 4.0 KiB" in text
    assert "async_offload (pre-grad): applied in 1 of 2; 2 router tensor(s) moved to host per call (2.2 KiB)" in text
    assert "schedule_overlap (post-grad): applied in 1 of 2; 6 all-to-all(s), overlapped with compute 0 -> 4" in text
    d = s.as_dict()
    json.dumps(d)  # plain data
    assert d["domino_ep"]["regions_chunked"] == 1
    assert d["layerwise_aux_loss"] == {"groups_rewritten": 1, "layers_rewritten": 2, "stacked_bytes_removed": 4096}
    assert d["async_offload"] == {"router_tensors_offloaded": 2, "offloaded_bytes": 2304}
    assert d["passes"]["domino_ep"]["applied"] == 1 and d["passes"]["domino_ep"]["skipped"] == 1


def test_a_pass_applied_nowhere_says_why() -> None:
    only_loss = reports()[1:]
    text = str(summarize(only_loss))
    assert "async_offload (pre-grad): applied in 0 of 1" in text
    assert "skipped (1x): graph: no router logits among the graph outputs" in text
    assert str(summarize([])) == "moe_passes summary: 0 graph(s) compiled"


def test_backend_summary_after_a_real_compile() -> None:
    """The aux loss compiled apart from its layers (regional form): the summary names the layers rewritten
    and the bytes of stacked tensors the rewrite removed; clear_reports() empties it."""
    backend = make_backend(passes=("layerwise_aux_loss",))

    def aux(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return load_balancing_loss((a, b, c), 8, 2) + router_z_loss((a, b, c))

    logits = [torch.randn(16, 8, requires_grad=True) for _ in range(3)]
    torch._dynamo.reset()
    try:
        torch.compile(aux, backend=backend, fullgraph=True)(*logits).backward()
    finally:
        torch._dynamo.reset()
    s = backend.summary()
    assert s.graphs == 1 and s.passes["layerwise_aux_loss"].applied == 1, s.as_dict()
    assert s.aux_layers_rewritten == 3 and s.stacked_bytes_removed >= 3 * 16 * 8 * 4, s.as_dict()  # at least the cat
    assert "3 layer(s) rewritten" in str(s)
    assert s.as_dict() == summarize(backend.reports).as_dict()
    backend.clear_reports()
    assert backend.summary().graphs == 0


def test_a_compile_served_from_the_cache_says_its_post_grad_passes_did_not_run(tmp_path: Any, monkeypatch: Any) -> None:
    """Inductor's caches skip every post-grad pass on a hit; the report and the summary say so instead of
    showing a schedule pass that silently saw nothing (a CI run once read 0 moves from a warm cache)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # a cold cache: the first compile fills it

    def f(x: torch.Tensor) -> torch.Tensor:
        return (torch.sin(x) * 2).sum()

    backends = []
    for _ in range(2):
        backend = make_backend(passes=("domino_ep",))  # schedule_overlap runs post-grad
        torch._dynamo.reset()
        try:
            with torch._inductor.config.patch(fx_graph_cache=True):
                torch.compile(f, backend=backend, fullgraph=True)(torch.randn(8, requires_grad=True)).backward()
        finally:
            torch._dynamo.reset()
        backends.append(backend)
    cold, warm = (b.reports[0] for b in backends)
    assert cold["cache"] == {} and cold["post_grad"]["forward"], cold  # filled the cache: passes ran, no note
    assert "forward" in warm["cache"] and "cache" in warm["cache"]["forward"], warm
    assert "TORCHINDUCTOR_FX_GRAPH_CACHE=0" in warm["cache"]["forward"]
    assert not warm["post_grad"]["forward"], warm  # nothing ran, and nothing pretends it did
    text = str(backends[1].summary())
    assert "graph 0 (forward): served from" in text, text
    assert backends[1].summary().cache_notes, backends[1].summary().as_dict()


def test_graph_breaks_are_summed_over_graphs_with_their_fix_and_where() -> None:
    """Each report holds the breaks Dynamo took before its graph; the summary sums them per reason."""
    from moe_passes.inductor.graph_breaks import SCALAR_OUTPUTS_HINT

    two = reports()
    reason = "Data dependent operator: Operator `aten._local_scalar_dense.default` has a non-Tensor output"
    two[0]["graph_breaks"] = [{"reason": reason, "count": 1, "hint": SCALAR_OUTPUTS_HINT, "torch_hint": None,
                               "where": "moe.py:170 in forward: input_splits = counts.tolist()"},
                              {"reason": "Call to `torch._dynamo.graph_break()`: User-inserted graph break.", "count": 1,
                               "hint": None, "torch_hint": "Remove the call.", "where": None}]
    two[1]["graph_breaks"] = [{"reason": reason, "count": 2, "hint": SCALAR_OUTPUTS_HINT, "torch_hint": None,
                               "where": "moe.py:172 in forward: output_splits = recv.tolist()"}]
    s = summarize(two)
    assert s.graph_breaks == {reason: 3, "Call to `torch._dynamo.graph_break()`: User-inserted graph break.": 1}
    assert s.graph_break_hints == {reason: SCALAR_OUTPUTS_HINT}  # no setting removes a user's graph_break()
    assert s.graph_break_where == {reason: ["moe.py:170 in forward: input_splits = counts.tolist()",
                                            "moe.py:172 in forward: output_splits = recv.tolist()"]}
    text = str(s)
    assert ("  graph breaks: 4 (Dynamo ended a graph there and started another)\n"
            f"    3x {reason}\n"
            "      at moe.py:170 in forward: input_splits = counts.tolist()\n"
            "      at moe.py:172 in forward: output_splits = recv.tolist()\n"
            "      fix: set torch._dynamo.config.capture_scalar_outputs = True") in text, text
    d = s.as_dict()
    json.dumps(d)
    assert d["graph_breaks"] == s.graph_breaks and d["graph_break_hints"] == s.graph_break_hints
    assert d["moe_split"] is None  # Domino chunked its region here: nothing was split
    assert "graph breaks" not in str(summarize(reports()))  # none recorded, none shown
