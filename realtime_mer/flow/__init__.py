"""Optical flow stage: TV-L1 (OpenCV reference, and the project's batched PyTorch TV-L1 as
"torch-tvl1"), Farnebäck (the spotter's per-frame flow) and DIS, and optical strain.

torch is imported only when a torch estimator is asked for (``create_flow("torch-tvl1")``,
``"auto"`` probing for CUDA, or the attribute ``TorchTVL1``): importing this package stays cheap."""

from __future__ import annotations

import logging

from realtime_mer.flow.base import FlowEstimator, TVL1Options, check_pair, optical_strain
from realtime_mer.flow.opencv_flow import DISFlow, FarnebackFlow, OpenCVTVL1

log = logging.getLogger(__name__)

__all__ = [
    "FlowEstimator", "TVL1Options", "check_pair", "optical_strain", "OpenCVTVL1", "DISFlow",
    "FarnebackFlow",
    "create_flow", "FLOW_NAMES", "TorchTVL1",
]

FLOW_NAMES = ("auto", "opencv-tvl1", "torch-tvl1", "farneback", "dis")


def __getattr__(name: str):
    if name == "TorchTVL1":
        from realtime_mer.flow.torch_tvl1 import TorchTVL1

        return TorchTVL1
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _cuda_available() -> bool:
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def create_flow(name: str = "auto", **kwargs) -> FlowEstimator:
    """Build a flow estimator by name.

    ``"torch-tvl1"``: :class:`~realtime_mer.flow.torch_tvl1.TorchTVL1` (kwargs: options, device,
    dtype, compile, ...). ``"auto"``: TorchTVL1 on CUDA when a GPU is there, else the OpenCV
    reference on CPU: on a 2-core CPU ours is 3-4x faster once compiled, batch 1 included, but
    its first compile there takes minutes when torch's on-disk cache is cold
    (``docs/BENCHMARKS.md``, "Optical flow"); ask for ``"torch-tvl1"`` by name to use it on CPU.
    ``auto`` logs which one it chose.
    """
    if name == "auto":
        if _cuda_available():
            log.info("flow auto: torch-tvl1 on CUDA")
            name = "torch-tvl1"
            kwargs.setdefault("device", "cuda")
        else:
            log.info("flow auto: opencv-tvl1 on CPU (no CUDA device)")
            name = "opencv-tvl1"
    if name == "opencv-tvl1":
        return OpenCVTVL1(kwargs.pop("options", TVL1Options()), **kwargs)
    if name == "torch-tvl1":
        from realtime_mer.flow.torch_tvl1 import TorchTVL1

        return TorchTVL1(kwargs.pop("options", TVL1Options()), **kwargs)
    if name == "dis":
        return DISFlow(**kwargs)
    if name == "farneback":
        return FarnebackFlow(**kwargs)
    raise ValueError(f"unknown flow {name!r}; choose from {FLOW_NAMES}")
