"""The ``explain`` command: compile a target with the backend, run it once, print ``backend.explain()``.

Targets resolve as for ``diff`` (``targets.resolve_target``), on the same
one-process fake group of ``--world-size`` ranks. The target is compiled
with ``make_backend(passes=..., num_chunks=...)`` and called once (forward,
with the backward lowered at once so the post-grad passes report on it too),
with Inductor's and AOTAutograd's caches off so every pass runs in this
process. What it prints is the backend's own ``explain()``: per pass where it
applied and what it did, where it did not and why, with the setting to change
(graph breaks included).
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from moe_passes.cli.errors import CLIError, check_writable
from moe_passes.cli.progress import Progress


def compile_and_run(target: Any, backend: Any, capture_scalar_outputs: bool, progress: Progress) -> None:
    """``torch.compile(target.fn, backend=backend)(*example_inputs)`` once, every pass running in this process."""
    import torch

    torch._dynamo.reset()
    try:
        with ExitStack() as stack, progress.phase("compiling and running once (Dynamo, passes, Inductor)"):
            stack.enter_context(torch._dynamo.config.patch(capture_scalar_outputs=capture_scalar_outputs))
            stack.enter_context(torch._inductor.config.patch(fx_graph_cache=False))
            stack.enter_context(torch._functorch.config.patch(enable_autograd_cache=False, force_non_lazy_backward_lowering=True))
            torch.compile(target.fn, backend=backend)(*target.example_inputs)
    finally:
        torch._dynamo.reset()


def cmd_explain(args: argparse.Namespace, progress: Progress) -> int:
    check_writable(args.output, "--output")
    progress("importing torch and the passes")
    from moe_passes.cli.diff import check_passes
    from moe_passes.cli.diff_cmd import emit, init_fake_process_group
    from moe_passes.cli.targets import META_PRESETS, TargetError, resolve_target
    from moe_passes.config import DEFAULT_PASSES
    from moe_passes.inductor.backend import make_backend

    if args.target in META_PRESETS:
        raise CLIError(f"{args.target} is a real-shape preset (traced on the meta device, never run); explain compiles "
                       f"and runs its target: use a smaller preset, or `moe-passes diff {args.target}` for its graphs")
    pass_names = tuple(args.passes) if args.passes else DEFAULT_PASSES
    num_chunks = args.num_chunks if args.num_chunks is not None else "auto"
    world_size = args.world_size if args.world_size is not None else 2
    progress(f"checking passes: {', '.join(pass_names) or '(none)'}")
    check_passes(pass_names)
    try:
        backend = make_backend(num_chunks=num_chunks, passes=pass_names)
    except ValueError as e:
        raise CLIError(str(e)) from e
    init_fake_process_group(world_size)
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # targets import from the working directory, as with python -m
    progress(f"building target {args.target}")
    try:
        target = resolve_target(args.target, layers=args.layers)
    except TargetError as e:
        raise CLIError(str(e)) from e
    if target.description:
        progress(target.description)
    compile_and_run(target, backend, args.capture_scalar_outputs, progress)
    if args.format == "json":
        options = {"passes": list(pass_names), "num_chunks": num_chunks, "world_size": world_size,
                   "capture_scalar_outputs": args.capture_scalar_outputs}
        payload = {"target": args.target, "options": options, **backend.explain_dict()}
        emit(json.dumps(payload, indent=2, default=str), args.output)
    elif args.output:
        emit(backend.explain(), args.output)
    else:
        write_text(backend.explain())
    if args.output:
        progress(f"wrote {args.output}")
    return 0


def write_text(text: str) -> None:
    """``explain()``'s lines on stdout: pass headers bold on a terminal, long lines wrapped at the width."""
    from moe_passes.cli.render import Writer, output_width, use_colour

    out = Writer(sys.stdout, output_width(sys.stdout), use_colour(sys.stdout))
    for line in text.splitlines():
        body = line.lstrip(" ")
        out.para(body, indent=line[: len(line) - len(body)], style=None if line.startswith(" ") else "bold")
