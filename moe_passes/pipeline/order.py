"""The declared pipeline: which passes run, in which order, built from what each pass declares.

Each pass class declares its ``stage``, its ``ir``, ``runs_after``/``runs_before``
and ``needs``/``invalidates`` (see ``moe_passes.pipeline.pass_base``). From the
requested passes this module derives one order:

* every ``ir = "torch"`` pass before every ``ir = "aten"`` pass (the graph is
  re-traced to the canonical ATen IR once, and there is no way back);
* ``A.runs_before`` / ``B.runs_after`` name constraints between requested passes;
* a pass that *needs* a property runs before any pass that *invalidates* it;
* ties keep the registry order (``moe_passes.registry``).

So any order a user lists gives the same pipeline; contradictory declarations
give a ``ValueError`` naming the cycle. Post-grad passes are not listed by the
user: a post-grad pass declares ``implied_by`` (pre-grad passes that need it) and
``enabled(config)``.
"""

from __future__ import annotations

import heapq
import logging
from typing import TYPE_CHECKING, Any, Sequence

from moe_passes.registry import POST_GRAD_PASSES, PRE_GRAD_PASSES, pass_class, rank, registered

if TYPE_CHECKING:
    from moe_passes.config import BackendConfig
    from moe_passes.pipeline.pass_base import GraphPass

log = logging.getLogger(__name__)


class PassUnavailableError(ValueError):
    """A requested pass is registered but its module cannot be imported (not written yet, or broken)."""


def load_pass(name: str, config: "BackendConfig") -> "GraphPass":
    """Instantiate a registered pass; an unimportable pass module gives a clear error naming it."""
    path = registered(name)
    try:
        cls = pass_class(name)
    except (ImportError, AttributeError) as e:
        raise PassUnavailableError(
            f"pass {name!r} is registered as {path} but cannot be loaded ({type(e).__name__}: {e}); "
            f"leave it out of passes=... until it is available"
        ) from e
    return cls(config)


def _edges(passes: Sequence[Any]) -> dict[int, dict[int, str]]:
    """i -> {j: why}: pass i must run before pass j."""
    edges: dict[int, dict[int, str]] = {i: {} for i in range(len(passes))}
    for i, a in enumerate(passes):
        for j, b in enumerate(passes):
            if i == j:
                continue
            if a.ir == "torch" and b.ir == "aten":
                edges[i][j] = f"{a.name} reads the torch IR, {b.name} the canonical ATen IR"
            elif a.name in getattr(b, "runs_after", ()):
                edges[i][j] = f"{b.name} declares runs_after {a.name}"
            elif b.name in getattr(a, "runs_before", ()):
                edges[i][j] = f"{a.name} declares runs_before {b.name}"
            else:
                shared = set(getattr(a, "needs", ())) & set(getattr(b, "invalidates", ()))
                if shared:
                    edges[i][j] = f"{a.name} needs {sorted(shared)}, which {b.name} invalidates"
    return edges


def build_pipeline(passes: Sequence["GraphPass"]) -> list["GraphPass"]:
    """The requested pre-grad passes in their declared order (independent of the order given)."""
    passes = list(passes)
    for p in passes:
        if getattr(p, "stage", "pre_grad") != "pre_grad":
            raise ValueError(f"pass {p.name!r} is a {p.stage} pass; only pre-grad passes can be listed in passes=...")
        if getattr(p, "ir", "torch") not in ("torch", "aten", "any"):
            raise ValueError(f"pass {p.name!r} declares ir={p.ir!r}; expected 'torch', 'aten' or 'any'")
    edges = _edges(passes)
    missing = {j: 0 for j in range(len(passes))}
    for i in edges:
        for j in edges[i]:
            missing[j] += 1
    ready = [(rank(passes[j].name), j) for j in missing if missing[j] == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        _, i = heapq.heappop(ready)
        order.append(i)
        for j in edges[i]:
            missing[j] -= 1
            if missing[j] == 0:
                heapq.heappush(ready, (rank(passes[j].name), j))
    if len(order) != len(passes):
        stuck = [j for j in range(len(passes)) if j not in order]
        why = [edges[i][j] for i in stuck for j in edges[i] if j in stuck]
        raise ValueError(
            f"the declared order of passes {[passes[j].name for j in stuck]} is contradictory: " + "; ".join(why)
        )
    return [passes[i] for i in order]


def pipeline_names(names: Sequence[str], config: "BackendConfig") -> list[str]:
    """The order the named pre-grad passes will run in (loads their classes)."""
    return [p.name for p in build_pipeline([load_pass(n, config) for n in names])]


def post_grad_pass_names(config: "BackendConfig") -> list[str]:
    """Post-grad passes the config implies: each registered post-grad pass whose ``implied_by`` names a
    requested pre-grad pass and whose ``enabled(config)`` holds; registry order."""
    names = []
    for name in POST_GRAD_PASSES:
        try:
            cls = pass_class(name)
        except (ImportError, AttributeError):
            log.warning("post-grad pass %r cannot be loaded; not run", name, exc_info=True)
            continue
        implied_by = getattr(cls, "implied_by", ())
        if set(implied_by) & set(config.passes) and cls.enabled(config):
            names.append(name)
    return names


__all__ = [
    "PRE_GRAD_PASSES",
    "POST_GRAD_PASSES",
    "PassUnavailableError",
    "build_pipeline",
    "load_pass",
    "pipeline_names",
    "post_grad_pass_names",
]
