"""``verify=True``: run the original and the transformed graph on the example inputs and compare
outputs and every input gradient, with tolerances that follow each tensor's dtype (``torch.testing``'s
table) and inputs named by their Dynamo source (``self.layers.1.gate.weight``)."""

from __future__ import annotations

import logging
import re
from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._pytree import tree_leaves

from moe_passes.ir.facts import collective_nodes

log = logging.getLogger(__name__)


class VerificationError(RuntimeError):
    """``verify=True`` and the transformed graph computes something else than the original."""


def _concrete_inputs(example_inputs: Sequence[Any]) -> tuple[list[Any], str | None]:
    """Example inputs with symbolic scalars replaced by their hints (dynamic shapes hand the backend
    ``SymInt`` sizes); the reason verification cannot run, if one is fake or has no hint."""
    out: list[Any] = []
    for i, x in enumerate(example_inputs):
        if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            if not x.node.has_hint():
                return [], f"example input {i} is a symbolic {type(x).__name__} without a hint"
            x = x.node.hint
        elif isinstance(x, FakeTensor):
            return [], f"example input {i} is fake ({type(x).__name__}); verification needs real values"
        elif isinstance(x, torch.Tensor) and x.is_meta:
            return [], f"example input {i} is on the meta device"
        out.append(x)
    return out, None


def _verify_skip_reason(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> str | None:
    if collective_nodes(gm.graph):
        if not dist.is_initialized():
            return "graph has collectives but no process group is initialised"
        if dist.get_backend() == "fake":
            return "graph has collectives on the fake process group, whose results are hallucinated"
    return None


def _clone_inputs(example_inputs: Sequence[Any]) -> list[Any]:
    return [
        x.detach().clone().requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) else x for x in example_inputs
    ]


@torch._dynamo.disable
def _run_with_grads(gm: fx.GraphModule, inputs: list[Any], seed: int) -> tuple[list[torch.Tensor], list[tuple[int, torch.Tensor | None]]]:
    """Outputs (tensor leaves) and, per input that requires grad, ``(input position, gradient)`` for random cotangents."""
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(seed)
        outs = [t for t in tree_leaves(gm(*inputs)) if isinstance(t, torch.Tensor)]
    diff_outs = [o for o in outs if o.requires_grad and o.is_floating_point()]
    wrt = [(i, x) for i, x in enumerate(inputs) if isinstance(x, torch.Tensor) and x.requires_grad]
    grads: list[tuple[int, torch.Tensor | None]] = []
    if diff_outs and wrt:
        gen = torch.Generator().manual_seed(seed + 1)
        cotangents = [torch.randn(o.shape, generator=gen, dtype=o.dtype).to(o.device) for o in diff_outs]
        found = torch.autograd.grad(diff_outs, [x for _, x in wrt], cotangents, allow_unused=True)
        grads = [(i, g) for (i, _), g in zip(wrt, found)]
    return [o.detach() for o in outs], grads


#: verify's floor for dtype tolerances: its fp32 defaults before they followed the dtype (a pass may
#: reorder a sum; torch's own fp32 rtol of 1.3e-6 is for bitwise-near results).
VERIFY_FLOOR = (1e-4, 1e-5)


def verify_tolerances(dtype: torch.dtype, rtol: float | None = None, atol: float | None = None) -> tuple[float, float, bool]:
    """``(rtol, atol, scaled)`` verify uses for a tensor of ``dtype``.

    An explicit ``rtol``/``atol`` (``BackendConfig.verify_rtol``/``verify_atol``) is used as given, with
    ``torch.testing.assert_close``'s elementwise meaning (``scaled`` False) once both are set. Otherwise
    the missing one comes from ``assert_close``'s own table for the dtype (bf16 1.6e-2 / 1e-5, fp16 1e-3 /
    1e-5, fp32 1.3e-6 / 1e-5; integers and bools exact), never tighter than ``VERIFY_FLOOR`` for floating
    dtypes, and the tolerance is ``scaled``: relative to the tensor's largest reference value, since a
    reordered low-precision sum is off by a few units of the sum's magnitude, not of each element's
    (an element that cancels to about zero would otherwise fail at any rtol).
    """
    if rtol is not None and atol is not None:
        return float(rtol), float(atol), False
    try:
        from torch.testing._comparison import default_tolerances

        table_rtol, table_atol = default_tolerances(dtype)
    except Exception:  # a private helper of torch.testing: fall back to its documented table
        table_rtol, table_atol = {torch.float16: (1e-3, 1e-5), torch.bfloat16: (1.6e-2, 1e-5),
                                  torch.float32: (1.3e-6, 1e-5), torch.float64: (1e-7, 1e-7)}.get(dtype, (0.0, 0.0))
    if dtype.is_floating_point or dtype.is_complex:
        table_rtol, table_atol = max(table_rtol, VERIFY_FLOOR[0]), max(table_atol, VERIFY_FLOOR[1])
    return (table_rtol if rtol is None else float(rtol)), (table_atol if atol is None else float(atol)), True


_SOURCE_PARTS = (
    (re.compile(r"\._(?:modules|parameters|buffers)\[['\"]([^'\"]*)['\"]\]"), r".\1"),
    (re.compile(r"^[LG]\[['\"]([^'\"]*)['\"]\]"), r"\1"),
)


def readable_source(name: str) -> str:
    """Dynamo's source name in the user's spelling: ``L['self']._modules['layers']._modules['0']._parameters['w']``
    -> ``self.layers.0.w``; ``L['x']`` -> ``x``."""
    for pattern, repl in _SOURCE_PARTS:
        name = pattern.sub(repl, name)
    return name


