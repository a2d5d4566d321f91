"""A graph re-runs in the one fake mode its inputs share; mixed or missing modes are no mode at all."""

from contextlib import ExitStack

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from moe_passes.ir.fake_mode import enter_fake_rerun, single_fake_mode


def test_the_shared_mode_is_found_and_mixed_or_absent_modes_are_refused() -> None:
    a, b = FakeTensorMode(), FakeTensorMode()
    x, y = a.from_tensor(torch.ones(2)), a.from_tensor(torch.ones(3))
    assert single_fake_mode([x, 3, None, y]) is a
    assert single_fake_mode([x, b.from_tensor(torch.ones(2))]) is None
    assert single_fake_mode([torch.ones(2), 1.0]) is None


def test_a_rerun_may_create_unbacked_symbols_and_records_autograd_when_asked() -> None:
    mode = FakeTensorMode(shape_env=ShapeEnv(allow_scalar_outputs=True))
    w = mode.from_tensor(torch.ones(4)).requires_grad_()
    with ExitStack() as stack, torch.no_grad():
        enter_fake_rerun(stack, mode, grad=True)
        n = (w > 0).sum().item()  # a fresh unbacked symbol, ignored rather than reported as unbound
        assert isinstance(n, torch.SymInt) and (w * 2).requires_grad
    with ExitStack() as stack, torch.no_grad():
        enter_fake_rerun(stack, mode)
        assert not (w * 2).requires_grad
