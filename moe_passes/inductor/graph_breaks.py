"""Graph breaks Dynamo reported while a backend compiled, and the setting that removes each one.

A graph break splits the user's code into several Dynamo graphs. For the
passes that is not a detail: a ``.tolist()`` of the split sizes compiled
without ``torch._dynamo.config.capture_scalar_outputs = True`` puts the
dispatch all-to-all and the combine all-to-all of one MoE block in different
graphs, and Domino, which sees one graph at a time, can only say that an
all-to-all has no partner. This module records the breaks so the backend's
reports can name the cause and the fix.

Where the breaks come from (torch 2.13, checked in its source):

- ``torch._dynamo.utils.counters["graph_break"]``, a ``Counter`` keyed by the
  break's message (``Unsupported.msg``: the break type on the first line, then
  ``Explanation:``, ``Hint:`` lines, a debug context and a link), incremented
  once each time Dynamo takes a break (``symbolic_convert``'s break handler
  moves the count from ``"unimplemented"`` to ``"graph_break"``). It is
  process-global and never cleared by ``torch._dynamo.reset()`` (only
  ``counters.clear()`` empties it), so it only ever grows: a delta against a
  snapshot counts exactly the breaks taken since the snapshot, including
  breaks with no graph before them (a ``bincount`` at a function's start)
  that no backend call would see. This is what the counts come from.
- ``gm.compile_subgraph_reason`` on the graph Dynamo hands a backend (what
  ``torch._dynamo.explain`` reads): the reason that ended *this* graph, with
  the user's stack. It says where the break is (file and line), but only for
  the break that ended a graph; it adds that location to the record.
- Not used: ``torch._dynamo.utils.graph_break_reasons`` (cleared by
  ``torch._dynamo.reset()``, so not a stable base for a delta);
  ``CompileEventLogger``'s ``num_graph_breaks`` metric (Inductor writes
  ``counters["graph_break"].total()`` into it: the same counter, summed over
  the process, without reasons); ``compilation_time_metrics`` (timings only).

The counter is global to the process, and a backend only ever sees its own
graphs, so it attributes breaks at each of its graphs (``BreakRecorder.take``):
Dynamo takes a break before it compiles the graph that ends there, so the
breaks counted since the last mark are this graph's (the one that ended it)
and those of frames that compiled no graph (a break at a function's start,
whose resume function this backend compiles next). The mark is the later of
the backend's own (taken when it was created, when its reports were cleared,
at its previous graph) and the last one any ``BreakRecorder`` took at a graph,
so two backends in one process never count each other's breaks. When Dynamo
compiled graphs for another backend since the mark
(``counters["stats"]["unique_graphs"]``), the breaks in between may be that
compile's: then only the break that ended this graph is counted. Breaks after
a backend's last graph are not counted.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DYNAMIC_OUTPUT_HINT",
    "MOE_SPLIT_MARKERS",
    "SCALAR_OUTPUTS_HINT",
    "BreakRecorder",
    "condense",
    "describe",
    "ended_by",
    "hint_for",
    "splits_moe_block",
    "torch_hint",
]

SCALAR_OUTPUTS_HINT = ("set torch._dynamo.config.capture_scalar_outputs = True before torch.compile "
                       "(or TORCHDYNAMO_CAPTURE_SCALAR_OUTPUTS=1)")
DYNAMIC_OUTPUT_HINT = ("set torch._dynamo.config.capture_dynamic_output_shape_ops = True before torch.compile "
                       "(or TORCHDYNAMO_CAPTURE_DYNAMIC_OUTPUT_SHAPE_OPS=1)")

#: torch's own hint naming the setting (2.13: "Hint: Set `torch._dynamo.config.capture_scalar_outputs = True`").
_CONFIG_IN_MESSAGE = re.compile(r"torch\._dynamo\.config\.(capture_scalar_outputs|capture_dynamic_output_shape_ops)\s*=\s*True")
_SCALAR = re.compile(r"capture_scalar_outputs|scalar[ _]outputs|_local_scalar_dense|Tensor\.item|\.item\(\)|\btolist\b", re.I)
_DYNAMIC = re.compile(r"capture_dynamic_output_shape_ops|dynamic[ _]shape operator|dynamic output shape|output shape depends on"
                      r"|\b(?:aten\.)?(?:bincount|nonzero|unique|_unique2|unique_consecutive|masked_select|repeat_interleave)\b", re.I)
#: Breaks a setting does not remove though they name ``tolist``: ``.tolist()`` of a float tensor breaks whatever the config.
_NO_SETTING = re.compile(r"non-integer tensor", re.I)
_HINTS = {"capture_scalar_outputs": SCALAR_OUTPUTS_HINT, "capture_dynamic_output_shape_ops": DYNAMIC_OUTPUT_HINT}

#: Domino skip reasons that a graph break between the dispatch and the combine all-to-all produces.
MOE_SPLIT_MARKERS = ("without a mirrored combine", "feeds the dispatch all-to-all")


def hint_for(reason: str) -> str | None:
    """The Dynamo setting that removes a break with this reason (full message or condensed), or None.

    Scalar outputs (``Tensor.item``, ``.tolist()``, ``_local_scalar_dense``) -> ``capture_scalar_outputs``;
    data-dependent output shapes (``bincount``, ``nonzero``, ``unique``, "dynamic shape operator") ->
    ``capture_dynamic_output_shape_ops``; anything else (a ``print``, ``torch._dynamo.graph_break()``,
    ``.tolist()`` of a float tensor) -> None: no setting removes it.
    """
    if _NO_SETTING.search(reason):
        return None
    named = _CONFIG_IN_MESSAGE.search(reason)
    if named:
        return _HINTS[named.group(1)]
    if _DYNAMIC.search(reason):
        return DYNAMIC_OUTPUT_HINT
    if _SCALAR.search(reason):
        return SCALAR_OUTPUTS_HINT
    return None


def _lines(message: str) -> list[str]:
    return [line.strip() for line in str(message).strip().splitlines() if line.strip()]


def condense(message: str) -> str:
    """One line: the break type and torch's explanation ("Dynamic shape operator: Operator `aten.nonzero.default`'s
    output shape depends on input Tensor data."), without the hints, debug context and link; a message in
    another form with its whitespace collapsed."""
    lines = _lines(message)
    if not lines:
        return "graph break (no reason given)"
    if not any(line.startswith(("Explanation:", "Hint:")) for line in lines[1:]):
        return " ".join(" ".join(lines).split())
    explanation = next((line[len("Explanation:"):].strip() for line in lines[1:] if line.startswith("Explanation:")), "")
    return f"{lines[0]}: {explanation}" if explanation else lines[0]


def torch_hint(message: str) -> str | None:
    """torch's own first ``Hint:`` line of a break message, if it has one."""
    return next((line[len("Hint:"):].strip() for line in _lines(message) if line.startswith("Hint:")), None)


