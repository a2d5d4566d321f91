"""Timeline pictures of the speed bench's Chrome traces: compute vs all-to-all per rank, one strip per variant.

``moe-passes bench --section speed --trace DIR`` profiles one step of every
variant on every rank (``torch.profiler``, ``record_shapes=True``) and writes it
as a Chrome trace, ``DIR/speed_<model>_<variant>_rank<r>.json`` (open it in
``chrome://tracing`` or Perfetto). This module reads those traces back and
draws ``DIR/timeline_<model>.png``: per variant a strip, per rank two lanes on
one time axis (milliseconds from the rank's ``bench_step`` start, the same
scale in every strip so lengths compare across variants):

- **compute** (the stepping thread): busy in the forward (blue), the backward
  (green) or the optimizer step (grey), from the bench's ``bench_forward`` /
  ``bench_backward`` / ``bench_optimizer`` annotations; red where it is blocked
  in ``_c10d_functional::wait_tensor`` (exposed communication). On CPU the
  backward runs on the stepping thread too.
- **all-to-all** (the communication threads): each collective as the backend
  ran it (``gloo:all_to_all`` on gloo's worker threads, NCCL all-to-all / send-recv
  kernels on CUDA), one sub-lane per thread, coloured by micro-batch.

How a micro-batch is told apart: the profiler does not know which chunk an
all-to-all belongs to, so the label is derived from issue order. Each
all-to-all the stepping thread issues (``_c10d_functional::all_to_all_single``,
with its split sizes from ``record_shapes``) is matched to the k-th collective
run by the backend (same order: the process group runs them first in, first
out). Within a phase (forward or backward), an exchange whose split sizes
mirror an earlier, still unmatched one (its input splits are the other's output
splits and vice versa: a combine after its dispatch, or the two gradients in
backward) gets that one's label; every other token exchange opens a new label,
the number of exchanges opened so far in the phase modulo N (N = the variant's
chunk count, ``_n<N>`` in its name; 1 otherwise). Integer exchanges (the
per-expert counts) are drawn dark grey, without a label. So "mb k" is the k-th
micro-batch *in the order the phase reaches them*: in a backward that runs the
micro-batches 1 -> 0, mb 0 is micro-batch 1 of the forward. Compute on one
thread cannot be split by micro-batch from the trace (Inductor's kernels are not
profiler events), so the compute lane is coloured by phase only.

The PNG is written by this module (zlib + ``struct``, a 5x7 bitmap font for
the labels) rather than with matplotlib: the picture is rectangles and short
labels, and a plotting library (matplotlib pulls numpy, pillow, fonttools,
kiwisolver, contourpy) would be a new dependency of every install for one
optional picture.
"""

from __future__ import annotations

import ast
import json
import re
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

#: Names of the bench's own profiler annotations (``moe_passes.bench.speed`` records them).
STEP, FORWARD, BACKWARD, OPTIMIZER = "bench_step", "bench_forward", "bench_backward", "bench_optimizer"
PHASES = {FORWARD: "forward", BACKWARD: "backward", OPTIMIZER: "optimizer"}
ISSUE_OP = "_c10d_functional::all_to_all_single"
WAIT_OP = "_c10d_functional::wait_tensor"


def is_comm_event(name: str) -> bool:
    """An all-to-all as the process group ran it: gloo's ``gloo:all_to_all``, or an NCCL all-to-all/send-recv kernel."""
    lowered = name.lower()
    if lowered.startswith("gloo:"):
        return "all_to_all" in lowered or "alltoall" in lowered
    return "nccl" in lowered and ("alltoall" in lowered or "all_to_all" in lowered or "sendrecv" in lowered)


def chunks_of(variant: str) -> int:
    """Micro-batches of a variant, from ``_n<N>`` in its name (``domino_layer_n2_dw`` -> 2); 1 otherwise."""
    m = re.search(r"_n(\d+)(?:_|$)", variant)
    return int(m.group(1)) if m else 1


@dataclass
class Exchange:
    """One all-to-all: when it was issued, in which phase, its split sizes and whether it moves integers."""

    issued_ms: float
    phase: str
    out_splits: tuple[int, ...]
    in_splits: tuple[int, ...]
    integer: bool
    label: int | None = None  # micro-batch (issue-order label); None for integer (counts) exchanges


