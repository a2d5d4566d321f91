"""Async device-to-host copy as two opaque custom ops: ``offload_start`` / ``offload_wait``.

These ops are graph *vocabulary*: a pre-grad FX pass
(``moe_passes.fx.async_offload``) inserts them, AOT autograd and Inductor
carry them through as opaque extern calls. They live here, below both
``moe_passes.fx`` and ``moe_passes.inductor``, so that the FX passes import
them without importing Inductor.

Why two ops: the copy must be *issued* where the tensor is produced (so the
device memory can be released early and the copy overlaps later compute) and
*completed* only where the host needs the values (the end of the forward).
Like functional collectives (``all_to_all_single`` + ``wait_tensor``), that is
a start node and a wait node in the graph.

Design, learned from ``torch/_functorch/_activation_offloading/offload_ops.py``
and adapted to a *host* consumer:

* ``moe_passes::offload_start(Tensor t) -> Tensor ticket``. On CUDA it
  allocates a contiguous *pinned* host buffer (PyTorch's caching host
  allocator pools these and does not hand a block out again while a copy into
  it is in flight), makes a per-device side stream wait for the current stream
  (so the copy sees the producer's result), issues ``copy_(non_blocking=True)``
  on the side stream and records an event. The device tensor is kept alive for
  the copy with ``t.record_stream(side)``: the caching allocator does not reuse
  its block until the side stream's work recorded so far has finished — alive
  until the copy is done and not longer, with no Python reference that would
  pin it until the wait. (``ao::offload`` avoids ``record_stream`` because of
  fragmentation when most activations are offloaded; router tensors are a few
  small blocks per layer.) On CPU, or any non-CUDA device, the copy is a plain
  synchronous copy into a new host tensor: same graph semantics.
* ``moe_passes::offload_wait(Tensor ticket, SymInt[] shape, ScalarType dtype,
  Tensor[] after, Tensor? grad_source=None) -> Tensor``. Blocks the host until
  the copy's event completes (``Event.synchronize``: the consumer is Python
  reading a host tensor, so making the compute stream wait, as
  ``ao::wait_tensor`` does, would not be enough) and returns the host buffer.

Gradients: ``grad_source`` is the device tensor the host copy was taken from,
when that tensor requires grad. The wait never reads it; it is the autograd
edge. The host tensor then requires grad like ``t.cpu()`` does, and its
backward moves the incoming gradient to ``grad_source``'s device and dtype
(the backward of a device-to-host copy), so a returned router-logit output
that the caller backpropagates through keeps its exact gradient. The price:
the device buffer is an input of the wait, so it lives until the wait (it
would live at least as long without the pass, as a graph output). Without
``grad_source`` the host tensor is detached (``offload_start`` copies a
``detach``ed value: no gradient flows through the copy itself).

Why a ticket and not the host tensor itself: the buffer must not be *read*
by anything before the wait. If ``offload_start`` returned it, the wait would
need an aliasing schema (``Tensor(a) -> Tensor(a)``), which AOT autograd's
functionalization rejects for custom ops (measured on torch 2.13), or a
mutating one (``Tensor(a!)``), which functionalization may turn into a clone
of the buffer *before* the wait — a read of an in-flight copy. With a ticket,
both ops are plain functional custom ops: the host buffer first appears in the
graph as the wait's output, so no backend can read it early, and the shape
arguments give the wait's fake kernel its exact (possibly unbacked) sizes
without keeping the device tensor alive until the wait.

A pending copy lives in a registry keyed by the ticket's value and is dropped
when the ticket tensor dies (``weakref.finalize``), so a graph that raises
between start and wait leaks nothing, and two waits on one ticket (CSE) both
work. The registry is not thread-safe: graphs run single-threaded.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Sequence

import torch
from torch.fx.node import has_side_effect

NAMESPACE = "moe_passes"

_side_streams: dict[torch.device, torch.cuda.Stream] = {}
_pending: dict[int, tuple[torch.Tensor, torch.cuda.Event | None]] = {}
_tickets = itertools.count(1)


def side_stream(device: torch.device | str) -> torch.cuda.Stream:
    """The per-device stream every offload copy runs on (created on first use)."""
    device = torch.device(device)
    if device.index is None:
        device = torch.device(device.type, torch.cuda.current_device())
    if device not in _side_streams:
        _side_streams[device] = torch.cuda.Stream(device=device)
    return _side_streams[device]


def pending_copies() -> int:
    """Copies whose ticket is still alive (tests and leak checks)."""
    return len(_pending)


def _copy_to_host(t: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    if t.device.type != "cuda":
        host = torch.empty(t.shape, dtype=t.dtype, device="cpu")
        host.copy_(t)
        return host, None
    host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
    if t.numel() == 0:
        return host, None
    stream = side_stream(t.device)
    stream.wait_stream(torch.cuda.current_stream(t.device))
    event = torch.cuda.Event()
    with torch.cuda.stream(stream):
        host.copy_(t, non_blocking=True)
        event.record(stream)
    t.record_stream(stream)
    return host, event


@torch.library.custom_op(f"{NAMESPACE}::offload_start", mutates_args=())
def offload_start(t: torch.Tensor) -> torch.Tensor:
    """Issue the copy of ``t`` to the host; returns a ticket (0-d int64 CPU tensor) for ``offload_wait``."""
    key = next(_tickets)
    _pending[key] = _copy_to_host(t)
    ticket = torch.tensor(key, dtype=torch.int64)
    weakref.finalize(ticket, _pending.pop, key, None)
    return ticket


@offload_start.register_fake
def _offload_start_fake(t: torch.Tensor) -> torch.Tensor:
    return torch.empty((), dtype=torch.int64, device="cpu")


@torch.library.custom_op(f"{NAMESPACE}::offload_wait", mutates_args=())
def offload_wait(
    ticket: torch.Tensor,
    shape: Sequence[int],
    dtype: torch.dtype,
    after: Sequence[torch.Tensor],
    grad_source: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block until the copy behind ``ticket`` is complete; returns the host tensor (``shape``, ``dtype``).

    ``after`` is read by nobody: its tensors are data dependencies that keep
    Inductor's scheduler (which reorders freely for peak memory) from hoisting
    the blocking wait above the compute it must follow. Pass tensors that do
    not require grad (they get no gradient). ``grad_source``, also never read,
    is the device tensor the copy was taken from when the host tensor must
    carry its gradient back (see the module docstring).
    """
    key = int(ticket.item())
    if key not in _pending:
        raise RuntimeError(f"offload_wait: no pending copy for ticket {key}; every wait needs its offload_start")
    host, event = _pending[key]
    if event is not None:
        event.synchronize()
    if tuple(host.shape) != tuple(shape) or host.dtype != dtype:
        raise RuntimeError(
            f"offload_wait: ticket {key} holds a {host.dtype} tensor of shape {tuple(host.shape)}, "
            f"the graph expects {dtype} {tuple(shape)}"
        )
    return host


