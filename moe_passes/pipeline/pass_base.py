"""What every pass is: a pure function of a graph plus config, with a report and a declaration.

A pass mutates the ``GraphModule`` it is given and returns a ``PassResult``
saying what it matched, what it changed and, for every candidate region it
left alone, why. Reports are how users (and ``strict=True``) learn that a pass
found nothing safe to do, instead of silently getting the slow path.

Every pass class also *declares* where it belongs; the pipeline
(``moe_passes.pipeline.order``) is built from these declarations, never from the
order a user happens to list the passes in:

``stage``
    ``"pre_grad"`` (the Dynamo graph, before AOT autograd) or ``"post_grad"``
    (Inductor's ATen forward/backward graphs).
``ir``
    Which graph a pre-grad pass reads: ``"torch"`` (Dynamo's torch-level graph),
    ``"aten"`` (the canonical pre-dispatch ATen re-trace of
    ``moe_passes.ir.canonical``) or ``"any"`` (either; it runs on whatever IR the
    graph is in at its place). The graph is re-traced once, before the first
    ``"aten"`` pass; so every ``"torch"`` pass runs before every ``"aten"`` pass.
``runs_after`` / ``runs_before``
    Names of passes this one must follow / precede when both are requested.
``needs`` / ``invalidates``
    Graph properties (free-form names, e.g. ``"whole_router_rows"``): a pass that
    needs a property runs before any pass that invalidates it.
``graphs``
    Post-grad only: which AOT graphs the pass runs on (``"forward"``, ``"backward"``,
    ``"inference"``).
``implied_by`` / ``enabled(config)``
    Post-grad only: users list pre-grad passes; a post-grad pass runs when one of
    ``implied_by`` is requested and ``enabled(config)`` holds.

``trigger(gm)`` says what in a graph makes the pass applicable (all-to-alls for
Domino EP, ...). A requested pass that changes nothing in a graph holding its
trigger reports why at WARNING, and ``strict=True`` raises only for such graphs.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch.fx as fx

if TYPE_CHECKING:
    from moe_passes.config import BackendConfig

log = logging.getLogger(__name__)

Stage = Literal["pre_grad", "post_grad"]
IR = Literal["torch", "aten", "any"]
IRS: tuple[str, ...] = ("torch", "aten", "any")
GRAPH_KINDS: tuple[str, ...] = ("forward", "backward", "inference")


@dataclass
class Skip:
    """A candidate region the pass left alone, and why."""

    region: str
    reason: str


@dataclass
class PassResult:
    name: str
    changed: bool = False
    matched: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    skipped: list[Skip] = field(default_factory=list)
    #: Set by the pass manager, not the pass: the traceback of an exception the pass raised
    #: (the graph was restored and compiled without the pass).
    error: str | None = None

    def skip(self, region: str, reason: str) -> None:
        log.info("%s: skipped %s: %s", self.name, region, reason)
        self.skipped.append(Skip(region, reason))

    def as_dict(self) -> dict[str, Any]:
        d = {
            "name": self.name,
            "changed": self.changed,
            "matched": list(self.matched),
            "stats": dict(self.stats),
            "skipped": [{"region": s.region, "reason": s.reason} for s in self.skipped],
        }
        if self.error is not None:
            d["error"] = self.error
        return d


class GraphPass(ABC):
    """Base class: ``name``, ``stage``, ``ir``, ordering declarations, ``__call__(gm) -> PassResult``,
    ``trigger(gm)``, ``uuid()``."""

    name: ClassVar[str]
    stage: ClassVar[Stage]
    ir: ClassVar[IR] = "torch"
    runs_after: ClassVar[tuple[str, ...]] = ()
    runs_before: ClassVar[tuple[str, ...]] = ()
    needs: ClassVar[tuple[str, ...]] = ()
    invalidates: ClassVar[tuple[str, ...]] = ()
    graphs: ClassVar[tuple[str, ...]] = GRAPH_KINDS
    implied_by: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def enabled(cls, config: "BackendConfig") -> bool:
        """Post-grad only: whether the config turns this pass on when one of ``implied_by`` is requested."""
        return True

    def __init__(self, config: BackendConfig | None = None) -> None:
        if config is None:
            from moe_passes.config import BackendConfig

            config = BackendConfig()
        self.config = config

    @abstractmethod
    def __call__(self, gm: fx.GraphModule) -> PassResult: ...

    def trigger(self, gm: fx.GraphModule) -> str | None:
        """What in ``gm`` this pass is for (e.g. "4 all_to_all collectives"), or None if nothing.

        A pass that returns a description and then changes nothing must say why (its skips are
        logged at WARNING); ``strict=True`` raises only then. Every built-in pass says what it is for;
        the default treats every graph with an operation as a trigger, so a pass without a
        declaration keeps the plain "strict: must change the graph".
        """
        n = sum(1 for node in gm.graph.nodes if node.op not in ("placeholder", "output"))
        return f"a graph of {n} operations" if n else None

    def uuid(self) -> str:
        """Inductor's FX-graph cache key: the pass, every source file of the package, torch, the config.

        A pass's behaviour also lives in the vocabulary it imports (``moe_passes.ir``: facts, the row
        analysis) and in the pipeline; hashing one module would let Inductor's cache serve a stale
        graph after an upgrade that changed only those. So every pass hashes the whole package, and a
        pass defined outside it (a user's) its own module's source too."""
        own = ""
        module = sys.modules.get(type(self).__module__)
        path = getattr(module, "__file__", None)
        if path is not None and not Path(path).resolve().is_relative_to(Path(__file__).resolve().parent.parent):
            own = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        return hashlib.sha256(f"{self.name}|{package_digest()}|{own}|{self.config.digest()}".encode()).hexdigest()


def package_digest(root: Path | None = None) -> str:
    """sha256 of every ``*.py`` under the ``moe_passes`` package (paths and contents) and the torch version."""
    return _digest(str(root or Path(__file__).resolve().parent.parent))


@functools.lru_cache(maxsize=None)
def _digest(root: str) -> str:
    import torch

    h = hashlib.sha256(torch.__version__.encode())
    base = Path(root)
    for path in sorted(base.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        h.update(str(path.relative_to(base)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()
