"""Rank agreement: ranks about to issue different collectives fail fast with a clear error, never hang.

Rank-invariant collectives are a hard rule of every pass that touches
collectives: a pass decision may depend only on what all ranks share (program,
weight shapes, config). Where a decision could still diverge (a region chunked
on one rank and declined on another, a pass that failed closed on one rank
only), gloo aborts the process ("collective mismatch") and NCCL hangs. This
module turns that into a ``RankDivergenceError`` raised on every rank, before
any collective of the graph runs.

For a graph that holds collectives and went through a pass that changes
collectives (``changes_collectives = True`` on the pass class; Domino EP), the
backend wraps the callable it returns (``guard``). Every call first agrees,
with ONE ``all_gather`` of a 32-byte digest over the graph's process group
(the one its collectives name, else the default group), on the fingerprint of
the compiled graph: the kinds and order of its collectives after the passes
plus the rank-invariant part of each pass's decision (applied or not, regions
matched, chunk counts; never token counts or sizes). Equal digests: the call
proceeds. Different digests: every rank sees the mismatch, the ranks gather
their readable decision texts (a second, rare collective, issued by all of
them), and every rank raises naming the pass(es) and both ranks' decisions.

Why every call and not only the first: each rank compiles at its own steps
(ranks that see different lengths recompile at different steps), so in one
step rank 0 may run its old graph (call 7) while rank 1 runs a new one (call
1). A first-call-only check would have rank 1 wait in an all_gather that rank 0
never issues: the hang the check exists to prevent. Checking every call keeps
the agreement itself rank-invariant: every call of every checked graph issues
exactly one all_gather, whatever graph it is.

Cost per call: one blocking all_gather of 4 int64 per rank before the graph
runs, plus comparing the gathered digests on the host (measured by
``tests/test_rank_divergence.py``: 1.07 ms per call with 2 gloo ranks over
loopback on a shared 2-core CPU machine under load; gloo's loopback round trip
dominates; on NCCL it is one tiny collective plus a device-to-host copy of the
digests, which synchronises the stream). ``BackendConfig(rank_check=False)`` turns it off. In a single
process, without ``torch.distributed`` initialised, on a one-rank group or on
the fake process group it does nothing.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.fx as fx

from moe_passes.ir.facts import collective_nodes, op_namespace_and_name

log = logging.getLogger(__name__)

_WORDS = 4  # int64 words of the digest exchanged per rank (32 bytes)


class RankDivergenceError(RuntimeError):
    """Ranks compiled graphs whose collectives differ; running them would abort (gloo) or hang (NCCL)."""


def collective_sequence(gm: fx.GraphModule) -> list[str]:
    """Kinds of the graph's collectives in graph order (``_c10d_functional.all_to_all_single`` ...)."""
    out = []
    for n in collective_nodes(gm.graph):
        parsed = op_namespace_and_name(n.target)
        out.append(f"{parsed[0]}.{parsed[1]}" if parsed else str(n.target))
    return out


def _group_names(gm: fx.GraphModule) -> set[str]:
    names = set()
    for n in collective_nodes(gm.graph):
        g = n.kwargs.get("group_name")
        if g is None:
            g = next((a for a in reversed(n.args) if isinstance(a, str)), None)
        if g is not None:
            names.add(g)
    return names


def decision_lines(records: Sequence[Any]) -> tuple[list[str], list[str]]:
    """(rank-invariant decision lines for the fingerprint, readable decision lines for the error).

    The fingerprint keeps what must agree across ranks (pass, applied or not, which regions, how many
    chunks each); the readable text adds skip reasons and chunk sizes, which may name one rank's shapes.
    """
    invariant, readable = [], []
    for rec in records:
        r = rec.result
        chunks = r.stats.get("chunks") if isinstance(r.stats, dict) else None
        counts = {k: len(v) for k, v in chunks.items()} if isinstance(chunks, dict) else {}
        invariant.append(f"{rec.name}: changed={r.changed} matched={sorted(map(str, r.matched))} chunks={sorted(counts.items())}")
        text = f"{rec.name}: {'applied' if r.changed else 'not applied'}"
        if r.matched:
            text += f" to {list(r.matched)}"
        if chunks:
            text += f", chunks {chunks}"
        for s in r.skipped:
            text += f"; declined {s.get('region')}: {s.get('reason')}" if isinstance(s, dict) else f"; {s}"
        readable.append(text)
    return invariant, readable


