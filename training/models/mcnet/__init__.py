"""MCNet (Chang et al., Mathematics 2025, 13, 2330). See README.md."""

from __future__ import annotations

from training.models.mcnet.model import (CBAM, MCCFM, RKCB, ChebyshevKAN1x1, MCNet,
                                         MobileNetV3SmallTrunk)
from training.models.registry import ModelInput, register_model

__all__ = ["MCNet", "MobileNetV3SmallTrunk", "ChebyshevKAN1x1", "CBAM", "RKCB", "MCCFM", "mcnet"]


# The paper feeds its magnified, AU-weighted colour image at 224 x 224.
@register_model("mcnet", ModelInput("mcnet", 224))
def mcnet(**kwargs) -> MCNet:
    """MCNet; kwargs: num_classes=3, in_channels=3, use_kan=True, use_rkcb=True, use_mccfm=True,
    kan_degree=3, mccfm_heads=8, head_hidden=1024, dropout=0.2."""
    return MCNet(**kwargs)
