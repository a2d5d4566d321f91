"""Log records of ``moe_passes`` on stderr while a command runs: one line each unless ``--verbose``.

A pass that fails closed logs its traceback at WARNING; a user reading the
diff needs the one line (the record in the summary says the rest), a
developer passing ``--verbose`` gets everything, INFO included.
"""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from typing import Iterator


class _Handler(logging.Handler):
    def __init__(self, verbose: bool) -> None:
        super().__init__(logging.INFO if verbose else logging.WARNING)
        self.verbose = verbose

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith("moe_passes.progress"):
            return  # printed as progress lines
        text = record.getMessage()
        if self.verbose:
            if record.exc_info:
                text += "\n" + logging.Formatter().formatException(record.exc_info)
            sys.stderr.write(f"{record.levelname.lower()}: {record.name}: {text}\n")
            return
        first = text.strip().splitlines()[0] if text.strip() else ""
        more = " (--verbose shows more)" if "\n" in text.strip() or record.exc_info else ""
        sys.stderr.write(f"moe-passes: {record.levelname.lower()}: {first}{more}\n")


@contextmanager
def cli_logging(verbose: bool) -> Iterator[None]:
    logger = logging.getLogger("moe_passes")
    handler = _Handler(verbose)
    old = (logger.level, logger.propagate)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old[0])
        logger.propagate = old[1]
