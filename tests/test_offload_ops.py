"""The offload custom ops: host copies with the right values, opaque to the compiler, stream-safe on CUDA."""

from __future__ import annotations

import gc
import re

import pytest
import torch

from moe_passes.ops import offload as ops
from moe_passes.ops.offload import OFFLOAD_START, OFFLOAD_WAIT, offload

CUDA_REASON = "needs a CUDA device: side-stream copy and overlap only exist on CUDA (CPU path is a plain copy)"


def _drop_tickets() -> None:
    gc.collect()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_cpu_offload_returns_a_distinct_contiguous_host_copy(dtype: torch.dtype) -> None:
    src = (torch.randn(5, 7) * 10).to(dtype).t()  # non-contiguous source
    host = offload(src)
    assert host.device.type == "cpu" and host.dtype == dtype and host.shape == src.shape
    assert host.is_contiguous()
    assert host.untyped_storage().data_ptr() != src.untyped_storage().data_ptr()
    assert torch.equal(host, src)


def test_empty_tensor_offloads() -> None:
    host = offload(torch.empty(0, 4))
    assert host.shape == (0, 4)


def test_pending_copy_is_dropped_when_its_ticket_dies() -> None:
    _drop_tickets()
    before = ops.pending_copies()
    ticket = OFFLOAD_START(torch.arange(6))
    assert ops.pending_copies() == before + 1
    assert torch.equal(OFFLOAD_WAIT(ticket, [6], torch.int64, []), torch.arange(6))
    del ticket
    _drop_tickets()
    assert ops.pending_copies() == before


def test_wait_without_start_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="no pending copy for ticket"):
        OFFLOAD_WAIT(torch.tensor(-5), [1], torch.float32, [])


def test_wait_with_wrong_shape_is_a_clear_error() -> None:
    ticket = OFFLOAD_START(torch.zeros(2, 3))
    with pytest.raises(RuntimeError, match="the graph expects"):
        OFFLOAD_WAIT(ticket, [3, 2], torch.float32, [])


def test_fake_kernels_pass_opcheck() -> None:
    x = torch.randn(4, 3)
    torch.library.opcheck(OFFLOAD_START, (x,), test_utils=("test_schema", "test_faketensor"))
    ticket = OFFLOAD_START(x)
    torch.library.opcheck(OFFLOAD_WAIT, (ticket, [4, 3], torch.float32, [x]), test_utils=("test_schema", "test_faketensor"))
    w = torch.randn(4, 3, requires_grad=True)
    args = (OFFLOAD_START(w.detach()), [4, 3], torch.float32, [], w)
    torch.library.opcheck(OFFLOAD_WAIT, args, test_utils=("test_schema", "test_autograd_registration"))


def test_host_copy_of_a_tensor_that_requires_grad_carries_its_gradient_back_like_cpu() -> None:
    w = torch.randn(5, 3, requires_grad=True)
    weights = torch.randn(5, 3)
    host = offload(w * 2)
    assert host.requires_grad and host.device.type == "cpu"
    (host * weights).sum().backward()
    via_offload = w.grad.clone()
    w.grad = None
    ((w * 2).cpu() * weights).sum().backward()
    assert torch.equal(via_offload, w.grad)


def test_without_grad_source_the_host_copy_is_detached() -> None:
    w = torch.randn(5, 3, requires_grad=True)
    host = OFFLOAD_WAIT(OFFLOAD_START(w.detach()), [5, 3], torch.float32, [])
    assert not host.requires_grad and torch.equal(host, w.detach())


def test_ops_live_below_fx_and_inductor_with_no_upward_import() -> None:
    """The FX pass gets its vocabulary from ``moe_passes.ops``, never from Inductor; Inductor needs no lowering
    of its own for these ops (extern fallback kernels), so ``moe_passes.inductor.ops`` is gone."""
    import ast
    import importlib.util
    import inspect
    import pkgutil

    import moe_passes.fx.async_offload as pass_package

    def imports(module: object) -> set[str]:
        tree = ast.parse(inspect.getsource(module))
        return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}

    modules = [pass_package] + [importlib.import_module(f"{pass_package.__name__}.{m.name}")
                                for m in pkgutil.iter_modules(pass_package.__path__)]
    every_import = set().union(*(imports(m) for m in modules))
    assert "moe_passes.ops.offload" in every_import
    assert not any(m.startswith("moe_passes.inductor") for m in every_import)
    assert not any(m.startswith(("moe_passes.inductor", "moe_passes.fx")) for m in imports(ops))
    assert importlib.util.find_spec("moe_passes.inductor.ops") is None


