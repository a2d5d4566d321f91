"""Diagnostics a user can act on: graph breaks in the reports, ``backend.explain()``, ``moe-passes explain``.

A ``.tolist()`` of split sizes compiled without ``capture_scalar_outputs`` breaks the Dynamo graph; the
dispatch and the combine all-to-all then land in different graphs and Domino can only say that an
all-to-all has no partner. The backend records the breaks Dynamo took while it compiled, names the
setting that removes each, and says when a break probably split an MoE block.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from moe_passes import make_backend
from moe_passes.cli import main
from moe_passes.inductor.backend import DominoBackend
from moe_passes.inductor.graph_breaks import DYNAMIC_OUTPUT_HINT, SCALAR_OUTPUTS_HINT, condense, hint_for
from moe_passes.inductor.summary import explain, summarize
from tests.cli_helpers import moe_passes_cli
from tests.test_summary import reports as summary_reports

ALL_PASSES = ("layerwise_aux_loss", "domino_ep", "async_offload", "schedule_overlap")


def split_sizes(x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    y = torch.sin(x)
    sizes = counts.tolist()  # the split sizes of a dropless MoE, read on the host
    return y * sizes[0]


def compile_once(backend: DominoBackend, capture_scalar_outputs: bool) -> None:
    """Compiled cold: a graph served from Inductor's caches runs no post-grad pass (and reports none)."""
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(capture_scalar_outputs=capture_scalar_outputs), \
                torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
            torch.compile(split_sizes, backend=backend)(torch.randn(8), torch.tensor([3, 5]))
    finally:
        torch._dynamo.reset()


@dataclass
class Compiled:
    without_flag: DominoBackend
    with_flag: DominoBackend


@pytest.fixture(scope="module")
def compiled() -> Compiled:
    """``split_sizes`` compiled through the default backend without, then with, ``capture_scalar_outputs``.
    Both backends exist before either compiles: the first one's break must not leak into the second's reports."""
    without_flag, with_flag = make_backend(), make_backend()
    compile_once(without_flag, capture_scalar_outputs=False)
    compile_once(with_flag, capture_scalar_outputs=True)
    return Compiled(without_flag, with_flag)


def test_a_tolist_without_capture_scalar_outputs_is_listed_with_its_fix(compiled: Compiled) -> None:
    s = compiled.without_flag.summary()
    assert s.graphs == 2, s.as_dict()  # the break split the function in two
    ((reason, count),) = s.graph_breaks.items()
    assert count == 1 and "_local_scalar_dense" in reason, s.graph_breaks
    assert s.graph_break_hints == {reason: SCALAR_OUTPUTS_HINT}
    # Where the break is, in the user's code: this file, the .tolist() line.
    (where,) = s.graph_break_where[reason]
    assert where.startswith(f"{__file__}:") and "counts.tolist()" in where, where
    text = str(s)
    assert f"graph breaks: 1 (Dynamo ended a graph there and started another)\n    1x {reason[:100]}" in text, text
    assert "fix: set torch._dynamo.config.capture_scalar_outputs = True" in text, text
    d = s.as_dict()
    json.dumps(d)
    assert d["graph_breaks"] == {reason: 1} and d["graph_break_hints"] == {reason: SCALAR_OUTPUTS_HINT}
    # The report of the graph the break ended says so; the one after it does not.
    first, second = compiled.without_flag.reports
    assert first["ended_by"]["where"] == where and first["graph_breaks"][0]["hint"] == SCALAR_OUTPUTS_HINT
    assert second["ended_by"] is None and second["graph_breaks"] == []


def test_with_capture_scalar_outputs_no_break_is_recorded(compiled: Compiled) -> None:
    s = compiled.with_flag.summary()
    assert s.graphs == 1 and s.graph_breaks == {} and s.moe_split is None, s.as_dict()
    assert "graph break" not in str(s) and "0 graph break(s)" in compiled.with_flag.explain()


def _eager_break() -> None:
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(capture_scalar_outputs=False):
            torch.compile(split_sizes, backend="eager")(torch.randn(8), torch.tensor([3, 5]))
    finally:
        torch._dynamo.reset()


def counts_first(ids: torch.Tensor) -> torch.Tensor:
    counts = torch.bincount(ids, minlength=4)  # a break before any op: no graph ends there
    return counts * 2


def test_a_break_with_no_graph_before_it_is_counted_at_the_next_graph() -> None:
    backend = make_backend(passes=())
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=False):
            torch.compile(counts_first, backend=backend)(torch.tensor([0, 1, 1, 3]))
    finally:
        torch._dynamo.reset()
    s = backend.summary()
    assert s.graphs == 1 and s.as_dict()["graph_breaks"] == {
        "Dynamic shape operator: Operator `aten.bincount.default`'s output shape depends on input Tensor data.": 1}
    assert list(s.graph_break_hints.values()) == [DYNAMIC_OUTPUT_HINT]
    assert "fix: set torch._dynamo.config.capture_dynamic_output_shape_ops = True" in str(s)


