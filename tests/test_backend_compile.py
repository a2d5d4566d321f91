"""The backend under torch.compile: equivalence with plain Inductor, reports, verify, entry point.

One rank, no process group. The MoE stack is compiled three times per module
(plain Inductor, backend with no passes, backend with two neutral test passes --
one on Dynamo's torch IR, one on the canonical ATen re-trace -- and verify);
everything else uses a tiny function that compiles in a second or two.
"""

from __future__ import annotations

import importlib.metadata
import logging

import pytest
import torch
from torch._inductor.utils import fresh_cache

import moe_passes
from moe_passes import BackendConfig, DominoBackend, domino_backend, make_backend
from moe_passes.inductor.backend import PostGradPipeline, VerificationError
from moe_passes.models.stacks import MoEStack, preset_stack
from moe_passes.pipeline.manager import StrictModeError
from moe_passes.pipeline.order import pipeline_names
from moe_passes.registry import PRE_GRAD_PASSES, pass_class
from tests import backend_helpers as h

log = logging.getLogger(__name__)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        yield
    torch._dynamo.reset()


def loss_and_grads(model: MoEStack, fn, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    loss = fn(x, target)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    grads["input"] = x.grad.clone()
    return loss.detach(), grads


@pytest.fixture(scope="module")
def moe_results() -> dict[str, tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """Loss and every gradient on fresh inputs (not the ones compiled with), per way of running."""
    torch.manual_seed(0)
    model = preset_stack(num_layers=2, hidden_size=16, intermediate_size=32, num_experts=4, top_k=2)
    compile_x, compile_t = torch.randn(2, 4, 16), torch.randn(2, 4, 16)
    fresh_x, fresh_t = torch.randn(2, 4, 16), torch.randn(2, 4, 16)
    neutral = None
    results = {}
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        for name in ("eager", "inductor", "no_passes", "neutral_pass"):
            torch._dynamo.reset()
            if name == "eager":
                fn = model
            elif name == "inductor":
                fn = torch.compile(model, backend="inductor")
            elif name == "no_passes":
                fn = torch.compile(model, backend=make_backend(passes=()))
            else:
                with pytest.MonkeyPatch.context() as mp:
                    h.register(mp, h.ScaleByOnePass, h.AtenScaleByOnePass)
                    neutral = make_backend(passes=("t_aten_scale_by_one", "t_scale_by_one"), verify=True)
                    neutral.pre_grad_passes()
                fn = torch.compile(model, backend=neutral)
            loss_and_grads(model, fn, compile_x, compile_t)  # compiles forward and backward
            results[name] = loss_and_grads(model, fn, fresh_x, fresh_t)
    torch._dynamo.reset()
    results["_neutral_backend"] = neutral  # type: ignore[assignment]
    return results


@pytest.mark.parametrize("variant", ["no_passes", "neutral_pass"])
def test_backend_matches_plain_inductor(moe_results: dict, variant: str) -> None:
    ref_loss, ref_grads = moe_results["inductor"]
    loss, grads = moe_results[variant]
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_inductor_matches_eager(moe_results: dict) -> None:
    ref_loss, ref_grads = moe_results["eager"]
    loss, grads = moe_results["inductor"]
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-5)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5)


def test_verify_ran_on_the_moe_graph_and_passed(moe_results: dict) -> None:
    backend: DominoBackend = moe_results["_neutral_backend"]
    (report,) = backend.reports
    assert report["verify"] == "ok"
    torch_record, aten_record = report["pre_grad"]  # declared order: torch IR first, whatever the listed order
    assert torch_record["name"] == "t_scale_by_one" and torch_record["changed"] and torch_record["stats"] == {"inserted": 1}
    assert torch_record["ir"] == "torch"


def test_aten_pass_ran_on_the_canonical_graph_inside_torch_compile(moe_results: dict) -> None:
    """Inside the real backend call: the re-trace happened, the aten pass saw only ATen overloads, and
    Inductor compiled the canonical graph (the loss/gradient tests above compare it with plain Inductor)."""
    (report,) = moe_results["_neutral_backend"].reports
    aten_record = report["pre_grad"][1]
    assert aten_record["name"] == "t_aten_scale_by_one" and aten_record["ir"] == "aten" and aten_record["changed"]
    assert aten_record["stats"] == {"all_overloads": True, "call_methods": 0}
    assert report["ir"] == "aten" and report["canonical_error"] is None


