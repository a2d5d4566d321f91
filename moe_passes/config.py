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

from moe_passes.registry import POST_GRAD_PASSES, PRE_GRAD_PASSES

DEFAULT_PASSES: tuple[str, ...] = ("layerwise_aux_loss", "domino_ep", "async_offload")

NumChunks = int | Literal["auto"]


#: The router tensors ``async_offload`` moves to the host, by kind: what ``offload_targets`` may list.
#: Declared here, below the passes (the pass imports it), so validating a config imports no pass.
OFFLOAD_TARGET_KINDS: tuple[str, ...] = ("router_logits", "selected_experts")
#: How the rewritten graph is lowered (``BackendConfig.lowering``).
LOWERINGS: tuple[str, ...] = ("inductor", "aot_eager")


def offload_target_kinds() -> tuple[str, ...]:
    """The kinds ``offload_targets`` may list: what the ``async_offload`` pass recognises."""
    return OFFLOAD_TARGET_KINDS


@dataclass(frozen=True)
class BackendConfig:
    """Options of ``make_backend``; every field is part of the cache key.

    num_chunks: token chunks per MoE region for Domino EP, or "auto".
    domino_mode: "moe" (default): Domino chunks each MoE region (router -> dispatch -> experts -> combine)
        into token chunks; "layer": micro-batches of whole sequences through whole decoder layers
        (attention, norms, router, experts), consecutive layers chunk to chunk, so the all-to-all of one
        micro-batch hides behind the attention of another (``moe_passes.fx.domino.layers``); a region
        whose batch cannot be split (one packed sequence, an op that mixes sequences) keeps token chunks,
        and the report says which mode each region got and why.
    passes: pre-grad passes to run (names from ``moe_passes.registry``); the order they run in is
        declared by the passes themselves (``moe_passes.pipeline.order``), not the order listed here.
    schedule_overlap: run the post-grad overlap scheduler on forward and backward graphs (True; with activation
        checkpointing the backward recomputation runs just in time, ``moe-passes bench --section
        checkpointing``), on the forward graphs only ("forward"), or not at all (False).
    max_chunks_in_flight: bound on all-to-alls issued but not yet waited (memory bound: receive buffers of
        rows; count exchanges, which only size the next all-to-all, are not counted).
    defer_weight_grads: in the backward schedule, run the weight-gradient GEMMs (those that feed parameter
        gradients only) inside open all-to-all windows, first among the work that does not issue the next
        all-to-all, and with no window open last of all (``moe_passes.inductor.dw_deferral``; the report
        says where each went and the bytes held for them); needs ``schedule_overlap=True``.
    offload_targets: "auto" (every router tensor among the graph outputs) or a tuple of the kinds
        ``async_offload`` knows (``OFFLOAD_TARGET_KINDS``: "router_logits", "selected_experts").
    strict: raise when a requested pass finds nothing it can safely apply.
    verify: run original and transformed graph on the example inputs; raise on mismatch.
    rank_check: before every call of a graph whose collectives a pass changed, agree across the ranks
        (one 32-byte all_gather) that every rank runs the same collective sequence; raise a clear
        error on every rank instead of a gloo abort / NCCL hang (``moe_passes.inductor.rank_check``).
    verify_rtol, verify_atol: verify's tolerances; None (the default): per compared tensor from its dtype
        (``torch.testing.assert_close``'s table, never tighter than rtol 1e-4 / atol 1e-5), scaled by the
        tensor's largest reference value; a number: exactly ``assert_close(rtol=..., atol=...)``.
    lowering: "inductor" (default) lowers the rewritten graph with Inductor (the post-grad passes run
        there); "aot_eager" runs it through AOTAutograd without Inductor (no post-grad passes): the
        passes' numerics apart from Inductor's, as ``backend="aot_eager"`` is for plain compiles.
    extra: (name, value) pairs for experimental options; names are strings, values hashable.

    Every field is checked when the record is made; a bad value is a ``ValueError`` that names the
    option, the value and the valid choices.
    """

    num_chunks: NumChunks = "auto"
    domino_mode: str = "moe"
    passes: tuple[str, ...] = DEFAULT_PASSES
    schedule_overlap: bool | str = True
    max_chunks_in_flight: int = 2
    defer_weight_grads: bool = False
    offload_targets: str | tuple[str, ...] = "auto"
    strict: bool = False
    verify: bool = False
    rank_check: bool = True
    verify_rtol: float | None = None
    verify_atol: float | None = None
    lowering: str = "inductor"
    extra: tuple[tuple[str, Any], ...] = field(default=())

    def __post_init__(self) -> None:
        if self.domino_mode not in ("moe", "layer"):
            raise ValueError(f"domino_mode must be 'moe' or 'layer', got {self.domino_mode!r}")
        if self.schedule_overlap not in (True, False, "forward") or type(self.schedule_overlap) not in (bool, str):
            raise ValueError(f"schedule_overlap must be True, False or 'forward', got {self.schedule_overlap!r}")
        for name in ("strict", "verify", "rank_check", "defer_weight_grads"):  # "yes" or 1 must not pass as a bool
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.defer_weight_grads and self.schedule_overlap is not True:
            raise ValueError("defer_weight_grads=True places weight-gradient GEMMs in the backward overlap schedule: it "
                             f"needs schedule_overlap=True, got schedule_overlap={self.schedule_overlap!r}")
        if self.lowering not in LOWERINGS:
            raise ValueError(f"lowering must be one of {list(LOWERINGS)}, got {self.lowering!r}")
        for name in ("verify_rtol", "verify_atol"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0):
                raise ValueError(f"{name} must be a non-negative number or None (tolerance from the dtype), got {value!r}")
        if isinstance(self.passes, str):
            raise ValueError(f"passes must be a sequence of pass names, got the string {self.passes!r}")
        try:
            object.__setattr__(self, "passes", tuple(self.passes))
        except TypeError:
            raise ValueError(f"passes must be a sequence of pass names from {sorted(PRE_GRAD_PASSES)}, "
                             f"got {self.passes!r}") from None
        unknown = [p for p in self.passes if p not in PRE_GRAD_PASSES]
        if unknown:
            post = [p for p in unknown if p in POST_GRAD_PASSES]
            hint = f" ({', '.join(post)}: a post-grad pass, switched by its own option, e.g. {post[0]}=False)" if post else ""
            raise ValueError(f"unknown pass(es) {unknown}; known passes: {sorted(PRE_GRAD_PASSES)}{hint}")
        if len(set(self.passes)) != len(self.passes):
            raise ValueError(f"pass listed twice in {self.passes}")
        if self.num_chunks != "auto" and (
            isinstance(self.num_chunks, bool) or not isinstance(self.num_chunks, int) or self.num_chunks < 1
        ):
            raise ValueError(f"num_chunks must be a positive int or 'auto', got {self.num_chunks!r}")
        if isinstance(self.max_chunks_in_flight, bool) or not isinstance(self.max_chunks_in_flight, int) or self.max_chunks_in_flight < 1:
            raise ValueError(f"max_chunks_in_flight must be a positive int, got {self.max_chunks_in_flight!r}")
        self._check_offload_targets()
        self._check_extra()

    def _check_offload_targets(self) -> None:
        targets = self.offload_targets
        if targets == "auto":
            return
        kinds = offload_target_kinds()
        choices = f"'auto' or a tuple of kinds from {list(kinds)}"
        if isinstance(targets, str):
            hint = f" (a tuple: offload_targets=({targets!r},))" if targets in kinds else ""
            raise ValueError(f"offload_targets must be {choices}, got {targets!r}{hint}")
        try:
            targets = tuple(targets)
        except TypeError:
            raise ValueError(f"offload_targets must be {choices}, got {self.offload_targets!r}") from None
        unknown = [t for t in targets if t not in kinds]
        if unknown:
            raise ValueError(f"offload_targets has unknown kind(s) {unknown}; valid: {choices}")
        if not targets:
            raise ValueError(f"offload_targets is empty; valid: {choices} (to offload nothing, leave "
                             "'async_offload' out of passes)")
        object.__setattr__(self, "offload_targets", tuple(dict.fromkeys(targets)))

    def _check_extra(self) -> None:
        extra = self.extra
        pairs = tuple(extra.items()) if isinstance(extra, dict) else extra
        try:
            pairs = tuple((k, v) for k, v in pairs)  # type: ignore[misc]
        except (TypeError, ValueError):
            raise ValueError(f"extra must be (name, value) pairs or a dict, got {extra!r}") from None
        for key, value in pairs:
            if not isinstance(key, str):
                raise ValueError(f"extra option names must be strings, got {key!r}")
            try:
                hash(value)
            except TypeError:
                raise ValueError(f"extra option {key!r} must have a hashable value (the config is a cache key), "
                                 f"got {type(value).__name__}") from None
        object.__setattr__(self, "extra", pairs)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """Stable hash of the configuration (part of every pass's ``uuid``)."""
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True, default=repr).encode()).hexdigest()
