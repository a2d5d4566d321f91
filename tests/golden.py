"""Golden-file comparison: checked-in normalised text, rewritten by ``--update-goldens``."""

from __future__ import annotations

import difflib
from pathlib import Path

GOLDEN_DIR = Path(__file__).parent / "golden"


def check_golden(name: str, actual: str, update: bool) -> None:
    """Compare ``actual`` to ``tests/golden/<name>``; with ``update`` rewrite it instead."""
    path = GOLDEN_DIR / name
    if update:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(actual)
        return
    if not path.exists():
        raise AssertionError(f"golden {path} does not exist; run pytest --update-goldens and review the new file")
    expected = path.read_text()
    if expected != actual:
        diff = "".join(
            difflib.unified_diff(expected.splitlines(True), actual.splitlines(True), f"golden/{name}", "actual")
        )
        raise AssertionError(f"output differs from golden {name} (pytest --update-goldens rewrites it):\n{diff}")
