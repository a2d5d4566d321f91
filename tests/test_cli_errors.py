"""Exit codes and messages: bad input exits 2 with one line naming the problem, before any work;
an internal error exits 1 and says it is one (traceback with --verbose)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from moe_passes.cli import main
from tests.cli_helpers import moe_passes_cli


def sequential() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 2), nn.ReLU())


def model_and_tensor() -> tuple[nn.Module, torch.Tensor]:
    return nn.Linear(2, 2), torch.randn(3, 2)


def too_many_inputs() -> tuple[nn.Module, list[torch.Tensor]]:
    return nn.Linear(2, 2), [torch.randn(3, 2), torch.randn(3, 2)]


def raises() -> None:
    raise RuntimeError("no weights here")


@pytest.mark.parametrize(
    "args, message",
    [
        (["diff", "moe_stack", "--pass", "nope"], "unknown pass(es) ['nope']; known passes:"),
        (["diff", "no_such_package.models:build"], "cannot import target module 'no_such_package.models'"),
        (["diff", "moe_passes.cli.targets:no_such_function"], "has no callable 'no_such_function'"),
        (["diff", "bogus-preset"], "unknown preset 'bogus-preset'"),
        (["diff", "tests.test_cli_errors:sequential"],
         "must return (model, example_inputs): a callable and the list or tuple of its positional inputs; got Sequential"),
        (["diff", "tests.test_cli_errors:model_and_tensor"], "example_inputs is a Tensor (wrap a single input as [x])"),
        (["diff", "tests.test_cli_errors:too_many_inputs"],
         "calling the model with its 2 example input(s) fails: too many positional arguments"),
        (["diff", "tests.test_cli_errors:raises"], "raises() raised RuntimeError: no weights here"),
        (["diff", "interns1-pro", "--stage", "forward"], "only --stage pre_grad"),
        (["bench", "--section", "nope"], "unknown bench section"),
        # a package.module spec without its function, or a path that is no file: the accepted forms, named
        (["diff", "no_such_package.models"], "or give package.module:function or path/to/file.py:function"),
        (["diff", "/no/such/dir/target.py:build"], "target file '/no/such/dir/target.py' does not exist"),
        (["diff", "models/my_model"], "looks like a path but names no .py file; a target is package.module:function, "
                                      "path/to/file.py:function, or a preset name"),
    ],
)
def test_bad_input_exits_2_with_one_line(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    # --world-size 1: no (fake) process group in this test process.
    extra = ["--world-size", "1"] if args[0] == "diff" else ["--device", "cpu"]
    assert main([*args, *extra, "-q"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("moe-passes: error: ") and err.count("\n") == 1, err


def test_preset_whose_experts_do_not_split_over_the_ranks_is_a_user_mistake(capsys: pytest.CaptureFixture[str]) -> None:
    """moe_stack has 4 experts: 3 ranks cannot share them. That is the user's choice of --world-size (exit 2, one
    line with the sizes that work), not an internal error (it was exit 1, "internal error in diff")."""
    import torch.distributed as dist

    assert main(["diff", "moe_stack", "--world-size", "3", "-q"]) == 2
    err = capsys.readouterr().err
    assert err == ("moe-passes: error: moe_stack has 4 experts, which 3 ranks cannot share evenly (expert parallelism): "
                   "use --world-size 1, 2 or 4\n"), err
    if dist.is_initialized():  # the fake group the command made for its 3 ranks
        dist.destroy_process_group()


FILE_TARGET = """\
import torch
from torch import nn


def make():
    torch.manual_seed(0)
    return nn.Linear(4, 4), [torch.randn(2, 4)]


def helper():
    return None
