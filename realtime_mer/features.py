"""Features stage: an onset/apex pair of face crops → the 28×28×3 (u, v, strain) network input
(and, for engines that take both phases of a movement, the apex/offset pair's map beside it:
:func:`movement_map`).

This is the ONE function that makes the map the 3DB-trained networks expect; training reads the
published maps with :func:`load_3db_map`, the live pipeline computes them with
:func:`flow_strain_map`. The recipe was calibrated against the published map of the one 3DB
sample whose onset/apex frames we have (``docs/FEATURES.md``, ``benchmarks/calibration.py``):

1. both crops → greyscale → ``flow_size``×``flow_size`` (``cv2.INTER_AREA``);
2. TV-L1 flow onset → apex at that size (OpenCV defaults except ``lambda_``, see below);
3. optical strain at ``flow_size`` with *smoothed* (Sobel) derivatives;
4. u, v and strain each area-averaged down to ``map_size``;
5. each channel min-max normalised on its own to [0, 1].

The published strain channel is what differs from the textbook recipe: it behaves like the
magnitude of smoothed flow derivatives *averaged* over each 28×28 cell, not like central
differences taken at full resolution and then resampled (strain r 0.67 → 0.87 with OpenCV's
default TV-L1, 0.91 with the calibrated one; docs/FEATURES.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from realtime_mer.errors import InputError
from realtime_mer.flow import FlowEstimator, TVL1Options, create_flow

__all__ = [
    "FeatureOptions", "FeatureExtractor", "flow_strain_map", "movement_map", "load_3db_map",
    "published_strain", "normalise_minmax", "CHANNELS", "MOVEMENT_CHANNELS", "CALIBRATED_TVL1",
    "uses_torch_flow", "area_matrix", "maps_from_flow_tensor",
]

CHANNELS = ("u", "v", "strain")
# Both phases of a movement: the onset→apex map, then the apex→offset map (the face going back).
MOVEMENT_CHANNELS = CHANNELS + tuple(f"{c}_apex_offset" for c in CHANNELS)

# OpenCV's default lambda_ is 0.15. On the calibration pair 0.2 matches the published u and v
# better both on the raw pair (u r 0.92 → 0.95) and on a lightly blurred copy that undoes its GIF
# quantisation (0.96 → 0.99); 0.25 scores a little higher on the raw pair only, which we read as
# compensating that quantisation noise, not as a property of the published pipeline.
CALIBRATED_TVL1 = TVL1Options(lambda_=0.2)

_TVL1_NAMES = ("auto", "opencv-tvl1", "torch-tvl1")


@dataclass(frozen=True)
class FeatureOptions:
    """How the (u, v, strain) map is made. Defaults are the calibrated recipe.

    flow_size: side (px) of the square the crops are resized to before TV-L1. 128 is the face
        aligner's crop size (no resampling in the live pipeline); 96 to 128 calibrate alike,
        160 is worse (TV-L1's smoothing is in pixels, so its scale relative to the face moves).
    map_size: side of the output map (the networks take 28).
    flow: estimator name for :func:`realtime_mer.flow.create_flow`.
    tvl1: TV-L1 parameters, used when ``flow`` names a TV-L1 estimator.
    strain_ksize: Sobel aperture (3, 5 or 7) of the flow derivatives in the strain. Strain r
        on the calibration pair: 0.89 / 0.91 / 0.92; 5 is the middle of a flat optimum.
    presmooth_sigma: Gaussian sigma (px, at the input crop's resolution) applied to both crops
        before resizing; 0 = off. 1.0 is chosen for robustness, not for one pair: on the
        calibration pair it raises r at every λ tried and under every perturbation a recording
        brings (JPEG, sensor noise, a pixel of head shift, a smaller face; mean r 0.947 → 0.967,
        worst 0.883 → 0.927 at λ 0.2, docs/FEATURES_ROBUSTNESS.md), with a flat optimum from 0.5
        to 1.5; on a held-out pair from another database it lifts r from 0.77 / 0.96 / 0.66 to
        0.90 / 0.97 / 0.84.
    """

    flow_size: int = 128
    map_size: int = 28
    flow: str = "opencv-tvl1"
    tvl1: TVL1Options = field(default=CALIBRATED_TVL1)
    strain_ksize: int = 5
    presmooth_sigma: float = 1.0

    def __post_init__(self) -> None:
        if self.flow_size < 8:
            raise ValueError(f"flow_size must be >= 8; got {self.flow_size}")
        if not 1 <= self.map_size <= self.flow_size:
            raise ValueError(
                f"map_size must be in 1..flow_size ({self.flow_size}); got {self.map_size}")
        if self.strain_ksize not in (3, 5, 7):
            raise ValueError(f"strain_ksize must be 3, 5 or 7; got {self.strain_ksize}")
        if self.presmooth_sigma < 0:
            raise ValueError(f"presmooth_sigma must be >= 0; got {self.presmooth_sigma}")


def to_grey(image: np.ndarray, name: str = "image") -> np.ndarray:
    """(H, W) greyscale of a grey, BGR or BGRA image; ValueError naming ``name`` otherwise."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    elif image.ndim == 3 and image.shape[2] in (3, 4):
        code = cv2.COLOR_BGR2GRAY if image.shape[2] == 3 else cv2.COLOR_BGRA2GRAY
        if image.dtype not in (np.uint8, np.uint16, np.float32):
            image = image.astype(np.float32)
        image = cv2.cvtColor(image, code)
    if image.ndim != 2:
        raise ValueError(f"{name} must be greyscale (H, W) or BGR (H, W, 3); got {image.shape}")
    if image.size == 0:
        raise ValueError(f"{name} is empty (shape {image.shape})")
    return image


def _prepare(image: np.ndarray, options: FeatureOptions) -> np.ndarray:
    image = image.astype(np.float32, copy=False)
    if not np.isfinite(image).all():
        raise ValueError("images contain NaN or inf values")
    if options.presmooth_sigma > 0:
        image = cv2.GaussianBlur(image, (0, 0), options.presmooth_sigma)
    size = (options.flow_size, options.flow_size)
    if image.shape != size:
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    return image


def published_strain(flow: np.ndarray, ksize: int = 5) -> np.ndarray:
    """Optical strain magnitude as in the published 3DB maps, before their downsampling.

    flow: (H, W, 2) float, pixels. Returns (H, W) float32, pixels per pixel:
    |ε| = sqrt(u_x² + v_y² + ½ (u_y + v_x)²) with derivatives from a normalised Sobel kernel of
    aperture ``ksize`` (reflected border).

    Same formula as :func:`realtime_mer.flow.optical_strain`, different derivative: that one
    uses plain central differences, which is the standard definition and what the spotter
    needs. The published maps' strain is smoother than central differences can give (see the
    module docstring), and the Sobel smoothing reproduces it; keep the two apart.
    """
    flow = np.asarray(flow, dtype=np.float32)
    if flow.ndim != 3 or flow.shape[2] != 2:
        raise ValueError(f"flow must be (H, W, 2); got {flow.shape}")
    # normalize=True scales the kernel so that a ramp of slope 1 gives 1: units stay px/px.
    kx = cv2.getDerivKernels(1, 0, ksize, normalize=True)
    ky = cv2.getDerivKernels(0, 1, ksize, normalize=True)
    u, v = flow[..., 0], flow[..., 1]
    u_x = cv2.sepFilter2D(u, cv2.CV_32F, kx[0], kx[1])
    u_y = cv2.sepFilter2D(u, cv2.CV_32F, ky[0], ky[1])
    v_x = cv2.sepFilter2D(v, cv2.CV_32F, kx[0], kx[1])
    v_y = cv2.sepFilter2D(v, cv2.CV_32F, ky[0], ky[1])
    return np.sqrt(u_x**2 + v_y**2 + 0.5 * (u_y + v_x) ** 2).astype(np.float32)


def normalise_minmax(channel: np.ndarray) -> np.ndarray:
    """(H, W) → (H, W) float32 in [0, 1], min → 0, max → 1. A constant channel (no motion at
    all) has no range to stretch and becomes all zeros rather than NaN."""
    channel = np.asarray(channel, dtype=np.float32)
    lo, hi = float(channel.min()), float(channel.max())
    if not hi > lo:
        return np.zeros_like(channel)
    return ((channel - lo) / (hi - lo)).astype(np.float32)


def _strain_map_from_flow(flow: np.ndarray, options: FeatureOptions) -> np.ndarray:
    size = (options.map_size, options.map_size)
    strain = published_strain(flow, options.strain_ksize)
    # INTER_AREA averages each output cell; INTER_LINEAR would sample a few pixels of the
    # high-resolution strain and alias (strain r 0.82 instead of 0.91 on the calibration pair).
    channels = [cv2.resize(c, size, interpolation=cv2.INTER_AREA)
                for c in (flow[..., 0], flow[..., 1], strain)]
    return np.stack([normalise_minmax(c) for c in channels], axis=-1)


def area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of a 1-D area average from ``n_in`` to ``n_out`` samples (each
    output sample the mean of the input interval it covers, partial samples weighted by the
    part covered): what ``cv2.INTER_AREA`` does when shrinking, as a matrix, so the same average
    can run on any device (``A @ X @ A.T`` for a 2-D map)."""
    scale = n_in / n_out
    weights = np.zeros((n_out, n_in), np.float64)
    for i in range(n_out):
        start, stop = i * scale, (i + 1) * scale
        for j in range(int(np.floor(start)), min(int(np.ceil(stop)), n_in)):
            weights[i, j] = min(stop, j + 1) - max(start, j)
    return (weights / scale).astype(np.float32)


def maps_from_flow_tensor(flow, options: FeatureOptions = FeatureOptions()):
    """Steps 3-5 of the recipe on a batch of flows, on their own device (a GPU flow's maps
    never leave the GPU until they are done): (N, 2, flow_size, flow_size) torch flow →
    (N, map_size, map_size, 3) torch maps. The same numbers as :func:`_strain_map_from_flow`:
    the Sobel derivatives with OpenCV's normalised kernels and reflected border, and the area
    average as a matrix (test_features checks the two agree)."""
    import torch
    import torch.nn.functional as F

    if flow.ndim != 4 or flow.shape[1] != 2:
        raise ValueError(f"flow must be (N, 2, H, W); got {tuple(flow.shape)}")
    flow = flow.float()
    device, k = flow.device, options.strain_ksize
    deriv, smooth = (torch.from_numpy(np.ascontiguousarray(c.ravel(), np.float32)).to(device)
                     for c in cv2.getDerivKernels(1, 0, k, normalize=True))
    # separable correlation as OpenCV's sepFilter2D: d/dx = smooth along y, deriv along x
    padded = F.pad(flow.reshape(-1, 1, *flow.shape[2:]), (k // 2,) * 4, mode="reflect")
    along_x = F.conv2d(padded, deriv.view(1, 1, 1, k))
    along_x_smooth = F.conv2d(padded, smooth.view(1, 1, 1, k))
    d_dx = F.conv2d(along_x, smooth.view(1, 1, k, 1)).reshape(flow.shape)
    d_dy = F.conv2d(along_x_smooth, deriv.view(1, 1, k, 1)).reshape(flow.shape)
    u_x, v_x = d_dx[:, 0], d_dx[:, 1]
    u_y, v_y = d_dy[:, 0], d_dy[:, 1]
    strain = torch.sqrt(u_x**2 + v_y**2 + 0.5 * (u_y + v_x) ** 2)
    channels = torch.stack([flow[:, 0], flow[:, 1], strain], dim=1)  # (N, 3, H, W)
    rows = torch.from_numpy(area_matrix(flow.shape[2], options.map_size)).to(device)
    cols = torch.from_numpy(area_matrix(flow.shape[3], options.map_size)).to(device)
    small = rows @ channels @ cols.T  # (N, 3, map, map)
    low = small.amin(dim=(2, 3), keepdim=True)
    span = small.amax(dim=(2, 3), keepdim=True) - low
    # a constant channel has no range to stretch: zeros, as normalise_minmax
    normalised = torch.where(span > 0, (small - low) / torch.where(span > 0, span, 1.0),
                             torch.zeros_like(small))
    return normalised.permute(0, 2, 3, 1).contiguous()


def uses_torch_flow(options: FeatureOptions) -> bool:
    """Whether the options' flow is the project's PyTorch TV-L1 (asked for, or "auto" on a
    machine with CUDA), which compiles before its first pair."""
    if options.flow == "torch-tvl1":
        return True
    if options.flow != "auto":
        return False
    from realtime_mer.flow import _cuda_available

    return _cuda_available()


def _new_estimator(options: FeatureOptions) -> FlowEstimator:
    kwargs = {"options": options.tvl1} if options.flow in _TVL1_NAMES else {}
    return create_flow(options.flow, **kwargs)


# Building a cv2 TV-L1 object per call costs more than a small flow; the bare function shares
# one per (flow, tvl1) setting. cv2 algorithm objects must not run calc() from two threads at
# once, so threaded callers should each hold a FeatureExtractor (which owns its estimator).
_FLOW_CACHE: dict[tuple, FlowEstimator] = {}


def _estimator(options: FeatureOptions) -> FlowEstimator:
    key = (options.flow, options.tvl1 if options.flow in _TVL1_NAMES else None)
    estimator = _FLOW_CACHE.get(key)
    if estimator is None:
        estimator = _FLOW_CACHE[key] = _new_estimator(options)
    return estimator


def flow_strain_map(
    onset: np.ndarray,
    apex: np.ndarray,
    options: FeatureOptions = FeatureOptions(),
    flow: FlowEstimator | None = None,
) -> np.ndarray:
    """The 3DB-style network input for one onset/apex pair.

    onset, apex: face crops of equal size, greyscale (H, W) uint8 (or float 0..255); BGR
        (H, W, 3) or BGRA colour images are converted to grey with ``cv2.COLOR_BGR2GRAY``.
        Any size; they are resized to ``options.flow_size`` square (aspect ratio not kept,
        like the published maps of non-square crops).
    options: the recipe (defaults = calibrated against the published maps).
    flow: an estimator to use instead of ``create_flow(options.flow)`` (shared per options).

    Returns (map_size, map_size, 3) float32 in [0, 1], channels (u, v, strain): u is horizontal
    flow onset → apex (+ = rightward), v vertical (+ = downward), each min-max normalised on its
    own, so 0 is the map's most leftward/upward motion, not zero motion.

    Raises ValueError for crops of different size, empty crops, non-finite values or shapes that
    are not images.
    """
    onset = to_grey(onset, "onset")
    apex = to_grey(apex, "apex")
    if onset.shape != apex.shape:
        raise ValueError(f"onset and apex differ in size: {onset.shape} vs {apex.shape}")
    estimator = flow if flow is not None else _estimator(options)
    uv = estimator.compute(_prepare(onset, options), _prepare(apex, options))
    return _strain_map_from_flow(np.asarray(uv, dtype=np.float32), options)


def movement_map(
    onset: np.ndarray,
    apex: np.ndarray,
    offset: np.ndarray,
    options: FeatureOptions = FeatureOptions(),
    flow: FlowEstimator | None = None,
) -> np.ndarray:
    """Both phases of one movement: (map_size, map_size, 6) float32, the onset→apex map of
    :func:`flow_strain_map` (channels 0-2) and the apex→offset map made the same way (channels
    3-5, :data:`MOVEMENT_CHANNELS`), each channel normalised on its own.

    The second phase is the face going back: its u and v mostly oppose the first's. Where the
    offset is the apex itself (a movement whose end was not seen), the second map has no motion
    to stretch and is all zeros, as :func:`normalise_minmax` makes a constant channel."""
    if np.shape(offset)[:2] != np.shape(apex)[:2]:
        raise ValueError(f"apex and offset differ in size: {np.shape(apex)} vs "
                         f"{np.shape(offset)}")
    return np.concatenate([flow_strain_map(onset, apex, options, flow),
                           flow_strain_map(apex, offset, options, flow)], axis=-1)


class FeatureExtractor:
    """Stage object for the pipeline: ``FeatureExtractor(options).process(onset, apex)`` →
    (map_size, map_size, 3) float32 map, as :func:`flow_strain_map`; with ``offset`` as well,
    both phases' (map_size, map_size, 6), as :func:`movement_map`. Owns its flow estimator
    (not the shared one), so extractors in different threads do not share a cv2 object."""

    def __init__(self, options: FeatureOptions = FeatureOptions(),
                 flow: FlowEstimator | None = None) -> None:
        self.options = options
        self._flow = flow if flow is not None else _new_estimator(options)

    def process(self, onset: np.ndarray, apex: np.ndarray,
                offset: np.ndarray | None = None) -> np.ndarray:
        if offset is not None:
            return movement_map(onset, apex, offset, self.options, self._flow)
        return flow_strain_map(onset, apex, self.options, self._flow)

    def process_batch(self, crops: list[tuple[np.ndarray, ...]]) -> list[np.ndarray]:
        """Several (onset, apex) or (onset, apex, offset) crops → their maps, as :meth:`process`
        gives them. With the PyTorch TV-L1 every pair goes through the flow together and the
        rest of the recipe runs on the flow's device (:func:`maps_from_flow_tensor`); other
        flows take them one by one."""
        if any(len(c) not in (2, 3) for c in crops):
            raise ValueError("each event's crops must be (onset, apex) or (onset, apex, offset)")
        pairs = [pair for c in crops for pair in zip(c[:-1], c[1:])]
        maps = self._pair_maps(pairs)
        out, start = [], 0
        for c in crops:
            phases = len(c) - 1
            out.append(maps[start] if phases == 1
                       else np.concatenate(maps[start:start + phases], axis=-1))
            start += phases
        return out

    def _pair_maps(self, pairs: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
        if not hasattr(self._flow, "flow_tensor") or len(pairs) < 2:
            return [self.process(onset, apex) for onset, apex in pairs]
        import torch

        prepared = []
        for onset, apex in pairs:
            onset, apex = to_grey(onset, "onset"), to_grey(apex, "apex")
            if onset.shape != apex.shape:
                raise ValueError(f"the crops of an event differ in size: {onset.shape} vs "
                                 f"{apex.shape}")
            prepared.append((_prepare(onset, self.options), _prepare(apex, self.options)))
        onsets = torch.from_numpy(np.stack([o for o, _ in prepared]))
        apexes = torch.from_numpy(np.stack([a for _, a in prepared]))
        maps = maps_from_flow_tensor(self._flow.flow_tensor(onsets, apexes), self.options)
        return list(maps.cpu().numpy())

    def warm_up(self) -> None:
        """One pair through the flow, so a compiled flow (the PyTorch TV-L1) compiles at start,
        not at the first event of a live stream."""
        rng = np.random.default_rng(0)
        crop = rng.integers(0, 255, (self.options.flow_size,) * 2).astype(np.uint8)
        self.process(crop, np.roll(crop, 1, axis=1))

    def reset(self) -> None:
        """No state carries over between pairs; present for the stage convention."""


def load_3db_map(path: str | Path) -> np.ndarray:
    """Read a published 3DB feature map (``data/megc2019_3db/flow/*.png``).

    The PNG stores R = u, G = v, B = strain (each 0..255); ``cv2.imread`` returns BGR, so its
    channel 0 is strain. Returns (H, W, 3) float32 in [0, 1] with channels (u, v, strain), the
    layout :func:`flow_strain_map` produces. Raises InputError for a missing, unreadable or
    non-colour file.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"3DB feature map not found: {path}")
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise InputError(f"cannot read {path} as an image (corrupt or not a PNG?)")
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise InputError(
            f"{path} is not a 3-channel (u, v, strain) map; its shape is {image.shape}")
    if image.dtype != np.uint8:
        raise InputError(f"{path} must be 8-bit; it is {image.dtype}")
    bgr = image[..., :3]
    return (bgr[..., ::-1].astype(np.float32) / 255.0).copy()
