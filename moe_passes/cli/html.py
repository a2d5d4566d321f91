"""The html page of ``moe-passes diff``: title, summary first, an anchor per graph and pass.

Diff lines are never wrapped (a long line scrolls inside its box); colours
are GitHub-like light backgrounds with dark text, readable on white.
"""

from __future__ import annotations

import html
from typing import Any, Sequence

from moe_passes.cli.diff import Section
from moe_passes.cli.render import ESTIMATE_COLUMNS, SUMMARY_COLUMNS, details, estimate_rows, real_shape_lines, summary_rows
from moe_passes.cli.tables import cell

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em 2em; color: #1f2328; background: #ffffff; }
h1 { font-size: 1.4em; margin-bottom: 0.2em; }
h2 { font-size: 1.1em; margin-top: 2em; border-bottom: 1px solid #d0d7de; padding-bottom: 0.2em; }
p.meta { color: #59636e; margin-top: 0; }
table { border-collapse: collapse; margin: 0.6em 0 1em 0; }
th, td { border: 1px solid #d0d7de; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f6f8fa; white-space: nowrap; }
td { white-space: nowrap; }
td:last-child { white-space: normal; }
td.details { color: #59636e; font-size: 0.9em; }
pre.diff { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; font-size: 12.5px;
           white-space: pre; overflow-x: auto; border: 1px solid #d0d7de; border-radius: 6px; padding: 0.5em 0; background: #ffffff; }
pre.diff span { display: block; padding: 0 0.8em; }
.add { background: #dafbe1; color: #116329; }
.del { background: #ffebe9; color: #82071e; }
.hunk { background: #ddf4ff; color: #0550ae; }
.file { color: #59636e; font-weight: bold; }
.nochange { color: #59636e; font-style: italic; }
a { color: #0969da; }
"""


def _diff_html(diff: str) -> str:
    out = []
    for line in diff.splitlines():
        cls = ("file" if line.startswith(("---", "+++")) else "hunk" if line.startswith("@@")
               else "add" if line.startswith("+") else "del" if line.startswith("-") else "")
        out.append(f'<span class="{cls}">{html.escape(line) or " "}</span>' if cls else f"<span>{html.escape(line) or ' '}</span>")
    return '<pre class="diff">' + "".join(out) + "</pre>"


def _table(columns: Sequence[str], rows: Sequence[Sequence[Any]], links: Sequence[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for k, row in enumerate(rows):
        cells = [html.escape(cell(v)) for v in row]
        if links:
            cells[0] = f'<a href="#{links[k]}">{cells[0]}</a>'
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def render_html(sections: Sequence[Section], header: dict[str, Any]) -> str:
    title = f"moe-passes diff {header['target']} ({header['stage']})"
    parts = [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>", f"<style>{CSS}</style>", "</head>", "<body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="meta">passes: {html.escape(", ".join(header.get("pipeline") or header["passes"]) or "-")} '
        f'&middot; diff: {html.escape(header["diff"])} &middot; world size {header["world_size"]}'
        f'{" &middot; " + html.escape(header["description"]) if header.get("description") else ""}</p>',
        '<h2 id="summary">Summary</h2>',
    ]
    if not sections:
        parts.append('<p class="nochange">no sections: the target produced no graph at this stage</p>')
    else:
        parts.append(_table(SUMMARY_COLUMNS + ["details"], [r + ["; ".join(details(s))] for r, s in zip(summary_rows(sections), sections)],
                            [s.anchor for s in sections]))
        est = estimate_rows(sections)
        if est:
            parts.append('<h2 id="estimates">Static estimates</h2>')
            parts.append('<p class="meta">liveness over graph order; data-dependent sizes guessed under uniform routing</p>')
            parts.append(_table(ESTIMATE_COLUMNS, est, [s.anchor for s in sections if s.estimate_before and s.estimate_after]))
        real = real_shape_lines(header, sections) if header.get("meta") else []
        if real:
            parts.append('<h2 id="real-shape">At the real shape</h2><ul>' + "".join(f"<li>{html.escape(x)}</li>" for x in real) + "</ul>")
    for s in sections:
        parts.append(f'<h2 id="{s.anchor}">{html.escape(s.title)} <a href="#{s.anchor}">#</a> <a href="#summary">&uarr; summary</a></h2>')
        diff = s.diff()
        if diff:
            parts.append(_diff_html(diff))
        elif s.before != s.after:
            parts.append('<p class="nochange">only annotations, frees or symbol numbers changed (--diff full shows them)</p>')
        else:
            parts.append('<p class="nochange">no change in this graph</p>')
    parts += ["</body>", "</html>"]
    return "\n".join(parts) + "\n"
