"""Grouped-GEMM experts: exact vs a per-expert loop, one opaque op per projection whatever the expert count."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from moe_passes.models.interns1_vl.grouped_mm import grouped_mm, grouped_mm_op, grouped_mm_weight_grad
from moe_passes.models.interns1_vl.moe import SparseMoeBlock


def loop_reference(x: torch.Tensor, w: torch.Tensor, counts: list[int]) -> torch.Tensor:
    return torch.cat([piece @ w[g] for g, piece in enumerate(x.split(counts))], dim=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("k,n", [(8, 12), (5, 7)])  # 16-byte aligned (native torch._grouped_mm on CPU) and not (loop)
def test_grouped_mm_matches_per_group_loop_forward_and_backward(dtype: torch.dtype, k: int, n: int) -> None:
    g = torch.Generator().manual_seed(0)
    counts = [3, 0, 6, 1]  # an empty group included
    x = torch.randn(sum(counts), k, generator=g).to(dtype).requires_grad_()
    w_linear = torch.randn(len(counts), n, k, generator=g).to(dtype).requires_grad_()  # F.linear layout, as the experts hold it
    out = grouped_mm(x, w_linear.transpose(-2, -1), torch.tensor(counts).cumsum(0))
    cot = torch.randn(out.shape, generator=g).to(dtype)
    out.backward(cot)
    x2, w2 = x.detach().clone().requires_grad_(), w_linear.detach().clone().requires_grad_()
    ref = loop_reference(x2, w2.transpose(-2, -1), counts)
    ref.backward(cot)
    tol: dict[str, Any] = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(x.grad, x2.grad, **tol)
    torch.testing.assert_close(w_linear.grad, w2.grad, **tol)
    assert w_linear.grad[1].abs().max() == 0  # the empty group's weights get no gradient


def test_custom_ops_pass_opcheck() -> None:
    """Schema, fake kernel and registered autograd agree with the real kernels (torch.library.opcheck)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 5, generator=g, requires_grad=True)
    w = torch.randn(3, 5, 7, generator=g, requires_grad=True)
    offsets = torch.tensor([2, 2, 9], dtype=torch.int32)
    torch.library.opcheck(grouped_mm_op, (x, w, offsets))
    torch.library.opcheck(grouped_mm_weight_grad, (x.detach(), torch.randn(9, 7, generator=g), offsets))


def _aot_graphs(
    experts: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule, torch.Tensor, torch.Tensor]:
    """Forward and backward ATen graphs of one SparseMoeBlock (no EP), plus compiled and eager outputs."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs: dict[str, torch.fx.GraphModule] = {}

    def keep(kind: str) -> Any:
        def compiler(gm: torch.fx.GraphModule, _: Any) -> Any:
            graphs[kind] = gm
            return make_boxed_func(gm.forward)

        return compiler

    torch.manual_seed(0)
    block = SparseMoeBlock(16, 8, experts, 2).to(dtype)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.2)
    x = torch.randn(1, 12, 16, dtype=dtype, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(block, backend=aot_autograd(fw_compiler=keep("fw"), bw_compiler=keep("bw")), fullgraph=True)
    out = compiled(x).hidden_states
    out.sum().backward()
    torch._dynamo.reset()
    return graphs["fw"], graphs["bw"], out.detach(), block(x).hidden_states.detach()


def _op_counts(gm: torch.fx.GraphModule) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function":
            counts[str(node.target)] = counts.get(str(node.target), 0) + 1
    return counts


def test_compiled_graphs_do_not_grow_with_the_expert_count() -> None:
    """8 and 64 experts give the same forward and backward graphs: one grouped GEMM per projection, no host sync."""
    fw8, bw8, out8, ref8 = _aot_graphs(8)
    fw64, bw64, out64, ref64 = _aot_graphs(64)
    torch.testing.assert_close(out8, ref8)
    torch.testing.assert_close(out64, ref64)
    assert _op_counts(fw8) == _op_counts(fw64)
    assert _op_counts(bw8) == _op_counts(bw64)
    fw, bw = _op_counts(fw8), _op_counts(bw8)
    assert fw["moe_models.grouped_mm.default"] == 2
    assert bw["moe_models.grouped_mm.default"] == 2 and bw["moe_models.grouped_mm_weight_grad.default"] == 2
    assert not any("_local_scalar_dense" in op or "split_with_sizes" in op for op in fw), fw  # no per-expert sizes


def test_bf16_uses_torch_grouped_mm_under_compile() -> None:
    """Aligned bf16 goes to aten._grouped_mm itself (whose compile-time fake kernel is bf16-only)."""
    fw, bw, out, ref = _aot_graphs(8, torch.bfloat16)
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    assert _op_counts(fw).get("aten._grouped_mm.default") == 2
    assert "moe_models.grouped_mm.default" not in _op_counts(fw)


def test_experts_match_the_per_expert_linear_loop() -> None:
    """GroupedExperts computes what the former per-expert F.linear loop did (same weight layout as transformers)."""
    torch.manual_seed(0)
    block = SparseMoeBlock(16, 8, 4, 2)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.3)
    counts = [5, 0, 2, 3]
    x = torch.randn(sum(counts), 16)
    out = block.experts(x, torch.tensor(counts).cumsum(0))
    experts = block.experts
    ref = []
    for e, tokens in enumerate(x.split(counts)):
        gate, up = F.linear(tokens, experts.gate_up_proj[e]).chunk(2, dim=-1)
        ref.append(F.linear(F.silu(gate) * up, experts.down_proj[e]))
    torch.testing.assert_close(out, torch.cat(ref))
