"""AHMSA-Net (adaptive hierarchical multi-scale attention network). See README.md."""

from __future__ import annotations

from training.models.ahmsa.model import (AdaptiveDownsample, AHMSANet, ChannelAttention,
                                         ChannelLayerNorm, FeedForward, MultiScaleAttentionBlock,
                                         SpatialMHSA)
from training.models.registry import register_model

__all__ = ["AHMSANet", "ChannelLayerNorm", "ChannelAttention", "SpatialMHSA", "FeedForward",
           "MultiScaleAttentionBlock", "AdaptiveDownsample", "ahmsa"]


@register_model("ahmsa")
def ahmsa(**kwargs) -> AHMSANet:
    """AHMSA-Net; kwargs: num_classes=3, in_channels=3, image_size=28, patch_size=7, dim=64,
    blocks=(2, 2, 8), heads=3, dim_head=32, ff_mult=4, dropout=0.0, downsample_factor=2."""
    return AHMSANet(**kwargs)
