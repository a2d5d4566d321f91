"""Unified diffs of graph texts: ``semantic`` (default) hides annotation and liveness churn.

A pass that sets ``meta["val"]`` on a node makes its printed line gain a type
annotation (``getitem_3 = sum_2[0]`` -> ``getitem_3: "i64[]" = sum_2[0]``);
any rewrite moves the ``x = y = None`` frees (pre-/post-grad graphs) and
``del buf3`` lines (output code) and the ``;  x = None`` tails of lines that
say where values die; new unbacked
symbols renumber every later ``u7``. None of that is what the pass did.
``semantic`` compares lines with annotations and symbol numbers masked and
drops the frees (whole lines and ``;  x = None`` tails) from what it shows; ``full`` shows every line that differs (symbol numbers
still masked).
"""

from __future__ import annotations

import difflib
import re

DIFF_MODES = ("semantic", "full")

_SYMBOL = re.compile(r"\b[us]\d+\b")
_ANNOTATION = re.compile(r'(\b\w+)\s*:\s*"[^"\n]*"')
_FREE = re.compile(r"^\s*\w+(\s*=\s*\w+)*\s*=\s*None\s*$")
_DEL = re.compile(r"^\s*del\s+\w+(\s*,\s*\w+)*\s*$")
_TRAILING_FREE = re.compile(r";\s*\w+(\s*=\s*\w+)*\s*=\s*None\s*$")


def strip_frees(line: str) -> str:
    """``y = f(x);  x = None`` -> ``y = f(x)``: the free says where ``x`` dies, not what is computed."""
    return _TRAILING_FREE.sub("", line)


def is_liveness_line(line: str) -> bool:
    """``a = b = None`` (graph frees) or ``del buf1, buf2`` (output code frees)."""
    return bool(_FREE.match(line) or _DEL.match(line))


def semantic_key(line: str) -> str:
    """The line without type annotations or symbol numbers, whitespace runs collapsed."""
    line = _ANNOTATION.sub(r"\1", line)
    line = _SYMBOL.sub("#", line)
    return " ".join(line.split())


def unified_diff(before: str, after: str, from_name: str, to_name: str, mode: str = "semantic", context: int = 3) -> str:
    """Unified diff; lines shown are the originals (annotations kept), matching follows ``mode``."""
    if mode not in DIFF_MODES:
        raise ValueError(f"diff mode must be one of {DIFF_MODES}, got {mode!r}")
    a, b = before.splitlines(), after.splitlines()
    if mode == "semantic":
        a = [strip_frees(line) for line in a if not is_liveness_line(line)]
        b = [strip_frees(line) for line in b if not is_liveness_line(line)]
        key_a, key_b = [semantic_key(x) for x in a], [semantic_key(x) for x in b]
    else:
        key_a, key_b = [_SYMBOL.sub("#", x) for x in a], [_SYMBOL.sub("#", x) for x in b]
    out: list[str] = []
    for group in difflib.SequenceMatcher(None, key_a, key_b, autojunk=False).get_grouped_opcodes(context):
        if not out:
            out += [f"--- {from_name}", f"+++ {to_name}"]
        i1, i2, j1, j2 = group[0][1], group[-1][2], group[0][3], group[-1][4]
        out.append(f"@@ -{i1 + 1},{i2 - i1} +{j1 + 1},{j2 - j1} @@")
        for tag, a1, a2, b1, b2 in group:
            if tag == "equal":
                out += [" " + line for line in b[b1:b2]]
                continue
            out += ["-" + line for line in a[a1:a2]]
            out += ["+" + line for line in b[b1:b2]]
    return "\n".join(out) + ("\n" if out else "")


def diff_stats(diff: str) -> tuple[int, int]:
    """Lines removed and added in a unified diff."""
    removed = sum(1 for line in diff.splitlines() if line.startswith("-") and not line.startswith("---"))
    added = sum(1 for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++"))
    return removed, added
