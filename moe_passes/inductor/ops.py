"""Deprecated location of the offload custom ops; they live in :mod:`moe_passes.ops.offload`.

Kept as a re-export so ``from moe_passes.inductor.ops import OFFLOAD_START`` keeps working. Inductor needs
no lowering of its own for them: they are functional custom ops with fake kernels, which Inductor runs
as extern (fallback) kernels. The dependency points downward only (inductor -> ops), never fx -> inductor.
"""

from __future__ import annotations

import logging

from moe_passes.ops.offload import OFFLOAD_START, OFFLOAD_WAIT, offload, pending_copies, side_stream

log = logging.getLogger(__name__)

__all__ = ["OFFLOAD_START", "OFFLOAD_WAIT", "offload", "pending_copies", "side_stream"]
