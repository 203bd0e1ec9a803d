"""Spotting: find facial movements (onset → apex → offset) in a stream of aligned face crops, per
facial region, with thresholds in units of the face and a stated detection floor.

For each frame the dense flow (Farnebäck by default) from a reference crop is measured; the head's
own motion (a robust affine fit of the whole face's flow) is subtracted; then in each region
(brows, lids, upper lip, lip corners) the mean residual displacement of each of its parts (left
and right brow, ...) is taken in Gaussian windows centred on this person's own landmarks, and the
region's value is the root mean square of its parts' displacements, in % of the inter-ocular
distance (IOD). While nothing happens the reference is the crop ``reference_lag_ms`` earlier;
once a region crosses its threshold the reference is frozen (until a lag after the event), so
during an event each value is the displacement from the last neutral face and rises to the apex
and falls back in one lobe.

Each region has its own threshold from its own recent values against the frame a lag back, at
every frame (median + k·robust σ), so a talking mouth raises the mouth's threshold and not the
brows'. The **detection floor** of a region is that threshold expressed as a movement: the
smallest movement (peak displacement, % IOD) the spotter would report there and then, given the
region's gain (measured: a movement of A % gives a value of about gain·A). Events larger than
``max_micro_pct`` or longer than ``max_micro_ms`` are macro-expressions. Blinks
(:mod:`realtime_mer.blinks`, from the eyelid landmarks) are reported as their own kind, and the
lids and brows are kept out of movement events while the eyes close.

:class:`Spotter` is the push-based state machine; :func:`spot_offline` computes the flow in
batches ahead of the same rules and gives the same events and trace to the bit.
See ``docs/SPOTTING.md``.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from realtime_mer.blinks import BlinkDetector, BlinkOptions, gaze
from realtime_mer.face import CANONICAL_STABLE_28, CANONICAL_STRETCH_X
from realtime_mer.flow import FlowEstimator, create_flow
from realtime_mer.spot_events import EventDetector, SpotEvent, blink_event

log = logging.getLogger(__name__)

__all__ = [
    "SpotterOptions", "SpotEvent", "SpotTrace", "Spotter", "spot_offline", "region_values",
    "make_flow", "DEFAULT_REGIONS", "DEFAULT_ANCHORS_28", "REGION_NAMES",
]

#: Regions as (name, groups): each group is a set of mirror parts (left and right, or one
#: part on the midline) that an action unit moves together, each part a few MediaPipe Face Mesh
#: landmarks whose Gaussian windows are averaged. Brows: inner ends (66 107 / 296 336; the brow
#: lowerer moves them alone) and the rest (70 63 105 / 300 293 334; the brow raisers move all);
#: lids: lower (145 153 144 / 374 380 373) and upper (159 158 160 / 386 385 387); upper lip:
#: its halves (39 37 / 267 269) and the philtrum (0); lip corners (61 / 291).
DEFAULT_REGIONS: tuple[tuple[str, tuple[tuple[tuple[int, ...], ...], ...]], ...] = (
    ("brows", (((66, 107), (296, 336)), ((70, 63, 105), (300, 293, 334)))),
    ("lids", (((145, 153, 144), (374, 380, 373)), ((159, 158, 160), (386, 385, 387)))),
    ("upper lip", (((39, 37), (267, 269)), ((0,),))),
    ("lip corners", (((61,), (291,)),)),
)
REGION_NAMES = tuple(name for name, _ in DEFAULT_REGIONS)

#: Where the region landmarks sit in the 28x28 frame when the spotter is given no landmarks:
#: the median over the eight real face videos of ../shared/media under the stable-point
#: alignment, made mirror-symmetric. With landmarks, each person's own positions are used.
DEFAULT_ANCHORS_28: dict[int, tuple[float, float]] = {
    70: (1.20, 4.85), 63: (2.38, 3.72), 105: (4.38, 3.07), 66: (7.05, 3.08), 107: (10.26, 3.33),
    145: (6.79, 8.65), 153: (7.89, 8.54), 144: (5.62, 8.58),
    159: (6.48, 7.13), 158: (7.62, 7.17), 160: (5.38, 7.26),
    39: (10.08, 18.95), 37: (11.93, 18.63), 0: (13.83, 18.85),
    61: (7.88, 20.07),
}
# The image-right side mirrors the image-left one about the template's midline.
_MIRROR = {300: 70, 293: 63, 334: 105, 296: 66, 336: 107, 374: 145, 380: 153, 373: 144,
           386: 159, 385: 158, 387: 160, 267: 37, 269: 39, 291: 61}
_MID = float(CANONICAL_STABLE_28[4, 0])
DEFAULT_ANCHORS_28.update({r: (2 * _MID - DEFAULT_ANCHORS_28[l][0], DEFAULT_ANCHORS_28[l][1])
                           for r, l in _MIRROR.items()})

#: The template's eye distance (eye-corner midpoints) in 28x28 units, without the dataset
#: stretch: the face unit of every value here (values are % of it).
_IOD_28 = float(np.linalg.norm((CANONICAL_STABLE_28[2] + CANONICAL_STABLE_28[3]) / 2
                               - (CANONICAL_STABLE_28[0] + CANONICAL_STABLE_28[1]) / 2))


@dataclass(frozen=True)
class SpotterOptions:
    """Spotting parameters. Windows are in milliseconds, never frames (datasets are recorded at
    100-200 fps, webcams deliver 15-60 fps, often irregularly); sizes are in % of the IOD."""

    # Compare frame t with the stored crop nearest t - lag while idle: long enough that most of a
    # micro-expression's rise shows, short enough that speech and drift between the two frames
    # stay small.
    reference_lag_ms: float = 133.0
    # Each region's running statistics (median and MAD) of its values against the crop a lag
    # back, at every frame, over this window.
    baseline_window_ms: float = 3000.0
    warmup_ms: float = 1000.0
    min_baseline_samples: int = 8
    # Threshold = median + threshold_k · 1.4826 · MAD of those values, and never a
    # movement smaller than min_floor_pct (so a perfectly still face does not fire on noise).
    threshold_k: float = 12.0
    min_floor_pct: float = 0.5
    # An event ends when its regions fall below median + release_fraction · (threshold - median);
    # its onset and offset are where its main region crosses the larger of that level and
    # edge_fraction of its peak (above the median).
    release_fraction: float = 0.3
    edge_fraction: float = 0.2
    # Shorter events are noise; longer than max_micro_ms or larger than max_micro_pct → macro;
    # still open after max_event_ms → closed there (a pose change must not hold the spotter).
    min_event_ms: float = 100.0
    # A region's movement counts only where consecutive frames over the threshold last at
    # least this long (each frame for the median frame interval): a lone frame over it at
    # 24-30 fps (33-42 ms) is a call that noise (a re-encode, landmark jitter) makes or breaks,
    # while a real movement's apex spans several; at 20 fps and slower (50 ms a frame, with room
    # for a camera's jitter) one frame is enough.
    min_over_ms: float = 45.0
    max_micro_ms: float = 500.0
    max_micro_pct: float = 5.0
    max_event_ms: float = 2000.0
    crop_size: int = 128
    stretch_x: float = CANONICAL_STRETCH_X
    # Any name create_flow accepts, with its keyword arguments as (name, value) pairs.
    flow: str = "farneback"
    flow_kwargs: tuple[tuple[str, object], ...] = ()
    regions: tuple[tuple[str, tuple[tuple[tuple[int, ...], ...], ...]], ...] = DEFAULT_REGIONS
    # Value per % of movement, per region (same order): a movement of A % (peak displacement of
    # a smooth, action-unit-sized field) gives a region value of about gain · A at its apex.
    # Measured on the still faces of the tuning clips (docs/SPOTTING.md).
    region_gains: tuple[float, ...] = (0.53, 0.44, 0.58, 0.61)
    # σ of each landmark's Gaussian window, in IOD.
    window_sigma: float = 0.07
    # The region windows follow the median landmark positions of the last anchor_window_ms,
    # refreshed every anchor_update_ms: a person's own face, not an expression's frame.
    anchor_window_ms: float = 2000.0
    anchor_update_ms: float = 500.0
    # Head motion = affine fit of the flow inside this ellipse (cx, cy, rx, ry; 28x28 units),
    # refitted on the trim_fraction of points that fit best.
    face_ellipse: tuple[float, float, float, float] = (14.0, 14.5, 12.0, 13.5)
    trim_fraction: float = 0.5
    blink: BlinkOptions = field(default_factory=BlinkOptions)
    # Regions a blink moves: masked while the eyes close, and left out of the events around it.
    blink_regions: tuple[str, ...] = ("lids", "brows")
    # Regions a glance moves: the lid windows border the irises, so between two frames where the
    # irises sit more than glance_shift eye widths apart (blinks.gaze) they measure the eyeball
    # turning, not the lids; masked in that pair.
    glance_regions: tuple[str, ...] = ("lids",)
    glance_shift: float = 0.1
    stride: int = 2
    max_fps: float = 250.0

    def __post_init__(self) -> None:
        for name in ("reference_lag_ms", "baseline_window_ms", "max_micro_ms", "max_event_ms",
                     "max_fps", "min_floor_pct", "max_micro_pct", "window_sigma",
                     "anchor_window_ms", "anchor_update_ms"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0; got {getattr(self, name)}")
        if not self.min_over_ms >= 0:
            raise ValueError(f"min_over_ms must be >= 0; got {self.min_over_ms}")
        if self.crop_size < 32:
            raise ValueError(f"crop_size must be >= 32; got {self.crop_size}")
        if not self.regions:
            raise ValueError("at least one region is needed")
        if len(self.region_gains) != len(self.regions) or min(self.region_gains) <= 0:
            raise ValueError(f"region_gains needs one positive gain per region "
                             f"({len(self.regions)}); got {self.region_gains}")
        for name, groups in self.regions:
            for part in (part for group in groups for part in group):
                if not part:
                    raise ValueError(f"region {name!r} has an empty part")
                if any(i not in DEFAULT_ANCHORS_28 for i in part):
                    raise ValueError(f"region {name!r}: landmarks {part} have no default "
                                     "position in DEFAULT_ANCHORS_28")
        if not 0.0 < self.trim_fraction <= 1.0:
            raise ValueError(f"trim_fraction must be in (0, 1]; got {self.trim_fraction}")
        if not 0.0 <= self.release_fraction < 1.0 or not 0.0 <= self.edge_fraction < 1.0:
            raise ValueError("release_fraction and edge_fraction must be in [0, 1)")
        if self.stride < 1:
            raise ValueError(f"stride must be >= 1; got {self.stride}")
        known = {region for region, _ in self.regions}
        for name in ("blink_regions", "glance_regions"):
            unknown = set(getattr(self, name)) - known
            if unknown:
                raise ValueError(f"{name} names regions that do not exist: {sorted(unknown)}")
        if not self.glance_shift > 0:
            raise ValueError(f"glance_shift must be > 0; got {self.glance_shift}")

    @property
    def region_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.regions)

    @property
    def iod_px(self) -> float:
        """The template's eye distance in crop pixels with the dataset stretch undone (values
        divide horizontal flow by ``stretch_x`` first): 100 % of the face unit."""
        return _IOD_28 * self.crop_size / 28.0 / self.stretch_x


@dataclass
class SpotTrace:
    """Per frame: ``values`` (N, R) region values (% IOD), ``floors`` (N, R) detection floors (%
    IOD of movement; NaN while warming up), ``blinking`` (N,) lids masked, ``in_event`` (N,)."""

    times_ms: np.ndarray
    values: np.ndarray
    floors: np.ndarray
    blinking: np.ndarray
    in_event: np.ndarray


# -- the measurement ------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Grid:
    xx: np.ndarray          # (G,) crop px of the sampled points
    yy: np.ndarray
    gx: np.ndarray          # (G,) centred, unit scale (well-conditioned normal equations)
    gy: np.ndarray
    fit_idx: np.ndarray     # the face ellipse


@functools.lru_cache(maxsize=8)
def _grid(crop_size: int, stride: int, ellipse: tuple) -> _Grid:
    coords = np.arange(0, crop_size, stride, dtype=np.float64)
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    xx, yy = xx.ravel(), yy.ravel()
    scale = crop_size / 28.0
    tx, ty = (xx + 0.5) / scale, (yy + 0.5) / scale
    cx, cy, rx, ry = ellipse
    fit_idx = np.flatnonzero(((tx - cx) / rx) ** 2 + ((ty - cy) / ry) ** 2 <= 1.0)
    half = crop_size / 2.0
    return _Grid(xx, yy, (xx - half) / half, (yy - half) / half, fit_idx)


def _parts(options: SpotterOptions) -> list[tuple[int, ...]]:
    """Every part of every group of every region, in order."""
    return [part for _, groups in options.regions for group in groups for part in group]


def _anchor_indices(options: SpotterOptions) -> tuple[int, ...]:
    return tuple(sorted({i for part in _parts(options) for i in part}))


def _default_anchors(options: SpotterOptions) -> np.ndarray:
    """(K, 2) crop px of the region landmarks (order of _anchor_indices) on the template."""
    scale = options.crop_size / 28.0
    return np.array([DEFAULT_ANCHORS_28[i] for i in _anchor_indices(options)]) * scale - 0.5


def _window_weights(options: SpotterOptions, anchors: np.ndarray) -> np.ndarray:
    """(P, G) float64 weights, one row per region part (regions in order, parts in order), each
    the normalised sum of Gaussian windows at the part's landmarks."""
    grid = _grid(options.crop_size, options.stride, tuple(options.face_ellipse))
    index = {i: k for k, i in enumerate(_anchor_indices(options))}
    sigma = options.window_sigma * options.iod_px
    rows = []
    for part in _parts(options):
        w = np.zeros(grid.xx.size)
        for i in part:
            ax, ay = anchors[index[i]]
            w += np.exp(-((grid.xx - ax) ** 2 + (grid.yy - ay) ** 2) / (2.0 * sigma ** 2))
        rows.append(w / w.sum())
    return np.ascontiguousarray(np.stack(rows))


