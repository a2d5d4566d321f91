"""``moe-passes``: see what each pass did (``diff``), why it applied where (``explain``) and measure it (``bench``).

Modules, one concern each: ``args`` (the parser), ``diff`` (sections:
capture, passes, compiled stages), ``textdiff`` (semantic/full diffs),
``counts`` (node and call counts), ``render``/``tables``/``html`` (output),
``progress`` (stderr progress lines), ``meta_capture`` (real shapes on the
meta device), ``bench_cmd``, ``diff_cmd`` and ``explain_cmd`` (the commands),
``errors``.

Exit status: 0 success; 1 a bench section failed (it raised, or every one of
its rows failed) or an internal error (a pass or the compile raised: "internal
error", traceback with --verbose); 2 bad input, one line saying the fix
(unknown pass, preset or section, unimportable target, a target breaking the
``(model, example_inputs)`` contract, a preset whose experts do not split over
--world-size, unwritable output, bad option value).
"""

from __future__ import annotations

import sys
import traceback
from typing import Sequence

from moe_passes.cli.errors import CLIError

__all__ = ["CLIError", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    from moe_passes.cli.args import build_parser, flatten_passes
    from moe_passes.cli.logs import cli_logging
    from moe_passes.cli.progress import Progress

    args = build_parser().parse_args(argv)
    if getattr(args, "passes", None) is not None:
        args.passes = flatten_passes(args.passes)
    progress = Progress(quiet=args.quiet)
    try:
        with cli_logging(args.verbose), progress.from_logger():
            if args.command == "diff":
                from moe_passes.cli.diff_cmd import cmd_diff

                return cmd_diff(args, progress)
            if args.command == "explain":
                from moe_passes.cli.explain_cmd import cmd_explain

                return cmd_explain(args, progress)
            from moe_passes.cli.bench_cmd import cmd_bench

            return cmd_bench(args, progress)
    except CLIError as e:  # the user's input: one line, status 2
        print(f"moe-passes: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moe-passes: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a pass, the compile or this program failed: say it is ours, not the user's
        inner = getattr(e, "inner_exception", None) or e
        where = f" (at: {progress.last})" if progress.last else ""
        print(f"moe-passes: internal error in {args.command}{where}: {type(inner).__name__}: {inner}", file=sys.stderr)
        if args.verbose:
            traceback.print_exception(e, file=sys.stderr)
        else:
            print("moe-passes: run again with --verbose for the traceback", file=sys.stderr)
        return 1
