"""Suite-wide settings: one thread per test process, golden updates, and two test processes by default.

Every test runs single-threaded (``torch.set_num_threads(1)``), and almost all of
the suite's time is single-threaded Dynamo/AOT/Inductor compilation, so on a
machine with two or more cores every selection runs in two pytest-xdist workers
(``--dist loadfile``: a file's tests stay on one worker, so module-scoped
fixtures, which share compiled graphs between tests, are built once). That holds
for the slow proofs too: their 2 to 4 gloo ranks compile one at a time
(``tests/distributed.py``), so one such test mostly keeps one core busy
(measured on the 2-core machine, cold cache: ``-m slow`` 24 min 44 s in two
workers against 28 min 51 s in one process after the default suite had warmed
the cache). Both workers share Inductor's on-disk cache.
(``loadfile`` is scheduled by the controlling process alone; ``loadgroup`` set
here would not reach the workers, which re-read the command line, and every
test would be scheduled on its own, building module fixtures twice: measured.)
``-n 0`` runs in one process, ``-n N`` picks another count; without
pytest-xdist installed the suite runs serially.
"""

import os

import pytest
import torch

#: Test worker processes when ``-n`` is not given (capped by the machine's cores).
DEFAULT_WORKERS = 2


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--update-goldens", action="store_true", default=False, help="rewrite tests/golden/* from the current output")


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> None:
    """Default to ``-n 2 --dist loadfile`` when pytest-xdist is installed and ``-n`` was not given."""
    if hasattr(config, "workerinput") or not config.pluginmanager.hasplugin("xdist"):
        return
    if config.getoption("numprocesses", None) is not None or config.getoption("collectonly", False):
        return
    workers = min(DEFAULT_WORKERS, os.cpu_count() or 1)
    if workers > 1 and not config.getoption("update_goldens", False):
        config.option.numprocesses = workers
        if config.getoption("dist", "no") == "no":
            config.option.dist = "loadfile"


@pytest.fixture(scope="session")
def update_goldens(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--update-goldens"))


@pytest.fixture(autouse=True)
def _small_cpu_footprint() -> None:
    torch.set_num_threads(1)


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # num_chunks="auto" reads calibrated rates from the user's cache: tests use the built-in ones (the
    # same on every machine, and in every rank process, which inherits the variable)
    os.environ["MOE_PASSES_CALIBRATION"] = os.path.join(os.path.dirname(__file__), "no-calibration.json")


@pytest.fixture(scope="module")
def trace_group():  # type: ignore[no-untyped-def]
    """A fake 2-rank expert-parallel group (``tests.distributed.fake_group``) for tests that capture graphs
    and never run them; one per test module."""
    from tests.distributed import fake_group

    with fake_group(2, values_matter=False) as group:
        yield group
