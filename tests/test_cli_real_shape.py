"""``moe-passes diff interns1-pro``: the 917 B-parameter shape traced on the meta device, estimates at that shape."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli_helpers import moe_passes_cli


@pytest.mark.slow  # ~1-3 min on 2 shared cores: one real-shape decoder layer plus the 27-block vision tower
def test_interns1_pro_traces_at_the_real_shape_without_allocating(tmp_path: Path) -> None:
    out = tmp_path / "pro.json"
    proc = moe_passes_cli("diff", "interns1-pro", "--layers", "1", "--pass", "layerwise_aux_loss", "--format", "json",
                          "--output", str(out), timeout=900)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert data["meta"] is True and data["world_size"] == 8 and data["num_layers"] == 1 and data["total_layers"] == 94
    before = data["sections"][0]["estimate_before"]
    # One MoE layer at the real shape: 8,192 tokens x top-8 rows of 4,096 fp32 go out (dispatch) and come back
    # (combine), 2 GiB, plus the per-expert count exchange (512 int64).
    tokens, top_k, hidden = 8192, 8, 4096
    payload = 2 * tokens * top_k * hidden * 4
    assert payload <= before["bytes_communicated"] <= payload + 2**20
    assert before["peak_live_bytes"] > 2**30  # GiB-scale activations and weights, never allocated
    assert data["real_shape"][0].startswith("bytes communicated per layer: 2.00 GiB")
    assert "x 94 layers: 188.00 GiB" in data["real_shape"][1]


@pytest.mark.slow  # ~20-60 s: three real-shape decoder layers traced on the meta device
def test_interns1_pro_domino_chunks_every_traced_layer(tmp_path: Path) -> None:
    """Issue 19: Intern-S1-Pro's grouped router at its real shape (group_routing, top-8 of 512 experts in 8 groups)
    is chunked in every layer the diff traces, well within the 5-minute meta-device budget."""
    out = tmp_path / "pro.json"
    proc = moe_passes_cli("diff", "interns1-pro", "--pass", "domino_ep", "--format", "json", "--output", str(out), timeout=300)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    result = data["sections"][0]["result"]
    assert data["num_layers"] >= 3 and len(result["matched"]) == data["num_layers"], result
    assert not result["skipped"], result["skipped"]
    for sizes in result["stats"]["chunks"].values():  # 8,192 tokens per rank, equal chunks
        assert sum(sizes) == 8192 and len(set(sizes)) == 1
