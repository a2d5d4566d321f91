"""All local experts as one grouped GEMM with offsets, opaque to the compiler in every dtype.

``grouped_mm(x, w, offsets)``: ``x`` is ``[rows, K]`` with its rows sorted by
group (expert), ``w`` is ``[G, K, N]``, ``offsets`` is ``[G]`` int32 holding
the cumulative end row of each group (``offsets[-1] == rows``). Row ``r`` of
the result is ``x[r] @ w[g]`` for the group ``g`` that holds row ``r``:

    rows in == rows out, each row multiplied by its group's matrix.

This is ``torch._grouped_mm`` with ``offs`` (what torchtitan, transformers 5
and Megatron run). Its compile-time fake kernel accepts bf16 only and it needs
16-byte aligned strides, so every other case goes through the custom op
``moe_models::grouped_mm`` (fake kernel + registered autograd, whose backward
is again two opaque ops: ``moe_models::grouped_mm`` for the input gradient and
``moe_models::grouped_mm_weight_grad`` for the weight gradient). Either way
the compiler sees ONE op per GEMM whatever the number of experts, so compile
time does not grow with the expert count; the eager kernel runs
``torch._grouped_mm`` where the device supports it and a per-group loop
otherwise (the loop is inside the op, invisible to the compiler).
"""

from __future__ import annotations

import torch
from torch import Tensor

OP_NAMESPACE = "moe_models"


def _aligned(*tensors: Tensor) -> bool:
    """``torch._grouped_mm`` needs every non-unit stride to be a multiple of 16 bytes."""
    for t in tensors:
        if t.numel() and t.data_ptr() % 16:
            return False
        size = t.element_size()
        if any(s != 1 and (s * size) % 16 for s in t.stride()):
            return False
    return True


def _static_aligned(x: Tensor, w: Tensor) -> bool:
    """Alignment decided from shapes alone (usable while tracing): contiguous rows of ``x``, ``w`` [G,K,N] any of its two layouts."""
    size = x.element_size()
    try:
        k, n = int(w.shape[-2]), int(w.shape[-1])
    except (TypeError, ValueError):  # symbolic weight shapes: do not guess
        return False
    return (k * size) % 16 == 0 and (n * size) % 16 == 0


def _native_ok(x: Tensor, w: Tensor) -> bool:
    if x.dtype != w.dtype or not x.is_floating_point():
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16) and _aligned(x, w)
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0) and _aligned(x, w)
    return False


def _bounds(offsets: Tensor) -> list[int]:
    return [0] + [int(o) for o in offsets.tolist()]


@torch.library.custom_op(f"{OP_NAMESPACE}::grouped_mm", mutates_args=())
def grouped_mm_op(x: Tensor, w: Tensor, offsets: Tensor) -> Tensor:
    """Rows of ``x`` grouped by ``offsets`` (cumulative ends), row r -> ``x[r] @ w[group(r)]``; ``[rows, N]``."""
    if _native_ok(x, w):
        return torch._grouped_mm(x, w, offsets.to(torch.int32)).contiguous()
    out = x.new_zeros(x.shape[0], w.shape[-1])
    bounds = _bounds(offsets)
    for g in range(w.shape[0]):
        lo, hi = bounds[g], bounds[g + 1]
        if hi > lo:
            torch.mm(x[lo:hi], w[g], out=out[lo:hi])
    return out


@grouped_mm_op.register_fake
def _grouped_mm_fake(x: Tensor, w: Tensor, offsets: Tensor) -> Tensor:
    torch._check(x.dim() == 2 and w.dim() == 3 and offsets.dim() == 1, lambda: "grouped_mm wants x [rows, K], w [G, K, N], offsets [G]")
    torch._check(x.shape[1] == w.shape[1], lambda: f"grouped_mm: x has {x.shape[1]} columns, w has K={w.shape[1]}")
    torch._check(offsets.shape[0] == w.shape[0], lambda: "grouped_mm: one offset per group")
    return x.new_empty(x.shape[0], w.shape[2])


@torch.library.custom_op(f"{OP_NAMESPACE}::grouped_mm_weight_grad", mutates_args=())
def grouped_mm_weight_grad(x: Tensor, grad_out: Tensor, offsets: Tensor) -> Tensor:
    """``[G, K, N]``: per group g, ``x[rows of g].T @ grad_out[rows of g]`` (zeros for an empty group)."""
    num_groups = offsets.shape[0]
    xt = x.t()
    if _native_ok(xt, grad_out):
        return torch._grouped_mm(xt, grad_out, offsets.to(torch.int32)).contiguous()
    out = x.new_zeros(num_groups, x.shape[1], grad_out.shape[1])
    bounds = _bounds(offsets)
    for g in range(num_groups):
        lo, hi = bounds[g], bounds[g + 1]
        if hi > lo:
            torch.mm(x[lo:hi].t(), grad_out[lo:hi], out=out[g])
    return out


@grouped_mm_weight_grad.register_fake
def _grouped_mm_weight_grad_fake(x: Tensor, grad_out: Tensor, offsets: Tensor) -> Tensor:
    return x.new_empty(offsets.shape[0], x.shape[1], grad_out.shape[1])


def _setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    x, w, offsets = inputs
    ctx.save_for_backward(x, w, offsets)


def _backward(ctx, grad: Tensor):  # type: ignore[no-untyped-def]
    x, w, offsets = ctx.saved_tensors
    grad = grad.contiguous()
    grad_x = grouped_mm_op(grad, w.transpose(-2, -1), offsets) if ctx.needs_input_grad[0] else None
    grad_w = grouped_mm_weight_grad(x, grad, offsets) if ctx.needs_input_grad[1] else None
    return grad_x, grad_w, None


grouped_mm_op.register_autograd(_backward, setup_context=_setup_context)


def grouped_mm(x: Tensor, w: Tensor, offsets: Tensor) -> Tensor:
    """One grouped GEMM: ``torch._grouped_mm`` for aligned bf16 (its fake kernel is bf16-only), else the custom op.

    ``offsets`` is cast to int32 (``torch._grouped_mm``'s contract); rows of
    ``x`` must be sorted by group and ``offsets[-1]`` must equal ``x.shape[0]``.
    """
    offsets = offsets.to(torch.int32)
    if x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16 and _static_aligned(x, w) and x.device.type in ("cpu", "cuda"):
        if x.device.type == "cpu" or torch.cuda.get_device_capability(x.device) >= (9, 0):
            return torch._grouped_mm(x, w, offsets)
    return torch.ops.moe_models.grouped_mm(x, w, offsets)