def _router_like(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    logits = torch.nn.functional.linear(x, w)
    ticket_logits = OFFLOAD_START(logits.detach())
    indices = torch.topk(torch.softmax(logits, -1), 2).indices
    nonzero = torch.nonzero(indices)  # unbacked leading size
    ticket_nz = OFFLOAD_START(nonzero)
    scaled = logits * 2  # its own buffer: two host copies of one buffer, one with a gradient edge, trip AOT autograd
    ticket_live = OFFLOAD_START(scaled.detach())
    loss = logits.pow(2).mean()
    done = [loss.detach(), ticket_logits, ticket_nz, ticket_live]  # every wait after all work and every start
    return (
        loss,
        OFFLOAD_WAIT(ticket_logits, logits.shape, logits.dtype, done),
        OFFLOAD_WAIT(ticket_nz, nonzero.shape, nonzero.dtype, done),
        OFFLOAD_WAIT(ticket_live, scaled.shape, scaled.dtype, done, scaled),  # carries the gradient back
    )


def _loss(out: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return out[0] + (out[3] * torch.arange(4.0)).sum()


@pytest.fixture(scope="module")
def compiled_router_like() -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...], str, torch.Tensor]:
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    x, w = torch.randn(6, 8), torch.randn(4, 8, requires_grad=True)
    _drop_tickets()
    pending_before = ops.pending_copies()
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        out, codes = run_and_get_code(torch.compile(_router_like, fullgraph=True), x, w)
    _drop_tickets()
    assert ops.pending_copies() == pending_before, "the compiled graph left pending copies behind"
    _loss(out).backward()
    grad = w.grad.clone()
    w.grad = None
    ref = _router_like(x, w)
    _loss(ref).backward()
    torch._dynamo.reset()
    return out, ref, codes[0], grad - w.grad


def test_compiled_ops_match_eager_including_unbacked_sizes(compiled_router_like) -> None:
    out, ref, _, grad_diff = compiled_router_like
    torch.testing.assert_close(out[0], ref[0])
    for got, want in zip(out[1:], ref[1:]):
        assert got.device.type == "cpu" and got.dtype == want.dtype and got.requires_grad == want.requires_grad
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert [t.requires_grad for t in out[1:]] == [False, False, True]
    assert grad_diff.abs().max() < 1e-6


def test_ops_are_extern_calls_in_inductor_output_and_waits_follow_the_work(compiled_router_like) -> None:
    code = compiled_router_like[2]
    body = code[code.index("def call(") :]
    starts = [m.start() for m in re.finditer(r"torch\.ops\.moe_passes\.offload_start\.default\(", body)]
    waits = [m.start() for m in re.finditer(r"torch\.ops\.moe_passes\.offload_wait\.default\(", body)]
    assert len(starts) == 3 and len(waits) == 3
    kernels = [m.start() for m in re.finditer(r"(cpp_fused_\w+|extern_kernels\.\w+|torch\.ops\.aten\.\w+\.default)\(", body)]
    assert max(starts) < min(waits)
    assert max(kernels) < min(waits), "a blocking wait was scheduled before compute it must follow"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_REASON)
def test_cuda_copy_runs_on_the_side_stream_and_overlaps_compute() -> None:
    dev = torch.device("cuda")
    torch.cuda.synchronize()
    main = torch.cuda.current_stream(dev)
    torch.cuda._sleep(50_000_000)  # the producer is queued behind long work: the copy must wait for it
    src = torch.arange(1 << 20, device=dev, dtype=torch.float32)
    ticket = OFFLOAD_START(src)
    assert ops.side_stream(dev) != main
    _, event = ops._pending[int(ticket)]
    allocated_with_src = torch.cuda.memory_allocated(dev)
    del src  # freed for accounting at once; record_stream keeps the block until the copy ends
    assert torch.cuda.memory_allocated(dev) < allocated_with_src
    scribble = torch.full((1 << 20,), -1.0, device=dev)  # must not get src's block while the copy reads it
    torch.cuda._sleep(200_000_000)  # compute issued after the start: the copy must not wait for it
    while not event.query():  # spin on the copy alone; the main stream is still sleeping
        pass
    assert not main.query(), "the copy finished only after the compute queued after it: no overlap"
    host = OFFLOAD_WAIT(ticket, [1 << 20], torch.float32, [])
    assert host.is_pinned() and host.device.type == "cpu"
    assert torch.equal(host, torch.arange(1 << 20, dtype=torch.float32))
    torch.cuda.synchronize()
    del scribble


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_REASON)
def test_cuda_host_copy_gradient_goes_back_to_the_device_like_cpu() -> None:
    w = torch.randn(5, 3, device="cuda", requires_grad=True)
    weights = torch.randn(5, 3)
    host = offload(w * 2)
    assert host.device.type == "cpu" and host.is_pinned() and host.requires_grad
    (host * weights).sum().backward()
    via_offload = w.grad.clone()
    assert via_offload.device.type == "cuda"
    w.grad = None
    ((w * 2).cpu() * weights).sum().backward()
    assert torch.equal(via_offload, w.grad)
