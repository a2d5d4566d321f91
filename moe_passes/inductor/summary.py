"""``BackendSummary``: what every pass did, over every graph a backend compiled (``DominoBackend.summary()``).

Modelled on ``torch._dynamo.explain``'s ``ExplainOutput``: a small dataclass
with ``as_dict()`` for programs and ``__str__`` for people. It reads only the
per-graph reports (``DominoBackend.reports``), so it never changes what was
compiled, and it can be built from reports saved elsewhere
(``summarize(reports)``).

Per pass: how many graphs it ran on, changed (applied), left unchanged
(skipped) or failed in, what it matched (with counts), why it skipped (with
counts) and its numeric stats summed over graphs. On top of that, one line per
product claim:

- ``domino_ep``: MoE regions chunked, the chunk count (N) and mode chosen per region;
- ``layerwise_aux_loss``: loss groups and layers rewritten, bytes of stacked
  ``[L*T, ...]`` tensors no longer in the graph (the tensor values the pass
  removed, at their size hints);
- ``async_offload``: router tensors moved to the host and their bytes;
- ``schedule_overlap`` (post-grad): all-to-alls issued early with compute between issue and wait.

Under regional compile one graph serves every layer of its kind, so a region
chunked in the block graph is chunked in every layer; counts here are per
graph, not per layer.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

__all__ = ["BackendSummary", "PassSummary", "summarize"]


@dataclass
class PassSummary:
    """One pass over every graph it ran on."""

    name: str
    stage: str  # "pre_grad" or "post_grad"
    graphs: int = 0  # graph runs (post-grad: forward and backward graphs count apart)
    applied: int = 0  # runs that changed the graph
    skipped: int = 0  # runs that left it unchanged
    failed: int = 0  # runs that raised or left an invalid graph (rolled back)
    matched: dict[str, int] = field(default_factory=dict)  # what it matched -> in how many graphs
    skip_reasons: dict[str, int] = field(default_factory=dict)  # "region: reason" -> how often
    totals: dict[str, float] = field(default_factory=dict)  # numeric stats summed over graphs

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "stage": self.stage,
            "graphs": self.graphs,
            "applied": self.applied,
            "skipped": self.skipped,
            "failed": self.failed,
            "matched": dict(self.matched),
            "skip_reasons": dict(self.skip_reasons),
            "totals": dict(self.totals),
        }


@dataclass
class BackendSummary:
    """What a backend did to every graph it compiled; ``str()`` is the short per-pass summary."""

    graphs: int
    passes: dict[str, PassSummary]
    regions_chunked: int = 0
    chunking: dict[str, str] = field(default_factory=dict)  # region -> "N chunks (mode): sizes"
    aux_groups_rewritten: int = 0
    aux_layers_rewritten: int = 0
    stacked_bytes_removed: int = 0
    router_tensors_offloaded: int = 0
    offloaded_bytes: int = 0
    all_to_alls: int = 0  # in the post-grad graphs the overlap scheduler saw
    all_to_alls_overlapped_before: int = 0
    all_to_alls_overlapped_after: int = 0
    canonical_errors: list[str] = field(default_factory=list)
    cache_notes: list[str] = field(default_factory=list)  # graphs whose post-grad passes a compile cache skipped

    def as_dict(self) -> dict[str, Any]:
        return {
            "graphs": self.graphs,
            "domino_ep": {"regions_chunked": self.regions_chunked, "chunking": dict(self.chunking)},
            "layerwise_aux_loss": {"groups_rewritten": self.aux_groups_rewritten,
                                   "layers_rewritten": self.aux_layers_rewritten,
                                   "stacked_bytes_removed": self.stacked_bytes_removed},
            "async_offload": {"router_tensors_offloaded": self.router_tensors_offloaded,
                              "offloaded_bytes": self.offloaded_bytes},
            "schedule_overlap": {"all_to_alls": self.all_to_alls,
                                 "overlapped_before": self.all_to_alls_overlapped_before,
                                 "overlapped_after": self.all_to_alls_overlapped_after},
            "canonical_errors": list(self.canonical_errors),
            "cache_notes": list(self.cache_notes),
            "passes": {name: p.as_dict() for name, p in self.passes.items()},
        }

    def __str__(self) -> str:
        lines = [f"moe_passes summary: {self.graphs} graph(s) compiled"]
        for name, p in self.passes.items():
            head = f"  {name} ({p.stage.replace('_', '-')}): applied in {p.applied} of {p.graphs}"
            if p.failed:
                head += f", failed in {p.failed}"
            detail = self._detail(name)
            lines.append(head + (f"; {detail}" if detail else ""))
            if not p.applied and p.skip_reasons:
                reason, count = max(p.skip_reasons.items(), key=lambda kv: kv[1])
                lines.append(f"    skipped ({count}x): {_clip(reason)}")
        for error in self.canonical_errors:
            lines.append(f"  canonical IR unavailable: {_clip(error)}")
        for note in self.cache_notes:
            lines.append(f"  {_clip(note, 240)}")
        return "\n".join(lines)

    def _detail(self, name: str) -> str:
        if name == "domino_ep":
            text = f"{self.regions_chunked} MoE region(s) chunked"
            if self.chunking:
                text += " (" + "; ".join(f"{r}: {c}" for r, c in self.chunking.items()) + ")"
            return text
        if name == "layerwise_aux_loss":
            return (f"{self.aux_layers_rewritten} layer(s) rewritten in {self.aux_groups_rewritten} loss group(s), "
                    f"{_bytes(self.stacked_bytes_removed)} of stacked tensors no longer in the graph")
        if name == "async_offload":
            return (f"{self.router_tensors_offloaded} router tensor(s) moved to host per call "
                    f"({_bytes(self.offloaded_bytes)})")
        if name == "schedule_overlap":
            return (f"{self.all_to_alls} all-to-all(s), overlapped with compute {self.all_to_alls_overlapped_before}"
                    f" -> {self.all_to_alls_overlapped_after}")
        return ""


def _clip(text: str, width: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # unreachable


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _add(summary: PassSummary, result: dict[str, Any]) -> None:
    summary.graphs += 1
    if result.get("error"):
        summary.failed += 1
    if result.get("changed"):
        summary.applied += 1
    else:
        summary.skipped += 1
    for m in result.get("matched", []):
        summary.matched[m] = summary.matched.get(m, 0) + 1
    for s in result.get("skipped", []):
        key = f"{s['region']}: {s['reason']}"
        summary.skip_reasons[key] = summary.skip_reasons.get(key, 0) + 1
    for key, value in result.get("stats", {}).items():
        if _number(value):
            summary.totals[key] = summary.totals.get(key, 0) + value


def summarize(reports: Iterable[dict[str, Any]]) -> BackendSummary:
    """Aggregate per-graph reports (``DominoBackend.reports``) into one ``BackendSummary``."""
    reports = list(reports)
    passes: dict[str, PassSummary] = {}
    out = BackendSummary(graphs=len(reports), passes=passes)
    errors: Counter[str] = Counter()
    for report in reports:
        if report.get("canonical_error"):
            errors[report["canonical_error"]] += 1
        for record in report.get("pre_grad", []):
            name = record["name"]
            _add(passes.setdefault(name, PassSummary(name, "pre_grad")), record)
            stats = record.get("stats", {})
            if not record.get("changed"):
                continue
            if name == "domino_ep":
                chunks = stats.get("chunks", {}) or {}
                out.regions_chunked += len(chunks)
                mode = stats.get("mode") or "token chunks"
                for region, sizes in chunks.items():
                    how = (stats.get("auto") or {}).get(region)
                    label = f"graph {report.get('graph')} {region}"
                    out.chunking[label] = f"{len(sizes)} chunks ({mode}{', auto: ' + how if how else ''})"
            elif name == "layerwise_aux_loss":
                out.aux_groups_rewritten += int(stats.get("groups_rewritten", 0))
                out.aux_layers_rewritten += int(stats.get("layers", 0))
                out.stacked_bytes_removed += int((record.get("removed_values") or {}).get("bytes", 0))
            elif name == "async_offload":
                out.router_tensors_offloaded += int(stats.get("offloaded", 0))
                out.offloaded_bytes += int(stats.get("offloaded_bytes", 0))
        for results in (report.get("post_grad") or {}).values():
            for result in results:
                name = result["name"]
                _add(passes.setdefault(name, PassSummary(name, "post_grad")), result)
                stats = result.get("stats", {})
                if name == "schedule_overlap" and "after" in stats:
                    out.all_to_alls += int(stats["after"].get("all_to_all", 0))
                    out.all_to_alls_overlapped_before += int(stats["before"].get("overlapped", 0))
                    out.all_to_alls_overlapped_after += int(stats["after"].get("overlapped", 0))
    out.canonical_errors = [f"{e} ({n} graph(s))" for e, n in errors.items()]
    for report in reports:
        for kind, note in (report.get("cache") or {}).items():
            out.cache_notes.append(f"graph {report.get('graph')} ({kind}): {note}")
    return out
