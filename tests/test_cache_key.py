"""Inductor's FX-graph cache key (``GraphPass.uuid``) covers everything a pass's behaviour depends on.

A pass's decisions live in the shared vocabulary (``moe_passes.ir``) and the pipeline as much as in its
own module: after an upgrade that changes only ``ir/``, a key built from the pass's module alone would
let Inductor serve the old graph. Every pass Inductor sees hashes the whole package."""

from __future__ import annotations

import shutil
from pathlib import Path

import moe_passes
from moe_passes.config import BackendConfig
from moe_passes.inductor.backend import make_backend
from moe_passes.pipeline.pass_base import package_digest

PACKAGE = Path(moe_passes.__file__).resolve().parent


def _copy(tmp_path: Path) -> Path:
    root = tmp_path / "moe_passes"
    shutil.copytree(PACKAGE, root, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def test_a_change_in_ir_changes_the_package_digest(tmp_path: Path) -> None:
    original = _copy(tmp_path / "a")
    same = _copy(tmp_path / "b")
    changed = _copy(tmp_path / "c")
    rows = changed / "ir" / "rows.py"
    rows.write_text(rows.read_text() + "\n# a behaviour change in the shared row analysis\n")
    assert package_digest(original) == package_digest(same), "the digest is a function of the sources"
    assert package_digest(changed) != package_digest(original)


def test_every_pass_inductor_sees_keys_on_the_package_digest(monkeypatch) -> None:
    backend = make_backend(passes=("layerwise_aux_loss", "domino_ep", "async_offload"))
    passes = [*backend.pre_grad_passes(), *backend.post_grad_passes()]
    assert {p.name for p in passes} >= {"layerwise_aux_loss", "domino_ep", "async_offload", "schedule_overlap"}
    before = {p.name: p.uuid() for p in passes}
    import moe_passes.pipeline.pass_base as pass_base

    monkeypatch.setattr(pass_base, "package_digest", lambda root=None: "another version of moe_passes/ir")
    after = {p.name: p.uuid() for p in passes}
    assert all(before[name] != after[name] for name in before), (before, after)


def test_the_config_is_part_of_the_key() -> None:
    a = make_backend(num_chunks=2).pre_grad_passes()
    b = make_backend(num_chunks=4).pre_grad_passes()
    assert [p.uuid() for p in a] != [p.uuid() for p in b]
    assert BackendConfig(num_chunks=2).digest() == BackendConfig(num_chunks=2).digest()
