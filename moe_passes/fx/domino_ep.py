"""Compatibility path: the Domino EP pass lives in the ``moe_passes.fx.domino`` package."""

from moe_passes.fx.domino import (  # noqa: F401
    DominoEPPass,
    MoERegion,
    RegionError,
    chunk_sizes,
    describe_trigger,
    ensure_canonical,
    find_regions,
    repropagate,
)
