"""Domino EP on the canonical ATen IR: region discovery (``regions``), row-locality (``kinds``), rewrite (``rewrite``)."""

from moe_passes.fx.domino.domino_pass import DominoEPPass, find_regions
from moe_passes.fx.domino.kinds import Kind, Unproven
from moe_passes.fx.domino.regions import MoERegion, RegionError, describe_trigger
from moe_passes.fx.domino.rewrite import chunk_sizes
from moe_passes.fx.domino.row_analysis import RowAnalysis

__all__ = ["DominoEPPass", "Kind", "MoERegion", "RegionError", "RowAnalysis", "Unproven", "chunk_sizes",
           "describe_trigger", "find_regions"]
