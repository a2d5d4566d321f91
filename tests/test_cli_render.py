"""What ``moe-passes diff`` shows: a semantic diff, counts of real collectives, tables that fit
80 columns without cutting a word, an html page with a title, summary first and anchors,
and progress lines on stderr when piped."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from typing import Any

import pytest

from moe_passes.cli.counts import output_code_counts
from moe_passes.cli.diff import Section, summarize
from moe_passes.cli.tables import table_lines
from moe_passes.cli.textdiff import unified_diff
from tests.cli_helpers import moe_passes_cli

BEFORE = """\
class GraphModule(torch.nn.Module):
    def forward(self, L_x_: "f32[8, 4]"):
        topk = torch.topk(routing_weights, 2, dim = -1);  routing_weights = None
        getitem_3 = sum_2[0]
        mul: "f32[8, 4]" = l_x_ * 2
        x = y = None
        size: "Sym(u3)" = l_x_.size(u3)
        return (mul,)
"""

AFTER = """\
class GraphModule(torch.nn.Module):
    def forward(self, L_x_: "f32[8, 4]"):
        topk = torch.topk(routing_weights, 2, dim = -1)
        getitem_3: "i64[]" = sum_2[0]
        x = y = None
        mul: "f32[8, 4]" = l_x_ * 3
        size: "Sym(u7)" = l_x_.size(u7)
        return (mul,)
"""


def test_semantic_diff_shows_the_change_and_hides_annotation_and_liveness_churn() -> None:
    diff = unified_diff(BEFORE, AFTER, "a", "b")
    changed = [line for line in diff.splitlines() if line[:1] in "+-" and not line.startswith(("---", "+++"))]
    assert changed == ['-        mul: "f32[8, 4]" = l_x_ * 2', '+        mul: "f32[8, 4]" = l_x_ * 3']
    full = unified_diff(BEFORE, AFTER, "a", "b", mode="full")
    assert (
        '+        getitem_3: "i64[]" = sum_2[0]' in full
        and "-        topk = torch.topk(routing_weights, 2, dim = -1);  routing_weights = None" in full
    )
    assert "u7" not in "".join(line for line in full.splitlines() if line.startswith("+"))  # renumbered symbols match too


OUTPUT_CODE = """
def call(args):
    arg0_1, = args
    buf0 = torch.ops._c10d_functional.all_to_all_single.default(arg0_1, [2, 2], [2, 2], '0')
    assert_size_stride(buf0, (4, 4), (4, 1), 'torch.ops._c10d_functional.all_to_all_single.default')
    # Topologically Sorted Source Nodes: [all_to_all_single, wait_tensor]
    buf1 = torch.ops._c10d_functional.wait_tensor.default(buf0)
    assert_size_stride(buf1, (4, 4), (4, 1), 'torch.ops._c10d_functional.wait_tensor.default')
    del buf0
    return (buf1, )
