"""``moe-passes``: see what each pass did (``diff``) and measure it (``bench``).

``diff`` needs no real ranks: it initialises the *fake* process group (one
process pretending to be rank 0 of ``--world-size``), captures the target's
graphs, runs the passes and shows, per pass, a coloured unified diff of the
readable graph, a summary (nodes added/removed, collectives, waits, chunks,
matched MoE layers, skip reasons) and static estimates (peak live bytes,
bytes communicated). Stages after ``pre_grad`` compile the target twice with
Inductor (no passes vs the chosen passes) and diff the post-grad forward or
backward graphs or the final output code.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import Counter
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence
from unittest import mock

STAGES = ("pre_grad", "forward", "backward", "output_code")
FORMATS = ("text", "json", "html")


class CLIError(Exception):
    """A user error: printed as one clear line, exit status 2."""


@dataclass
class Section:
    """One before/after comparison: a pass on a graph, or baseline vs transformed at a later stage."""

    graph: int
    title: str
    pass_name: str | None
    before: str
    after: str
    result: dict[str, Any] | None = None
    estimate_before: dict[str, Any] | None = None
    estimate_after: dict[str, Any] | None = None
    summary: dict[str, Any] = field(default_factory=dict)

    def diff(self) -> str:
        return symbol_insensitive_diff(self.before, self.after, f"{self.title} (before)", f"{self.title} (after)")

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["diff"] = self.diff()
        return d


# ---------------------------------------------------------------- graph facts

_SYMBOL = re.compile(r"\b[us]\d+\b")


def symbol_insensitive_diff(before: str, after: str, from_name: str, to_name: str, context: int = 3) -> str:
    """Unified diff that matches lines up to symbol numbering.

    Normalised texts number unbacked symbols in order of appearance, so a pass
    that adds symbols early renumbers every later line; comparing lines with
    the numbers masked keeps the diff to what the pass really changed.
    """
    import difflib

    a, b = before.splitlines(), after.splitlines()
    masked_a = [_SYMBOL.sub("#", line) for line in a]
    masked_b = [_SYMBOL.sub("#", line) for line in b]
    out: list[str] = []
    for group in difflib.SequenceMatcher(None, masked_a, masked_b, autojunk=False).get_grouped_opcodes(context):
        if not out:
            out += [f"--- {from_name}", f"+++ {to_name}"]
        i1, i2, j1, j2 = group[0][1], group[-1][2], group[0][3], group[-1][4]
        out.append(f"@@ -{i1 + 1},{i2 - i1} +{j1 + 1},{j2 - j1} @@")
        for tag, a1, a2, b1, b2 in group:
            if tag == "equal":
                out += [" " + line for line in b[b1:b2]]
                continue
            out += ["-" + line for line in a[a1:a2]]
            out += ["+" + line for line in b[b1:b2]]
    return "\n".join(out) + ("\n" if out else "")


_COLLECTIVE = re.compile(r"_c10d_functional(?:_autograd)?\.(?!wait_tensor)\w+")
_WAIT = re.compile(r"_c10d_functional\.wait_tensor")
_ASSIGN = re.compile(r"^\s+(\w+)(?:\s*:\s*[^=]+)?\s*=\s*(.+?)\(", re.MULTILINE)


def text_facts(text: str) -> dict[str, int]:
    """Counts read off the readable graph / output code: comparable across any two texts."""
    return {
        "collectives": len(_COLLECTIVE.findall(text)),
        "waits": len(_WAIT.findall(text)),
        "lines": text.count("\n"),
    }


def _ops(text: str) -> Counter[str]:
    return Counter(m.group(2).strip() for m in _ASSIGN.finditer(text))


def summarize(section: Section) -> dict[str, Any]:
    before, after = text_facts(section.before), text_facts(section.after)
    ops_before, ops_after = _ops(section.before), _ops(section.after)
    summary: dict[str, Any] = {
        "nodes_added": sum((ops_after - ops_before).values()),
        "nodes_removed": sum((ops_before - ops_after).values()),
        "collectives": f"{before['collectives']} -> {after['collectives']}",
        "waits": f"{before['waits']} -> {after['waits']}",
    }
    result = section.result or {}
    stats = result.get("stats", {})
    chunks = stats.get("chunks")
    if isinstance(chunks, dict) and chunks:
        summary["chunks"] = ", ".join(f"{k}: {len(v) if isinstance(v, (list, tuple)) else v}" for k, v in chunks.items())
    elif chunks:
        summary["chunks"] = str(chunks)
    summary["matched"] = list(result.get("matched", []))
    summary["skipped"] = [f"{s['region']}: {s['reason']}" for s in result.get("skipped", [])]
    summary["changed"] = result.get("changed")
    for key in ("peak_live_bytes", "bytes_communicated"):
        if section.estimate_before and section.estimate_after:
            summary[key] = f"{section.estimate_before[key]} -> {section.estimate_after[key]}"
    return summary


# ---------------------------------------------------------------- running a target


def init_fake_process_group(world_size: int) -> None:
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if world_size < 1:
        raise CLIError(f"--world-size must be >= 1, got {world_size}")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)


def check_passes(names: Sequence[str]) -> None:
    """Unknown or unimportable passes fail before any compile, naming the pass."""
    from moe_passes.config import BackendConfig
    from moe_passes.fx.pass_manager import load_pass

    config = BackendConfig(passes=tuple(names))
    for name in names:
        load_pass(name, config)


def pre_grad_sections(target: Any, pass_names: Sequence[str], num_chunks: Any, progress: Any) -> list[Section]:
    """Capture the Dynamo graphs and run the passes one by one: no Inductor needed."""
    from moe_passes.config import BackendConfig
    from moe_passes.fx.capture import capture_graphs
    from moe_passes.fx.graph_text import graph_text
    from moe_passes.fx.memory import estimate_graph
    from moe_passes.fx.pass_manager import PassManager, load_pass

    config = BackendConfig(passes=tuple(pass_names), num_chunks=num_chunks)
    task = progress.add_task("capturing graphs (Dynamo)", total=None)
    graphs = capture_graphs(target.fn, *target.example_inputs)
    progress.update(task, description=f"captured {len(graphs)} graph(s)", total=1, completed=1)
    sections: list[Section] = []
    for index, captured in enumerate(graphs):
        for name in pass_names:
            task = progress.add_task(f"graph {index}: {name}", total=None)
            before_est = estimate_graph(captured.gm).as_dict()
            before_text = graph_text(captured.gm)
            (record,) = PassManager([load_pass(name, config)], graph_name=f"graph_{index}").run(captured.gm, captured.example_inputs)
            section = Section(
                index, f"graph {index} / {name}", name, before_text, record.after or graph_text(captured.gm),
                record.as_dict(), before_est, estimate_graph(captured.gm).as_dict(),
            )
            section.summary = summarize(section)
            sections.append(section)
            progress.update(task, total=1, completed=1)
    return sections


@contextmanager
def capture_output_code() -> Iterator[list[str]]:
    from torch._inductor.graph import GraphLowering

    codes: list[str] = []
    with mock.patch.object(GraphLowering, "save_output_code", codes.append):
        yield codes


def compile_target(target: Any, backend: Any) -> list[str]:
    """Compile forward and backward (eagerly lowered) through ``backend``; returns the output code."""
    import torch

    torch._dynamo.reset()
    with ExitStack() as stack:
        codes = stack.enter_context(capture_output_code())
        stack.enter_context(torch._dynamo.config.patch(capture_scalar_outputs=True))
        stack.enter_context(torch._inductor.config.patch(fx_graph_cache=False))
        stack.enter_context(torch._functorch.config.patch(enable_autograd_cache=False, force_non_lazy_backward_lowering=True))
        torch.compile(target.fn, backend=backend)(*target.example_inputs)
    torch._dynamo.reset()
    return codes


def compiled_sections(target: Any, pass_names: Sequence[str], num_chunks: Any, stage: str, progress: Any) -> list[Section]:
    """Baseline (no passes) vs transformed at a post-grad stage or in the output code."""
    from moe_passes.config import BackendConfig
    from moe_passes.fx.graph_text import normalize_output_code
    from moe_passes.inductor.backend import DominoBackend

    baseline = DominoBackend(BackendConfig(passes=(), num_chunks=num_chunks), keep_graphs=True)
    transformed = DominoBackend(BackendConfig(passes=tuple(pass_names), num_chunks=num_chunks), keep_graphs=True)
    task = progress.add_task("compiling without passes (Inductor)", total=None)
    base_codes = compile_target(target, baseline)
    progress.update(task, total=1, completed=1)
    task = progress.add_task(f"compiling with {', '.join(pass_names) or 'no passes'}", total=None)
    new_codes = compile_target(target, transformed)
    progress.update(task, total=1, completed=1)
    sections: list[Section] = []
    if stage == "output_code":
        for i, (a, b) in enumerate(zip(base_codes, new_codes)):
            kind = "forward" if i % 2 == 0 else "backward"
            section = Section(i // 2, f"graph {i // 2} / {kind} output code", None, normalize_output_code(a), normalize_output_code(b))
            section.summary = summarize(section)
            sections.append(section)
        return sections
    for base, new in zip(baseline.graphs, transformed.graphs):
        base_graphs = base.post_grad_graphs.get(stage, {})
        new_graphs = new.post_grad_graphs.get(stage, {})
        if not base_graphs or not new_graphs:
            continue
        pre = {r.name: r.result.as_dict() for r in new.pre_grad}
        section = Section(
            new.index, f"graph {new.index} / {stage}: no passes vs pre-grad passes", None,
            base_graphs["after"], new_graphs["before"],
            {"name": "pre-grad passes", "changed": any(r["changed"] for r in pre.values()),
             "matched": [m for r in pre.values() for m in r["matched"]],
             "stats": {k: v for r in pre.values() for k, v in r["stats"].items()},
             "skipped": [s for r in pre.values() for s in r["skipped"]]},
            base.post_grad_estimates.get(stage, {}).get("after"), new.post_grad_estimates.get(stage, {}).get("before"),
        )
        section.summary = summarize(section)
        sections.append(section)
        for result in new.post_grad.get(stage, []):
            post = Section(
                new.index, f"graph {new.index} / {stage} / {result.name}", result.name,
                new_graphs["before"], new_graphs["after"], result.as_dict(),
                new.post_grad_estimates.get(stage, {}).get("before"), new.post_grad_estimates.get(stage, {}).get("after"),
            )
            post.summary = summarize(post)
            sections.append(post)
    return sections


# ---------------------------------------------------------------- rendering


def _fmt_bytes(value: Any) -> str:
    """Exact below 1 MiB (small test models differ by a few bytes), else MiB/GiB."""
    if not isinstance(value, int):
        return str(value)
    if abs(value) < 2**20:
        return f"{value:,} B"
    if abs(value) < 2**30:
        return f"{value / 2**20:.1f} MiB"
    return f"{value / 2**30:.2f} GiB"


def render(console: Any, sections: list[Section], header: dict[str, Any]) -> None:
    from rich.panel import Panel
    from rich.rule import Rule
    from rich.syntax import Syntax
    from rich.table import Table

    console.print(Rule(f"moe-passes diff {header['target']}  stage={header['stage']}  passes={','.join(header['passes']) or '-'}"))
    for section in sections:
        console.print(Rule(section.title, style="cyan"))
        diff = section.diff()
        if diff:
            console.print(Syntax(diff, "diff", theme="ansi_dark", background_color="default", word_wrap=True))
        else:
            console.print("[dim](no change in this graph)[/dim]")
    table = Table(title="summary", show_lines=True)
    table.add_column("section", ratio=1, overflow="fold")
    for col in ("changed", "nodes +/-", "collectives", "waits"):
        table.add_column(col, no_wrap=True)
    table.add_column("chunks", ratio=1, overflow="fold")
    table.add_column("matched", ratio=1, overflow="fold")
    table.add_column("skipped", ratio=1, overflow="fold")
    for s in sections:
        m = s.summary
        table.add_row(
            s.title, str(m.get("changed", "")), f"+{m['nodes_added']} / -{m['nodes_removed']}", m["collectives"], m["waits"],
            m.get("chunks", ""), "\n".join(m.get("matched", [])), "\n".join(m.get("skipped", [])),
        )
    console.print(table)
    est = Table(title="static estimates (liveness over graph order; unbacked sizes: uniform routing)")
    for col in ("section", "peak live before", "peak live after", "communicated before", "communicated after", "guessed sizes"):
        est.add_column(col)
    for s in sections:
        if s.estimate_before and s.estimate_after:
            b, a = s.estimate_before, s.estimate_after
            est.add_row(
                s.title, _fmt_bytes(b["peak_live_bytes"]), _fmt_bytes(a["peak_live_bytes"]),
                _fmt_bytes(b["bytes_communicated"]), _fmt_bytes(a["bytes_communicated"]), str(a["unhinted_sizes"]),
            )
    if est.row_count:
        console.print(est)
    if not sections:
        console.print(Panel("no sections: the target produced no graph at this stage"))


# ---------------------------------------------------------------- commands


def cmd_diff(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from moe_passes.config import DEFAULT_PASSES
    from moe_passes.targets import resolve_target

    pass_names = tuple(args.passes) if args.passes else DEFAULT_PASSES
    num_chunks = args.num_chunks if args.num_chunks is not None else "auto"
    if isinstance(num_chunks, int) and num_chunks < 1:
        raise CLIError(f"--num-chunks must be a positive integer, got {num_chunks}")
    check_passes(pass_names)
    init_fake_process_group(args.world_size)
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # targets import from the working directory, as with python -m
    target = resolve_target(args.target)
    err = Console(stderr=True)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err, transient=True) as progress:
        if args.stage == "pre_grad":
            sections = pre_grad_sections(target, pass_names, num_chunks, progress)
        else:
            sections = compiled_sections(target, pass_names, num_chunks, args.stage, progress)
    header = {"target": args.target, "stage": args.stage, "passes": list(pass_names), "num_chunks": num_chunks}
    if args.format == "json":
        payload = json.dumps({**header, "sections": [s.as_dict() for s in sections]}, indent=2, default=str)
        _emit(payload, args.output)
        return 0
    if args.format == "html":
        console = Console(record=True, width=140, file=open("/dev/null", "w"))
        render(console, sections, header)
        _emit(console.export_html(), args.output)
        return 0
    if args.output:
        with open(args.output, "w") as f:
            render(Console(file=f, width=140, no_color=True, force_terminal=False), sections, header)
        return 0
    render(_console(), sections, header)
    return 0


def _console() -> Any:
    """Terminal width on a terminal; 160 columns when piped (unless COLUMNS says otherwise)."""
    from rich.console import Console

    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=160)
    return console


def _emit(text: str, output: str | None) -> None:
    if output:
        Path(output).write_text(text)
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")


def cmd_bench(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from moe_passes.bench import SECTIONS, BenchOptions, run_section

    names = args.section or list(SECTIONS)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise CLIError(f"unknown bench section(s) {unknown}; known: {sorted(SECTIONS)}")
    options = BenchOptions(quick=args.quick, world_size=args.world_size, steps=args.steps, warmup=args.warmup,
                           device=_bench_device(args.device))
    console = _console()
    results: dict[str, Any] = {}
    failed = 0
    for name in names:
        with console.status(f"bench {name} ..."):
            try:
                section = run_section(name, options)
            except Exception as e:  # one broken or missing section must not hide the others
                failed += 1
                results[name] = {"error": f"{type(e).__name__}: {e}"}
                table = Table(title=f"{name}: unavailable", title_style="bold red")
                table.add_column("error", style="red")
                table.add_row(f"{type(e).__name__}: {e}")
                console.print(table)
                continue
        results[name] = section.as_dict()
        table = Table(title=section.title)
        for col in section.columns:
            table.add_column(col)
        for row in section.rows:
            table.add_row(*(_cell(row.get(col)) for col in section.columns))
        console.print(table)
        for note in section.notes:
            console.print(f"[dim]{note}[/dim]")
    if args.json:
        Path(args.json).write_text(json.dumps({"options": asdict(options), "sections": results}, indent=2, default=str))
    return 1 if failed else 0


def _bench_device(name: str) -> str:
    """``auto`` is CUDA where torch sees a GPU, else CPU; asking for CUDA without one is an error, not a silent CPU run."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: torch sees no CUDA device on this machine")
    return name


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-passes", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    diff = sub.add_parser("diff", help="show what each pass does to a target's graphs")
    diff.add_argument("target", help="preset name (moe_stack, tiny, tiny-vl, ...) or package.module:function returning (model, example_inputs)")
    diff.add_argument("--stage", choices=STAGES, default="pre_grad")
    diff.add_argument("--pass", dest="passes", action="append", metavar="NAME", help="pass to run (repeatable; default: all)")
    diff.add_argument("--format", choices=FORMATS, default="text")
    diff.add_argument("--output", metavar="FILE")
    diff.add_argument("--num-chunks", type=int, metavar="N")
    diff.add_argument("--world-size", type=int, default=2, help="size of the fake process group (default 2)")
    diff.set_defaults(func=cmd_diff)
    bench = sub.add_parser("bench", help="side-by-side measurements (sections run real ranks)")
    bench.add_argument("--section", nargs="+", metavar="NAME")
    bench.add_argument("--quick", action="store_true")
    bench.add_argument("--json", metavar="FILE")
    bench.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                       help="auto: CUDA (NCCL) where available, else CPU (gloo)")
    bench.add_argument("--world-size", type=int, default=2, help="ranks for the speed section (default 2)")
    bench.add_argument("--steps", type=int, default=7, help="timed steps per variant (default 7)")
    bench.add_argument("--warmup", type=int, default=2, help="warm-up steps per variant, the first compiles (default 2)")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CLIError, ValueError) as e:  # bad input: unknown pass/preset, unimportable target, bad option
        print(f"moe-passes: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a pass or the compile failed: say which, without a wall of frames
        inner = getattr(e, "inner_exception", None) or e
        print(f"moe-passes: failed: {type(inner).__name__}: {inner}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
