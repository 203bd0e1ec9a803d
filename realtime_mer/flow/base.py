"""The flow interface: options with OpenCV's names, the estimator protocol, input checks, strain."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class TVL1Options:
    """TV-L1 parameters, with the names and defaults of ``cv2.optflow.DualTVL1OpticalFlow_create``
    so that every implementation behind :class:`FlowEstimator` is interchangeable."""

    tau: float = 0.25
    lambda_: float = 0.15
    theta: float = 0.3
    nscales: int = 5
    warps: int = 5
    epsilon: float = 0.01
    inner_iterations: int = 30
    outer_iterations: int = 10
    scale_step: float = 0.8
    gamma: float = 0.0
    median_filtering: int = 5
    use_initial_flow: bool = False

    @classmethod
    def fast(cls) -> "TVL1Options":
        """A cheap setting for per-frame signals (spotting), not for the network maps: 3 scales,
        2 warps, 10 inner × 2 outer iterations, 3×3 median. Its end-point error against the
        default setting is measured in ``docs/BENCHMARKS.md`` ("Optical flow")."""
        return cls(nscales=3, warps=2, inner_iterations=10, outer_iterations=2,
                   median_filtering=3)


@runtime_checkable
class FlowEstimator(Protocol):
    """Dense optical flow from ``prev`` to ``nxt``.

    ``compute``: two greyscale images (H, W), uint8 or float32 (0..255) → flow (H, W, 2) float32,
    in pixels, channel 0 = u (horizontal, +right), channel 1 = v (vertical, +down), defined so that
    ``prev(x) ≈ nxt(x + flow(x))``.
    ``compute_batch``: (N, H, W) and (N, H, W) → (N, H, W, 2).
    """

    name: str

    def compute(self, prev: np.ndarray, nxt: np.ndarray) -> np.ndarray: ...

    def compute_batch(self, prev: np.ndarray, nxt: np.ndarray) -> np.ndarray: ...


def check_pair(prev: np.ndarray, nxt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate a greyscale pair and return it as float32 0..255 arrays.

    Raises ``ValueError`` with the reason for: different sizes, non-2D (colour) images, empty
    images, NaN/inf values.
    """
    prev = np.asarray(prev)
    nxt = np.asarray(nxt)
    for name, image in (("prev", prev), ("nxt", nxt)):
        if image.ndim != 2:
            raise ValueError(
                f"{name} must be a greyscale image (H, W); got shape {image.shape}. "
                "Convert colour frames with cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) first."
            )
        if image.size == 0:
            raise ValueError(f"{name} is empty (shape {image.shape})")
    if prev.shape != nxt.shape:
        raise ValueError(f"prev and nxt differ in size: {prev.shape} vs {nxt.shape}")
    prev = prev.astype(np.float32, copy=False)
    nxt = nxt.astype(np.float32, copy=False)
    if not (np.isfinite(prev).all() and np.isfinite(nxt).all()):
        raise ValueError("images contain NaN or inf values")
    return prev, nxt


def optical_strain(flow: np.ndarray) -> np.ndarray:
    """Magnitude of the optical strain tensor of a flow field.

    flow: (H, W, 2) float, pixels. Returns (H, W) float32:
    |ε| = sqrt(u_x² + v_y² + ½ (u_y + v_x)²), derivatives by central differences (one-sided at
    the border), in pixels per pixel.
    """
    flow = np.asarray(flow, dtype=np.float32)
    if flow.ndim != 3 or flow.shape[2] != 2:
        raise ValueError(f"flow must be (H, W, 2); got {flow.shape}")
    u, v = flow[..., 0], flow[..., 1]
    u_y, u_x = np.gradient(u)
    v_y, v_x = np.gradient(v)
    return np.sqrt(u_x**2 + v_y**2 + 0.5 * (u_y + v_x) ** 2).astype(np.float32)