def fingerprint(gm: fx.GraphModule, records: Sequence[Any]) -> tuple[str, str]:
    """(hex digest, readable text) of the graph's collective sequence and the passes' decisions."""
    seq = collective_sequence(gm)
    invariant, readable = decision_lines(records)
    digest = hashlib.sha256("\n".join(["collectives:", *seq, "decisions:", *invariant]).encode()).hexdigest()
    text = f"{len(seq)} collectives [{', '.join(seq)}]; " + " | ".join(readable)
    return digest, text


def needs_check(gm_before_collectives: bool, passes: Sequence[Any]) -> bool:
    """A graph that held collectives and went through a pass that changes collectives."""
    return gm_before_collectives and any(getattr(p, "changes_collectives", False) for p in passes)


def _active_group(group_names: set[str]) -> Any | None:
    """The group to agree over, or None when there is nothing to agree with (no peers, fake group)."""
    if not dist.is_available() or not dist.is_initialized():
        return None
    group = None
    if len(group_names) == 1:
        try:
            from torch.distributed.distributed_c10d import _resolve_process_group

            group = _resolve_process_group(next(iter(group_names)))
        except Exception:  # noqa: BLE001 - unknown name: fall back to the default group
            group = None
    if group is None:
        group = dist.group.WORLD
    try:
        if dist.get_world_size(group) <= 1 or dist.get_backend(group) == "fake":
            return None
    except Exception:  # noqa: BLE001 - a group this rank is not in
        return None
    return group


def _device(group: Any) -> torch.device:
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class RankAgreement:
    """Agrees, before every call, that all ranks of the group run a graph with the same fingerprint."""

    def __init__(self, digest: str, text: str, graph_name: str, group_names: set[str]) -> None:
        self.digest = digest
        self.text = text
        self.graph_name = graph_name
        self.group_names = group_names
        words = [int(digest[i * 16:(i + 1) * 16], 16) - (1 << 63) for i in range(_WORDS)]
        self._words = torch.tensor(words, dtype=torch.int64)
        self._device_words: torch.Tensor | None = None

    def check(self) -> None:
        group = _active_group(self.group_names)
        if group is None:
            return
        if self._device_words is None:
            self._device_words = self._words.to(_device(group))
        size = dist.get_world_size(group)
        gathered = [torch.empty_like(self._device_words) for _ in range(size)]
        dist.all_gather(gathered, self._device_words, group=group)
        if all(torch.equal(g, self._device_words) for g in gathered):
            return
        texts: list[Any] = [None] * size
        dist.all_gather_object(texts, f"{self.graph_name}: {self.text}", group=group)
        me = dist.get_rank(group)
        lines = [f"rank {r}{' (this rank)' if r == me else ''}: {t}" for r, t in enumerate(texts)]
        raise RankDivergenceError(
            "ranks are about to run compiled graphs with different collectives (a pass decided differently "
            "on different ranks; running on would abort in gloo or hang in NCCL). Decisions per rank:\n  "
            + "\n  ".join(lines)
            + "\nA pass decision must depend only on what all ranks share; BackendConfig(rank_check=False) "
            "turns this check off."
        )


def guard(compiled: Callable[..., Any], agreement: RankAgreement) -> Callable[..., Any]:
    """``compiled`` that first runs ``agreement.check()`` on every call.

    Arguments pass through unchanged, so either calling convention works (Dynamo calls the backend's
    result with the flat inputs; a ``_boxed_call`` attribute, copied by ``functools.wraps``, keeps its
    meaning for a caller that passes one list)."""

    @functools.wraps(compiled)
    def call(*args: Any, **kwargs: Any) -> Any:
        agreement.check()
        return compiled(*args, **kwargs)

    call.rank_agreement = agreement  # type: ignore[attr-defined]
    return call


def wrap_if_needed(compiled: Callable[..., Any], gm: fx.GraphModule, had_collectives: bool, passes: Sequence[Any],
                   records: Sequence[Any], graph_name: str, enabled: bool) -> Callable[..., Any]:
    """The backend's hook: ``compiled`` guarded by a rank agreement when the graph needs one."""
    if not enabled or not needs_check(had_collectives, passes):
        return compiled
    digest, text = fingerprint(gm, records)
    log.debug("rank check on %s: %s (%s)", graph_name, digest[:12], text)
    return guard(compiled, RankAgreement(digest, text, graph_name, _group_names(gm)))
