"""Packaging: the wheel installs one top-level name, ``moe_passes``; the reference model is a plain
subpackage, ``moe_passes.models.interns1_vl``, with no path tricks."""

from __future__ import annotations

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_in_the_tree_is_listed_and_nothing_else():
    setuptools = _pyproject()["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    in_tree = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "moe_passes").rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    assert listed == in_tree, f"pyproject lists {sorted(listed - in_tree)} not in the tree, misses {sorted(in_tree - listed)}"
    assert all(name.startswith("moe_passes") for name in listed), "only the moe_passes namespace is installed"
    assert "package-dir" not in setuptools, "packages live where their names say: no package-dir mapping"


def _imports_top_level_models(text: str) -> bool:
    return any(line.lstrip().startswith(("from models.", "import models.", "from models ", "import models "))
               for line in text.splitlines())


def test_no_top_level_models_package_and_one_import_path():
    assert not (ROOT / "models").exists(), "the reference model lives in moe_passes/models/, not a top-level models/"
    import moe_passes.models as models_pkg
    import moe_passes.models.interns1_vl as ref

    assert Path(ref.__file__).resolve().parent == (ROOT / "moe_passes" / "models" / "interns1_vl").resolve()
    assert list(models_pkg.__path__) == [str(ROOT / "moe_passes" / "models")], "no __path__ extension"
    offenders = [
        str(p.relative_to(ROOT))
        for folder in ("moe_passes", "tests", "examples")
        for p in (ROOT / folder).rglob("*.py")
        if p.resolve() != Path(__file__).resolve() and _imports_top_level_models(p.read_text())
    ]
    assert not offenders, f"import the reference model as moe_passes.models.interns1_vl: {offenders}"


def test_the_wheel_holds_only_the_moe_passes_namespace(tmp_path):
    """Build the wheel as pip would (no downloads: the environment's setuptools) and read its names."""
    import subprocess
    import sys
    import zipfile

    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT), "-w", str(tmp_path)],
        check=True, timeout=300, capture_output=True,
    )
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"moe_passes", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}
    assert "moe_passes/models/interns1_vl/moe.py" in names
    assert "moe_passes/ops/offload.py" in names
