"""Pass manager: declared order, canonical IR, validation after every pass, fail-closed, snapshots, logging,
strict mode, config errors.

Runs on the Dynamo graph of a real (1-rank) MoE stack (its grouped-matmul experts take
data-dependent offsets), captured once and copied per test.
"""

from __future__ import annotations

import itertools
import json
import logging

import pytest
import torch

from moe_passes import BackendConfig, make_backend
from moe_passes.cli.targets import moe_stack
from moe_passes.config import DEFAULT_PASSES
from moe_passes.harness.capture import CapturedGraph, capture_graphs
from moe_passes.ir.graph_text import graph_text
from moe_passes.pipeline.manager import (
    PassFailedError,
    PassManager,
    PassUnavailableError,
    PassValidationError,
    StrictModeError,
    copy_graph_module,
    load_pass,
)
from moe_passes.pipeline.order import pipeline_names, post_grad_pass_names
from tests import backend_helpers as h


@pytest.fixture(scope="module")
def captured() -> CapturedGraph:
    target = moe_stack()
    graphs = capture_graphs(target.fn, *target.example_inputs)
    assert len(graphs) == 1
    return graphs[0]


@pytest.fixture()
def graph(captured: CapturedGraph) -> CapturedGraph:
    """A fresh copy per test: passes mutate the graph in place."""
    return CapturedGraph(copy_graph_module(captured.gm), captured.example_inputs)


def run(monkeypatch: pytest.MonkeyPatch, graph: CapturedGraph, *classes: type, strict: bool = False):
    h.register(monkeypatch, *classes)
    config = BackendConfig(passes=tuple(c.name for c in classes), strict=strict)
    return PassManager.from_config(config).run(graph.gm, graph.example_inputs)


def apply(monkeypatch: pytest.MonkeyPatch, graph: CapturedGraph, *classes: type, strict: bool = False):
    h.register(monkeypatch, *classes)
    config = BackendConfig(passes=tuple(c.name for c in classes), strict=strict)
    return PassManager.from_config(config).apply(graph.gm, graph.example_inputs)


def test_passes_run_in_declared_order_whatever_the_listed_order(monkeypatch: pytest.MonkeyPatch, graph: CapturedGraph) -> None:
    h.register(monkeypatch, h.FirstPass, h.SecondPass)  # registry order: t_first, then t_second
    for listed in (("t_second", "t_first"), ("t_first", "t_second")):
        h.CALL_LOG.clear()
        records = PassManager.from_config(BackendConfig(passes=listed)).run(graph.gm, graph.example_inputs)
        assert h.CALL_LOG == ["t_first", "t_second"]
        assert [r.name for r in records] == ["t_first", "t_second"]


def test_default_passes_in_every_listed_order_give_the_same_graph(captured: CapturedGraph) -> None:
    """The declared pipeline: every permutation of the default passes runs them in one order and
    leaves the identical graph (the aux pass applies on this graph; the others say why not)."""
    texts, orders = set(), set()
    for listed in itertools.permutations(DEFAULT_PASSES):
        gm = copy_graph_module(captured.gm)
        run_ = PassManager.from_config(BackendConfig(passes=listed), snapshot=False).apply(gm, captured.example_inputs)
        orders.add(tuple(r.name for r in run_.records))
        texts.add(graph_text(run_.gm))
        assert not any(r.result.error for r in run_.records), [r.result.error for r in run_.records]
    assert orders == {tuple(pipeline_names(DEFAULT_PASSES, BackendConfig()))}
    assert len(texts) == 1
    assert graph_text(captured.gm) not in texts  # the pipeline did change the graph


def test_needs_and_invalidates_order_the_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    h.register(monkeypatch, h.InvalidatesRowsPass, h.NeedsRowsPass, h.AtenLoggedPass, h.FirstPass)
    config = BackendConfig(passes=())
    for listed in itertools.permutations(["t_aten_logged", "t_needs_rows", "t_invalidates_rows", "t_first"]):
        # registry order alone would put t_invalidates_rows first; its declaration moves it after t_needs_rows,
        # and the aten pass goes after every torch pass
        assert pipeline_names(listed, config) == ["t_needs_rows", "t_invalidates_rows", "t_first", "t_aten_logged"]


def test_contradictory_declarations_are_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    h.register(monkeypatch, h.AtenBeforeTorchPass, h.FirstPass)
    with pytest.raises(ValueError, match="contradictory: .*canonical ATen IR; t_aten_first declares runs_before t_first"):
        make_backend(passes=("t_first", "t_aten_first")).pre_grad_passes()


