"""Optical flow stage: TV-L1 (OpenCV reference; PyTorch batched joins as "torch-tvl1"), DIS for
per-frame signals, and optical strain."""

from __future__ import annotations

import logging

from realtime_mer.flow.base import FlowEstimator, TVL1Options, check_pair, optical_strain
from realtime_mer.flow.opencv_flow import DISFlow, OpenCVTVL1

log = logging.getLogger(__name__)

__all__ = [
    "FlowEstimator", "TVL1Options", "check_pair", "optical_strain", "OpenCVTVL1", "DISFlow",
    "create_flow", "FLOW_NAMES",
]

FLOW_NAMES = ("auto", "opencv-tvl1", "dis")


def create_flow(name: str = "auto", **kwargs) -> FlowEstimator:
    """Build a flow estimator by name. ``auto`` is the OpenCV TV-L1 reference on CPU."""
    if name in ("auto", "opencv-tvl1"):
        return OpenCVTVL1(kwargs.pop("options", TVL1Options()), **kwargs)
    if name == "dis":
        return DISFlow(**kwargs)
    raise ValueError(f"unknown flow {name!r}; choose from {FLOW_NAMES}")
