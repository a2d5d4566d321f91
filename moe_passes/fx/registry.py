"""Moved to ``moe_passes.registry`` (plain data the config validates against); kept for old imports."""

from moe_passes.registry import POST_GRAD_PASSES, PRE_GRAD_PASSES, pass_class, rank, registered  # noqa: F401

__all__ = ["POST_GRAD_PASSES", "PRE_GRAD_PASSES", "pass_class", "rank", "registered"]