def test_validation_repropagated_inside_torch_compile(moe_results: dict) -> None:
    """Fake-tensor re-propagation ran in the graph's own fake mode (not "unavailable") on both IRs."""
    (report,) = moe_results["_neutral_backend"].reports
    for record in report["pre_grad"]:
        notes = record["validation_notes"]
        assert any(n.startswith("fake-tensor re-propagation ran") for n in notes), (record["name"], notes)
        assert not any("unavailable" in n for n in notes), notes


def backend_error(err: BaseException) -> BaseException:
    """The exception the backend raised, unwrapped from Dynamo's BackendCompilerFailed."""
    return getattr(err, "inner_exception", None) or err.__cause__ or err


def small_fn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (torch.tanh(x @ w) * 2).sum()


def small_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(4, 3), torch.randn(3, 5, requires_grad=True)


def test_verify_catches_a_wrong_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    h.register(monkeypatch, h.WrongScalePass)
    backend = make_backend(passes=("t_wrong_scale",), verify=True)
    with pytest.raises(Exception) as err:
        torch.compile(small_fn, backend=backend)(*small_inputs())
    error = backend_error(err.value)
    assert isinstance(error, VerificationError), error
    assert "output 0" in str(error) and "gradient of input" in str(error)


def test_a_raising_pass_fails_closed_through_torch_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    h.register(monkeypatch, h.RaisingPass)
    backend = make_backend(passes=("t_raising",))
    x, w = small_inputs()
    torch.testing.assert_close(torch.compile(small_fn, backend=backend)(x, w), small_fn(x, w))
    (record,) = backend.reports[0]["pre_grad"]
    assert not record["changed"] and "Traceback" in record["error"] and "used before it has been defined" in record["error"]


def test_a_raising_post_grad_pass_is_rolled_back_forward_and_backward() -> None:
    backend = DominoBackend(BackendConfig(passes=()), post_grad=[h.RaisingPostGradPass(BackendConfig(passes=()))])
    x, w = small_inputs()
    with fresh_cache():
        out = torch.compile(small_fn, backend=backend)(x, w)
        out.backward()
    torch.testing.assert_close(out, small_fn(x, w))
    post = backend.reports[0]["post_grad"]
    for kind in ("forward", "backward"):  # the AOT graph kind comes from Inductor's own call
        (record,) = post[kind]
        assert "post-grad pass bug" in record["error"] and "graph restored" in record["skipped"][0]["reason"]