@functools.lru_cache(maxsize=8)
def _group_slices(options: SpotterOptions) -> tuple[tuple[slice, ...], ...]:
    """Per region, the rows of its groups in the weight matrix."""
    out, start = [], 0
    for _, groups in options.regions:
        slices = []
        for group in groups:
            slices.append(slice(start, start + len(group)))
            start += len(group)
        out.append(tuple(slices))
    return tuple(out)


def region_values(flow: np.ndarray, weights: np.ndarray,
                  options: SpotterOptions = SpotterOptions()) -> np.ndarray:
    """Per-region movement of one flow field, in % of the IOD.

    flow: (S, S, 2) float, crop pixels, S = ``options.crop_size``; weights: (P, G) from the
    region windows (P parts, G sampled points). Returns (R,) float64: for each region the root
    mean square over its parts of the length of the part's mean displacement, after subtracting
    a robust affine fit of the flow inside the face ellipse (the head's own motion)."""
    size = options.crop_size
    flow = np.asarray(flow)
    if flow.shape != (size, size, 2):
        raise ValueError(f"flow must be ({size}, {size}, 2); got {flow.shape}")
    grid = _grid(size, options.stride, tuple(options.face_ellipse))
    s = options.stride
    f = np.ascontiguousarray(flow[::s, ::s, :].astype(np.float64).reshape(-1, 2).T)  # (2, G)
    fx, fy = grid.gx[grid.fit_idx], grid.gy[grid.fit_idx]
    f_fit = np.ascontiguousarray(f[:, grid.fit_idx])
    params = _affine_fit(f_fit, fx, fy, np.ones(fx.size))
    if options.trim_fraction < 1.0:
        resid = f_fit - _affine_eval(params, fx, fy)
        mag = np.sqrt((resid ** 2).sum(0))
        k = max(int(round(options.trim_fraction * mag.size)) - 1, 2)
        cut = np.partition(mag, k)[k]
        params = _affine_fit(f_fit, fx, fy, (mag <= cut).astype(np.float64))
    resid = f - _affine_eval(params, grid.gx, grid.gy)
    parts = weights @ resid.T                                          # (P, 2) px
    parts[:, 0] /= options.stretch_x
    length2 = (parts ** 2).sum(1) * (100.0 / options.iod_px) ** 2
    return np.array([math.sqrt(max(float(length2[sl].mean()) for sl in groups))
                     for groups in _group_slices(options)])