def test_only_breaks_after_the_backends_mark_count() -> None:
    """The counter is process-global: breaks another compile took before this backend was created, or before
    its reports were cleared, are not this backend's."""
    _eager_break()  # a break, not ours
    backend = make_backend(passes=())
    compile_once(backend, capture_scalar_outputs=True)
    assert backend.summary().graph_breaks == {}
    _eager_break()  # another compile's break after this backend's mark, before its next graph
    compile_once(backend, capture_scalar_outputs=True)
    assert backend.summary().graph_breaks == {}
    compile_once(backend, capture_scalar_outputs=False)
    assert sum(backend.summary().graph_breaks.values()) == 1
    backend.clear_reports()
    assert backend.summary().graph_breaks == {}
    _eager_break()
    backend.clear_reports()  # breaks taken before the clear are forgotten with the reports
    compile_once(backend, capture_scalar_outputs=True)
    assert backend.summary().graph_breaks == {}


# Break messages as torch 2.13 words them (first line, Explanation:, Hint:).
def _message(kind: str, explanation: str, hint: str) -> str:
    return f"{kind}\n  Explanation: {explanation}\n  Hint: {hint}\n\n  Developer debug context: x\n\n For more details: https://x"


@pytest.mark.parametrize("message, hint", [
    (_message("Data dependent operator", "Operator `aten._local_scalar_dense.default` has a non-Tensor output ...",
              "Enable tracing of data-dependent output operators with `torch._dynamo.config.capture_scalar_outputs = True`"),
     SCALAR_OUTPUTS_HINT),
    (_message("Unsupported Tensor.item() call with capture_scalar_outputs=False", "...", "Set ..."), SCALAR_OUTPUTS_HINT),
    ("Tensor.tolist() is not supported without scalar outputs", SCALAR_OUTPUTS_HINT),  # an older wording: keywords
    (_message("Dynamic shape operator", "Operator `aten.bincount.default`'s output shape depends on input Tensor data.",
              "Enable tracing of dynamic shape operators with `torch._dynamo.config.capture_dynamic_output_shape_ops = True`"),
     DYNAMIC_OUTPUT_HINT),
    ("dynamic shape operator: aten.nonzero.default", DYNAMIC_OUTPUT_HINT),
    ("aten._unique2.default has a data-dependent output shape", DYNAMIC_OUTPUT_HINT),
    # No setting removes these: no hint of ours.
    (_message("Tensor.tolist() with non-integer tensor", "Dynamo currently does not support tracing `tolist()` on "
              "non-integer tensors.", "Ensure the input tensor to `tolist()` is an integer type"), None),
    (_message("Call to `torch._dynamo.graph_break()`", "User-inserted graph break.", "Remove the call."), None),
    (_message("Failed to trace builtin operator", "Dynamo does not know how to trace builtin operator `print`", "Avoid it"), None),
])
def test_hint_for_a_break_reason(message: str, hint: str | None) -> None:
    assert hint_for(message) == hint
    assert hint_for(condense(message)) == hint  # the reports keep the condensed reason: the hint must survive it


def test_condense_keeps_the_break_type_and_the_explanation() -> None:
    message = _message("Dynamic shape operator", "Operator `aten.nonzero.default`'s output shape depends on input Tensor data.",
                       "Enable ...")
    assert condense(message) == "Dynamic shape operator: Operator `aten.nonzero.default`'s output shape depends on input Tensor data."
    assert condense("graph break   in\n  old form") == "graph break in old form"


def _with_split(reason: str, breaks: bool) -> list[dict[str, Any]]:
    """The summary test's two graphs, the first with Domino skipping a half MoE block, and maybe a recorded break."""
    reports = summary_reports()
    domino = reports[1]["pre_grad"][1]
    domino["skipped"] = [{"region": "all_to_all ['all_to_all_single_1']", "reason": reason}]
    if breaks:
        reports[0]["graph_breaks"] = [{"reason": "Data dependent operator: aten._local_scalar_dense", "count": 2,
                                       "hint": SCALAR_OUTPUTS_HINT, "torch_hint": None, "where": "moe.py:170 in forward"}]
    return reports


@pytest.mark.parametrize("reason", ["token all-to-all without a mirrored combine all-to-all",
                                    "no row gather src[sorted index] feeds the dispatch all-to-all (tokens are not permuted ...)"])
def test_a_domino_skip_that_a_break_explains_names_the_break(reason: str) -> None:
    s = summarize(_with_split(reason, breaks=True))
    assert s.moe_split == ("a graph break probably split the MoE block (domino_ep saw only part of it in graph(s) 1): "
                           + SCALAR_OUTPUTS_HINT)
    assert s.moe_split in str(s) and s.as_dict()["moe_split"] == s.moe_split
    text = explain(s)
    assert f"  not applied in graph 1:\n    all_to_all ['all_to_all_single_1']: {reason}\n    fix: a graph break probably" in text
    # Without a recorded break, the same skip is Domino's reason alone: no guess about breaks.
    plain = summarize(_with_split(reason, breaks=False))
    assert plain.moe_split is None and "graph break" not in str(plain) and "graph break probably" not in explain(plain)