@offload_wait.register_fake
def _offload_wait_fake(
    ticket: torch.Tensor,
    shape: Sequence[int],
    dtype: torch.dtype,
    after: Sequence[torch.Tensor],
    grad_source: torch.Tensor | None = None,
) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="cpu")


def _wait_setup_context(ctx: object, inputs: tuple[object, ...], output: torch.Tensor) -> None:
    _, _, _, after, source = inputs
    ctx.after_count = len(after)  # type: ignore[attr-defined]
    ctx.source_meta = (source.device, source.dtype) if isinstance(source, torch.Tensor) else None  # type: ignore[attr-defined]


def _wait_backward(ctx: object, grad: torch.Tensor) -> tuple[object, ...]:
    """The backward of a device-to-host copy: the host gradient goes back to the source's device."""
    no_grads = [None] * ctx.after_count  # type: ignore[attr-defined]
    meta = ctx.source_meta  # type: ignore[attr-defined]
    if meta is None:
        return None, None, None, no_grads, None
    device, dtype = meta
    return None, None, None, no_grads, grad.to(device=device, dtype=dtype)


offload_wait.register_autograd(_wait_backward, setup_context=_wait_setup_context)


# Both ops are effects, not pure functions: a start registers a pending copy, a wait blocks the host.
# Marked so, no pass may drop or merge them: two identical-looking starts (CSE) would share one
# ticket, which AOT autograd mis-handles when one of their waits carries a gradient edge and the
# other does not (measured on torch 2.13: a None tangent in the compiled backward).
has_side_effect(torch.ops.moe_passes.offload_start.default)
has_side_effect(torch.ops.moe_passes.offload_wait.default)

OFFLOAD_START = torch.ops.moe_passes.offload_start.default
OFFLOAD_WAIT = torch.ops.moe_passes.offload_wait.default


def offload(t: torch.Tensor) -> torch.Tensor:
    """Start and finish one copy (eager convenience and tests): ``offload_wait(offload_start(t.detach()), ...)``.

    The host tensor carries ``t``'s gradient back when ``t`` requires grad, as ``t.cpu()`` would.
    """
    source = t if t.requires_grad else None
    return OFFLOAD_WAIT(OFFLOAD_START(t.detach()), list(t.shape), t.dtype, [], source)
