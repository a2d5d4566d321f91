"""``moe-passes diff``: what each pass does to a target's graphs.

Pre-grad: the Dynamo graphs are captured (no Inductor) and the passes run one
by one. Later stages compile the target twice with Inductor (no passes, then
the chosen passes) and compare the post-grad forward or backward graphs, or
the output code, identified by what each is (Inductor's ``is_backward``),
never by position.
"""

from __future__ import annotations

import logging
import re
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Sequence

from moe_passes.cli.counts import Counts, count_delta, graph_counts, output_code_counts
from moe_passes.cli.errors import CLIError
from moe_passes.cli.progress import Progress
from moe_passes.cli.textdiff import diff_stats, unified_diff

log = logging.getLogger(__name__)



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
    diff_mode: str = "semantic"

    @property
    def anchor(self) -> str:
        return re.sub(r"[^a-z0-9_]+", "-", self.title.lower()).strip("-")

    def diff(self) -> str:
        return unified_diff(self.before, self.after, f"{self.title} (before)", f"{self.title} (after)", self.diff_mode)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["diff"] = self.diff()
        d["anchor"] = self.anchor
        return d


_SOURCE_PREFIX = re.compile(r"L\['(?:self|fn|model)'\]\.")


def short_region(text: str) -> str:
    """``L['self'].layers.0`` -> ``layers.0`` anywhere in ``text`` (Dynamo's source prefix says nothing to a reader)."""
    return _SOURCE_PREFIX.sub("", text)


def summarize(section: Section, before: Counts | None, after: Counts | None) -> dict[str, Any]:
    """Counts from the graphs (or the output code's calls), the pass's result, the estimates."""
    summary: dict[str, Any] = (
        count_delta(before, after) if before is not None and after is not None
        else {"nodes_added": None, "nodes_removed": None, "collectives": "?", "waits": "?"}
    )
    removed, added = diff_stats(section.diff())
    summary["diff_lines"] = f"+{added} / -{removed}"
    result = section.result or {}
    stats = result.get("stats", {})
    chunks = stats.get("chunks")
    if isinstance(chunks, dict) and chunks:
        summary["chunks"] = ", ".join(f"{k}: {len(v) if isinstance(v, (list, tuple)) else v}" for k, v in chunks.items())
    elif chunks:
        summary["chunks"] = str(chunks)
    summary["matched"] = list(result.get("matched", []))
    summary["skipped"] = [f"{s['region']}: {s['reason']}" for s in result.get("skipped", [])]
    changed = result.get("changed")
    summary["changed"] = (section.before != section.after) if changed is None else bool(changed)
    for key in ("peak_live_bytes", "bytes_communicated"):
        if section.estimate_before and section.estimate_after:
            summary[key] = f"{section.estimate_before[key]} -> {section.estimate_after[key]}"
    return summary


# ---------------------------------------------------------------- pre-grad


def check_passes(names: Sequence[str]) -> None:
    """Unknown or unimportable passes fail before any compile, naming the pass."""
    from moe_passes.config import BackendConfig
    from moe_passes.pipeline.manager import load_pass

    try:
        config = BackendConfig(passes=tuple(names))
        for name in names:
            load_pass(name, config)
    except ValueError as e:
        raise CLIError(str(e)) from e


def _ordered_passes(pass_names: Sequence[str], config: Any) -> list[Any]:
    """The passes in the order the backend runs them (the declared pipeline), not the order listed."""
    from moe_passes.pipeline.manager import PassManager, load_pass

    return list(PassManager([load_pass(name, config) for name in pass_names]).passes)


def pipeline_order(pass_names: Sequence[str]) -> list[str]:
    from moe_passes.config import BackendConfig

    return [p.name for p in _ordered_passes(pass_names, BackendConfig(passes=tuple(pass_names)))]


def _to_pass_ir(graph_pass: Any, gm: Any, example_inputs: Sequence[Any], progress: Progress, label: str) -> Any:
    """Re-trace to the canonical ATen IR before the first pass that runs on it, as the pass manager does."""
    if getattr(graph_pass, "ir", "torch") != "aten":
        return gm
    from moe_passes.ir.canonical import canonicalize, is_canonical

    if is_canonical(gm):
        return gm
    progress(f"{label}: re-tracing to the canonical ATen IR (for {graph_pass.name})")
    canon = canonicalize(gm, example_inputs)
    return canon.gm if canon.canonical else gm


