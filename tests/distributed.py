"""Run a function on N real processes with gloo on 127.0.0.1 and collect results.

Bounded: every rank gets a timeout, processes are always joined (and killed
if they hang), and a failure on any rank is re-raised with its traceback.

Ranks trace the same graphs, so Inductor compiles run one rank at a time
(a file lock around Inductor's inner compile): the first rank compiles, the
others hit its FX-graph cache entry.  On a 2-core machine that turns N
concurrent C++ compiles of one graph into one, which is what keeps the 4-rank
tests inside the suite's time budget.  Nothing inside Inductor's compile
waits on another rank, so the lock cannot deadlock with a collective.

``fake_group`` is the one-process alternative for tests that trace an EP
model without peers.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import socket
import tempfile
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from moe_passes.harness.fake_group import FakeGroupUnusable, fake_process_group


@contextlib.contextmanager
def fake_group(world_size: int = 2, *, values_matter: bool = True) -> Iterator[dist.ProcessGroup]:
    """One process as rank 0 of a fake ``world_size``-rank group (``moe_passes.harness.fake_group``), destroyed
    afterwards. A test that runs code sized by collective outputs (``values_matter``) is skipped, with
    the reason, on a torch whose fake all-to-all leaves its output unwritten (torch 2.11)."""
    with contextlib.ExitStack() as stack:
        try:
            group = stack.enter_context(fake_process_group(world_size, values_matter=values_matter))
        except FakeGroupUnusable as e:
            pytest.skip(str(e))
        yield group


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def inductor_compiles_one_at_a_time(lock_path: str) -> Any:
    """Serialise Inductor's inner compile (forward and lazily compiled backward) across processes: the
    speed bench's lock (``moe_passes.bench.speed.compiles_one_rank_at_a_time``), shared, not copied."""
    from moe_passes.bench.speed import compiles_one_rank_at_a_time

    return compiles_one_rank_at_a_time(lock_path)


def _worker(rank: int, world_size: int, port: int, outdir: str, fn: Callable[..., Any], args: tuple, timeout_s: float) -> None:
    import torch
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    out = Path(outdir) / f"rank{rank}.pkl"
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))
        try:
            with inductor_compiles_one_at_a_time(str(Path(outdir) / "inductor.lock")):
                result = ("ok", fn(rank, world_size, *args))
        finally:
            dist.destroy_process_group()
    except BaseException:
        result = ("error", traceback.format_exc())
    with open(out, "wb") as f:
        pickle.dump(result, f)


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 300.0) -> list[Any]:
    """``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; returns the per-rank results.

    ``fn`` must be importable (module level) and its results picklable.
    """
    with tempfile.TemporaryDirectory() as outdir:
        ctx = mp.get_context("spawn")
        port = free_port()
        procs = [
            ctx.Process(target=_worker, args=(r, world_size, port, outdir, fn, args, timeout_s), daemon=False)
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout_s + 60)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        results = []
        for r in range(world_size):
            path = Path(outdir) / f"rank{r}.pkl"
            if not path.exists():
                raise RuntimeError(f"rank {r} produced no result (exit code {procs[r].exitcode}; hung ranks: {hung})")
            status, value = pickle.loads(path.read_bytes())
            if status != "ok":
                raise RuntimeError(f"rank {r} failed:\n{value}")
            results.append(value)
        return results


def shared_worker(rank: int, world_size: int, parts: dict[str, tuple[Callable[..., Any], tuple]],
                  partial_dir: str) -> dict[str, tuple[str, Any]]:
    """Every run of ``parts`` (name -> (fn, args): ``fn(rank, world_size, *args)``) in turn on this rank, in one
    process group: ("ok", its result) or ("error", its traceback). After each run the results so far are also
    written to ``partial_dir`` (read if a later run kills the process group: a hang or a dead rank)."""
    import torch
    import torch.distributed as dist

    out: dict[str, tuple[str, Any]] = {}
    for name, (fn, args) in parts.items():
        torch._dynamo.reset()
        try:
            out[name] = ("ok", fn(rank, world_size, *args))
        except Exception:  # recorded: that run's test fails with it, the others still run
            out[name] = ("error", traceback.format_exc())
        (Path(partial_dir) / f"rank{rank}.pkl").write_bytes(pickle.dumps(out))
        dist.barrier()
    torch._dynamo.reset()
    return out


class SharedRun:
    """Several runs of one world size in ONE process group, for the tests of a file: each rank pays its start-up
    (imports, gloo) and Dynamo's first-compile set-up once instead of once per run. The run starts on the first
    ``result`` call (any test's), each test reads its own run's per-rank results. Failure isolation: a run that
    raises fails its own test only; should the shared run itself fail (a rank died or hung), each test reads
    what finished before that and reports the failure otherwise; a failed shared run is never rerun."""

    def __init__(self, world_size: int, parts: dict[str, tuple[Callable[..., Any], tuple]], timeout_s: float) -> None:
        self.world_size, self.parts, self.timeout_s = world_size, parts, timeout_s
        self._results: list[dict[str, tuple[str, Any]]] = []

    def result(self, name: str) -> list[Any]:
        """``name``'s result on every rank; raises (fails the test) if it raised on any rank."""
        if not self._results:
            with tempfile.TemporaryDirectory() as partial_dir:
                try:
                    self._results.extend(run_distributed(shared_worker, self.world_size, self.parts, partial_dir,
                                                         timeout_s=self.timeout_s))
                except Exception:
                    failure = ("error", f"the shared {self.world_size}-rank run did not finish:\n{traceback.format_exc()}")
                    for rank in range(self.world_size):
                        path = Path(partial_dir) / f"rank{rank}.pkl"
                        done = pickle.loads(path.read_bytes()) if path.exists() else {}
                        self._results.append({n: done.get(n, failure) for n in self.parts})
        failed = [f"rank {rank}:\n{r[name][1]}" for rank, r in enumerate(self._results) if r[name][0] != "ok"]
        assert not failed, f"{name} raised:\n" + "\n".join(failed)
        return [r[name][1] for r in self._results]
