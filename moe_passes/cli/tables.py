"""Plain-text tables that never cut a header or break a word.

A table that fits the width is printed as aligned columns. One that does
not is printed as records (one block per row, ``column: value`` lines,
values wrapped at spaces), which reads well at 80 columns.
"""

from __future__ import annotations

import textwrap
from typing import Any, Sequence

GAP = "  "


def cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def wrap(text: str, width: int, indent: str = "") -> list[str]:
    """Wrap at spaces only (a word longer than the width stays whole)."""
    return textwrap.wrap(text, max(width, 20), initial_indent=indent, subsequent_indent=indent + "  ",
                         break_long_words=False, break_on_hyphens=False) or [indent]


def table_lines(columns: Sequence[str], rows: Sequence[Sequence[Any]], width: int | None) -> list[str]:
    cells = [[cell(v) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    total = sum(widths) + len(GAP) * (len(columns) - 1)
    if width is None or total <= width:
        lines = [GAP.join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
        lines.append(GAP.join("-" * w for w in widths))
        lines += [GAP.join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells]
        return lines
    label = max(len(c) for c in columns[1:]) if len(columns) > 1 else 0
    lines = []
    for r in cells:
        lines += wrap(r[0], width)
        for c, v in zip(columns[1:], r[1:]):
            if v:
                head = f"  {c.ljust(label)}  "
                body = wrap(v, width - len(head))
                lines.append(head + body[0])
                lines += [" " * len(head) + b for b in body[1:]]
    return lines
