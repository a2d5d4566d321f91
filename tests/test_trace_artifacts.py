"""``TORCH_TRACE=dir``: every pass's report and the post-grad schedule's graphs and moves are structured-trace
artifacts beside the before/after graphs, so ``tlparse dir`` shows what each pass decided.

Trace logging is configured when torch initialises its logging (``TORCH_TRACE`` read at import), so the
compile runs in a subprocess with the variable set; the test then reads the trace files as tlparse does:
one glog-prefixed JSON line per record, its payload on the following tab-indented lines.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r'''
import torch, torch.distributed as dist
from moe_passes import make_backend
from tests.distributed import fake_group
from tests.domino_helpers import TinyMoEStack, capture_without_running, init_biased, make_inputs

backend = make_backend(num_chunks=2)  # all three pre-grad passes; the overlap scheduler post-grad

# The 2-layer MoE stack (with its stacked aux loss) on a fake 2-rank group, compiled, never run: Domino
# chunks both MoE regions, the aux loss is rewritten layer-wise, the selected experts are offloaded, the
# post-grad scheduler reorders the all-to-alls.
with fake_group(2, values_matter=False):
    model = TinyMoEStack(dist.group.WORLD)
    init_biased(model, seed=1, world_size=2)
    capture_without_running(model, make_inputs(0, 0, 12), compile_with=backend)

# A graph with nothing to do: the passes' skip reasons are in its reports too.
torch.compile(lambda x: (2 * x).sum(), backend=backend, fullgraph=True)(torch.randn(4))
print("SUMMARY", backend.summary())
'''

_RECORD = re.compile(r"^[VIWE]\d{4} [^\]]*\] (\{.*\})$")


def read_trace(directory: Path) -> list[tuple[dict[str, Any], str]]:
    """Every structured-trace record in ``directory``: (metadata, payload text)."""
    records: list[tuple[dict[str, Any], str]] = []
    for path in sorted(directory.glob("*.log")):
        current: list[Any] | None = None
        for line in path.read_text().splitlines():
            if line.startswith("\t"):
                if current is not None:
                    current[1].append(line[1:])
                continue
            m = _RECORD.match(line)
            if m:
                current = [json.loads(m.group(1)), []]
                records.append(current)  # type: ignore[arg-type]
    return [(meta, "\n".join(payload)) for meta, payload in records]


def artifacts(records: list[tuple[dict[str, Any], str]]) -> dict[str, str]:
    return {meta["artifact"]["name"]: payload for meta, payload in records if "artifact" in meta}


@pytest.mark.timeout(900)  # one MoE compile in a fresh process (measured 9 min on the loaded shared 2-core box)
def test_pass_reports_and_schedule_are_trace_artifacts(tmp_path: Path) -> None:
    trace_dir = tmp_path / "trace"
    # Inductor's caches skip every post-grad pass on a hit (the report then says so: test_summary.py); a
    # warm cache from another test compiling the same graph once hid the schedule here, so this compile is cold.
    env = {**os.environ, "TORCH_TRACE": str(trace_dir), "PYTHONPATH": str(ROOT), "TORCHINDUCTOR_FX_GRAPH_CACHE": "0",
           "TORCHINDUCTOR_AUTOGRAD_CACHE": "0"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=840, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    found = artifacts(read_trace(trace_dir))
    names = sorted(found)
    assert found, f"no artifacts in {list(trace_dir.iterdir()) if trace_dir.exists() else 'no trace dir'}"

    # Pre-grad: every pass has a JSON report beside its before/after graphs.
    reports = {n: json.loads(found[n]) for n in names if n.startswith("moe_passes_graph_") and n.endswith("_report")}
    pre = {n: r for n, r in reports.items() if r["stage"] == "pre_grad"}
    by_pass: dict[str, list[dict[str, Any]]] = {}
    for r in pre.values():
        by_pass.setdefault(r["name"], []).append(r)
    assert set(by_pass) == {"layerwise_aux_loss", "domino_ep", "async_offload"}, names
    for r in pre.values():
        assert {"matched", "changed", "skipped", "stats", "validation_notes", "ir", "trigger"} <= set(r), r
    domino = [r for r in by_pass["domino_ep"] if r["changed"]]
    assert len(domino) == 1, by_pass["domino_ep"]
    chunks = domino[0]["stats"]["chunks"]
    assert chunks and all(len(sizes) == 2 for sizes in chunks.values()), domino[0]  # the chosen N
    graph = domino[0]["graph"]
    assert f"moe_passes_{graph}_domino_ep_before" in found and f"moe_passes_{graph}_domino_ep_after" in found, names
    assert "all_to_all" in found[f"moe_passes_{graph}_domino_ep_after"]
    aux = [r for r in by_pass["layerwise_aux_loss"] if r["changed"]]
    assert len(aux) == 1 and aux[0]["stats"]["layers"] == 2 and aux[0]["graph"] == graph, by_pass["layerwise_aux_loss"]
    assert aux[0]["removed_values"]["bytes"] > 0, aux[0]
    offload = [r for r in by_pass["async_offload"] if r["changed"]]
    assert len(offload) == 1 and offload[0]["stats"]["offloaded"] >= 1, by_pass["async_offload"]
    skipped = [s for r in pre.values() if r["graph"] != graph for s in r["skipped"]]
    assert skipped and all(s["reason"] for s in skipped), skipped  # skips carry their reasons

    # Post-grad: the schedule's report, graphs before/after and its moves, forward and backward.
    for kind in ("forward", "backward"):
        stem = f"moe_passes_{graph}_{kind}"
        report = json.loads(found[f"{stem}_schedule_overlap_report"])
        assert report["stage"] == "post_grad" and report["name"] == "schedule_overlap", report
        assert report["stats"]["after"]["all_to_all"] > 0, report
        assert "all_to_all" in found[f"{stem}_post_grad_before"] and "all_to_all" in found[f"{stem}_post_grad_after"]
        moves = json.loads(found[f"{stem}_post_grad_moves"])
        assert moves["all_to_all_windows"], moves
        if report["changed"]:
            assert moves["collective_moves"] or moves["other_nodes_moved"], moves
    fwd_moves = json.loads(found[f"moe_passes_{graph}_forward_post_grad_moves"])
    assert any(w["compute_nodes_between"] > 0 for w in fwd_moves["all_to_all_windows"]), fwd_moves
    assert "SUMMARY moe_passes summary" in proc.stdout, proc.stdout[-2000:]
