"""Name -> pass class, resolved lazily so importing the package stays cheap."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moe_passes.fx.pass_base import GraphPass

PRE_GRAD_PASSES: dict[str, str] = {
    "layerwise_aux_loss": "moe_passes.fx.layerwise_aux_loss:LayerwiseAuxLossPass",
    "domino_ep": "moe_passes.fx.domino_ep:DominoEPPass",
    "async_offload": "moe_passes.fx.async_offload:AsyncOffloadPass",
}

POST_GRAD_PASSES: dict[str, str] = {
    "schedule_overlap": "moe_passes.fx.schedule:ScheduleOverlapPass",
}


def pass_class(name: str) -> type[GraphPass]:
    table = {**PRE_GRAD_PASSES, **POST_GRAD_PASSES}
    if name not in table:
        raise ValueError(f"unknown pass {name!r}; known passes: {sorted(table)}")
    module, _, attr = table[name].partition(":")
    return getattr(importlib.import_module(module), attr)
