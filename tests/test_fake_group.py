"""The one-process fake EP group: handed out only where this torch's fake all-to-all can stand in."""

import pytest
import torch.distributed as dist

import moe_passes.harness.fake_group as fake_group
from moe_passes.harness.fake_group import FakeGroupUnusable, fake_process_group


def test_a_group_whose_all_to_all_leaves_outputs_unwritten_is_refused_where_values_matter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fake_group, "fake_all_to_all_fills_outputs", lambda: False)  # torch 2.11's behaviour
    with pytest.raises(FakeGroupUnusable, match="leaves all-to-all outputs uninitialised"):
        with fake_process_group(2):
            pass
    assert not dist.is_initialized()  # refused, and nothing left behind
    with fake_process_group(2, values_matter=False) as group:  # tracing alone never reads the values
        assert dist.get_world_size(group) == 2 and dist.get_rank(group) == 0
    assert not dist.is_initialized()


def test_a_second_group_is_an_error_not_a_silent_reuse() -> None:
    with fake_process_group(4, values_matter=False):
        with pytest.raises(RuntimeError, match="already initialised"):
            fake_group.init_fake_process_group(2)
        assert dist.get_world_size() == 4
    assert not dist.is_initialized()