@dataclass
class RankTimeline:
    rank: int
    step_ms: float
    phases: list[tuple[str, float, float]] = field(default_factory=list)  # (phase, start, end) in ms from the step start
    waits: list[tuple[float, float]] = field(default_factory=list)
    comm: list[tuple[float, float, int, int | None, bool]] = field(default_factory=list)  # (start, end, lane, label, integer)
    exchanges: list[Exchange] = field(default_factory=list)
    comm_lanes: int = 1


def label_exchanges(exchanges: Sequence[Exchange], chunks: int) -> None:
    """Set each exchange's micro-batch label in place (see the module docstring): mirrored splits share a label,
    every other token exchange opens the next one, modulo ``chunks``, counted per phase."""
    opened: dict[str, int] = {}
    open_ones: dict[str, list[Exchange]] = {}
    for ex in exchanges:
        if ex.integer:
            ex.label = None
            continue
        pending = open_ones.setdefault(ex.phase, [])
        mirror = next((p for p in pending if p.in_splits == ex.out_splits and p.out_splits == ex.in_splits), None)
        if mirror is not None:
            pending.remove(mirror)
            ex.label = mirror.label
            continue
        k = opened.get(ex.phase, 0)
        opened[ex.phase] = k + 1
        ex.label = k % max(1, chunks)
        pending.append(ex)


def split_sizes(text: Any) -> tuple[int, ...]:
    if isinstance(text, (list, tuple)):
        return tuple(int(v) for v in text)
    if not text:
        return ()
    try:
        return tuple(int(v) for v in ast.literal_eval(str(text)))
    except (ValueError, SyntaxError, TypeError):
        return ()


def load_events(path: str | Path) -> list[dict[str, Any]]:
    """The complete (``"ph": "X"``) events of a Chrome trace file."""
    data = json.loads(Path(path).read_text())
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X" and "ts" in e]


def rank_timeline(events: Iterable[dict[str, Any]], rank: int, chunks: int) -> RankTimeline:
    """One rank's lanes from its trace events (the first ``bench_step`` annotation is the step)."""
    events = list(events)
    steps = sorted((e for e in events if e.get("name") == STEP), key=lambda e: e["ts"])
    if not steps:
        raise ValueError(f"rank {rank}: the trace has no {STEP!r} annotation")
    step = steps[0]
    t0, t1 = float(step["ts"]), float(step["ts"]) + float(step.get("dur", 0.0))
    stepping = {step.get("tid")} | {e.get("tid") for e in events if str(e.get("name", "")).startswith("autograd::engine::")}

    def inside(e: dict[str, Any]) -> bool:
        return t0 <= float(e["ts"]) <= t1

    def ms(us: float) -> float:
        return (us - t0) / 1000.0

    tl = RankTimeline(rank=rank, step_ms=(t1 - t0) / 1000.0)
    for e in events:
        name = e.get("name")
        if name in PHASES and inside(e):
            tl.phases.append((PHASES[name], ms(e["ts"]), ms(e["ts"] + e.get("dur", 0.0))))
        elif name == WAIT_OP and e.get("tid") in stepping and inside(e):
            tl.waits.append((ms(e["ts"]), ms(e["ts"] + e.get("dur", 0.0))))
    tl.phases.sort(key=lambda p: p[1])

    def phase_at(t: float) -> str:
        for name, start, end in tl.phases:
            if start <= t <= end:
                return name
        return "other"

    issues = sorted((e for e in events if e.get("name") == ISSUE_OP and e.get("tid") in stepping and inside(e)),
                    key=lambda e: e["ts"])
    for e in issues:
        args = e.get("args", {})
        concrete = args.get("Concrete Inputs") or []
        types = args.get("Input type") or [""]
        t = ms(e["ts"])
        tl.exchanges.append(Exchange(
            issued_ms=t, phase=phase_at(t),
            out_splits=split_sizes(concrete[1] if len(concrete) > 1 else ""),
            in_splits=split_sizes(concrete[2] if len(concrete) > 2 else ""),
            integer="int" in str(types[0]).lower()))
    label_exchanges(tl.exchanges, chunks)

    runs = sorted((e for e in events if is_comm_event(str(e.get("name", ""))) and inside(e)), key=lambda e: e["ts"])
    lanes = {tid: i for i, tid in enumerate(sorted({e.get("tid") for e in runs}, key=str))}
    tl.comm_lanes = max(1, len(lanes))
    matched = len(runs) == len(tl.exchanges)  # the group runs them in issue order
    for i, e in enumerate(runs):
        ex = tl.exchanges[i] if matched else None
        tl.comm.append((ms(e["ts"]), ms(e["ts"] + e.get("dur", 0.0)), lanes[e.get("tid")],
                        ex.label if ex else None, ex.integer if ex else False))
    return tl


