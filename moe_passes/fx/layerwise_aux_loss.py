"""Deprecated location: the pass lives in the package ``moe_passes.fx.aux_loss``.

Kept so ``from moe_passes.fx.layerwise_aux_loss import LayerwiseAuxLossPass`` keeps working.
"""

from moe_passes.fx.aux_loss.layerwise import LayerwiseAuxLossPass  # noqa: F401

__all__ = ["LayerwiseAuxLossPass"]