def pre_grad_sections(target: Any, pass_names: Sequence[str], num_chunks: Any, progress: Progress, diff_mode: str) -> list[Section]:
    """Capture the Dynamo graphs and run the passes one by one, in pipeline order: no Inductor needed.

    Each section compares the graph the pass received with the graph it left,
    in the IR the pass ran on (a pass declaring ``ir = "aten"`` sees the
    canonical re-trace; the re-trace itself is not shown as the pass's change).
    """
    from moe_passes.config import BackendConfig
    from moe_passes.cost.memory import estimate_graph
    from moe_passes.ir.graph_text import graph_text
    from moe_passes.pipeline.manager import PassManager

    config = BackendConfig(passes=tuple(pass_names), num_chunks=num_chunks)
    ordered = _ordered_passes(pass_names, config)
    if [p.name for p in ordered] != list(pass_names):
        progress(f"pipeline order: {', '.join(p.name for p in ordered)} (declared by the passes)")
    with progress.phase("capturing graphs (Dynamo)" + (" on the meta device" if target.meta else "")):
        if target.meta:
            from moe_passes.cli.meta_capture import capture_graphs_meta

            graphs = capture_graphs_meta(target.fn, *target.example_inputs)
        else:
            from moe_passes.harness.capture import capture_graphs

            graphs = capture_graphs(target.fn, *target.example_inputs)
    progress(f"captured {len(graphs)} graph(s): {', '.join(str(len(g.gm.graph.nodes)) + ' nodes' for g in graphs)}")
    sections: list[Section] = []
    for index, captured in enumerate(graphs):
        current = captured.gm
        for j, graph_pass in enumerate(ordered):
            label = f"graph {index + 1}/{len(graphs)}: pass {j + 1}/{len(ordered)} {graph_pass.name}"
            current = _to_pass_ir(graph_pass, current, captured.example_inputs, progress, label)
            progress(label)
            before_est = estimate_graph(current).as_dict()
            before_text, before_counts = graph_text(current), graph_counts(current)
            run = PassManager([graph_pass], graph_name=f"graph_{index}").apply(current, captured.example_inputs)
            (record,) = run.records
            current = run.gm
            section = Section(
                index, f"graph {index} / {graph_pass.name}", graph_pass.name, before_text, graph_text(current),
                record.as_dict(), before_est, estimate_graph(current).as_dict(), diff_mode=diff_mode,
            )
            section.summary = summarize(section, before_counts, graph_counts(current))
            sections.append(section)
    return sections


# ---------------------------------------------------------------- compiled stages


@contextmanager
def inductor_hooks(progress: Progress, label: str, codes: list[tuple[str, str]]) -> Iterator[None]:
    """Progress per Inductor lowering, and each output code recorded with what it is (forward/backward)."""
    from unittest import mock

    from torch._inductor.graph import GraphLowering

    run, to_module = GraphLowering.run, GraphLowering._compile_to_module_lines

    def kind(graph: Any) -> str:
        return "backward" if getattr(graph, "is_backward", False) else "forward"

    def run_hook(self: Any, *args: Any) -> Any:
        progress(f"{label}: Inductor lowering the {kind(self)} graph")
        return run(self, *args)

    def to_module_hook(self: Any, wrapper_code: Any) -> Any:
        codes.append((kind(self), wrapper_code.value))
        return to_module(self, wrapper_code)

    with mock.patch.object(GraphLowering, "run", run_hook), mock.patch.object(GraphLowering, "_compile_to_module_lines", to_module_hook):
        yield


def counting_backend(config: Any, counts: dict[tuple[int, str, str], Counts], progress: Progress, label: str) -> Any:
    """A ``DominoBackend`` keeping graph texts that also counts the post-grad graphs' nodes (from the graph)."""
    from moe_passes.inductor.backend import DominoBackend, PostGradPipeline

    class CountingPipeline(PostGradPipeline):
        def _keep(self, kind: str, when: str, gm: Any) -> None:
            super()._keep(kind, when, gm)
            counts[(self.report.index, kind, when)] = graph_counts(gm)

    class CountingBackend(DominoBackend):
        def __call__(self, gm: Any, example_inputs: list[Any]) -> Callable[..., Any]:
            progress(f"{label}: graph {len(self.graphs)}: pre-grad passes, then AOT autograd (forward + backward)")
            return super().__call__(gm, example_inputs)

        def inductor_patches(self, report: Any) -> dict[str, Any]:
            patches = super().inductor_patches(report)
            pipe = patches.get("post_grad_custom_post_pass")
            if isinstance(pipe, PostGradPipeline):
                patches["post_grad_custom_post_pass"] = CountingPipeline(pipe.passes, report, pipe.keep_graphs)
            return patches

    return CountingBackend(config, keep_graphs=True)


