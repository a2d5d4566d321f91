"""Backend configuration: one validated, hashable record of every option.

Validation happens here, once, so a typo in a pass name or a nonsensical
chunk count fails at ``make_backend(...)`` time with a clear message instead
of deep inside a compile.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from moe_passes.registry import PRE_GRAD_PASSES

DEFAULT_PASSES: tuple[str, ...] = ("layerwise_aux_loss", "domino_ep", "async_offload")

NumChunks = int | Literal["auto"]


@dataclass(frozen=True)
class BackendConfig:
    """Options of ``make_backend``; every field is part of the cache key.

    num_chunks: token chunks per MoE region for Domino EP, or "auto".
    passes: pre-grad passes to run (names from ``moe_passes.registry``); the order they run in is
        declared by the passes themselves (``moe_passes.pipeline.order``), not the order listed here.
    schedule_overlap: run the post-grad overlap scheduler on forward and backward graphs.
    max_chunks_in_flight: bound on all-to-alls issued but not yet waited (memory bound).
    offload_targets: "auto" (router tensors that are graph outputs) or explicit kinds.
    strict: raise when a requested pass finds nothing it can safely apply.
    verify: run original and transformed graph on the example inputs; raise on mismatch.
    """

    num_chunks: NumChunks = "auto"
    passes: tuple[str, ...] = DEFAULT_PASSES
    schedule_overlap: bool = True
    max_chunks_in_flight: int = 2
    offload_targets: str | tuple[str, ...] = "auto"
    strict: bool = False
    verify: bool = False
    verify_rtol: float = 1e-4
    verify_atol: float = 1e-5
    extra: tuple[tuple[str, Any], ...] = field(default=())

    def __post_init__(self) -> None:
        for name in ("schedule_overlap", "strict", "verify"):  # "yes" or 1 must not pass as a bool
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("verify_rtol", "verify_atol"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be a non-negative number, got {value!r}")
        if isinstance(self.passes, str):
            raise ValueError(f"passes must be a sequence of pass names, got the string {self.passes!r}")
        object.__setattr__(self, "passes", tuple(self.passes))
        unknown = [p for p in self.passes if p not in PRE_GRAD_PASSES]
        if unknown:
            raise ValueError(f"unknown pass(es) {unknown}; known passes: {sorted(PRE_GRAD_PASSES)}")
        if len(set(self.passes)) != len(self.passes):
            raise ValueError(f"pass listed twice in {self.passes}")
        if self.num_chunks != "auto" and (
            isinstance(self.num_chunks, bool) or not isinstance(self.num_chunks, int) or self.num_chunks < 1
        ):
            raise ValueError(f"num_chunks must be a positive int or 'auto', got {self.num_chunks!r}")
        if isinstance(self.max_chunks_in_flight, bool) or not isinstance(self.max_chunks_in_flight, int) or self.max_chunks_in_flight < 1:
            raise ValueError(f"max_chunks_in_flight must be a positive int, got {self.max_chunks_in_flight!r}")
        if isinstance(self.offload_targets, str):
            if self.offload_targets != "auto":
                raise ValueError(f"offload_targets must be 'auto' or a tuple of target kinds, got {self.offload_targets!r}")
        else:
            object.__setattr__(self, "offload_targets", tuple(self.offload_targets))

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """Stable hash of the configuration (part of every pass's ``uuid``)."""
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True, default=repr).encode()).hexdigest()