def test_post_grad_passes_come_from_the_registry_declarations() -> None:
    assert post_grad_pass_names(BackendConfig(passes=("domino_ep",))) == ["schedule_overlap"]
    assert post_grad_pass_names(BackendConfig(passes=("domino_ep",), schedule_overlap=False)) == []
    assert post_grad_pass_names(BackendConfig(passes=("layerwise_aux_loss", "async_offload"))) == []


def test_aten_pass_runs_on_the_canonical_graph_after_torch_passes(monkeypatch: pytest.MonkeyPatch, graph: CapturedGraph) -> None:
    run_ = apply(monkeypatch, graph, h.AtenScaleByOnePass, h.ScaleByOnePass)
    assert [r.name for r in run_.records] == ["t_scale_by_one", "t_aten_scale_by_one"]
    torch_rec, aten_rec = run_.records
    assert (torch_rec.ir, aten_rec.ir, run_.ir) == ("torch", "aten", "aten")
    assert aten_rec.result.stats == {"all_overloads": True, "call_methods": 0}
    assert run_.gm is not graph.gm and run_.gm.meta["moe_passes_canonical"]
    assert any("re-propagation ran" in n for n in aten_rec.notes), aten_rec.notes
    # the torch pass's multiply survived the re-trace as an ATen op
    assert any(n.target is torch.ops.aten.mul.Tensor for n in run_.gm.graph.nodes)