def splits_moe_block(reason: str) -> bool:
    """Whether a Domino skip reason is what a graph break between dispatch and combine looks like from one graph."""
    return any(marker in reason for marker in MOE_SPLIT_MARKERS)


def _counts() -> Counter[str]:
    from torch._dynamo.utils import counters

    return Counter(counters["graph_break"])


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


@dataclass
class _Mark:
    seq: int  # which mark is later
    breaks: Counter[str]  # counters["graph_break"] then
    graphs: int  # Dynamo graphs compiled by then, counting the graph being compiled when the mark was taken in one


_SEQ = itertools.count()
#: The mark the last ``BreakRecorder.take`` left: breaks counted before it belong to some backend's graph already.
_LAST: _Mark | None = None


def _mark(in_graph: bool) -> _Mark:
    return _Mark(next(_SEQ), _counts(), _graphs() + (1 if in_graph else 0))


class BreakRecorder:
    """Graph breaks Dynamo counted since a mark (see the module docstring for the source and the attribution)."""

    def __init__(self) -> None:
        self.mark = _mark(in_graph=False)

    def reset(self) -> None:
        """Forget every break counted so far: later ``take()`` calls count from now."""
        self.mark = _mark(in_graph=False)

    def take(self, gm: Any = None) -> list[dict[str, Any]]:
        """The breaks to attribute to the graph ``gm`` Dynamo hands the backend now (``describe``'s entries);
        moves the mark. A counter someone cleared meanwhile (``counters.clear()``) counts from zero again."""
        global _LAST
        base = self.mark if _LAST is None or _LAST.seq < self.mark.seq else _LAST
        now = _counts()
        before = base.breaks if sum(now.values()) >= sum(base.breaks.values()) else Counter()  # cleared: from zero
        delta = {reason: n - before.get(reason, 0) for reason, n in now.items() if n > before.get(reason, 0)}
        ended = _ended_message(gm)
        if _graphs() > base.graphs:  # another backend compiled graphs meanwhile: keep only the break that ended ours
            delta = {ended: 1} if ended in delta else {}
        self.mark = _LAST = _mark(in_graph=True)
        return describe(delta, ended_by(gm))


def _ended_message(gm: Any) -> str | None:
    reason = getattr(gm, "compile_subgraph_reason", None)
    if reason is None or not getattr(reason, "graph_break", False):
        return None
    return str(getattr(reason, "reason", ""))


def ended_by(gm: Any) -> dict[str, str] | None:
    """The break that ended the graph Dynamo hands the backend (``gm.compile_subgraph_reason``): its condensed
    reason and where in the user's code it is ("file.py:88 in forward: sizes = counts.tolist()"); None for a
    graph that ended at a return or when this torch does not say."""
    message = _ended_message(gm)
    if message is None:
        return None
    reason = gm.compile_subgraph_reason
    stack = list(getattr(reason, "user_stack", None) or [])
    where = ""
    if stack:
        frame = stack[-1]
        where = f"{frame.filename}:{frame.lineno} in {frame.name}"
        if getattr(frame, "line", None):
            where += f": {frame.line.strip()}"
    return {"reason": condense(message), "where": where}


def describe(delta: dict[str, int], ended: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Per break reason (condensed), as the reports hold it: count, the setting that removes it (``hint``),
    torch's own hint, and where it is when it ended the graph being compiled."""
    merged: dict[str, dict[str, Any]] = {}
    for message, count in delta.items():
        reason = condense(message)
        entry = merged.setdefault(reason, {"reason": reason, "count": 0, "hint": hint_for(message),
                                           "torch_hint": torch_hint(message), "where": None})
        entry["count"] += count
    if ended is not None and ended["where"]:
        entry = merged.get(ended["reason"])
        if entry is not None:
            entry["where"] = ended["where"]
    return list(merged.values())