"""


def test_output_code_counts_calls_not_the_strings_that_name_them() -> None:
    counts = output_code_counts(OUTPUT_CODE)
    assert (counts.collectives, counts.waits) == (1, 1)
    section = Section(0, "graph 0 / forward output code", None, OUTPUT_CODE, OUTPUT_CODE.replace("[2, 2], [2, 2]", "[1, 3], [1, 3]"))
    summary = summarize(section, counts, output_code_counts(section.after))
    assert summary["changed"] is True and summary["collectives"] == "1 -> 1"  # "changed" is filled, not None


def test_tables_fit_80_columns_without_cutting_or_breaking_words() -> None:
    columns = ["section", "peak live", "communicated", "guessed sizes"]
    rows = [["graph 0 / layerwise_aux_loss", "26.96 GiB -> 26.96 GiB", "6.00 GiB -> 6.00 GiB", 48]]
    lines = table_lines(columns, rows, 80)
    assert all(len(line) <= 80 for line in lines)
    words = {w for v in [*columns[1:], *rows[0]] for w in str(v).split()}  # records: the first column titles each block
    shown = {w for line in lines for w in line.split()}
    assert words <= shown and "…" not in "".join(lines)
    wide = table_lines(columns, rows, 160)  # fits: one aligned row under the headers
    assert len(wide) == 3 and wide[0].split() == "section peak live communicated guessed sizes".split()


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.title = ""
        self.ids: list[str] = []
        self.hrefs: list[str] = []
        self.h2: list[str] = []
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("id"):
            self.ids.append(a["id"] or "")
        if tag == "a" and a.get("href", "").startswith("#"):
            self.hrefs.append((a["href"] or "")[1:])
        self._in = tag if tag in ("title", "h2") else None
        if tag == "h2":
            self.h2.append("")

    def handle_data(self, data: str) -> None:
        if self._in == "title":
            self.title += data
        elif self._in == "h2":
            self.h2[-1] += data

    def handle_endtag(self, tag: str) -> None:
        self._in = None


@pytest.fixture(scope="module")
def cli_html(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, str]:
    out = tmp_path_factory.mktemp("html") / "diff.html"
    proc = moe_passes_cli(
        "diff",
        "moe_stack",
        "--pass",
        "layerwise_aux_loss",
        "domino_ep",
        "--num-chunks",
        "2",
        "--format",
        "html",
        "--output",
        str(out),
        columns=None,
    )
    assert proc.returncode == 0, proc.stderr
    return proc, out.read_text()


def test_html_page_has_title_summary_first_anchors_and_readable_colours(cli_html: tuple[Any, str]) -> None:
    _, page = cli_html
    parser = _Page()
    parser.feed(page)
    assert parser.title == "moe-passes diff moe_stack (pre_grad)"
    assert parser.h2[0] == "Summary"  # before any graph's diff
    assert page.index('id="summary"') < page.index("<pre")
    for name in ("graph-0-layerwise_aux_loss", "graph-0-domino_ep"):
        assert name in parser.ids and name in parser.hrefs  # linked from the summary to the section
    assert set(parser.hrefs) <= set(parser.ids)  # no dangling link
    assert "#00ff00" not in page.lower() and "white-space: pre;" in page  # no neon green, no hard wrapping
    assert "<br" not in page.split("<pre", 1)[1]


def test_progress_lines_on_stderr_when_piped(cli_html: tuple[Any, str]) -> None:
    proc, _ = cli_html
    lines = proc.stderr.splitlines()
    stamped = [line for line in lines if re.match(r"^\[\s*\d+\.\d+s\] ", line)]
    text = "\n".join(stamped)
    for phase in (
        "importing torch and the passes",
        "building target moe_stack",
        "capturing graphs (Dynamo)",
        "capturing graphs (Dynamo): done in",
        "graph 1/1: pass 1/2 layerwise_aux_loss",
        "graph 1/1: pass 2/2 domino_ep",
        "rendering 2 section(s) as html",
        "wrote ",
    ):
        assert phase in text, proc.stderr
    times = [float(re.match(r"^\[\s*(\d+\.\d+)s\]", line).group(1)) for line in stamped]  # type: ignore[union-attr]
    assert times == sorted(times)


def _words(text: str) -> set[str]:
    return {w for w in text.split() if not set(w) <= {"-", "+", "─"}}


@pytest.fixture(scope="module")
def text_runs() -> tuple[Any, Any]:
    """The same diff piped without a width (plain, unwrapped) and with COLUMNS=80."""
    args = ("diff", "moe_stack", "--pass", "layerwise_aux_loss", "-q")
    return moe_passes_cli(*args, columns=None), moe_passes_cli(*args, columns=80)


def test_text_format_shows_diff_then_summary_and_estimates(text_runs: tuple[Any, Any]) -> None:
    proc, _ = text_runs
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "--- graph 0 / layerwise_aux_loss (before)" in out and "+++ graph 0 / layerwise_aux_loss (after)" in out
    assert re.search(r"^\+\s+\w+: ", out, re.MULTILINE)
    assert "── summary" in out and "── static estimates" in out and "peak live" in out
    assert re.search(r"^graph 0 / layerwise_aux_loss\s+yes\s+\+\d+ -\d+\s+6 -> 6\s+6 -> 6$", out, re.MULTILINE)
    # Piped without COLUMNS: no colour codes, no wrapping (the graph's long lines stay whole).
    assert "\033[" not in out and max(len(line) for line in out.splitlines()) > 100
    # Semantic diff: no line is shown only because a free moved, and no free tail is shown.
    assert not re.search(r"^[-+].*=\s*None\s*$", out, re.MULTILINE)
    assert proc.stderr == ""  # -q: no progress lines


def test_text_at_80_columns_breaks_no_word(text_runs: tuple[Any, Any]) -> None:
    unwrapped, narrow = text_runs
    assert narrow.returncode == 0, narrow.stderr
    lines = narrow.stdout.splitlines()
    # Every line fits, unless it holds a word too long to fit after its indent (never split).
    too_long = [line for line in lines if len(line) > 80 and not any(len(w) > 40 for w in line.split())]
    assert not too_long, too_long
    # No broken word: every word shown at 80 columns is a word of the unwrapped output ("secti" / "on" would not be).
    assert _words(narrow.stdout) <= _words(unwrapped.stdout), sorted(_words(narrow.stdout) - _words(unwrapped.stdout))[:10]
    assert "…" not in narrow.stdout and max(len(line) for line in unwrapped.stdout.splitlines()) > 80
