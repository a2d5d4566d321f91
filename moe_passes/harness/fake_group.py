"""A one-process stand-in for an expert-parallel group, to trace EP models without their peers.

``torch.distributed``'s fake process group lets one process act as rank 0 of
``world_size`` ranks: collectives return at once and nothing is sent.  That is
enough to *trace* an EP model (the diff CLI, the graph tests), but whether the
traced *values* are usable depends on torch: dropless EP exchanges its split
sizes through an all-to-all, then sizes buffers by them.  torch 2.13's fake
all-to-all copies this rank's rows into every peer's slot; torch 2.11's leaves
the output uninitialised, so those split sizes are garbage (seen: an 8e15-byte
allocation).  Where the values matter, the group is probed once at start and
refused with :class:`FakeGroupUnusable` rather than handed out.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


class FakeGroupUnusable(RuntimeError):
    """This torch's fake process group cannot stand in for the peers where traced values matter."""


def fake_all_to_all_fills_outputs() -> bool:
    """Whether the initialised (fake) group's all-to-all writes its output."""
    from torch.distributed._functional_collectives import all_to_all_single

    n = dist.get_world_size()
    sent = torch.full((n,), 7, dtype=torch.int64)
    return bool((all_to_all_single(sent, [1] * n, [1] * n, dist.group.WORLD) == 7).all())


def init_fake_process_group(world_size: int, *, values_matter: bool = True) -> None:
    """Make this process rank 0 of a fake group of ``world_size`` ranks.

    ``values_matter``: the caller runs (not only traces) code whose shapes come from
    collective outputs; the group is then probed and, where its all-to-all leaves
    outputs unwritten, destroyed again and :class:`FakeGroupUnusable` raised.
    """
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a process group is already initialised in this process; destroy it first")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    if values_matter and not fake_all_to_all_fills_outputs():
        dist.destroy_process_group()
        raise FakeGroupUnusable(
            f"torch {torch.__version__}: the fake process group leaves all-to-all outputs uninitialised, so "
            f"expert-parallel split sizes exchanged through it (world size {world_size}) would be garbage")
    log.debug("fake process group of %d ranks initialised (values_matter=%s)", world_size, values_matter)


@contextlib.contextmanager
def fake_process_group(world_size: int, *, values_matter: bool = True) -> Iterator[dist.ProcessGroup]:
    """:func:`init_fake_process_group` for the duration of a ``with`` block; the group is destroyed after it."""
    init_fake_process_group(world_size, values_matter=values_matter)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()
