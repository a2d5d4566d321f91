"""What every pass is: a pure function of a graph plus config, with a report.

A pass mutates the ``GraphModule`` it is given and returns a ``PassResult``
saying what it matched, what it changed and, for every candidate region it
left alone, why. Reports are how users (and ``strict=True``) learn that a pass
found nothing safe to do, instead of silently getting the slow path.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch.fx as fx

from moe_passes.config import BackendConfig

log = logging.getLogger("moe_passes")

Stage = Literal["pre_grad", "post_grad"]


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

    def skip(self, region: str, reason: str) -> None:
        log.info("%s: skipped %s: %s", self.name, region, reason)
        self.skipped.append(Skip(region, reason))

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "changed": self.changed,
            "matched": list(self.matched),
            "stats": dict(self.stats),
            "skipped": [{"region": s.region, "reason": s.reason} for s in self.skipped],
        }


class GraphPass(ABC):
    """Base class: ``name``, ``stage``, ``__call__(gm) -> PassResult``, ``uuid()``."""

    name: ClassVar[str]
    stage: ClassVar[Stage]

    def __init__(self, config: BackendConfig | None = None) -> None:
        self.config = config if config is not None else BackendConfig()

    @abstractmethod
    def __call__(self, gm: fx.GraphModule) -> PassResult: ...

    def uuid(self) -> str:
        """Changes with this pass's source code and the config: Inductor's FX cache key."""
        module = sys.modules[type(self).__module__]
        try:
            source = inspect.getsource(module)
        except (OSError, TypeError):
            source = type(self).__qualname__
        return hashlib.sha256(f"{self.name}|{source}|{self.config.digest()}".encode()).hexdigest()