def test_strict_passes_a_graph_break_graph_without_their_triggers() -> None:
    """strict=True with the real passes: the graph before a graph break holds no all-to-all, router or loss,
    so nothing raises there (it used to), and the report says no trigger was seen."""

    def broken(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(x @ w)
        torch._dynamo.graph_break()
        return (y * 3).sum()

    backend = make_backend(strict=True)
    x, w = small_inputs()
    torch.testing.assert_close(torch.compile(broken, backend=backend)(x, w), broken(x, w))
    assert len(backend.reports) == 2
    for report in backend.reports:
        assert all(p["trigger"] is None and not p["changed"] for p in report["pre_grad"]), report["pre_grad"]


def test_strict_mode_raises_through_torch_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    h.register(monkeypatch, h.NothingToDoPass)
    backend = make_backend(passes=("t_nothing",), strict=True)
    with pytest.raises(Exception, match="router output used by a side effect") as err:
        torch.compile(small_fn, backend=backend)(*small_inputs())
    assert isinstance(backend_error(err.value), StrictModeError)


def test_reports_cover_graph_breaks_and_post_grad_forward_and_backward(monkeypatch: pytest.MonkeyPatch) -> None:
    h.register(monkeypatch, h.ScaleByOnePass, h.NothingToDoPass)
    backend = DominoBackend(
        BackendConfig(passes=("t_scale_by_one", "t_nothing")), post_grad=[h.RecordingPostGradPass(BackendConfig(passes=()))]
    )

    def broken(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(x @ w)
        torch._dynamo.graph_break()
        return (y * 3).sum()

    x, w = small_inputs()
    with fresh_cache():  # a cached graph skips post-grad passes (and so their reports)
        out = torch.compile(broken, backend=backend)(x, w)
        out.backward()
    torch.testing.assert_close(out, broken(x, w))
    reports = backend.reports
    assert [r["graph"] for r in reports] == [0, 1]
    for r in reports:
        assert [p["name"] for p in r["pre_grad"]] == ["t_scale_by_one", "t_nothing"]
        assert r["pre_grad"][1]["skipped"] == [{"region": "layers.0", "reason": "router output used by a side effect"}]
        (fw,) = r["post_grad"]["forward"]
        (bw,) = r["post_grad"]["backward"]
        assert fw["stats"]["tangents"] == 0 and bw["stats"]["tangents"] >= 1


def test_dynamic_shapes_and_recompiles(monkeypatch: pytest.MonkeyPatch) -> None:
    h.register(monkeypatch, h.ScaleByOnePass)
    backend = make_backend(passes=("t_scale_by_one",), verify=True)
    compiled = torch.compile(small_fn, backend=backend, dynamic=True)
    for rows in (4, 7):
        x, w = torch.randn(rows, 3), torch.randn(3, 5)
        torch.testing.assert_close(compiled(x, w), small_fn(x, w))
    assert len(backend.reports) == 1  # one dynamic graph serves both sizes
    static_backend = make_backend(passes=("t_scale_by_one",))
    compiled = torch.compile(small_fn, backend=static_backend, dynamic=False)
    for dtype in (torch.float32, torch.float64):
        x, w = torch.randn(4, 3, dtype=dtype), torch.randn(3, 5, dtype=dtype)
        torch.testing.assert_close(compiled(x, w), small_fn(x, w))
    assert len(static_backend.reports) == 2  # a recompile runs the pipeline again


def test_verify_runs_with_symbolic_sizes_at_their_hints(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dynamic shapes hand the backend SymInt sizes; verify runs the graphs at the sizes' hints."""
    h.register(monkeypatch, h.ScaleByOnePass)
    backend = make_backend(passes=("t_scale_by_one",), verify=True)
    compiled = torch.compile(small_fn, backend=backend, dynamic=True)
    compiled(torch.randn(4, 3), torch.randn(3, 5))
    (report,) = backend.reports
    assert report["verify"] == "ok"


def test_post_grad_pipeline_uuid_follows_pass_code_and_config() -> None:
    report = moe_passes.inductor.backend.GraphReport(index=0, num_nodes=0)
    a = PostGradPipeline([h.RecordingPostGradPass(BackendConfig(num_chunks=2))], report)
    b = PostGradPipeline([h.RecordingPostGradPass(BackendConfig(num_chunks=2))], report)
    c = PostGradPipeline([h.RecordingPostGradPass(BackendConfig(num_chunks=4))], report)
    assert a.uuid() == b.uuid() != c.uuid()


def test_inductor_patches_carry_the_post_grad_pipeline_and_its_config() -> None:
    report = moe_passes.inductor.backend.GraphReport(index=0, num_nodes=0)
    assert make_backend(passes=()).inductor_patches(report) == {}
    assert make_backend(passes=("domino_ep",), schedule_overlap=False).inductor_patches(report) == {}
    patches = make_backend(passes=("domino_ep",)).inductor_patches(report)
    assert isinstance(patches["post_grad_custom_post_pass"], PostGradPipeline)
    assert [p.name for p in patches["post_grad_custom_post_pass"].passes] == ["schedule_overlap"]
    from moe_passes.inductor.schedule import INDUCTOR_CONFIG

    assert INDUCTOR_CONFIG.items() <= patches.items()


def test_entry_point_resolves_to_domino_backend() -> None:
    (ep,) = [e for e in importlib.metadata.entry_points(group="torch_dynamo_backends") if e.name == "domino"]
    assert ep.value == "moe_passes.inductor.backend:domino_backend"
    assert ep.load() is domino_backend
    assert torch._dynamo.lookup_backend("domino") is domino_backend
    assert domino_backend.config.passes == ("layerwise_aux_loss", "domino_ep", "async_offload")


def test_default_passes_load_and_compile_by_registered_name() -> None:
    """``backend="domino"`` is the process-wide backend with the default passes; its reports are its own
    and ``clear_reports()`` starts them afresh."""
    for name in PRE_GRAD_PASSES:
        pass_class(name)  # an unimportable default pass fails here, with its ImportError
    domino_backend.clear_reports()
    x, w = small_inputs()
    torch.testing.assert_close(torch.compile(small_fn, backend="domino")(x, w), small_fn(x, w))
    (report,) = domino_backend.reports
    assert [p["name"] for p in report["pre_grad"]] == pipeline_names(PRE_GRAD_PASSES, domino_backend.config)
    # nothing in this graph is what the default passes are for: no trigger, so no warnings and no strict error
    assert [p["trigger"] for p in report["pre_grad"]] == [None, None, None]
    domino_backend.clear_reports()
    assert domino_backend.reports == []
