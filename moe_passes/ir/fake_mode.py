"""Running a graph again on fake tensors: which fake mode its inputs share, and what a re-run enters.

Several analyses re-run a graph in the fake mode it was traced in (shape re-propagation after a
pass, autograd's facts, the re-trace's gradient-path check). They find that mode and enter it here,
in one way: the re-run may create fresh unbacked symbols (``.item()``, ``.tolist()``), which the
shape env is told to ignore.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from typing import Any, Iterable

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

log = logging.getLogger(__name__)


def single_fake_mode(values: Iterable[Any]) -> FakeTensorMode | None:
    """The one fake mode the fake tensors among ``values`` belong to; None when there are none or several."""
    modes = {id(v.fake_mode): v.fake_mode for v in values if isinstance(v, FakeTensor)}
    return next(iter(modes.values())) if len(modes) == 1 else None


def enter_fake_rerun(stack: ExitStack, mode: FakeTensorMode, grad: bool = False) -> None:
    """Enter, on ``stack``, ``mode`` with its shape env ignoring the fresh unbacked symbols a re-run
    creates; ``grad``: with grad enabled too (a re-run that autograd must record)."""
    stack.enter_context(mode)
    if mode.shape_env is not None:
        stack.enter_context(mode.shape_env.ignore_fresh_unbacked_symbols())
    if grad:
        stack.enter_context(torch.enable_grad())
