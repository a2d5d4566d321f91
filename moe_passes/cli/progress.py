"""Progress lines on stderr, one per phase, with the elapsed time: the same on a terminal and in a log.

    [   0.0s] resolving target moe_stack
    [   4.1s] capturing graphs (Dynamo)
    [   9.8s] graph 1/1: pass 2/3 domino_ep

Any module can report progress without importing the CLI: log at INFO to the
``moe_passes.progress`` logger (``logging.getLogger(PROGRESS_LOGGER).info("rank 1/2 compiling")``);
while a command runs, those records are printed as progress lines.
"""

from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager
from typing import IO, Iterator

log = logging.getLogger(__name__)

PROGRESS_LOGGER = "moe_passes.progress"


class Progress:
    """Prints ``[ elapsed] message`` lines to ``stream`` (stderr) unless ``quiet``."""

    def __init__(self, stream: IO[str] | None = None, quiet: bool = False) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.quiet = quiet
        self.start = time.monotonic()
        self.last = ""  # the phase now running: named in an internal error

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def __call__(self, message: str) -> None:
        self.last = message
        if self.quiet:
            return
        self.stream.write(f"[{self.elapsed():7.1f}s] {message}\n")
        self.stream.flush()

    @contextmanager
    def phase(self, message: str) -> Iterator[None]:
        """``message`` now, ``message: done in N s`` after (phases that take long say so when they end)."""
        t0 = time.monotonic()
        self(message)
        yield
        self(f"{message}: done in {time.monotonic() - t0:.1f} s")

    @contextmanager
    def from_logger(self) -> Iterator[None]:
        """Print INFO records of the ``moe_passes.progress`` logger as progress lines meanwhile."""
        progress = self

        class Handler(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                progress(record.getMessage())

        logger = logging.getLogger(PROGRESS_LOGGER)
        handler = Handler(logging.INFO)
        old_level = logger.level
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        try:
            yield
        finally:
            logger.removeHandler(handler)
            logger.setLevel(old_level)
