"""Name -> pass class, resolved lazily so importing the package stays cheap.

This module is plain data and imports nothing of the project (the config
validates pass names against it without a circle). The position of a pass in
its table is its default place in the pipeline: ``moe_passes.pipeline.order``
orders the requested passes by their declared constraints (IR, ``runs_after``,
``runs_before``, ``needs``/``invalidates``) and breaks ties by this order, so any
order a user lists gives the same pipeline.
"""

from __future__ import annotations

import importlib
from typing import Any

PRE_GRAD_PASSES: dict[str, str] = {
    "layerwise_aux_loss": "moe_passes.fx.aux_loss:LayerwiseAuxLossPass",
    "domino_ep": "moe_passes.fx.domino:DominoEPPass",
    "async_offload": "moe_passes.fx.async_offload:AsyncOffloadPass",
}

POST_GRAD_PASSES: dict[str, str] = {
    "schedule_overlap": "moe_passes.inductor.schedule:ScheduleOverlapPass",
}


def registered(name: str) -> str:
    """The ``module:Class`` path of a registered pass; ValueError naming the known ones otherwise."""
    table = {**PRE_GRAD_PASSES, **POST_GRAD_PASSES}
    if name not in table:
        raise ValueError(f"unknown pass {name!r}; known passes: {sorted(table)}")
    return table[name]


def rank(name: str) -> tuple[int, str]:
    """Default place of a pass in its stage's pipeline (registry order; unknown names last, by name)."""
    for table in (PRE_GRAD_PASSES, POST_GRAD_PASSES):
        if name in table:
            return list(table).index(name), name
    return 1 << 30, name


def pass_class(name: str) -> Any:
    """The registered class (``type[GraphPass]``); ImportError/AttributeError if its module is broken."""
    module, _, attr = registered(name).partition(":")
    return getattr(importlib.import_module(module), attr)
