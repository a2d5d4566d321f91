"""The ``bench`` command: run the sections, print each as a table, write ``--json``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from moe_passes.cli.errors import CLIError, check_writable
from moe_passes.cli.progress import Progress

log = logging.getLogger(__name__)


def bench_device(name: str, world_size: int) -> str:
    """``auto``: CUDA where torch sees at least ``world_size`` GPUs, else CPU; ``cuda`` without a GPU is an error."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() and torch.cuda.device_count() >= world_size else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: torch sees no CUDA device on this machine")
    if name == "cuda" and torch.cuda.device_count() < world_size:
        raise CLIError(f"--device cuda: {torch.cuda.device_count()} GPU(s) for --world-size {world_size}")
    return name


def cmd_bench(args: argparse.Namespace, progress: Progress) -> int:
    check_writable(args.json, "--json")
    progress("importing torch and the bench sections")
    from moe_passes.bench import OPT_IN, SECTIONS, BenchOptions, row_failure, run_section
    from moe_passes.cli.render import Writer, output_width, use_colour

    names = args.section or [n for n in SECTIONS if n not in OPT_IN]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise CLIError(f"unknown bench section(s) {unknown}; known: {sorted(SECTIONS)}")
    trace_dir = getattr(args, "trace", None)
    if trace_dir:
        try:
            Path(trace_dir).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CLIError(f"--trace {trace_dir}: cannot create the directory ({e.strerror or e})") from None
        check_writable(str(Path(trace_dir) / "timeline.png"), "--trace")
    variants = tuple(args.variants) if getattr(args, "variants", None) else None
    if variants:
        from moe_passes.bench.speed import plan

        try:
            plan(BenchOptions(variants=variants))
        except ValueError as e:
            raise CLIError(f"--variants: {e}") from None
    options = BenchOptions(quick=args.quick, world_size=args.world_size, steps=args.steps, warmup=args.warmup,
                           device=bench_device(args.device, args.world_size), trace_dir=trace_dir, variants=variants)
    progress(f"bench on {options.device}: {', '.join(names)} (world size {options.world_size}, {options.steps} steps, "
             f"{options.warmup} warm-up{', quick' if options.quick else ''})")
    out = Writer(sys.stdout, output_width(sys.stdout), use_colour(sys.stdout))
    results: dict[str, Any] = {}
    failed = 0
    for k, name in enumerate(names):
        try:
            with progress.phase(f"section {k + 1}/{len(names)}: {name}"):
                section = run_section(name, options)
        except Exception as e:  # one broken or missing section must not hide the others
            failed += 1
            results[name] = {"error": f"{type(e).__name__}: {e}"}
            out.line(f"{name}: unavailable", "bold")
            out.para(f"error: {type(e).__name__}: {e}", indent="  ")
            out.line()
            log.debug("section %s failed", name, exc_info=True)
            continue
        results[name] = section.as_dict()
        out.line(section.title, "bold")
        out.table(section.columns, [[row.get(col) for col in section.columns] for row in section.rows])
        for note in section.notes:
            out.para(note, style="dim")
        out.line()
        sys.stdout.flush()
        failures = [f for f in map(row_failure, section.rows) if f]
        if failures:  # the table shows each; the exit status and stderr say whether anything was measured
            every = len(failures) == len(section.rows)
            failed += every
            results[name]["failed_rows"] = len(failures)
            print(f"moe-passes: bench {name}: {'every' if every else f'{len(failures)} of'} {len(section.rows)} "
                  f"row(s) failed{' (nothing measured)' if every else ''}; first: {failures[0]}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({"options": asdict(options), "sections": results}, indent=2, default=str))
        progress(f"wrote {args.json}")
    return 1 if failed else 0
