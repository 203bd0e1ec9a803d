"""MJFN (Li et al., Computational Visual Media 2021). See README.md."""

from __future__ import annotations

from training.models.mjfn.model import FUSIONS, MJFN, JointFeatureModule
from training.models.registry import ModelInput, register_model

__all__ = ["MJFN", "JointFeatureModule", "FUSIONS", "mjfn"]


# The paper feeds the colour-coded flow of the face at 224 x 224.
@register_model("mjfn", ModelInput("colour", 224, "input_size"))
def mjfn(**kwargs) -> MJFN:
    """MJFN; kwargs: num_classes=3, in_channels=3, fusion="softmax"|"average"|"backbone",
    dropout=0.5, hidden=256, input_size=224."""
    return MJFN(**kwargs)