def load_rank_timeline(path: str | Path, rank: int, chunks: int) -> RankTimeline:
    return rank_timeline(load_events(path), rank, chunks)


# --------------------------------------------------------------------------------------------------- picture

#: 5x7 glyphs, one byte per row (low 5 bits, most significant = leftmost pixel); lower case draws as upper case.
_FONT = {
    'A': "0e11111f111111", 'B': "1e11111e11111e", 'C': "0e11101010110e", 'D': "1e11111111111e", 'E': "1f10101e10101f",
    'F': "1f10101e101010", 'G': "0e11101711110f", 'H': "1111111f111111", 'I': "0e04040404040e", 'J': "0702020202120c",
    'K': "11121418141211", 'L': "1010101010101f", 'M': "111b1515111111", 'N': "11111915131111", 'O': "0e11111111110e",
    'P': "1e11111e101010", 'Q': "0e11111115120d", 'R': "1e11111e141211", 'S': "0f10100e01011e", 'T': "1f040404040404",
    'U': "1111111111110e", 'V': "11111111110a04", 'W': "1111111515150a", 'X': "11110a040a1111", 'Y': "11110a04040404",
    'Z': "1f01020408101f", '0': "0e11131519110e", '1': "040c040404040e", '2': "0e11010204081f", '3': "1e01010e01011e",
    '4': "02060a121f0202", '5': "1f101e0101110e", '6': "0608101e11110e", '7': "1f010204080808", '8': "0e11110e11110e",
    '9': "0e11110f01020c", '_': "0000000000001f", '.': "00000000000c0c", ':': "000c0c000c0c00", '-': "0000001f000000",
    '/': "01010204081010", '(': "02040808080402", ')': "08040202020408", '=': "00001f001f0000", ',': "000000000c0408",
    '%': "18190204081303", '+': "0004041f040400", ' ': "00000000000000",
}

WHITE, BLACK, GRID = (255, 255, 255), (20, 20, 20), (225, 225, 225)
PHASE_COLOURS = {"forward": (66, 122, 190), "backward": (56, 160, 96), "optimizer": (160, 160, 160), "other": (200, 200, 200)}
WAIT_COLOUR = (215, 48, 39)
COUNTS_COLOUR = (80, 80, 80)
MB_COLOURS = [(253, 141, 60), (128, 77, 191), (23, 190, 207), (140, 86, 75), (227, 119, 194), (188, 189, 34),
              (255, 187, 120), (31, 119, 180)]
UNLABELLED_COLOUR = (150, 120, 60)


class Canvas:
    """An RGB raster with rectangles and 5x7 text, saved as PNG."""

    def __init__(self, width: int, height: int, background: tuple[int, int, int] = WHITE) -> None:
        self.width, self.height = width, height
        self.pixels = bytearray(bytes(background) * (width * height))

    def rect(self, x0: float, y0: float, x1: float, y1: float, colour: tuple[int, int, int]) -> None:
        xa, xb = max(0, int(round(x0))), min(self.width, max(int(round(x1)), int(round(x0)) + 1))
        ya, yb = max(0, int(y0)), min(self.height, int(y1))
        if xa >= xb or ya >= yb:
            return
        row = bytes(colour) * (xb - xa)
        for y in range(ya, yb):
            start = (y * self.width + xa) * 3
            self.pixels[start:start + len(row)] = row

    def text(self, x: int, y: int, s: str, colour: tuple[int, int, int] = BLACK, scale: int = 2) -> int:
        """Draw ``s`` with its top-left corner at (x, y); returns the x after the last glyph."""
        for ch in s.upper():
            glyph = _FONT.get(ch, _FONT[" "])
            for r in range(7):
                bits = int(glyph[2 * r:2 * r + 2], 16)
                for c in range(5):
                    if bits & (1 << (4 - c)):
                        self.rect(x + c * scale, y + r * scale, x + (c + 1) * scale, y + (r + 1) * scale, colour)
            x += 6 * scale
        return x

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(self.pixels[y * self.width * 3:(y + 1) * self.width * 3]) for y in range(self.height))

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)  # 8-bit RGB
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.png())


@dataclass
class Strip:
    """One variant: its name, a caption (step / exposed ms) and one timeline per rank (empty: no trace)."""

    variant: str
    caption: str
    ranks: list[RankTimeline]
    chunks: int = 1


def _tick(span_ms: float) -> float:
    for step in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000):
        if span_ms / step <= 10:
            return float(step)
    return 10000.0