def test_aten_pass_is_skipped_with_the_reason_when_no_canonical_ir(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    hand_built = torch.fx.symbolic_trace(lambda x: (x * 2,))  # no fake mode anywhere: cannot re-trace
    with caplog.at_level(logging.WARNING):
        run_ = apply(monkeypatch, CapturedGraph(hand_built, [torch.randn(3)]), h.AtenScaleByOnePass)
    (aten_rec,) = run_.records
    assert aten_rec.ir == "unavailable" and not aten_rec.result.changed
    assert run_.ir == "torch" and run_.gm is hand_built
    assert "canonical ATen IR unavailable: no fake mode" in aten_rec.result.skipped[0].reason
    assert "canonical ATen IR unavailable" in caplog.text


def test_valid_pass_is_recorded_with_before_and_after_text(monkeypatch: pytest.MonkeyPatch, graph: CapturedGraph) -> None:
    before = graph_text(graph.gm)
    (record,) = run(monkeypatch, graph, h.ScaleByOnePass)
    assert record.result.changed and record.result.stats == {"inserted": 1}
    assert record.before == before
    assert record.after == graph_text(graph.gm) != before
    assert "torch.mul" in record.after and "torch.mul" not in before


def test_new_nodes_get_fake_values_from_repropagation(monkeypatch: pytest.MonkeyPatch, graph: CapturedGraph) -> None:
    run(monkeypatch, graph, h.ScaleByOnePass)
    (mul,) = [n for n in graph.gm.graph.nodes if n.target is torch.mul]
    assert isinstance(mul.meta["val"], torch.Tensor) and mul.meta["val"].shape == ()


@pytest.mark.parametrize(
    "bad_pass, message",
    [
        (h.DeadNodePass, "dead nodes"),
        (h.WrongShapePass, "output 0 changed"),
        (h.BadOpPass, "fake-tensor re-propagation failed"),
        (h.ForeignNodePass, "graph.lint() failed"),
        (h.NewInputPass, "graph inputs changed"),
        (h.NotAResultPass, "expected PassResult"),
    ],
)
def test_validation_catches_a_broken_pass_and_fails_closed(
    monkeypatch: pytest.MonkeyPatch, graph: CapturedGraph, bad_pass: type, message: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    before = graph_text(graph.gm)
    with caplog.at_level(logging.WARNING, logger="moe_passes.pipeline.manager"):
        (record,) = run(monkeypatch, graph, bad_pass)
    assert "PassValidationError" in record.result.error and message in record.result.error
    assert graph_text(graph.gm) == before  # rolled back: the graph compiles without the pass
    assert not record.result.changed and "graph restored" in record.result.skipped[0].reason
    assert f"{bad_pass.name} on graph failed" in caplog.text and message in caplog.text


@pytest.mark.parametrize("bad_pass, message", [(h.WrongShapePass, "output 0 changed"), (h.NotAResultPass, "expected PassResult")])
def test_strict_raises_on_a_broken_pass(monkeypatch: pytest.MonkeyPatch, graph: CapturedGraph, bad_pass: type, message: str) -> None:
    with pytest.raises(PassValidationError, match=f"pass '{bad_pass.name}'") as err:
        run(monkeypatch, graph, bad_pass, strict=True)
    assert message in str(err.value)


def test_a_pass_that_raises_fails_closed_with_its_traceback(monkeypatch: pytest.MonkeyPatch, graph: CapturedGraph) -> None:
    scaled, raised = run(monkeypatch, graph, h.ScaleByOnePass, h.RaisingPass)
    assert scaled.result.changed and "torch.mul" in graph_text(graph.gm)  # the earlier pass is kept
    assert raised.after == scaled.after  # the raising pass left nothing behind
    assert "Traceback" in raised.result.error and "in __call__" in raised.result.error
    assert "RuntimeError: Argument 'x' was used before it has been defined!" in raised.result.error
    assert raised.as_dict()["error"] == raised.result.error


def test_a_pass_that_raises_is_named_in_one_line_under_strict(monkeypatch: pytest.MonkeyPatch, graph: CapturedGraph) -> None:
    with pytest.raises(PassFailedError) as err:
        run(monkeypatch, graph, h.ScaleByOnePass, h.RaisingPass, strict=True)
    assert str(err.value) == "pass 't_raising' failed on graph: RuntimeError: Argument 'x' was used before it has been defined!"
    assert isinstance(err.value.__cause__, RuntimeError)


def test_strict_raises_with_the_skip_reasons(monkeypatch: pytest.MonkeyPatch, graph: CapturedGraph) -> None:
    with pytest.raises(StrictModeError, match="t_nothing.*layers.0: router output used by a side effect"):
        run(monkeypatch, graph, h.NothingToDoPass, strict=True)


def test_strict_does_not_raise_on_a_graph_without_the_trigger(monkeypatch: pytest.MonkeyPatch, graph: CapturedGraph) -> None:
    (record,) = run(monkeypatch, graph, h.NothingToDoWithoutTriggerPass, strict=True)
    assert record.trigger is None and not record.result.changed


def test_non_strict_records_the_skips(monkeypatch: pytest.MonkeyPatch, graph: CapturedGraph, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="moe_passes"):
        (record,) = run(monkeypatch, graph, h.NothingToDoPass)
    assert record.as_dict()["skipped"] == [{"region": "layers.0", "reason": "router output used by a side effect"}]
    assert "skipped layers.0: router output used by a side effect" in caplog.text
    assert "t_nothing on graph (torch IR): changed=False" in caplog.text
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("t_nothing changed nothing in graph although it holds" in r.getMessage() for r in warnings)


def test_before_and_after_graphs_are_structured_trace_artifacts(monkeypatch: pytest.MonkeyPatch, graph: CapturedGraph) -> None:
    emitted: list[tuple[str, dict, str]] = []

    def fake_trace(kind: str, metadata_fn, payload_fn) -> None:  # type: ignore[no-untyped-def]
        emitted.append((kind, metadata_fn(), payload_fn()))

    monkeypatch.setattr(torch._logging, "trace_structured", fake_trace)
    (record,) = run(monkeypatch, graph, h.ScaleByOnePass)
    assert [(k, m["name"]) for k, m, _ in emitted] == [
        ("artifact", "moe_passes_graph_t_scale_by_one_before"),
        ("artifact", "moe_passes_graph_t_scale_by_one_after"),
        ("artifact", "moe_passes_graph_t_scale_by_one_report"),  # what the pass decided, beside its graphs
    ]
    assert emitted[0][2] == record.before and emitted[1][2] == record.after
    assert emitted[2][1]["encoding"] == "json"
    report = json.loads(emitted[2][2])
    assert report["name"] == "t_scale_by_one" and report["stage"] == "pre_grad" and report["graph"] == "graph"
    assert {k: report[k] for k in ("changed", "matched", "skipped")} == {
        k: record.as_dict()[k] for k in ("changed", "matched", "skipped")}


def test_registered_but_missing_pass_errors_only_when_requested(monkeypatch: pytest.MonkeyPatch, graph: CapturedGraph) -> None:
    monkeypatch.setitem(h.PRE_GRAD_PASSES, "t_ghost", "moe_passes.fx.no_such_module:GhostPass")
    backend = make_backend(passes=("t_ghost",))  # creating the backend is fine
    with pytest.raises(PassUnavailableError, match="'t_ghost' is registered as moe_passes.fx.no_such_module:GhostPass"):
        backend(graph.gm, graph.example_inputs)
    with pytest.raises(PassUnavailableError):
        load_pass("t_ghost", BackendConfig(passes=("t_ghost",)))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"passes": ("no_such_pass",)}, "unknown pass"),
        ({"passes": "domino_ep"}, "sequence of pass names"),
        ({"passes": None}, r"sequence of pass names from \['async_offload', 'domino_ep', 'layerwise_aux_loss'\]"),
        ({"passes": ("domino_ep", "domino_ep")}, "listed twice"),
        ({"num_chunks": 0}, "num_chunks must be a positive int"),
        ({"num_chunks": "four"}, "num_chunks must be a positive int"),
        ({"max_chunks_in_flight": 0}, "max_chunks_in_flight"),
        ({"offload_targets": "everything"}, "offload_targets"),
        # a kind misspelt: refused here, not inside the compile; the message lists the valid kinds
        ({"offload_targets": ("router_logit",)}, r"unknown kind\(s\) \['router_logit'\]; valid: 'auto' or a tuple of kinds "
                                                r"from \['router_logits', 'selected_experts'\]"),
        ({"offload_targets": "router_logits"}, r"a tuple: offload_targets=\('router_logits',\)"),
        ({"offload_targets": ()}, "offload_targets is empty"),
        ({"offload_targets": 3}, "offload_targets must be 'auto' or a tuple"),
        ({"passes": ("schedule_overlap",)}, "a post-grad pass, switched by its own option"),
        ({"verify_rtol": "1e-2"}, "verify_rtol must be a non-negative number or None"),
        ({"verify_atol": float("nan")}, "verify_atol must be a non-negative number"),
        ({"extra": {"x": []}}, "extra option 'x' must have a hashable value"),
        ({"extra": (("x",),)}, r"extra must be \(name, value\) pairs"),
        ({"chunks": 4}, "unknown backend option"),
        ({"keep_graphs": "yes"}, "keep_graphs must be True or False"),
    ],
)
def test_config_errors_are_value_errors_naming_the_problem(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_backend(**kwargs)


def test_valid_options_are_kept_normalised() -> None:
    config = make_backend(offload_targets=["selected_experts", "selected_experts"], extra={"probe": 1},
                          verify_rtol=0.0).config
    assert config.offload_targets == ("selected_experts",) and config.extra == (("probe", 1),)
    assert (config.verify_rtol, config.verify_atol) == (0.0, None)
    hash(config)  # the config is a cache key


def test_help_of_make_backend_documents_every_option() -> None:
    import dataclasses
    import pydoc

    text = pydoc.render_doc(make_backend, renderer=pydoc.plaintext)
    for option in [f.name for f in dataclasses.fields(BackendConfig)] + ["keep_graphs"]:
        assert f"{option}:" in text or f"{option}," in text, option
    for kind in ("router_logits", "selected_experts", *DEFAULT_PASSES):
        assert kind in text, kind


def test_unknown_pass_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="known passes: .*domino_ep"):
        load_pass("domino", BackendConfig(passes=()))