def test_explain_mentions_each_pass_and_what_it_did(compiled: Compiled) -> None:
    backend = compiled.with_flag
    text = backend.explain()
    data = backend.explain_dict()
    json.dumps(data)
    assert text.splitlines()[0] == "moe_passes explain: 1 graph(s) compiled, 0 graph break(s)"
    for name in ALL_PASSES:
        assert f"\n{name} (" in text, (name, text)
        assert name in data["passes"]
    # Per place: applied / not applied (reasons verbatim) / nothing to do, and the data says the same.
    for name, p in data["passes"].items():
        places = len(p["applied_in"]) + len(p["not_applied"]) + len(p["nothing_to_do"])
        assert places == p["graphs"] == backend.summary().passes[name].graphs, (name, p)
    offload = data["passes"]["async_offload"]["not_applied"][0]
    assert offload["reasons"][0].startswith("graph: no router logits") and offload["reasons"][0] in text


def test_explain_on_hand_made_reports_says_what_applied_where_and_what_to_change() -> None:
    reports = summary_reports()
    reports[1]["canonical_error"] = "pre-dispatch re-trace failed (RuntimeError: boom)"
    reports[1]["pre_grad"][1]["skipped"] = [{"region": "graph", "reason": "canonical ATen IR unavailable: pre-dispatch "
                                                                          "re-trace failed (RuntimeError: boom)"}]
    text = explain(summarize(reports))
    assert "  applied in graph 0: 1 MoE region(s) chunked: L['self'].mlp: 2 chunks (token chunks, auto: 2 chunks: 48 tokens)" in text
    assert "  applied in graph 1: 2 layer(s) rewritten in 1 loss group(s), 4.0 KiB of stacked tensors no longer in the graph" in text
    assert "  applied in graph 0 (forward): 6 all-to-all(s), overlapped with compute 0 -> 4" in text
    assert "  not applied in graph 0 (backward):\n    graph: no all-to-all in this graph" in text
    assert ("  not applied in graph 1:\n    graph: canonical ATen IR unavailable: pre-dispatch re-trace failed "
            "(RuntimeError: boom)\n    fix: no setting changes this") in text, text
    assert "canonical IR unavailable: pre-dispatch re-trace failed (RuntimeError: boom) (1 graph(s))\n  fix: " in text


def test_cli_explain_on_the_smallest_preset() -> None:
    """The issue's scenario from the command line: one MoE layer compiled without capture_scalar_outputs. Every pass
    has its lines, the break is listed with its fix, and Domino's silence is explained by it."""
    proc = moe_passes_cli("explain", "moe_stack", "--layers", "1", "--no-capture-scalar-outputs", timeout=300)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    for name in ALL_PASSES:
        assert f"\n{name} (" in text, (name, text)
    assert "graph breaks (Dynamo ended a graph there and started another):" in text
    assert "models/interns1_vl/moe.py:" in text and ".tolist()" in text, text
    assert "    fix: set torch._dynamo.config.capture_scalar_outputs = True" in text
    assert "a graph break probably split the MoE block (domino_ep saw only part of it in graph(s) " in text
    assert "async_offload (pre-grad): applied in 1 of " in text and "  applied in graph 0: 2 router tensor(s) moved" in text
    assert "compiling and running once (Dynamo, passes, Inductor): done in" in proc.stderr


def tolist_target() -> tuple[Any, list[torch.Tensor]]:
    """A ``package.module:function`` target without all-to-alls: compiles in seconds."""
    return split_sizes, [torch.randn(8), torch.tensor([3, 5])]


def test_cli_explain_json_without_capture_scalar_outputs(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "explain.json"
    status = main(["explain", "tests.test_explain:tolist_target", "--world-size", "1", "--pass", "async_offload",
                   "--no-capture-scalar-outputs", "--format", "json", "--output", str(out), "-q"])
    assert status == 0, capsys.readouterr().err
    data = json.loads(out.read_text())
    assert data["options"]["passes"] == ["async_offload"] and data["options"]["capture_scalar_outputs"] is False
    assert data["target"] == "tests.test_explain:tolist_target" and data["graphs"] == 2
    (brk,) = data["graph_breaks"]
    assert brk["count"] == 1 and brk["hint"] == SCALAR_OUTPUTS_HINT and "counts.tolist()" in brk["where"][0], brk
    offload = data["passes"]["async_offload"]
    assert offload["graphs"] == 2 and len(offload["not_applied"]) == 2 and offload["applied_in"] == []


@pytest.mark.parametrize("args, message", [
    (["explain", "bogus-preset"], "unknown preset 'bogus-preset'"),
    (["explain", "moe_passes.cli.targets:no_such_function"], "has no callable 'no_such_function'"),
    (["explain", "moe_stack", "--pass", "nope"], "unknown pass(es) ['nope']; known passes:"),
    (["explain", "interns1-pro"], "interns1-pro is a real-shape preset"),
])
def test_cli_explain_bad_input_exits_2_with_one_line(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*args, "--world-size", "1", "-q"]) == 2  # --world-size 1: no fake group in this process
    err = capsys.readouterr().err
    assert message in err and err.startswith("moe-passes: error: ") and err.count("\n") == 1, err
