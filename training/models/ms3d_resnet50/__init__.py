"""Multi-scale 3D-ResNet50 (Jin et al., MBE 2024). See README.md."""

from __future__ import annotations

from training.models.ms3d_resnet50.model import (AFFA, RC1, RC2, RC3, Bottleneck3D,
                                                 ChannelAttention3D, MultiScale3DResNet50,
                                                 SpatioTemporalAttention)
from training.models.registry import ModelInput, register_model

__all__ = ["MultiScale3DResNet50", "Bottleneck3D", "SpatioTemporalAttention", "RC1", "RC2", "RC3",
           "AFFA", "ChannelAttention3D", "ms3d_resnet50"]


# Fed 16-frame flow stacks of raw recordings (training.clips), not the 3DB maps.
@register_model("ms3d_resnet50", ModelInput(None))
def ms3d_resnet50(**kwargs) -> MultiScale3DResNet50:
    """Multi-scale 3D-ResNet50; kwargs: num_classes=3, in_channels=3, width=64,
    layers=(3, 4, 6, 3), head_hidden=256, dropout=0.5, select="confidence"|"mean",
    use_attention=True, use_multiscale=True. Input (N, C, 16, 134, 134)."""
    return MultiScale3DResNet50(**kwargs)
