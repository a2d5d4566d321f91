"""The argument parser: every option with its default, the pass names, no markup in ``--help``."""

from __future__ import annotations

import argparse
from typing import Any, Callable

from moe_passes.cli.textdiff import DIFF_MODES

FORMATS = ("text", "json", "html")
STAGES = ("pre_grad", "forward", "backward", "output_code")


class Parser(argparse.ArgumentParser):
    """An epilog computed when help is shown (listing presets imports torch: not on every run)."""

    def __init__(self, *args: Any, epilog_fn: Callable[[], str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.epilog_fn = epilog_fn

    def format_help(self) -> str:
        if self.epilog_fn is not None:
            self.epilog = self.epilog_fn()
        return super().format_help()


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("moe-passes")
    except PackageNotFoundError:
        return "unknown (not installed)"


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Real defaults shown after each option (not None/False flags); descriptions and epilogs keep their line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: {action.default})" if text else f"default: {action.default}"


def _pass_list() -> str:
    from moe_passes.config import DEFAULT_PASSES
    from moe_passes.registry import POST_GRAD_PASSES, PRE_GRAD_PASSES

    return (
        f"pre-grad passes: {', '.join(PRE_GRAD_PASSES)}\n"
        f"  default: {', '.join(DEFAULT_PASSES)}\n"
        f"post-grad passes (follow from the pre-grad ones): {', '.join(POST_GRAD_PASSES)}"
    )


def _sections() -> str:
    from moe_passes.bench import SECTION_HELP, SECTIONS

    width = max(map(len, SECTIONS))
    lines = [f"  {name:<{width}}  {SECTION_HELP.get(name, '')}".rstrip() for name in SECTIONS]
    return ("sections (--section NAME ...; default: all, in this order):\n" + "\n".join(lines) +
            "\n\nexit status: 0 every section measured; 1 a section failed, or every row of one did;\n"
            "  2 bad input (unknown section, unwritable --json, no GPU for --device cuda)\n")


def _presets() -> str:
    try:
        from moe_passes.models.interns1_vl.config import PRESETS

        return "moe_stack, " + ", ".join(PRESETS)
    except Exception:  # the reference model is optional for the CLI
        return "moe_stack"


DESCRIPTION = """\
moe-passes: see what each pass does to a model's graphs (diff), why it did or did not
apply where (explain), and measure it (bench).

diff needs no real ranks: it initialises a fake process group (one process
pretending to be rank 0 of --world-size), captures the target's graphs, runs
the passes and shows per pass a diff of the readable graph, a summary (nodes
added and removed, collectives, waits, chunks, matched MoE layers, skip
reasons) and static estimates (peak live bytes, bytes communicated).
Progress lines go to stderr (-q silences them)."""


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="moe-passes", description=DESCRIPTION, formatter_class=Formatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    common.add_argument("-v", "--verbose", action="store_true", help="INFO logs of moe_passes, and the traceback of an internal error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{diff,explain,bench}")

    diff = sub.add_parser(
        "diff", parents=[common], formatter_class=Formatter, help="show what each pass does to a target's graphs",
        description="Show what each pass does to a target's graphs, on one process (fake process group).",
        epilog_fn=lambda: _pass_list() + f"\n\npresets: {_presets()}\n"
        "  interns1-pro is traced at its real shape on the meta device (nothing allocated);\n"
        "  any other target can be with --meta.",
    )
    diff.add_argument("target", help="a preset name (see below), package.module:function or path/to/file.py:function "
                      "returning (model, example_inputs)")
    diff.add_argument("--stage", choices=STAGES, default="pre_grad",
                      help="pre_grad: passes on the Dynamo graph, no Inductor; "
                      "forward/backward/output_code: compile twice with Inductor and compare")
    diff.add_argument("--pass", dest="passes", nargs="+", action="append", metavar="NAME",
                      help="passes to run, in order (--pass a b or --pass a --pass b; default: the default pre-grad passes)")
    diff.add_argument("--format", choices=FORMATS, default="text",
                      help="text: coloured diff and tables; json: everything per section; html: a page, summary first")
    diff.add_argument("--diff", choices=DIFF_MODES, default="semantic",
                      help="semantic hides type annotations, frees and symbol renumbering; full shows every changed line")
    diff.add_argument("--output", metavar="FILE", help="write to FILE instead of stdout (checked before any work)")
    diff.add_argument("--num-chunks", type=positive_int, metavar="N", help="Domino chunks per MoE layer (default: auto)")
    diff.add_argument("--world-size", type=positive_int, metavar="N",
                      help="size of the fake process group (default: 2; 8 for interns1-pro)")
    diff.add_argument("--layers", type=positive_int, metavar="N",
                      help="decoder layers to build for a preset (default: all; 3 of 94 for interns1-pro)")
    diff.add_argument("--meta", action=argparse.BooleanOptionalAction, default=None,
                      help="trace on the meta device: real shapes, nothing allocated, pre_grad only (default: on for interns1-pro)")

    explain = sub.add_parser(
        "explain", parents=[common], formatter_class=Formatter, help="compile a target once and say per pass what applied where, "
        "and why not elsewhere", description="Compile a target with the backend, run it once on one process (fake process group),\n"
        "and print backend.explain(): per pass the graphs where it applied and what it did, the\n"
        "graphs where it did not with its reasons and what to change, and the graph breaks\n"
        "Dynamo took with the setting that removes each. Progress lines go to stderr (-q silences them).",
        epilog_fn=lambda: _pass_list() + f"\n\npresets: {_presets()} (not interns1-pro: real shape, never run)\n\n"
        "exit status: 0 explained; 1 internal error (a pass or the compile raised);\n"
        "  2 bad input (unknown pass or preset, unimportable target, bad option value, unwritable --output)\n",
    )
    explain.add_argument("target", help="a preset name (see below), package.module:function or path/to/file.py:function "
                         "returning (model, example_inputs)")
    explain.add_argument("--pass", dest="passes", nargs="+", action="append", metavar="NAME",
                         help="pre-grad passes to run (--pass a b or --pass a --pass b; default: the default pre-grad passes)")
    explain.add_argument("--num-chunks", type=positive_int, metavar="N", help="Domino chunks per MoE layer (default: auto)")
    explain.add_argument("--world-size", type=positive_int, metavar="N", help="size of the fake process group (default: 2)")
    explain.add_argument("--layers", type=positive_int, metavar="N", help="decoder layers to build for a preset (default: all)")
    explain.add_argument("--capture-scalar-outputs", action=argparse.BooleanOptionalAction, default=True,
                         help="torch._dynamo.config.capture_scalar_outputs while compiling (as the README's usage sets it; "
                         "--no-capture-scalar-outputs shows the graph breaks a .tolist() of split sizes causes without it)")
    explain.add_argument("--format", choices=("text", "json"), default="text",
                         help="text: backend.explain(); json: backend.explain_dict() with the options")
    explain.add_argument("--output", metavar="FILE", help="write to FILE instead of stdout (checked before any work)")

    bench = sub.add_parser(
        "bench", parents=[common], formatter_class=Formatter, help="side-by-side measurements (sections run real ranks)",
        description="Run benchmark sections side by side and print one table per section.",
        epilog_fn=_sections,
    )
    bench.add_argument("--section", nargs="+", metavar="NAME", help="sections to run (listed below; default: all)")
    bench.add_argument("--quick", action="store_true", help="smaller shapes and fewer variants")
    bench.add_argument("--json", metavar="FILE", help="write every section to FILE (checked before any work)")
    bench.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                       help="auto: CUDA with NCCL where torch sees at least --world-size GPUs, else CPU with gloo")
    bench.add_argument("--world-size", type=positive_int, default=2, metavar="N", help="ranks for the multi-rank sections")
    bench.add_argument("--steps", type=positive_int, default=7, metavar="N", help="timed steps per variant")
    bench.add_argument("--warmup", type=non_negative_int, default=2, metavar="N", help="warm-up steps per variant (the first compiles)")
    bench.add_argument("--trace", metavar="DIR",
                       help="speed section: write a Chrome trace of one step per variant and rank, and a timeline PNG "
                            "per model (compute vs all-to-all per rank), to DIR (created if missing)")
    bench.add_argument("--variants", nargs="+", metavar="MODEL/VARIANT",
                       help="speed section: only these rows, e.g. decoder/domino_layer_n2 (each model's inductor row, "
                            "the baseline, always runs)")
    return parser


def flatten_passes(passes: list[list[str]] | None) -> list[str] | None:
    """``--pass a b --pass c,d`` -> [a, b, c, d]."""
    if not passes:
        return None
    return [name for group in passes for item in group for name in item.split(",") if name]
