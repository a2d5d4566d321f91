"""Run a function on N real processes with gloo on 127.0.0.1 and collect results.

Bounded: every rank gets a timeout, processes are always joined (and killed
if they hang), and a failure on any rank is re-raised with its traceback.
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
