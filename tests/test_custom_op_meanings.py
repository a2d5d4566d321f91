"""Library ops the analyses read as an ATen op (``moe_passes.ir.facts.CUSTOM_OP_MEANINGS``) compute what
that op computes: checked here on random inputs for each installed library, so a library that changes its
op fails this test instead of a rewrite silently treating it by an outdated meaning."""

from __future__ import annotations

import importlib

import pytest
import torch

from moe_passes.ir.facts import CUSTOM_OP_MEANINGS

#: where each library registers its op (importing the module registers it)
_REGISTERED_BY = {
    "moe_models.grouped_mm": "moe_passes.models.interns1_vl.grouped_mm",
    "transformers.grouped_mm_fallback": "transformers.integrations.moe",
    "torchtitan.deterministic_scatter_add": "torchtitan.ops.scatter_add",
}


def _grouped_mm_meaning(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``aten._grouped_mm(x [M, K], w [G, K, N], offs [G])``: rows ``offs[g-1]:offs[g]`` times ``w[g]``; rows past
    the last offset belong to no group (zeros here; the rewrite never relies on their value: row-locality holds
    either way)."""
    out = torch.zeros(x.shape[0], w.shape[2], dtype=x.dtype)
    start = 0
    for g, end in enumerate(offs.tolist()):
        out[start:end] = x[start:end] @ w[g]
        start = end
    return out


def _op(label: str) -> torch._ops.OpOverloadPacket:
    ns, name = label.split(".")
    return getattr(getattr(torch.ops, ns), name)


def test_every_declared_meaning_is_checked_here() -> None:
    assert set(CUSTOM_OP_MEANINGS) == set(_REGISTERED_BY)
    assert set(CUSTOM_OP_MEANINGS.values()) <= {"aten._grouped_mm", "aten.scatter_add"}


@pytest.mark.parametrize("label", sorted(CUSTOM_OP_MEANINGS))
def test_library_op_computes_its_declared_aten_meaning(label: str) -> None:
    module = _REGISTERED_BY[label]
    pytest.importorskip(module.split(".")[0], reason=f"{module.split('.')[0]} is not installed")
    importlib.import_module(module)
    op = _op(label)
    g = torch.Generator().manual_seed(0)
    if CUSTOM_OP_MEANINGS[label] == "aten._grouped_mm":
        x, w = torch.randn(13, 6, generator=g), torch.randn(4, 6, 5, generator=g)
        for ends in ([3, 3, 9, 13], [0, 5, 11, 11], [2, 4, 6, 10]):  # empty groups, rows past the last offset
            offs = torch.tensor(ends, dtype=torch.int32)
            got = op(x, w, offs)
            want = _grouped_mm_meaning(x, w, offs)
            last = ends[-1]
            torch.testing.assert_close(got[:last], want[:last], rtol=1e-5, atol=1e-5)
    else:  # scatter_add(out, 0, index, src)
        out, src = torch.randn(7, 4, generator=g), torch.randn(10, 4, generator=g)
        index = torch.randint(0, 7, (10, 1), generator=g).expand(-1, 4)  # torchtitan passes the expanded index
        got = op(out, index, src)
        want = torch.ops.aten.scatter_add(out, 0, index, src)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
