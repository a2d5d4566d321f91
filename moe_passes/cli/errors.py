"""What the CLI reports as the user's mistake (exit 2) versus its own failure (exit 1)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


class CLIError(Exception):
    """A user error (bad option, unknown pass or preset, unimportable target): one line, exit status 2."""


def check_writable(path: str | None, option: str) -> None:
    """Fail before any work when ``path`` cannot be written (not after a ten-minute compile).

    The check opens the file as the command later will (append for an existing
    file, so nothing is changed; create-then-remove for a new one), which also
    holds for root and for special file systems where permission bits say nothing.
    """
    if not path:
        return
    p = Path(path)
    if p.is_dir():
        raise CLIError(f"{option} {path}: is a directory")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise CLIError(f"{option} {path}: directory {str(parent)!r} does not exist")
    existed = p.exists()
    try:
        with open(p, "a"):
            pass
    except OSError as e:
        raise CLIError(f"{option} {path}: cannot write there ({e.strerror or e})") from e
    if not existed:
        try:
            os.unlink(p)
        except OSError:
            log.debug("could not remove the probe file %s", p)
