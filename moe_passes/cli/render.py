"""Text rendering of ``moe-passes diff``: coloured diff on a terminal, plain in a pipe or file.

Lines are wrapped only where a width is known (a terminal, or ``COLUMNS``),
at spaces, with the diff marker kept; tables switch to records when they do
not fit (see ``tables``). Nothing is cut with "…".
"""

from __future__ import annotations

import os
import shutil
import textwrap
from typing import IO, Any, Sequence

from moe_passes.cli.diff import Section, short_region
from moe_passes.cli.tables import table_lines, wrap

_COLOURS = {"+": "\033[32m", "-": "\033[31m", "@": "\033[36m", "bold": "\033[1m", "dim": "\033[2m", "title": "\033[1;36m"}
_RESET = "\033[0m"


def fmt_bytes(value: Any) -> str:
    """Exact below 1 MiB (small test models differ by a few bytes), else MiB/GiB."""
    if not isinstance(value, int):
        return str(value)
    if abs(value) < 2**20:
        return f"{value:,} B"
    if abs(value) < 2**30:
        return f"{value / 2**20:.1f} MiB"
    return f"{value / 2**30:.2f} GiB"


def output_width(stream: IO[str]) -> int | None:
    """Terminal width on a terminal, ``COLUMNS`` when set, else None (no wrapping in pipes and files)."""
    if "COLUMNS" in os.environ:
        try:
            return max(int(os.environ["COLUMNS"]), 40)
        except ValueError:
            pass
    if hasattr(stream, "isatty") and stream.isatty():
        return shutil.get_terminal_size().columns
    return None


def use_colour(stream: IO[str]) -> bool:
    return hasattr(stream, "isatty") and stream.isatty() and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"


class Writer:
    def __init__(self, stream: IO[str], width: int | None, colour: bool) -> None:
        self.stream, self.width, self.colour = stream, width, colour

    def line(self, text: str = "", style: str | None = None) -> None:
        if style and self.colour:
            text = f"{_COLOURS[style]}{text}{_RESET}"
        self.stream.write(text + "\n")

    def para(self, text: str, indent: str = "", style: str | None = None) -> None:
        for piece in (wrap(text, self.width, indent) if self.width else [indent + text]):
            self.line(piece, style)

    def rule(self, title: str) -> None:
        width = min(self.width or 100, 100)
        head = f"── {title} "
        self.line(head + "─" * max(width - len(head), 3), "title")

    def diff_line(self, line: str) -> None:
        style = "@" if line.startswith("@@") else "bold" if line.startswith(("---", "+++")) else line[:1] if line[:1] in "+-" else None
        if self.width is None or len(line) <= self.width:
            self.line(line, style)
            return
        marker, body = line[:1], line[1:]
        indent = len(body) - len(body.lstrip())
        pieces = textwrap.wrap(body.strip(), self.width - 1, initial_indent=" " * indent, subsequent_indent=" " * (indent + 4),
                               break_long_words=False, break_on_hyphens=False)
        for piece in pieces:
            self.line(marker + piece, style)

    def table(self, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        for k, text in enumerate(table_lines(columns, rows, self.width)):
            self.line(text, "bold" if k == 0 and self.width is not None and len(rows) and text.startswith(columns[0]) else None)


def summary_rows(sections: Sequence[Section]) -> list[list[Any]]:
    rows = []
    for s in sections:
        m = s.summary
        nodes = "n/a" if m.get("nodes_added") is None else f"+{m['nodes_added']} -{m['nodes_removed']}"
        rows.append([s.title, m.get("changed"), nodes, m["collectives"], m["waits"]])
    return rows


SUMMARY_COLUMNS = ["section", "changed", "nodes +/-", "collectives", "waits"]
ESTIMATE_COLUMNS = ["section", "peak live", "communicated", "guessed sizes"]


def estimate_rows(sections: Sequence[Section]) -> list[list[Any]]:
    rows = []
    for s in sections:
        if s.estimate_before and s.estimate_after:
            b, a = s.estimate_before, s.estimate_after
            rows.append([
                s.title, f"{fmt_bytes(b['peak_live_bytes'])} -> {fmt_bytes(a['peak_live_bytes'])}",
                f"{fmt_bytes(b['bytes_communicated'])} -> {fmt_bytes(a['bytes_communicated'])}", a["unhinted_sizes"],
            ])
    return rows


def details(section: Section) -> list[str]:
    m = section.summary
    out = []
    if m.get("chunks"):
        out.append("chunks: " + short_region(m["chunks"]))
    if m.get("matched"):
        out.append("matched: " + ", ".join(short_region(x) for x in m["matched"]))
    for skipped in m.get("skipped", []):
        out.append("skipped " + short_region(skipped))
    return out


def real_shape_lines(header: dict[str, Any], sections: Sequence[Section]) -> list[str]:
    """Per-layer communication at the real shape (meta targets): what a cluster run would move."""
    layers, total = header.get("num_layers"), header.get("total_layers")
    firsts = [s for s in sections if s.estimate_before]
    if not layers or not firsts:
        return []
    first, last = firsts[0].estimate_before, firsts[-1].estimate_after or firsts[-1].estimate_before
    per_layer_before = first["bytes_communicated"] // layers
    per_layer_after = last["bytes_communicated"] // layers
    lines = [f"bytes communicated per layer: {fmt_bytes(per_layer_before)} without passes, {fmt_bytes(per_layer_after)} after them"]
    if total and total != layers:
        lines.append(f"  x {total} layers: {fmt_bytes(per_layer_before * total)} -> {fmt_bytes(per_layer_after * total)} per step and rank")
    lines.append(f"peak live bytes ({layers} layers shown): {fmt_bytes(first['peak_live_bytes'])} -> {fmt_bytes(last['peak_live_bytes'])}")
    return lines


def render_text(stream: IO[str], sections: Sequence[Section], header: dict[str, Any], width: int | None, colour: bool) -> None:
    w = Writer(stream, width, colour)
    w.para(f"moe-passes diff {header['target']}: stage {header['stage']}, "
           f"passes {', '.join(header.get('pipeline') or header['passes']) or '-'}, "
           f"diff {header['diff']}, world size {header['world_size']}", style="bold")
    if header.get("description"):
        w.para(header["description"])
    for section in sections:
        w.line()
        w.rule(section.title)
        diff = section.diff()
        if diff:
            for line in diff.splitlines():
                w.diff_line(line)
        elif section.before != section.after:
            w.line("(only annotations, frees or symbol numbers changed; --diff full shows them)", "dim")
        else:
            w.line("(no change in this graph)", "dim")
    w.line()
    w.rule("summary")
    if not sections:
        w.line("no sections: the target produced no graph at this stage")
        return
    w.table(SUMMARY_COLUMNS, summary_rows(sections))
    for s in sections:
        extra = details(s)
        if extra:
            w.line()
            w.para(s.title, style="bold")
            for text in extra:
                w.para(text, indent="  ")
    rows = estimate_rows(sections)
    if rows:
        w.line()
        w.rule("static estimates")
        w.para("liveness over graph order; data-dependent sizes guessed under uniform routing (count in 'guessed sizes')", style="dim")
        w.table(ESTIMATE_COLUMNS, rows)
    real = real_shape_lines(header, sections) if header.get("meta") else []
    if real:
        w.line()
        w.rule("at the real shape")
        for text in real:
            w.para(text)
