"""The ``diff`` command: options checked, target resolved, sections computed, one format written."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from moe_passes.cli.diff import check_passes, compiled_sections, pipeline_order, pre_grad_sections
from moe_passes.cli.errors import CLIError, check_writable
from moe_passes.cli.progress import Progress


def init_fake_process_group(world_size: int, meta: bool = False) -> None:
    """A one-process fake group of ``world_size`` ranks for tracing EP targets (none for one rank, or when
    a group exists); a clear error where this torch's fake group cannot stand in for the peers (unless
    ``meta``: meta tensors never reach it)."""
    import torch.distributed as dist

    from moe_passes.harness.fake_group import FakeGroupUnusable
    from moe_passes.harness.fake_group import init_fake_process_group as init_group

    if world_size > 1 and not dist.is_initialized():
        try:
            init_group(world_size, values_matter=not meta)
        except FakeGroupUnusable as e:
            raise CLIError(f"{e}; use --meta (traces on the meta device), --world-size 1, or torch 2.13") from e


def cmd_diff(args: argparse.Namespace, progress: Progress) -> int:
    check_writable(args.output, "--output")
    progress("importing torch and the passes")
    from moe_passes.cli.targets import META_PRESETS, TargetError, resolve_target
    from moe_passes.config import DEFAULT_PASSES

    pass_names = tuple(args.passes) if args.passes else DEFAULT_PASSES
    num_chunks = args.num_chunks if args.num_chunks is not None else "auto"
    meta = args.meta
    if meta and args.stage != "pre_grad":
        raise CLIError(f"--meta traces without real tensors: only --stage pre_grad (got --stage {args.stage})")
    shape = META_PRESETS.get(args.target, {})
    if shape and args.stage != "pre_grad" and meta is None:
        raise CLIError(f"{args.target} is a real-shape preset traced on the meta device: only --stage pre_grad")
    world_size = args.world_size if args.world_size is not None else shape.get("world_size", 2)
    progress(f"checking passes: {', '.join(pass_names) or '(none)'}")
    check_passes(pass_names)
    init_fake_process_group(world_size, meta=bool(shape) if meta is None else bool(meta))
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # targets import from the working directory, as with python -m
    progress(f"building target {args.target}")
    try:
        target = resolve_target(args.target, layers=args.layers, meta=meta)
    except TargetError as e:
        raise CLIError(str(e)) from e
    if target.description:
        progress(target.description)
    pipeline = pipeline_order(pass_names)
    if args.stage == "pre_grad":
        sections = pre_grad_sections(target, pass_names, num_chunks, progress, args.diff)
    else:
        sections = compiled_sections(target, pass_names, num_chunks, args.stage, progress, args.diff)
    header: dict[str, Any] = {
        "target": args.target, "stage": args.stage, "passes": list(pass_names), "pipeline": pipeline, "num_chunks": num_chunks,
        "diff": args.diff, "world_size": world_size, "description": target.description, "meta": target.meta,
        "num_layers": target.num_layers, "total_layers": target.total_layers,
    }
    progress(f"rendering {len(sections)} section(s) as {args.format}")
    if args.format == "json":
        from moe_passes.cli.render import real_shape_lines

        payload = {**header, "sections": [s.as_dict() for s in sections]}
        if target.meta:
            payload["real_shape"] = real_shape_lines(header, sections)
        emit(json.dumps(payload, indent=2, default=str), args.output)
    elif args.format == "html":
        from moe_passes.cli.html import render_html

        emit(render_html(sections, header), args.output)
    else:
        from moe_passes.cli.render import output_width, render_text, use_colour

        if args.output:
            with open(args.output, "w") as f:
                render_text(f, sections, header, None, False)
        else:
            render_text(sys.stdout, sections, header, output_width(sys.stdout), use_colour(sys.stdout))
    if args.output:
        progress(f"wrote {args.output}")
    return 0


def emit(text: str, output: str | None) -> None:
    if output:
        Path(output).write_text(text)
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