def _affine_fit(f: np.ndarray, x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted least-squares affine model of each flow component: f (2, M) ≈ a0 + ax·x + ay·y.
    Returns (2, 3). The 3x3 system is solved by its adjugate: np.linalg.solve costs more in
    LAPACK start-up than the fit."""
    m = [(w * q).sum() for q in (np.ones_like(x), x, y, x * x, x * y, y * y)]
    wf = w * f
    b = np.stack([wf.sum(-1), (wf * x).sum(-1), (wf * y).sum(-1)], axis=-1)   # (2, 3)
    a00, a01, a02, a11, a12, a22 = m
    c = np.array([[a11 * a22 - a12 * a12, a02 * a12 - a01 * a22, a01 * a12 - a02 * a11],
                  [a02 * a12 - a01 * a22, a00 * a22 - a02 * a02, a01 * a02 - a00 * a12],
                  [a01 * a12 - a02 * a11, a01 * a02 - a00 * a12, a00 * a11 - a01 * a01]])
    det = a00 * c[0, 0] + a01 * c[0, 1] + a02 * c[0, 2]
    if abs(det) <= 1e-12 * max(abs(v) for v in m) ** 3:
        return np.zeros((2, 3))  # no weight at all (an empty face): no head motion
    return b @ c.T / det


def _affine_eval(params: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return params[:, 0:1] + params[:, 1:2] * x + params[:, 2:3] * y


def make_flow(options: SpotterOptions) -> FlowEstimator:
    """The flow estimator the options name (``farneback`` by default)."""
    return create_flow(options.flow, **dict(options.flow_kwargs))


def _check_crop(crop: np.ndarray, size: int) -> None:
    shape = np.shape(crop)
    if shape != (size, size):
        raise ValueError(f"crop must be a greyscale ({size}, {size}) image (the aligned face "
                         f"crop; SpotterOptions.crop_size={size}); got shape {shape}")


class _Anchors:
    """The region windows, following the median position of the region landmarks over the last
    ``anchor_window_ms`` (refreshed every ``anchor_update_ms``), so they sit on this person's
    brows and lips, not on an expression's momentary shape. Fed identically by both paths."""

    def __init__(self, options: SpotterOptions) -> None:
        self.o = options
        self._idx = np.array(_anchor_indices(options))
        cap = int(math.ceil(options.anchor_window_ms * options.max_fps / 1000.0)) + 2
        self._t = np.zeros(cap)
        self._pts = np.zeros((cap, self._idx.size, 2))
        self._cap = cap
        self._default = _weights_for(options, _default_anchors(options).tobytes())
        self.reset()

    def reset(self) -> None:
        self._n = self._head = 0
        self._updated: float | None = None
        self.weights = self._default

    def push(self, t_ms: float, landmarks: np.ndarray | None) -> np.ndarray:
        if landmarks is not None:
            pts = np.asarray(landmarks, np.float64)
            if pts.ndim == 2 and pts.shape[0] > self._idx.max() and \
                    np.isfinite(pts[self._idx]).all():
                self._t[self._head] = t_ms
                self._pts[self._head] = pts[self._idx]
                self._head = (self._head + 1) % self._cap
                self._n = min(self._n + 1, self._cap)
                if self._updated is None or t_ms - self._updated >= self.o.anchor_update_ms:
                    self._updated = t_ms
                    recent = self._t[:self._n] >= t_ms - self.o.anchor_window_ms
                    anchors = np.median(self._pts[:self._n][recent], axis=0)
                    self.weights = _weights_for(self.o, np.round(anchors, 2).tobytes())
        return self.weights


@functools.lru_cache(maxsize=64)
def _weights_for(options: SpotterOptions, anchors_bytes: bytes) -> np.ndarray:
    anchors = np.frombuffer(anchors_bytes, dtype=np.float64).reshape(-1, 2)
    return _window_weights(options, anchors)


# -- the rules shared by both paths -------------------------------------------------------------


def _nearest(times: np.ndarray, target: float) -> int:
    """Index of the entry of increasing ``times`` nearest ``target`` (the earlier on a tie)."""
    i = int(np.searchsorted(times, target))
    if i <= 0:
        return 0
    if i >= len(times):
        return len(times) - 1
    return i - 1 if target - times[i - 1] <= times[i] - target else i


class _PairMask:
    """Which regions a pair of frames (the current one and its reference) cannot measure: the
    blink regions when either frame is in a blink (they would measure the blink), the glance
    regions when the irises sit elsewhere in one of them (the eyeball turning)."""

    def __init__(self, options: SpotterOptions) -> None:
        names = options.region_names
        self._blink = np.array([name in options.blink_regions for name in names])
        self._glance = np.array([name in options.glance_regions for name in names])
        self._shift = options.glance_shift

    def __call__(self, blinking: bool, ref_blinking: bool, frame_gaze: np.ndarray,
                 ref_gaze: np.ndarray) -> np.ndarray:
        glance = bool(np.hypot(*(frame_gaze - ref_gaze)) > self._shift)  # False where NaN
        return self._blink & bool(blinking or ref_blinking) | self._glance & glance


def _crop_capacity(options: SpotterOptions) -> int:
    # The idle reference is a lag back, a face at rest before it at most max_micro_ms more
    # (EventDetector._rest_before); half as much again for irregular clocks.
    span_ms = 1.5 * (options.reference_lag_ms + options.max_micro_ms)
    return int(math.ceil(span_ms * options.max_fps / 1000.0)) + 2


# -- the two paths ------------------------------------------------------------------------------

def _to_uint8(crops: np.ndarray) -> np.ndarray:
    """uint8 as given; float crops (0..255) rounded the way the flow estimators round them."""
    crops = np.asarray(crops)
    if crops.dtype == np.uint8:
        return crops
    return np.clip(crops.astype(np.float32) + 0.5, 0, 255).astype(np.uint8)


class Spotter:
    """Streaming spotter: ``push`` one aligned crop (and its landmarks, in crop pixels) at a time;
    the events that close at that frame come back from it (a movement at its offset, or
    ``max_event_ms`` after its onset; a blink when the eyes reopen); ``finish`` closes what is
    still open at the end of the input.

    After each push: ``region_values`` (% IOD per region), ``floors`` (% IOD per region, NaN
    while warming up), ``blinking``, ``in_event``; ``signal`` and ``threshold`` summarise them as
    the region standing highest over its threshold (its value and its threshold). Memory is
    preallocated: a ring of crops covering the reference lag at ``max_fps``, one frozen reference
    crop, and fixed-size histories.
    """

    def __init__(self, options: SpotterOptions = SpotterOptions(),
                 flow: FlowEstimator | None = None) -> None:
        self.options = options
        self.flow = flow if flow is not None else make_flow(options)
        size = options.crop_size
        self._capacity = _crop_capacity(options)
        self._crops = np.zeros((self._capacity, size, size), np.uint8)
        self._times = np.zeros(self._capacity)
        self._blinking = np.zeros(self._capacity, bool)
        self._gaze = np.full((self._capacity, 2), np.nan)
        self._order = np.arange(self._capacity)
        self._frozen = np.zeros((size, size), np.uint8)
        self._unusable = _PairMask(options)
        self._detector = EventDetector(options)
        self._blinks = BlinkDetector(options.blink)
        self._anchors = _Anchors(options)
        self.reset()

    def reset(self) -> None:
        """Forget everything: history, statistics, an open event (it is dropped)."""
        self._head = self._n = 0
        self._frozen_t = 0.0
        self._frozen_blinking = False
        self._frozen_gaze = np.full(2, np.nan)
        self._detector.reset()
        self._blinks.reset()
        self._anchors.reset()
        self.region_values: np.ndarray | None = None
        self.blinking = False
        self._last_t: float | None = None

    @property
    def floors(self) -> np.ndarray:
        return self._detector.floors

    @property
    def in_event(self) -> bool:
        return self._detector.in_event

    @property
    def thresholds(self) -> np.ndarray:
        """Each region's threshold now, in the units of ``region_values`` (NaN while warming
        up)."""
        levels = self._detector._ev if self.in_event else self._detector.levels
        return np.full(len(self.options.regions), np.nan) if levels is None \
            else levels.threshold.copy()

    @property
    def signal(self) -> float | None:
        r = self._leading_region()
        return None if r is None else float(self.region_values[r])

    @property
    def threshold(self) -> float | None:
        r = self._leading_region()
        levels = self._detector._ev if self.in_event else self._detector.levels
        return None if r is None or levels is None else float(levels.threshold[r])

    def _leading_region(self) -> int | None:
        if self.region_values is None:
            return None
        levels = self._detector._ev if self.in_event else self._detector.levels
        if levels is None:
            return int(np.argmax(self.region_values))
        return int(np.argmax(self.region_values / levels.threshold))

    def push(self, t_ms: float, crop: np.ndarray,
             landmarks: np.ndarray | None = None) -> list[SpotEvent]:
        """Feed one aligned greyscale crop (crop_size², uint8) taken at ``t_ms`` with its
        landmarks (478, 2) in crop pixels (None: the regions stay on the template and no blink
        is detected); timestamps must increase. Returns the events that closed here."""
        t = float(t_ms)
        _check_crop(crop, self.options.crop_size)
        if not math.isfinite(t):
            raise ValueError(f"t_ms must be finite; got {t_ms}")
        if self._last_t is not None and t <= self._last_t:
            raise ValueError(f"timestamps must increase: got {t} after {self._last_t}")
        self._last_t = t
        weights = self._anchors.push(t, landmarks)
        blink = self._blinks.push(t, landmarks)
        self.blinking = self._blinks.masking
        pos = self._head
        self._crops[pos] = _to_uint8(crop)
        self._times[pos] = t
        self._blinking[pos] = self.blinking
        self._gaze[pos] = np.nan if landmarks is None else gaze(landmarks)
        self._head = (pos + 1) % self._capacity
        self._n = min(self._n + 1, self._capacity)

        det = self._detector
        order = (self._order[:self._n] + (self._head - self._n)) % self._capacity
        lag_pos = int(order[_nearest(self._times[order], t - self.options.reference_lag_ms)])
        if det.reference_target(t) is None:
            ref, ref_t, ref_blinking = self._frozen, self._frozen_t, self._frozen_blinking
            ref_gaze = self._frozen_gaze
        else:  # idle: the reference is the crop a lag back, the baseline's own
            ref, ref_t = self._crops[lag_pos], float(self._times[lag_pos])
            ref_blinking, ref_gaze = bool(self._blinking[lag_pos]), self._gaze[lag_pos]
        values = self._values(ref, ref_t, t, pos, weights)
        self.region_values = values

        def unusable(k_blinking: bool, k_gaze: np.ndarray) -> np.ndarray:
            return self._unusable(self.blinking, k_blinking, self._gaze[pos], k_gaze)

        masked = unusable(ref_blinking, ref_gaze)
        lag_t = float(self._times[lag_pos])
        if lag_t == ref_t:
            baseline = (values, ref_t, masked)
        else:  # in or just after an event: the baseline still needs the lag comparison
            baseline = (self._values(self._crops[lag_pos], lag_t, t, pos, weights), lag_t,
                        unusable(bool(self._blinking[lag_pos]), self._gaze[lag_pos]))

        def remeasure(target: float) -> tuple[np.ndarray, np.ndarray]:
            k = int(order[_nearest(self._times[order], target)])
            return (self._values(self._crops[k], float(self._times[k]), t, pos, weights),
                    unusable(bool(self._blinking[k]), self._gaze[k]))

        out, opened = det.step(t, values, ref_t, masked, baseline, remeasure)
        if opened:
            self._frozen[...] = ref
            self._frozen_t = ref_t
            self._frozen_blinking = ref_blinking
            self._frozen_gaze = ref_gaze.copy()
        if blink is not None:
            out.append(blink_event(blink))
        return out

    def _values(self, ref: np.ndarray, ref_t: float, t: float, pos: int,
                weights: np.ndarray) -> np.ndarray:
        if ref_t == t:
            return np.zeros(len(self.options.regions))
        return region_values(self.flow.compute(ref, self._crops[pos]), weights, self.options)

    def finish(self) -> list[SpotEvent]:
        """The movement and the blink still open when the input ends, closed at its last frame
        and marked truncated (an open event is never dropped without a word)."""
        out = self._detector.finish()
        blink = self._blinks.finish(self._last_t)
        if blink is not None:
            out.append(blink_event(blink))
        return out


def spot_offline(times_ms: Sequence[float] | np.ndarray, crops: np.ndarray,
                 landmarks: np.ndarray | None = None,
                 options: SpotterOptions = SpotterOptions(),
                 flow: FlowEstimator | None = None,
                 batch_size: int = 32) -> tuple[list[SpotEvent], SpotTrace]:
    """Spot a whole recorded sequence: the same events as pushing it frame by frame into a
    :class:`Spotter` and calling ``finish``, with the flow computed in batches
    (``flow.compute_batch``, one call per batch for a batched GPU flow).

    times_ms: (N,) increasing; crops: (N, S, S) aligned greyscale crops; landmarks: (N, 478, 2)
    in crop pixels, or None. Returns (events in the order the streaming spotter gives them,
    the per-frame trace).

    The idle-reference pairs (each frame with the frame ``reference_lag_ms`` before it) are
    computed a batch of frames ahead of the rules, for every frame (they feed the thresholds'
    statistics). During an event the rules ask for the frozen reference too; those pairs are
    computed on demand, a batch of following frames at a time.
    """
    times = np.asarray(times_ms, dtype=np.float64).ravel()
    crops = _to_uint8(np.asarray(crops))
    size = options.crop_size
    if crops.ndim != 3 or crops.shape[1:] != (size, size):
        raise ValueError(f"crops must be (N, {size}, {size}); got {crops.shape}")
    if len(times) != len(crops):
        raise ValueError(f"{len(times)} timestamps for {len(crops)} crops")
    if landmarks is not None and len(landmarks) != len(times):
        raise ValueError(f"{len(landmarks)} landmark sets for {len(times)} crops")
    if not np.isfinite(times).all() or np.any(np.diff(times) <= 0):
        raise ValueError("timestamps must be finite and increasing")
    estimator = flow if flow is not None else make_flow(options)
    n = len(times)
    lag = options.reference_lag_ms
    capacity = _crop_capacity(options)
    regions = len(options.regions)

    # The per-frame landmark rules first: they depend on the landmarks alone.
    anchors, blinks = _Anchors(options), BlinkDetector(options.blink)
    weights, blinking, blink_at = [], np.zeros(n, bool), {}
    gazes = np.full((n, 2), np.nan)
    for j in range(n):
        lm = None if landmarks is None else landmarks[j]
        if lm is not None:
            gazes[j] = gaze(lm)
        weights.append(anchors.push(float(times[j]), lm))
        blink = blinks.push(float(times[j]), lm)
        blinking[j] = blinks.masking
        if blink is not None:
            blink_at[j] = blink

    def window(j: int) -> int:
        return max(0, j - capacity + 1)

    def values_of(ref: np.ndarray, cur: np.ndarray) -> np.ndarray:
        out = np.zeros((len(cur), regions))
        moving = np.flatnonzero(ref != cur)
        for start in range(0, moving.size, batch_size):
            sel = moving[start:start + batch_size]
            flows = estimator.compute_batch(crops[ref[sel]], crops[cur[sel]])
            for k, flow_k in zip(sel, flows):
                out[k] = region_values(flow_k, weights[cur[k]], options)
        return out

    idle_ref = np.array([window(j) + _nearest(times[window(j):j + 1], times[j] - lag)
                         for j in range(n)], dtype=np.int64)
    idle_values = np.zeros((n, regions))
    idle_done = np.zeros(n, bool)

    detector = EventDetector(options)
    pair_mask = _PairMask(options)

    def unusable(j: int, k: int) -> np.ndarray:
        return pair_mask(bool(blinking[j]), bool(blinking[k]), gazes[j], gazes[k])

    trace = SpotTrace(times.copy(), np.zeros((n, regions)), np.zeros((n, regions)),
                      blinking, np.zeros(n, bool))
    events: list[SpotEvent] = []
    frozen = -1
    extra_ref, extra, extra_batch = -1, {}, 4
    for j in range(n):
        ref = frozen if detector.reference_target(times[j]) is None else int(idle_ref[j])
        if not idle_done[j]:  # every frame's lag comparison feeds the baseline
            cur = np.arange(j, min(n, j + batch_size))
            cur = cur[~idle_done[cur]]
            idle_values[cur] = values_of(idle_ref[cur], cur)
            idle_done[cur] = True
        if ref == idle_ref[j]:
            v = idle_values[j]
        else:
            if ref != extra_ref or j not in extra:
                # The frozen reference holds for a run of frames of unknown length:
                # batches that start small and double while it lasts.
                extra_batch = 4 if ref != extra_ref else min(2 * extra_batch, batch_size)
                cur = np.arange(j, min(n, j + extra_batch))
                vals = values_of(np.full(cur.size, ref), cur)
                extra_ref, extra = ref, {int(c): vals[k] for k, c in enumerate(cur)}
            v = extra[j]
        trace.values[j] = v
        masked = unusable(j, ref)
        lag_j = idle_ref[j]
        baseline = (idle_values[j], float(times[lag_j]), unusable(j, lag_j))

        def remeasure(target: float, j: int = j) -> tuple[np.ndarray, np.ndarray]:
            k = window(j) + _nearest(times[window(j):j + 1], target)
            return values_of(np.array([k]), np.array([j]))[0], unusable(j, k)

        closed, opened = detector.step(float(times[j]), v, float(times[ref]), masked, baseline,
                                       remeasure)
        trace.floors[j] = detector.floors
        trace.in_event[j] = detector.in_event
        if opened:
            frozen = ref
        events.extend(closed)
        if j in blink_at:
            events.append(blink_event(blink_at[j]))
    events.extend(detector.finish())
    blink = blinks.finish(float(times[-1]) if n else None)
    if blink is not None:
        events.append(blink_event(blink))
    return events, trace
