"""How an exception is named in one line: skip reasons, pass failures, CLI messages and bench rows.

A skip reason or a table cell holds one line; the traceback goes to the log
(``--verbose`` in the CLI).  Every place that turns an exception into such a
line calls these, so they all read alike: ``TypeName: first line of the message``.
"""

from __future__ import annotations


def first_line(e: BaseException) -> str:
    """The first line of ``e``'s message, surrounding blank lines dropped ('' when it has none)."""
    return (str(e).strip().splitlines() or [""])[0]


def error_summary(e: BaseException) -> str:
    """``TypeName: first line`` of an exception (``TypeName:`` alone when it has no message)."""
    return f"{type(e).__name__}: {first_line(e)}"