def input_names(gm: fx.GraphModule) -> list[str]:
    """One name per placeholder of a Dynamo graph: its source (parameter path or argument name) in the
    user's spelling, else the placeholder's own name."""
    names = []
    for node in gm.graph.find_nodes(op="placeholder"):
        source = getattr(node.meta.get("grapharg"), "source", None) or getattr(node, "_dynamo_source", None)
        try:
            names.append(readable_source(source.name) if source is not None else node.name)
        except Exception:  # a source without a name
            names.append(node.name)
    return names


def _describe_tensor(t: torch.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}"


def _compare(what: str, new: Any, ref: Any, rtol: float | None, atol: float | None) -> str | None:
    """Why ``new`` is not ``ref`` within verify's tolerances for its dtype (see ``verify_tolerances``), or None."""
    if ref is None or new is None:  # autograd's None for an input no output depends on: a zero gradient
        other = new if ref is None else ref
        if other is None or not bool(other.detach().ne(0).any()):
            return None
        return f"{what}: {'no' if new is None else 'a'} gradient where the original has {'one' if new is None else 'none'}"
    if new.shape != ref.shape or new.dtype != ref.dtype:
        return f"{what}: {_describe_tensor(new)} instead of {_describe_tensor(ref)}"
    r_tol, a_tol, scaled = verify_tolerances(ref.dtype, rtol, atol)
    if ref.numel() == 0:
        return None
    wide = torch.complex128 if ref.is_complex() else torch.float64  # on the tensor's device: no host copy of it
    n64, r64 = new.detach().to(device=ref.device, dtype=wide), ref.detach().to(wide)
    inexact = ref.is_floating_point() or ref.is_complex()
    both_nan = torch.isnan(n64) & torch.isnan(r64) if inexact else torch.zeros_like(r64, dtype=torch.bool)
    finite_ref = r64[torch.isfinite(r64)] if inexact else r64
    scale = float(finite_ref.abs().max()) if scaled and finite_ref.numel() else 0.0
    allowed = a_tol + r_tol * (scale if scaled else r64.abs())
    diff = (n64 - r64).abs()
    same_inf = (n64 == r64)  # equal infinities have a nan difference
    bad = ~((diff <= allowed) | both_nan | same_inf)
    if not bool(bad.any()):
        return None
    worst = torch.where(bad, torch.nan_to_num(diff, nan=float("inf")), torch.zeros_like(diff)).flatten().argmax()
    index = tuple(int(i) for i in torch.unravel_index(worst, ref.shape))
    limit = float(allowed) if scaled else float(allowed.flatten()[worst])
    rule = (f"rtol {r_tol:g} x largest |reference| {scale:.4g} + atol {a_tol:g}" if scaled
            else f"atol {a_tol:g} + rtol {r_tol:g} x |reference|")
    return (f"{what} ({_describe_tensor(ref)}): {int(bad.sum())} of {ref.numel()} elements differ; largest at "
            f"{list(index)}: {float(n64.flatten()[worst].real):.6g} vs {float(r64.flatten()[worst].real):.6g} "
            f"(|difference| {float(diff.flatten()[worst]):.3g}, allowed {limit:.3g} = {rule})")


def verify_graphs(
    original: fx.GraphModule, transformed: fx.GraphModule, example_inputs: Sequence[Any],
    rtol: float | None = None, atol: float | None = None,
) -> str:
    """Run both graphs on clones of the example inputs; compare outputs and input gradients.

    Tolerances follow each compared tensor's dtype unless ``rtol``/``atol`` are given (see
    ``verify_tolerances``); a mismatch names the input a gradient belongs to by its source (parameter
    path or argument name, from Dynamo's placeholders). Every rank must verify (the config is the same
    everywhere), so collectives are issued in the same order on all ranks. Returns "ok" or the skip
    reason; raises ``VerificationError`` on a mismatch.
    """
    example_inputs, reason = _concrete_inputs(example_inputs)
    reason = reason or _verify_skip_reason(original, example_inputs)
    if reason is not None:
        log.info("verify skipped: %s", reason)
        return f"skipped: {reason}"
    names = input_names(original)
    seed = 1234
    ref_out, ref_grads = _run_with_grads(original, _clone_inputs(example_inputs), seed)
    new_out, new_grads = _run_with_grads(transformed, _clone_inputs(example_inputs), seed)
    problems: list[str] = []
    if len(ref_out) != len(new_out):
        problems.append(f"{len(new_out)} outputs instead of {len(ref_out)}")
    for i, (r, n) in enumerate(zip(ref_out, new_out)):
        problems.append(_compare(f"output {i}", n, r, rtol, atol) or "")
    if len(ref_grads) != len(new_grads):  # no output of one graph requires grad
        problems.append(f"{len(new_grads)} input gradients instead of {len(ref_grads)} (an output that required "
                        "grad no longer does, or the other way round)")
    for (i, r), (_, n) in zip(ref_grads, new_grads):
        name = names[i] if i < len(names) else str(i)
        problems.append(_compare(f"gradient of input {name}", n, r, rtol, atol) or "")
    problems = [p for p in problems if p]
    if problems:
        raise VerificationError("transformed graph differs from the original:\n  - " + "\n  - ".join(problems))
    log.info("verify: transformed graph matches the original (%d outputs, %d gradients)", len(ref_out), len(ref_grads))
    return "ok"