def test_aot_eager_lowering_runs_the_passes_without_inductor() -> None:
    """``lowering="aot_eager"``: the pre-grad passes' result through AOTAutograd alone (no post-grad pass
    runs, nothing is generated by Inductor): the passes' numerics apart from Inductor's."""
    from moe_passes import make_backend

    backend = make_backend(passes=("layerwise_aux_loss",), lowering="aot_eager")

    def f(x: torch.Tensor) -> torch.Tensor:
        return (x.sin() * 2).sum()

    x = torch.randn(5, requires_grad=True)
    torch._dynamo.reset()
    try:
        torch.compile(f, backend=backend, fullgraph=True)(x).backward()
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(x.grad, 2 * x.detach().cos())
    (report,) = backend.reports
    assert [r["name"] for r in report["pre_grad"]] == ["layerwise_aux_loss"]
    assert report["post_grad"] == {"forward": [], "backward": []}, report["post_grad"]
    with pytest.raises(ValueError, match="lowering must be one of \\['inductor', 'aot_eager'\\], got 'eager'"):
        make_backend(lowering="eager")


def test_schedule_overlap_forward_only_runs_the_schedule_on_forward_graphs() -> None:
    """``schedule_overlap="forward"``: with activation checkpointing the backward schedule costs memory
    (``moe-passes bench --section checkpointing``); this keeps the forward overlap only."""
    from moe_passes.inductor.schedule import ScheduleOverlapPass

    both = ScheduleOverlapPass(BackendConfig(schedule_overlap=True))
    forward = ScheduleOverlapPass(BackendConfig(schedule_overlap="forward"))
    assert "backward" in both.graphs and "backward" not in forward.graphs and "forward" in forward.graphs
    assert both.uuid() != forward.uuid()  # Inductor's cache keeps the two apart
    assert ScheduleOverlapPass.enabled(BackendConfig(schedule_overlap="forward"))
    assert not ScheduleOverlapPass.enabled(BackendConfig(schedule_overlap=False))
    with pytest.raises(ValueError, match="schedule_overlap must be True, False or 'forward', got 'backward'"):
        make_backend(schedule_overlap="backward")
    with pytest.raises(ValueError, match="schedule_overlap must be True, False or 'forward', got 1"):
        make_backend(schedule_overlap=1)