"""


def test_file_path_target_is_loaded_as_a_module(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "my_model.py").write_text(FILE_TARGET)
    out = tmp_path / "diff.json"
    assert main(["diff", f"{tmp_path}/my_model.py:make", "--world-size", "1", "-q", "--pass", "async_offload",
                 "--format", "json", "--output", str(out)]) == 0, capsys.readouterr().err
    import json

    data = json.loads(out.read_text())
    assert data["target"] == f"{tmp_path}/my_model.py:make" and len(data["sections"]) == 1


@pytest.mark.parametrize("suffix, message", [
    ("", "is a file without a function: name the one that returns (model, example_inputs)"),
    (":nope", "has no callable 'nope' (its functions: helper, make)"),
])
def test_file_path_target_without_its_function_names_the_form(tmp_path: Path, suffix: str, message: str,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "my_model.py"
    path.write_text(FILE_TARGET)
    assert main(["diff", f"{path}{suffix}", "--world-size", "1", "-q"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    if not suffix:
        assert f"as {path}:make_model; its functions: helper, make" in err, err


def test_target_with_a_syntax_error_exits_2(tmp_path: Path) -> None:
    (tmp_path / "broken_target.py").write_text("def build(:\n    pass\n")
    proc = moe_passes_cli("diff", "broken_target:build", env={"PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 2, proc.stderr
    assert "cannot import target module 'broken_target': SyntaxError: invalid syntax" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["diff", "moe_stack", "--output", "/no/such/dir/out.html"],
         "--output /no/such/dir/out.html: directory '/no/such/dir' does not exist"),
        (["diff", "moe_stack", "--output", "/proc/out.txt"], "--output /proc/out.txt: cannot write there"),
        (["bench", "--json", "/no/such/dir/b.json"], "--json /no/such/dir/b.json: directory '/no/such/dir' does not exist"),
    ],
)
def test_unwritable_output_is_found_before_any_work(args: list[str], message: str, capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from moe_passes.cli import diff_cmd

    def no_work(*_: object, **__: object) -> None:
        raise AssertionError("work started before the output path was checked")

    monkeypatch.setattr(diff_cmd, "check_passes", no_work)
    assert main([*args, "-q"]) == 2
    assert message in capsys.readouterr().err


def test_writability_probe_leaves_no_file(tmp_path: Path) -> None:
    from moe_passes.cli.errors import check_writable

    target = tmp_path / "new.json"
    check_writable(str(target), "--json")
    assert not target.exists()
    target.write_text("keep")
    check_writable(str(target), "--json")
    assert target.read_text() == "keep"


@pytest.mark.parametrize(
    "args, message",
    [
        (["bench", "--world-size", "0"], "argument --world-size: must be >= 1, got 0"),
        (["bench", "--steps", "0"], "argument --steps: must be >= 1, got 0"),
        (["bench", "--warmup", "-1"], "argument --warmup: must be >= 0, got -1"),
        (["diff", "moe_stack", "--num-chunks", "0"], "argument --num-chunks: must be >= 1, got 0"),
        (["diff", "moe_stack", "--world-size", "x"], "expected a positive integer, got 'x'"),
    ],
)
def test_bad_numbers_are_rejected_up_front(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_pass_option_takes_several_names_and_repeats() -> None:
    from moe_passes.cli.args import build_parser, flatten_passes

    args = build_parser().parse_args(["diff", "moe_stack", "--pass", "domino_ep", "async_offload", "--pass", "layerwise_aux_loss"])
    assert flatten_passes(args.passes) == ["domino_ep", "async_offload", "layerwise_aux_loss"]


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"moe-passes {version('moe-passes')}"
    with pytest.raises(SystemExit):
        main(["diff", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "`" not in text  # no RST markup
    from moe_passes.config import DEFAULT_PASSES
    from moe_passes.registry import POST_GRAD_PASSES, PRE_GRAD_PASSES

    assert all(name in text for name in [*PRE_GRAD_PASSES, *POST_GRAD_PASSES])
    assert "default: " + ", ".join(DEFAULT_PASSES) in text
    assert "(default: pre_grad)" in text and "(default: semantic)" in text and "interns1-pro" in text
    assert "(default: None)" not in text and "(default: False)" not in text
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    help_text = capsys.readouterr().out
    text = " ".join(help_text.split())
    assert "(default: 7)" in text and "(default: 2)" in text and "at least --world-size GPUs" in text
    from moe_passes.bench import SECTION_HELP, SECTIONS

    assert set(SECTION_HELP) == set(SECTIONS)
    for name in SECTIONS:  # each section on its own line, with what it measures
        assert re.search(rf"^  {name} +{re.escape(SECTION_HELP[name])}$", help_text, re.MULTILINE), (name, help_text)
    assert "exit status: 0" in text


def test_internal_error_is_reported_as_such_with_traceback_under_verbose(monkeypatch: pytest.MonkeyPatch,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from moe_passes.cli import diff_cmd

    def broken(*_: object, **__: object) -> None:
        raise ValueError("a pass tripped over its own feet")

    # A ValueError inside the work is not bad user input (it used to exit 2 as if it were).
    monkeypatch.setattr(diff_cmd, "pre_grad_sections", broken)
    assert main(["diff", "moe_stack", "--world-size", "1", "--pass", "async_offload"]) == 1
    err = capsys.readouterr().err
    assert re.search(r"moe-passes: internal error in diff \(at: .+\): ValueError: a pass tripped over its own feet", err), err
    assert "Traceback" not in err and "--verbose" in err
    assert main(["diff", "moe_stack", "--world-size", "1", "--pass", "async_offload", "--verbose", "-q"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "in broken" in err


@pytest.mark.parametrize("field, value", [("schedule_overlap", "yes"), ("strict", 1), ("verify", "no"), ("verify_rtol", -1.0),
                                          ("max_chunks_in_flight", True)])
def test_backend_options_are_type_checked(field: str, value: object) -> None:
    from moe_passes import make_backend

    with pytest.raises(ValueError, match=field):
        make_backend(**{field: value})


def test_readme_device_auto_claim_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--device auto`` is CUDA only with at least --world-size GPUs, as the README says."""
    from moe_passes.cli.bench_cmd import bench_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert bench_device("auto", 2) == "cpu" and bench_device("auto", 1) == "cuda"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert bench_device("auto", 2) == "cuda"



def test_fake_group_that_hallucinates_split_sizes_is_a_clear_error(monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """torch 2.11's fake process group leaves all-to-all outputs uninitialised (seen on the lent GPU
    machine: ``diff moe_stack`` then tried to allocate 8e15 bytes). Here (torch 2.13) the probe holds;
    where it does not, the command exits 2 naming the way out, and leaves no process group behind."""
    import torch.distributed as dist

    import moe_passes.harness.fake_group as fake_group

    with fake_group.fake_process_group(2):
        assert fake_group.fake_all_to_all_fills_outputs()
    monkeypatch.setattr(fake_group, "fake_all_to_all_fills_outputs", lambda: False)
    assert main(["diff", "moe_stack", "-q"]) == 2
    err = capsys.readouterr().err
    assert "fake process group leaves all-to-all outputs uninitialised" in err and "--meta" in err, err
    assert not dist.is_initialized()