def render(strips: Sequence[Strip], title: str, width: int = 1600) -> Canvas:
    """The timeline picture: a title, a legend, then one strip per variant on a common time axis."""
    scale, lane_h, gap = 2, 18, 4
    text_h = 7 * scale
    left, right = 26 * 6 * scale // 2 + 20, 20
    plot_w = width - left - right
    span = max([tl.step_ms for s in strips for tl in s.ranks] + [1.0])
    px = plot_w / span
    max_chunks = max([s.chunks for s in strips] + [1])
    rank_h = 2 * lane_h + gap
    strip_heights = [text_h + 8 + max(1, len(s.ranks)) * (rank_h + gap) + 10 for s in strips]
    height = 2 * (text_h + 10) + 10 + sum(strip_heights) + text_h + 20
    cv = Canvas(width, height)
    y = 8
    cv.text(10, y, title)
    y += text_h + 10
    x = 10
    legend = [("forward", PHASE_COLOURS["forward"]), ("backward", PHASE_COLOURS["backward"]),
              ("optimizer", PHASE_COLOURS["optimizer"]), ("wait (exposed)", WAIT_COLOUR), ("counts a2a", COUNTS_COLOUR)]
    legend += [(f"a2a mb {k}", MB_COLOURS[k % len(MB_COLOURS)]) for k in range(max_chunks)]
    for name, colour in legend:
        cv.rect(x, y, x + 2 * text_h, y + text_h, colour)
        x = cv.text(x + 2 * text_h + 6, y, name) + 18
    y += text_h + 20
    tick = _tick(span)
    axis_top = y
    for s in strips:
        cv.text(10, y, f"{s.variant}  {s.caption}")
        y += text_h + 8
        if not s.ranks:
            cv.text(left, y, "no trace (the variant failed)", WAIT_COLOUR)
            y += rank_h + gap
        for tl in s.ranks:
            cv.text(10, y + 2, f"r{tl.rank} compute", scale=scale)
            cv.rect(left, y, left + tl.step_ms * px, y + lane_h, GRID)
            for phase, start, end in tl.phases:
                cv.rect(left + start * px, y, left + end * px, y + lane_h, PHASE_COLOURS.get(phase, PHASE_COLOURS["other"]))
            for start, end in tl.waits:
                cv.rect(left + start * px, y, left + end * px, y + lane_h, WAIT_COLOUR)
            yc = y + lane_h + gap
            cv.text(10, yc + 2, f"r{tl.rank} all-to-all", scale=scale)
            cv.rect(left, yc, left + tl.step_ms * px, yc + lane_h, GRID)
            sub = lane_h / tl.comm_lanes
            for start, end, lane, label, integer in tl.comm:
                colour = COUNTS_COLOUR if integer else (UNLABELLED_COLOUR if label is None else MB_COLOURS[label % len(MB_COLOURS)])
                cv.rect(left + start * px, yc + lane * sub, left + end * px, yc + (lane + 1) * sub, colour)
            y += rank_h + gap
        y += 10
    t = 0.0
    while t <= span + 1e-9:
        xt = left + t * px
        cv.rect(xt, axis_top - 4, xt + 1, y, (190, 190, 190))
        cv.text(int(xt) - 6, y + 4, f"{t:g}", scale=scale)
        t += tick
    cv.text(10, y + 4, "time (ms)", scale=scale)
    return cv


def trace_path(trace_dir: str | Path, model: str, variant: str, rank: int) -> Path:
    return Path(trace_dir) / f"speed_{model}_{variant}_rank{rank}.json"


def write_timeline(trace_dir: str | Path, model: str, rows: Sequence[dict[str, Any]], world_size: int) -> Path:
    """``trace_dir/timeline_<model>.png`` from the traces of ``rows`` (the section's rows of that model)."""
    strips = []
    for row in rows:
        variant = row["variant"]
        chunks = chunks_of(variant)
        ranks = [load_rank_timeline(p, r, chunks) for r in range(world_size)
                 if (p := trace_path(trace_dir, model, variant, r)).exists()]
        step, exposed = row.get("step_ms"), row.get("exposed_comm_ms")
        caption = f"step {step:.0f} ms, exposed {exposed:.0f} ms" if step is not None and exposed is not None else "failed"
        strips.append(Strip(variant, caption, ranks, chunks))
    out = Path(trace_dir) / f"timeline_{model}.png"
    render(strips, f"speed bench, {model}: one profiled step per rank").save(out)
    return out
