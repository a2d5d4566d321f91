"""The speed bench's traces and timeline picture: micro-batch labels, the PNG, and a real 2-rank traced step."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any

from moe_passes.bench import BenchOptions
from moe_passes.bench.speed import PEAK_STEPS, MiB
from moe_passes.bench.timeline import (
    COUNTS_COLOUR,
    MB_COLOURS,
    PHASE_COLOURS,
    WAIT_COLOUR,
    Exchange,
    chunks_of,
    label_exchanges,
    load_rank_timeline,
    trace_path,
    write_timeline,
)
from tests.distributed import run_distributed


def read_png(path: Path) -> tuple[int, int, bytes]:
    """(width, height, RGB bytes) of an 8-bit RGB PNG with filter 0 rows, as the timeline writes it; checks every CRC."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:8]
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, kind
        chunks.append((kind, body))
        pos += 12 + length
    assert [k for k, _ in chunks][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    width, height, depth, colour_type = struct.unpack(">IIBB", chunks[0][1][:10])
    assert (depth, colour_type) == (8, 2)
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    stride = 1 + 3 * width
    assert len(raw) == stride * height
    assert all(raw[y * stride] == 0 for y in range(height))
    return width, height, b"".join(raw[y * stride + 1:(y + 1) * stride] for y in range(height))


def colours(rgb: bytes) -> set[tuple[int, int, int]]:
    return {tuple(rgb[i:i + 3]) for i in range(0, len(rgb), 3)}  # type: ignore[misc]


def _ex(phase: str, out: tuple[int, ...], inp: tuple[int, ...], integer: bool = False) -> Exchange:
    return Exchange(0.0, phase, out, inp, integer)


def test_mirrored_exchanges_share_a_micro_batch_label_whatever_the_interleaving() -> None:
    # Two micro-batches: counts, dispatch d0 / d1, combine c0 / c1 (a combine mirrors its dispatch's splits).
    d0, c0 = ((3, 5), (4, 4)), ((4, 4), (3, 5))
    d1, c1 = ((2, 6), (5, 3)), ((5, 3), (2, 6))
    grouped = [_ex("forward", (2, 2), (2, 2), True), _ex("forward", *d0), _ex("forward", *d1), _ex("forward", *c0),
               _ex("forward", *c1)]
    label_exchanges(grouped, 2)
    assert [e.label for e in grouped] == [None, 0, 1, 0, 1]
    interleaved = [_ex("forward", *d0), _ex("forward", *c0), _ex("forward", *d1), _ex("forward", *c1),
                   _ex("backward", *c1), _ex("backward", *d1), _ex("backward", *c0), _ex("backward", *d0)]
    label_exchanges(interleaved, 2)
    # plain issue order modulo 2 would give 0 1 0 1: the combine of micro-batch 0 is its second exchange
    assert [e.label for e in interleaved] == [0, 0, 1, 1, 0, 0, 1, 1]
    assert chunks_of("domino_layer_n2_dw") == 2 and chunks_of("domino_n4_unscheduled") == 4 and chunks_of("inductor") == 1


def _synthetic_trace(path: Path, rank: int) -> None:
    """One step: forward 0-40 ms with one counts and two token exchanges (a wait at 20-30 ms), backward 40-90 ms."""
    main, gloo = 100, 200

    def x(name: str, ts_ms: float, dur_ms: float, tid: int, **args: Any) -> dict[str, Any]:
        return {"ph": "X", "name": name, "pid": 1, "tid": tid, "ts": 1e6 + ts_ms * 1000, "dur": dur_ms * 1000, "args": args}

    def issue(ts: float, out: list[int], inp: list[int], dtype: str = "float") -> dict[str, Any]:
        return x("_c10d_functional::all_to_all_single", ts, 0.1, main, **{
            "Concrete Inputs": ["", str(out), str(inp), ""], "Input type": [dtype, "ScalarList", "ScalarList", ""]})

    events = [
        x("bench_step", 0, 100, main), x("bench_forward", 0, 40, main), x("bench_backward", 40, 50, main),
        x("bench_optimizer", 90, 8, main),
        issue(1, [2, 2], [2, 2], "long int"), issue(5, [3, 5], [4, 4]), issue(12, [2, 6], [5, 3]),
        x("gloo:all_to_all", 1.5, 2, gloo), x("gloo:all_to_all", 6, 10, gloo), x("gloo:all_to_all", 16, 12, gloo),
        x("_c10d_functional::wait_tensor", 20, 10, main),
    ]
    path.write_text(json.dumps({"traceEvents": events}))


def test_timeline_png_draws_phases_waits_and_each_micro_batch(tmp_path: Path) -> None:
    for rank in range(2):
        _synthetic_trace(trace_path(tmp_path, "decoder", "domino_layer_n2", rank), rank)
    tl = load_rank_timeline(trace_path(tmp_path, "decoder", "domino_layer_n2", 0), 0, 2)
    assert tl.step_ms == 100.0 and [p[0] for p in tl.phases] == ["forward", "backward", "optimizer"]
    assert tl.waits == [(20.0, 30.0)]
    assert [(c[3], c[4]) for c in tl.comm] == [(None, True), (0, False), (1, False)]
    rows = [{"variant": "inductor", "step_ms": None, "exposed_comm_ms": None},  # failed: a strip saying so
            {"variant": "domino_layer_n2", "step_ms": 100.0, "exposed_comm_ms": 10.0}]
    png = write_timeline(tmp_path, "decoder", rows, world_size=2)
    assert png == tmp_path / "timeline_decoder.png"
    width, height, rgb = read_png(png)
    assert width == 1600 and height > 100
    seen = colours(rgb)
    for colour in (PHASE_COLOURS["forward"], PHASE_COLOURS["backward"], WAIT_COLOUR, COUNTS_COLOUR, MB_COLOURS[0], MB_COLOURS[1]):
        assert colour in seen, colour


def _traced_eager_decoder_step(rank: int, world_size: int, trace_dir: str) -> dict[str, Any]:
    import torch.distributed as dist

    from moe_passes.bench.speed import _measure

    options = BenchOptions(quick=True, steps=2, warmup=1, trace_dir=trace_dir)
    return _measure(rank, options, "decoder", "eager", dist.group.WORLD)


def test_a_traced_step_on_real_ranks_has_every_column_and_all_to_all_events(tmp_path: Path) -> None:
    """The quick decoder, eager, on 2 gloo ranks: compute (local copies), comm (replay) and peak are measured,
    and the Chrome trace of each rank holds the all-to-alls, issued with their split sizes and run by gloo."""
    cells = run_distributed(_traced_eager_decoder_step, 2, str(tmp_path), timeout_s=240)
    for cell in cells:
        assert cell["note"] == "" and cell["model"] == "decoder"
        # 2 MoE layers: forward counts + dispatch + combine, backward the two token gradients
        assert cell["all_to_alls"] == 10
        for col in ("step_ms", "compute_ms", "comm_ms"):
            assert isinstance(cell[col], float) and cell[col] > 0, (col, cell)
        assert isinstance(cell["peak_bytes"], int) and cell["peak_bytes"] > 0
        # the peak is the median of PEAK_STEPS measured steps, each kept
        assert len(cell["peak_samples_MiB"]) == PEAK_STEPS
        assert round(cell["peak_bytes"] / MiB, 1) == sorted(cell["peak_samples_MiB"])[PEAK_STEPS // 2]
    assert cells[0]["compute_ms"] != cells[1]["compute_ms"] or cells[0]["comm_ms"] != cells[1]["comm_ms"]
    for rank in range(2):
        events = json.loads(trace_path(tmp_path, "decoder", "eager", rank).read_text())["traceEvents"]
        issued = [e for e in events if e.get("name") == "_c10d_functional::all_to_all_single"]
        ran = [e for e in events if e.get("name") == "gloo:all_to_all"]
        assert len(issued) == len(ran) == 10
        assert all(e["args"]["Concrete Inputs"][1].startswith("[") for e in issued)
    png = write_timeline(tmp_path, "decoder", [{"variant": "eager", "step_ms": cells[0]["step_ms"],
                                                "exposed_comm_ms": cells[0]["exposed_comm_ms"]}], world_size=2)
    _, _, rgb = read_png(png)
    assert {MB_COLOURS[0], COUNTS_COLOUR, PHASE_COLOURS["forward"]} <= colours(rgb)
