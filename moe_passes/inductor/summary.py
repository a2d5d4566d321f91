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

Graph breaks: the summary lists the graph breaks Dynamo took while the backend
compiled (reason -> count, from each report's ``graph_breaks``), each with the
Dynamo setting that removes it where one does (a ``.tolist()`` or ``.item()``
-> ``capture_scalar_outputs``; ``bincount``, ``nonzero``, ``unique`` ->
``capture_dynamic_output_shape_ops``). A break between the dispatch and the
combine all-to-all of an MoE block leaves Domino one half per graph, and its
skip reasons then read as if the model were unsupported ("token all-to-all
without a mirrored combine all-to-all", "no row gather ... feeds the dispatch
all-to-all", or an all-to-all and no candidate region); when breaks were
recorded, the summary says that a break probably split the MoE block and
names the fix.

``explain(summary)`` (``DominoBackend.explain()``) renders the same data per
pass and graph: what applied where, and where a pass did not apply, its
reasons verbatim and what to change (``explain_dict`` is the same as data).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

from moe_passes.inductor.graph_breaks import splits_moe_block

__all__ = ["BackendSummary", "PassOutcome", "PassSummary", "explain", "explain_dict", "summarize"]


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
class PassOutcome:
    """One pass on one graph (post-grad: on one of its AOT graphs): what it did, or why not and what to change."""

    name: str
    stage: str  # "pre_grad" or "post_grad"
    graph: int
    kind: str | None  # post-grad: "forward" / "backward" / "inference"
    applied: bool
    failed: bool
    did: str  # what it did here ("" when it did not apply)
    trigger: str | None  # what made it look at the graph (pre-grad passes), None: nothing to do there
    reasons: list[str] = field(default_factory=list)  # "region: reason", verbatim from the pass
    fixes: list[str] = field(default_factory=list)  # what to change, where there is something


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
    graph_breaks: dict[str, int] = field(default_factory=dict)  # reason -> how often Dynamo broke the graph there
    graph_break_hints: dict[str, str] = field(default_factory=dict)  # reason -> the setting that removes it
    graph_break_torch_hints: dict[str, str] = field(default_factory=dict)  # reason -> torch's own hint
    graph_break_where: dict[str, list[str]] = field(default_factory=dict)  # reason -> where in the user's code
    moe_split: str | None = None  # a graph break probably split an MoE block: which graphs, what to change
    outcomes: list[PassOutcome] = field(default_factory=list)  # per pass and graph (``explain``)

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
            "graph_breaks": dict(self.graph_breaks),
            "graph_break_hints": dict(self.graph_break_hints),
            "graph_break_where": {r: list(w) for r, w in self.graph_break_where.items()},
            "moe_split": self.moe_split,
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
        if self.graph_breaks:
            lines.append(f"  graph breaks: {sum(self.graph_breaks.values())} (Dynamo ended a graph there and started another)")
            for reason, count in self.graph_breaks.items():
                lines.append(f"    {count}x {_clip(reason)}")
                lines.extend(f"      at {_clip(w)}" for w in self.graph_break_where.get(reason, []))
                if reason in self.graph_break_hints:
                    lines.append(f"      fix: {self.graph_break_hints[reason]}")
        if self.moe_split:
            lines.append(f"  {self.moe_split}")
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
        graph = report.get("graph", 0)
        if report.get("canonical_error"):
            errors[report["canonical_error"]] += 1
        for record in report.get("pre_grad", []):
            name = record["name"]
            _add(passes.setdefault(name, PassSummary(name, "pre_grad")), record)
            out.outcomes.append(_outcome(record, "pre_grad", graph, None))
            stats = record.get("stats", {})
            if not record.get("changed"):
                continue
            if name == "domino_ep":
                chunks = stats.get("chunks", {}) or {}
                out.regions_chunked += len(chunks)
                for region, how in _chunking(stats).items():
                    out.chunking[f"graph {graph} {region}"] = how
            elif name == "layerwise_aux_loss":
                out.aux_groups_rewritten += int(stats.get("groups_rewritten", 0))
                out.aux_layers_rewritten += int(stats.get("layers", 0))
                out.stacked_bytes_removed += int((record.get("removed_values") or {}).get("bytes", 0))
            elif name == "async_offload":
                out.router_tensors_offloaded += int(stats.get("offloaded", 0))
                out.offloaded_bytes += int(stats.get("offloaded_bytes", 0))
        for kind, results in (report.get("post_grad") or {}).items():
            for result in results:
                name = result["name"]
                _add(passes.setdefault(name, PassSummary(name, "post_grad")), result)
                out.outcomes.append(_outcome(result, "post_grad", graph, kind))
                stats = result.get("stats", {})
                if name == "schedule_overlap" and "after" in stats:
                    out.all_to_alls += int(stats["after"].get("all_to_all", 0))
                    out.all_to_alls_overlapped_before += int(stats["before"].get("overlapped", 0))
                    out.all_to_alls_overlapped_after += int(stats["after"].get("overlapped", 0))
        for brk in report.get("graph_breaks") or []:
            reason = brk["reason"]
            out.graph_breaks[reason] = out.graph_breaks.get(reason, 0) + int(brk.get("count", 1))
            if brk.get("hint"):
                out.graph_break_hints[reason] = brk["hint"]
            if brk.get("torch_hint"):
                out.graph_break_torch_hints[reason] = brk["torch_hint"]
            if brk.get("where") and brk["where"] not in out.graph_break_where.setdefault(reason, []):
                out.graph_break_where[reason].append(brk["where"])
    out.graph_break_where = {r: w for r, w in out.graph_break_where.items() if w}
    out.canonical_errors = [f"{e} ({n} graph(s))" for e, n in errors.items()]
    for report in reports:
        for kind, note in (report.get("cache") or {}).items():
            out.cache_notes.append(f"graph {report.get('graph')} ({kind}): {note}")
    _hint_outcomes(out)
    return out


# ---------------------------------------------------------------- per pass and graph (explain)


def _chunking(stats: dict[str, Any]) -> dict[str, str]:
    """Domino's regions in one graph -> "N chunks (mode, auto: why N)"."""
    modes = stats.get("modes") or {}
    out = {}
    for region, sizes in (stats.get("chunks", {}) or {}).items():
        how = (stats.get("auto") or {}).get(region)
        why = modes.get(region, "")
        mode = "whole-layer micro-batches" if why.startswith("layer:") else "token chunks"
        fallback = f", {why.split(': ', 1)[1]}" if why.startswith("moe") else ""
        out[region] = f"{len(sizes)} chunks ({mode}{fallback}{', auto: ' + how if how else ''})"
    return out


def _did(result: dict[str, Any]) -> str:
    """What an applied pass did in one graph, in the words of the summary's per-pass line."""
    name, stats = result["name"], result.get("stats", {})
    if name == "domino_ep":
        chunking = _chunking(stats)
        return f"{len(chunking)} MoE region(s) chunked: " + "; ".join(f"{r}: {how}" for r, how in chunking.items())
    if name == "layerwise_aux_loss":
        return (f"{int(stats.get('layers', 0))} layer(s) rewritten in {int(stats.get('groups_rewritten', 0))} loss group(s), "
                f"{_bytes(int((result.get('removed_values') or {}).get('bytes', 0)))} of stacked tensors no longer in the graph")
    if name == "async_offload":
        text = (f"{int(stats.get('offloaded', 0))} router tensor(s) moved to host per call "
                f"({_bytes(int(stats.get('offloaded_bytes', 0)))})")
        return text + (f": {', '.join(result['matched'])}" if result.get("matched") else "")
    if name == "schedule_overlap" and "after" in stats:
        return (f"{int(stats['after'].get('all_to_all', 0))} all-to-all(s), overlapped with compute "
                f"{int(stats['before'].get('overlapped', 0))} -> {int(stats['after'].get('overlapped', 0))}")
    return "changed the graph" + (f": matched {', '.join(result['matched'])}" if result.get("matched") else "")


def _outcome(result: dict[str, Any], stage: str, graph: int, kind: str | None) -> PassOutcome:
    applied = bool(result.get("changed"))
    reasons = [f"{s['region']}: {s['reason']}" for s in result.get("skipped", [])]
    trigger = result.get("trigger")
    if not applied and not reasons and trigger:
        reasons = [f"graph: it holds {trigger} but the pass matched nothing there (no candidate region found)"]
    return PassOutcome(result["name"], stage, graph, kind, applied, bool(result.get("error")),
                       _did(result) if applied else "", trigger, reasons)


CANONICAL_FIXES = (
    ("no fake mode", "compile the model through torch.compile (a graph Dynamo did not capture has no fake mode to re-trace in)"),
    ("context_fn", "checkpoint with a selective-checkpoint policy (torch.utils.checkpoint.create_selective_checkpoint_contexts) "
                   "or with no context_fn, so the block can be re-traced with its recompute decisions"),
)
CANONICAL_FIX = ("no setting changes this: the graph compiles without the passes that analyse the canonical ATen IR; "
                 "report the reason to moe_passes (strict=True stops at it with the pass named)")
FAILED_FIX = ("a bug in the pass, not in the model: the graph compiled without it; strict=True raises it with the "
              "traceback (the report holds it under 'error'); please report it")


def _canonical_fix(reason: str) -> str:
    return next((fix for marker, fix in CANONICAL_FIXES if marker in reason), CANONICAL_FIX)


def _break_fix(summary: BackendSummary) -> str:
    hints = list(dict.fromkeys(summary.graph_break_hints.values()))
    if hints:
        return "; ".join(hints)
    return ("remove the graph break(s) listed under 'graph breaks' (torch._dynamo.explain shows each), so the dispatch "
            "and the combine all-to-all are captured in one graph")


def _hint_outcomes(summary: BackendSummary) -> None:
    """Fill each outcome's fixes, and the summary's MoE-split line, from the reasons and the graph breaks."""
    split_graphs: list[int] = []
    for o in summary.outcomes:
        if o.applied:
            continue
        if o.failed:
            o.fixes.append(FAILED_FIX)
        for reason in o.reasons:
            if "canonical ATen IR unavailable" in reason or "canonical IR unavailable" in reason:
                o.fixes.append(_canonical_fix(reason))
        split = any(splits_moe_block(r) or "no candidate region found" in r for r in o.reasons)
        if o.name == "domino_ep" and o.stage == "pre_grad" and split and summary.graph_breaks:
            split_graphs.append(o.graph)
            o.fixes.append(f"a graph break probably split the MoE block, so dispatch and combine are in different graphs: "
                           f"{_break_fix(summary)}")
        o.fixes[:] = list(dict.fromkeys(o.fixes))
    if split_graphs:
        summary.moe_split = (f"a graph break probably split the MoE block (domino_ep saw only part of it in graph(s) "
                             f"{', '.join(map(str, sorted(set(split_graphs))))}): {_break_fix(summary)}")


def explain_dict(summary: BackendSummary) -> dict[str, Any]:
    """``explain(summary)`` as plain data: graph breaks, then per pass where it applied and where it did not."""
    passes: dict[str, Any] = {}
    for name, p in summary.passes.items():
        mine = [o for o in summary.outcomes if o.name == name and o.stage == p.stage]
        passes[name] = {
            "stage": p.stage, "graphs": p.graphs, "applied": p.applied, "failed": p.failed,
            "applied_in": [{"graph": o.graph, "kind": o.kind, "did": o.did} for o in mine if o.applied],
            "not_applied": [{"graph": o.graph, "kind": o.kind, "trigger": o.trigger, "failed": o.failed,
                             "reasons": list(o.reasons), "fixes": list(o.fixes)} for o in mine if not o.applied and o.reasons],
            "nothing_to_do": [{"graph": o.graph, "kind": o.kind} for o in mine if not o.applied and not o.reasons],
        }
    breaks = [{"reason": r, "count": n, "hint": summary.graph_break_hints.get(r),
               "torch_hint": summary.graph_break_torch_hints.get(r), "where": summary.graph_break_where.get(r, [])}
              for r, n in summary.graph_breaks.items()]
    return {"graphs": summary.graphs, "graph_breaks": breaks, "moe_split": summary.moe_split,
            "canonical_errors": list(summary.canonical_errors), "cache_notes": list(summary.cache_notes),
            "passes": passes, "outcomes": [asdict(o) for o in summary.outcomes]}


def _graphs(items: list[dict[str, Any]]) -> str:
    where = [f"{i['graph']}" + (f" ({i['kind']})" if i.get("kind") else "") for i in items]
    return ("graph " if len(where) == 1 else "graphs ") + ", ".join(where)


def explain(summary: BackendSummary) -> str:
    """Per pass: each graph where it applied and what it did there; each graph where it did not, the pass's
    reasons verbatim (graphs sharing reasons grouped) and ``fix:`` lines saying what to change."""
    data = explain_dict(summary)
    total = sum(summary.graph_breaks.values())
    lines = [f"moe_passes explain: {summary.graphs} graph(s) compiled, {total} graph break(s)"]
    if data["graph_breaks"]:
        lines.append("graph breaks (Dynamo ended a graph there and started another):")
        for b in data["graph_breaks"]:
            lines.append(f"  {b['count']}x {b['reason']}")
            lines.extend(f"    at {w}" for w in b["where"])
            if b["hint"]:
                lines.append(f"    fix: {b['hint']}")
            elif b["torch_hint"]:
                lines.append(f"    no setting removes it; torch's hint: {b['torch_hint']}")
    if summary.moe_split:
        lines.append(summary.moe_split)
    for error in summary.canonical_errors:
        lines.append(f"canonical IR unavailable: {error}")
        lines.append(f"  fix: {_canonical_fix(error)}")
    for name, p in data["passes"].items():
        head = f"{name} ({p['stage'].replace('_', '-')}): applied in {p['applied']} of {p['graphs']} graph(s)"
        lines.append(head + (f", failed in {p['failed']}" if p["failed"] else ""))
        for item in p["applied_in"]:
            lines.append(f"  applied in {_graphs([item])}: {item['did']}")
        groups: dict[tuple[tuple[str, ...], tuple[str, ...]], list[dict[str, Any]]] = {}
        for item in p["not_applied"]:
            groups.setdefault((tuple(item["reasons"]), tuple(item["fixes"])), []).append(item)
        for (reasons, fixes), items in groups.items():
            lines.append(f"  not applied in {_graphs(items)}:")
            lines.extend(f"    {reason}" for reason in reasons)
            lines.extend(f"    fix: {fix}" for fix in fixes)
        if p["nothing_to_do"]:
            lines.append(f"  nothing to do in {_graphs(p['nothing_to_do'])}: nothing there it rewrites")
    for note in summary.cache_notes:
        lines.append(note)
    return "\n".join(lines)