def compile_target(target: Any, backend: Any, progress: Progress, label: str) -> list[tuple[str, str]]:
    """Compile forward and backward (eagerly lowered) through ``backend``; returns (kind, output code) pairs."""
    import torch

    if target.meta:
        raise CLIError("stages after pre_grad compile with Inductor and need real tensors; use --stage pre_grad with --meta")
    torch._dynamo.reset()
    codes: list[tuple[str, str]] = []
    with ExitStack() as stack, progress.phase(f"{label}: compiling (Inductor)"):
        stack.enter_context(inductor_hooks(progress, label, codes))
        stack.enter_context(torch._dynamo.config.patch(capture_scalar_outputs=True))
        stack.enter_context(torch._inductor.config.patch(fx_graph_cache=False))
        stack.enter_context(torch._functorch.config.patch(enable_autograd_cache=False, force_non_lazy_backward_lowering=True))
        torch.compile(target.fn, backend=backend)(*target.example_inputs)
    torch._dynamo.reset()
    return codes


def output_code_sections(base_codes: list[tuple[str, str]], new_codes: list[tuple[str, str]], diff_mode: str) -> list[Section]:
    """Pair the i-th forward (backward) code of one compile with the i-th of the other."""
    from moe_passes.ir.graph_text import normalize_output_code

    sections: list[Section] = []
    for kind in ("forward", "backward"):
        base = [c for k, c in base_codes if k == kind]
        new = [c for k, c in new_codes if k == kind]
        if len(base) != len(new):
            log.warning("%d %s output codes without passes, %d with: comparing the first %d", len(base), kind, len(new),
                        min(len(base), len(new)))
        for i, (a, b) in enumerate(zip(base, new)):
            section = Section(i, f"graph {i} / {kind} output code", None, normalize_output_code(a), normalize_output_code(b),
                              diff_mode=diff_mode)
            section.summary = summarize(section, output_code_counts(a), output_code_counts(b))
            sections.append(section)
    return sorted(sections, key=lambda s: s.graph)


def compiled_sections(target: Any, pass_names: Sequence[str], num_chunks: Any, stage: str, progress: Progress,
                      diff_mode: str) -> list[Section]:
    """Baseline (no passes) vs transformed at a post-grad stage or in the output code."""
    from moe_passes.config import BackendConfig

    counts: dict[tuple[int, str, str], Counts] = {}
    base_counts: dict[tuple[int, str, str], Counts] = {}
    baseline = counting_backend(BackendConfig(passes=(), num_chunks=num_chunks), base_counts, progress, "without passes")
    transformed = counting_backend(BackendConfig(passes=tuple(pass_names), num_chunks=num_chunks), counts, progress, "with passes")
    base_codes = compile_target(target, baseline, progress, "without passes")
    new_codes = compile_target(target, transformed, progress, f"with {', '.join(pass_names) or 'no passes'}")
    if stage == "output_code":
        return output_code_sections(base_codes, new_codes, diff_mode)
    sections: list[Section] = []
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
            diff_mode=diff_mode,
        )
        section.summary = summarize(section, base_counts.get((base.index, stage, "after")), counts.get((new.index, stage, "before")))
        sections.append(section)
        for result in new.post_grad.get(stage, []):
            post = Section(
                new.index, f"graph {new.index} / {stage} / {result.name}", result.name,
                new_graphs["before"], new_graphs["after"], result.as_dict(),
                new.post_grad_estimates.get(stage, {}).get("before"), new.post_grad_estimates.get(stage, {}).get("after"),
                diff_mode=diff_mode,
            )
            post.summary = summarize(post, counts.get((new.index, stage, "before")), counts.get((new.index, stage, "after")))
            sections.append(post)
    return sections
