"""Spotting: find facial movements (onset → apex → offset) in a stream of aligned face crops, per
facial region, with thresholds in units of the face and a stated detection floor.

For each frame the dense flow (Farnebäck by default) from a reference crop is measured; the head's
own motion (a robust affine fit of the whole face's flow) is subtracted; then in each region
(brows, lids, upper lip, lip corners) the mean residual displacement of each of its parts (left
and right brow, ...) is taken in Gaussian windows centred on this person's own landmarks, and the
region's value is the root mean square of its parts' displacements, in % of the inter-ocular
distance (IOD). While nothing happens the reference is the crop ``reference_lag_ms`` earlier;
once a region crosses its threshold the reference is frozen, so during an event each value is the
displacement from the last neutral face and rises to the apex and falls back in one lobe.

Each region has its own threshold from its own recent idle values (median + k·robust σ), so a
talking mouth raises the mouth's threshold and not the brows'. The **detection floor** of a region
is that threshold expressed as a movement: the smallest movement (peak displacement, % IOD) the
spotter would report there and then, given the region's gain (measured: a movement of A % gives
a value of about gain·A). Events larger than ``max_micro_pct`` or longer than ``max_micro_ms`` are
macro-expressions. Blinks (:mod:`realtime_mer.blinks`, from the eyelid landmarks) are reported as
their own kind, and the lids and brows are kept out of movement events while the eyes close.

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

from realtime_mer.blinks import Blink, BlinkDetector, BlinkOptions
from realtime_mer.blinks import crossing as _crossing
from realtime_mer.buffer import TimeSeries
from realtime_mer.face import CANONICAL_STABLE_28, CANONICAL_STRETCH_X
from realtime_mer.flow import FlowEstimator, create_flow

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
    # Each region's running statistics of its idle values (median and MAD) over this window.
    baseline_window_ms: float = 3000.0
    warmup_ms: float = 1000.0
    min_baseline_samples: int = 8
    # Threshold = median + threshold_k · 1.4826 · MAD of the region's idle values, and never a
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
    stride: int = 2
    max_fps: float = 250.0

    def __post_init__(self) -> None:
        for name in ("reference_lag_ms", "baseline_window_ms", "max_micro_ms", "max_event_ms",
                     "max_fps", "min_floor_pct", "max_micro_pct", "window_sigma",
                     "anchor_window_ms", "anchor_update_ms"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0; got {getattr(self, name)}")
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
        unknown = set(self.blink_regions) - {name for name, _ in self.regions}
        if unknown:
            raise ValueError(f"blink_regions names regions that do not exist: {sorted(unknown)}")

    @property
    def region_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.regions)

    @property
    def iod_px(self) -> float:
        """The template's eye distance in crop pixels with the dataset stretch undone (values
        divide horizontal flow by ``stretch_x`` first): 100 % of the face unit."""
        return _IOD_28 * self.crop_size / 28.0 / self.stretch_x


@dataclass(frozen=True)
class SpotEvent:
    """One spotted movement or blink. Times in ms on the caller's clock. ``kind``: "micro",
    "macro" or "blink". ``regions``: the regions that moved, the main one first. ``peak`` and
    ``threshold``: the main region's value at the apex and its threshold (% IOD of windowed
    displacement); ``amplitude_pct``: the movement's size (peak / gain, % IOD; for a blink, how
    far the eyes closed, in % of their opening); ``floor_pct``: the detection floor of the main
    region when the event opened. ``truncated``: the input ended while the event was open."""

    onset_ms: float
    apex_ms: float
    offset_ms: float
    kind: str
    peak: float
    threshold: float
    regions: tuple[str, ...] = ()
    amplitude_pct: float = 0.0
    floor_pct: float = 0.0
    truncated: bool = False

    @property
    def duration_ms(self) -> float:
        return self.offset_ms - self.onset_ms


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


def _crop_capacity(options: SpotterOptions) -> int:
    # The idle reference is at most `lag` back; margin for irregular clocks.
    return int(math.ceil(options.reference_lag_ms * 1.5 * options.max_fps / 1000.0)) + 2


@dataclass
class _Levels:
    median: np.ndarray
    threshold: np.ndarray
    release: np.ndarray


@dataclass(frozen=True)
class _RegionEvent:
    region: int
    onset: float
    apex: float
    offset: float
    peak: float
    truncated: bool


class _EventDetector:
    """The causal event rules, fed one frame's region values at a time by both the streaming
    and the offline path. It also decides which reference the next frame's values must use
    (``reference_target``), since that depends on whether an event is open.

    Each region opens and closes its own event against its own threshold; they share one
    reference, frozen when the first of them opens and released when the last closes (one flow
    per frame, whatever the number of regions). The region events of that span are then merged
    where they overlap (IoU >= ``merge_iou``: one movement seen in two regions) and returned."""

    merge_iou = 0.3

    def __init__(self, options: SpotterOptions) -> None:
        self.o = options
        width = len(options.regions)
        self._gains = np.asarray(options.region_gains, np.float64)
        self._min_threshold = options.min_floor_pct * self._gains
        self._blink_mask = np.array([name in options.blink_regions
                                     for name in options.region_names])
        self._stats = TimeSeries(
            TimeSeries.capacity_for(options.baseline_window_ms, options.max_fps), width)
        self._hist = TimeSeries(TimeSeries.capacity_for(
            options.max_event_ms + 2 * options.reference_lag_ms, options.max_fps, 4), width)
        self._warned = False
        self.reset()

    def reset(self) -> None:
        self._stats.clear()
        self._hist.clear()
        self.t_first: float | None = None
        self.clamp_t = -math.inf
        self.in_event = False
        self.levels: _Levels | None = None
        self._ev: _Levels | None = None
        width = len(self.o.regions)
        self._open = np.zeros(width, bool)
        self._count = np.zeros(width, np.int64)   # samples of each open region's event so far
        self._onset = np.zeros(width)              # each open region's walk-back onset
        self._group_start = 0.0
        self._closed: list[_RegionEvent] = []
        self._last = np.zeros(width)  # the last frame's usable values (NaN: masked)

    @property
    def floors(self) -> np.ndarray:
        """Each region's detection floor now (% IOD of movement; NaN while warming up, inf
        while a blink masks the region): the threshold as a movement, and while the region is
        itself moving, what it is doing plus the threshold (a new movement must stand out of
        it)."""
        levels = self._ev if self.in_event else self.levels
        if levels is None:
            return np.full(len(self.o.regions), np.nan)
        floor = levels.threshold / self._gains
        if self.in_event and self._open.any():
            current = np.where(np.isfinite(self._last), self._last, 0.0)
            floor = np.where(self._open, (current + levels.threshold) / self._gains, floor)
        return np.where(np.isnan(self._last), np.inf, floor)

    def reference_target(self, t_ms: float) -> float | None:
        """Time of the reference for a frame at ``t_ms`` while idle: ``lag`` back, but never
        across the end of the last event (a reference inside an event would make a second,
        phantom event). None while an event is open: the frozen reference is used."""
        if self.in_event:
            return None
        return max(t_ms - self.o.reference_lag_ms, self.clamp_t)

    def _compute_levels(self, t_ms: float) -> _Levels | None:
        values = self._stats.since(t_ms - self.o.baseline_window_ms)
        if self.t_first is None or t_ms - self.t_first < self.o.warmup_ms or \
                values.shape[0] < self.o.min_baseline_samples:
            return None
        median = np.full(values.shape[1], np.inf)  # a region masked all along cannot trigger
        sigma = np.zeros(values.shape[1])
        for r in range(values.shape[1]):
            column = values[:, r]
            column = column[np.isfinite(column)]
            if column.size >= self.o.min_baseline_samples:
                median[r] = np.median(column)
                sigma[r] = 1.4826 * np.median(np.abs(column - median[r]))
        threshold = np.maximum(median + self.o.threshold_k * sigma, self._min_threshold)
        known = np.isfinite(median)
        release = np.full_like(median, np.inf)
        release[known] = median[known] + self.o.release_fraction * (threshold[known]
                                                                   - median[known])
        return _Levels(median, threshold, release)

    def step(self, t_ms: float, values: np.ndarray, ref_t: float,
             masked: np.ndarray) -> tuple[list[SpotEvent], bool]:
        """Feed one frame: its region values and which regions a blink makes unusable. Returns
        (the events that closed here, whether the reference froze here)."""
        o = self.o
        if self.t_first is None:
            self.t_first = t_ms
        usable = np.where(masked, np.nan, values)
        self._last = usable
        self._hist.append(t_ms, usable)
        if self.in_event and self._count.max() + 1 >= self._hist.capacity and not self._warned:
            self._warned = True
            log.warning("frames arrive faster than SpotterOptions.max_fps=%s: event history is "
                        "truncated", o.max_fps)
        if self.in_event:
            ev = self._ev
            self._count[self._open] += 1
            forced = t_ms - self._group_start >= o.max_event_ms
            for r in np.flatnonzero(self._open):
                if masked[r]:  # a blink took the region over: its movement is the blink's
                    self._open[r] = False
                elif forced or usable[r] < ev.release[r]:
                    self._close_region(r, t_ms, truncated=False, forced=forced)
            idle = ~self._open & ~masked
            if not forced:
                for r in np.flatnonzero(idle & (usable > ev.threshold)):
                    self._open_region(r, t_ms)
            if not self._open.any():
                return self._end_group(t_ms), False
            return [], False
        self.levels = self._compute_levels(t_ms)
        # A reference much nearer than the lag (right after an event or at the start) makes a
        # smaller value: neither a fair trigger nor a fair baseline sample.
        full_lag = t_ms - ref_t >= 0.5 * o.reference_lag_ms
        if self.levels is not None and full_lag:
            above = (usable > self.levels.threshold) & ~masked
            if above.any():
                self.in_event = True
                self._ev = self.levels
                self._group_start = t_ms
                for r in np.flatnonzero(above):
                    self._open_region(r, t_ms)
                return [], True
        if full_lag:
            self._stats.append(t_ms, usable)
        return [], False

    def _open_region(self, r: int, t_ms: float) -> None:
        """The rise began before the crossing: walk back over the region's samples above its
        release level (never to before one lag ahead of the span's first trigger, whose samples
        were compared with an older reference, nor into the last span)."""
        times, values, _ = self._hist.last(self._hist.n)
        level = self._ev.release[r]
        limit = self._group_start - self.o.reference_lag_ms
        back = 0
        while back + 1 < len(times):
            t_prev = times[-2 - back]
            if t_prev < limit or t_prev <= self.clamp_t or not values[-2 - back, r] > level:
                break
            back += 1
        self._open[r] = True
        self._count[r] = back + 1
        i = len(times) - 1 - back
        self._onset[r] = float(times[i])
        if i > 0 and times[i - 1] > self.clamp_t and times[i - 1] >= limit and \
                np.isfinite(values[i - 1, r]):
            self._onset[r] = _crossing(times[i - 1], values[i - 1, r], times[i], values[i, r],
                                       level)

    def _close_region(self, r: int, t_ms: float, truncated: bool, forced: bool = False) -> None:
        o = self.o
        self._open[r] = False
        times, values, _ = self._hist.last(int(self._count[r]))
        ev = self._ev
        series = values[:, r]
        series = np.where(np.isfinite(series), series, ev.median[r])
        if series.size < 2:
            return
        # The closing sample is below the release level: not a candidate apex.
        last = series.size if truncated or forced else series.size - 1
        apex_i = int(np.argmax(series[:last]))
        peak = float(series[apex_i])
        level = max(float(ev.release[r]),
                    float(ev.median[r] + o.edge_fraction * (peak - ev.median[r])))
        i = apex_i
        while i > 0 and series[i - 1] > level:
            i -= 1
        # Back to the first stored sample: the walk-back's own crossing is the onset.
        onset = self._onset[r] if i == 0 else _crossing(times[i - 1], series[i - 1], times[i],
                                                        series[i], level)
        j = apex_i
        while j + 1 < series.size and series[j + 1] > level:
            j += 1
        offset = float(times[j]) if j + 1 >= series.size else _crossing(
            times[j], series[j], times[j + 1], series[j + 1], level)
        if offset - onset < o.min_event_ms and not truncated:
            return
        apex = min(max(_refine_apex(times, series, apex_i), onset), offset)
        self._closed.append(_RegionEvent(r, float(onset), float(apex), float(offset), peak,
                                         truncated))

    def _end_group(self, t_ms: float) -> list[SpotEvent]:
        """Release the reference and turn the span's region events into events: overlapping
        ones (IoU >= merge_iou) are one movement, named by the region that stood highest above
        its floor."""
        o = self.o
        self.in_event = False
        self.clamp_t = t_ms
        ev = self._ev
        pending = sorted(self._closed, key=lambda e: e.onset)
        self._closed = []
        clusters: list[list[_RegionEvent]] = []
        for e in pending:
            for cluster in clusters:
                if any(_iou(e, other) >= self.merge_iou for other in cluster):
                    cluster.append(e)
                    break
            else:
                clusters.append([e])
        out = []
        for cluster in clusters:
            main = max(cluster, key=lambda e: e.peak / ev.threshold[e.region])
            r = main.region
            amplitude = max(e.peak / self._gains[e.region] for e in cluster)
            others = [o.region_names[e.region] for e in sorted(
                cluster, key=lambda e: -e.peak / ev.threshold[e.region]) if e is not main]
            regions = tuple(dict.fromkeys([o.region_names[r], *others]))
            duration = main.offset - main.onset
            kind = "micro" if duration <= o.max_micro_ms and amplitude <= o.max_micro_pct \
                else "macro"
            out.append(SpotEvent(main.onset, main.apex, main.offset, kind, main.peak,
                                 float(ev.threshold[r]), regions, float(amplitude),
                                 float(ev.threshold[r] / self._gains[r]),
                                 any(e.truncated for e in cluster)))
        return sorted(out, key=lambda e: e.onset_ms)

    def finish(self) -> list[SpotEvent]:
        """Close the events still open when the input ends (marked truncated)."""
        if not self.in_event or self._hist.n == 0:
            return []
        t_last = float(self._hist.last(1)[0][0])
        for r in np.flatnonzero(self._open):
            self._close_region(r, t_last, truncated=True)
        return self._end_group(t_last)


def _iou(a: _RegionEvent, b: _RegionEvent) -> float:
    inter = min(a.offset, b.offset) - max(a.onset, b.onset)
    union = max(a.offset, b.offset) - min(a.onset, b.onset)
    return inter / union if inter > 0 and union > 0 else 0.0


def _refine_apex(times: np.ndarray, values: np.ndarray, i: int) -> float:
    """Vertex of the parabola through the maximum and its two neighbours (uneven spacing
    allowed): at webcam rates the true apex usually falls between two frames."""
    if i == 0 or i + 1 >= len(times):
        return float(times[i])
    t0, s0 = times[i - 1], values[i - 1]
    t1, s1 = times[i], values[i]
    t2, s2 = times[i + 1], values[i + 1]
    d0, d2 = t0 - t1, t2 - t1
    denom = d0 * d2 * (d0 - d2)
    if denom == 0:
        return float(t1)
    a = ((s0 - s1) * d2 - (s2 - s1) * d0) / denom
    b = ((s2 - s1) * d0 * d0 - (s0 - s1) * d2 * d2) / denom
    if a >= 0:
        return float(t1)
    return float(t1 + min(max(-b / (2 * a), d0), d2))


def _blink_event(blink: Blink) -> SpotEvent:
    return SpotEvent(blink.onset_ms, blink.apex_ms, blink.offset_ms, "blink", blink.closure,
                     0.0, ("lids",), 100.0 * blink.closure, 0.0, blink.truncated)


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
        self._order = np.arange(self._capacity)
        self._frozen = np.zeros((size, size), np.uint8)
        self._blink_mask = np.array([name in options.blink_regions
                                     for name in options.region_names])
        self._detector = _EventDetector(options)
        self._blinks = BlinkDetector(options.blink)
        self._anchors = _Anchors(options)
        self.reset()

    def reset(self) -> None:
        """Forget everything: history, statistics, an open event (it is dropped)."""
        self._head = self._n = 0
        self._frozen_t = 0.0
        self._frozen_blinking = False
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
        self._head = (pos + 1) % self._capacity
        self._n = min(self._n + 1, self._capacity)

        det = self._detector
        target = det.reference_target(t)
        if target is None:
            ref, ref_t, ref_blinking = self._frozen, self._frozen_t, self._frozen_blinking
        else:
            order = (self._order[:self._n] + (self._head - self._n)) % self._capacity
            ref_pos = int(order[_nearest(self._times[order], target)])
            ref, ref_t = self._crops[ref_pos], float(self._times[ref_pos])
            ref_blinking = bool(self._blinking[ref_pos])
        if ref_t == t:
            values = np.zeros(len(self.options.regions))
        else:
            values = region_values(self.flow.compute(ref, self._crops[pos]), weights,
                                   self.options)
        self.region_values = values
        # Lids compared with a frame of a blink measure the blink, whichever frame blinks.
        masked = self._blink_mask & (self.blinking or ref_blinking)
        out, opened = det.step(t, values, ref_t, masked)
        if opened:
            self._frozen[...] = ref
            self._frozen_t = ref_t
            self._frozen_blinking = ref_blinking
        if blink is not None:
            out.append(_blink_event(blink))
        return out

    def finish(self) -> list[SpotEvent]:
        """The movement and the blink still open when the input ends, closed at its last frame
        and marked truncated (an open event is never dropped without a word)."""
        out = self._detector.finish()
        blink = self._blinks.finish(self._last_t)
        if blink is not None:
            out.append(_blink_event(blink))
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
    computed a batch of frames ahead of the rules. The rules can ask for another reference (the
    frozen one during an event, the end of the last event right after it); those pairs are
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
    for j in range(n):
        lm = None if landmarks is None else landmarks[j]
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

    detector = _EventDetector(options)
    blink_mask = np.array([name in options.blink_regions for name in options.region_names])
    trace = SpotTrace(times.copy(), np.zeros((n, regions)), np.zeros((n, regions)),
                      blinking, np.zeros(n, bool))
    events: list[SpotEvent] = []
    frozen = -1
    extra_ref, extra, extra_batch = -1, {}, 4
    for j in range(n):
        target = detector.reference_target(times[j])
        if target is None:
            ref = frozen
        else:
            ref = window(j) + _nearest(times[window(j):j + 1], target)
        if ref == idle_ref[j]:
            if not idle_done[j]:
                cur = np.arange(j, min(n, j + batch_size))
                cur = cur[~idle_done[cur]]
                idle_values[cur] = values_of(idle_ref[cur], cur)
                idle_done[cur] = True
            v = idle_values[j]
        else:
            if ref != extra_ref or j not in extra:
                # A frozen or post-event reference holds for a run of frames of unknown length:
                # batches that start small and double while it lasts.
                extra_batch = 4 if ref != extra_ref else min(2 * extra_batch, batch_size)
                cur = np.arange(j, min(n, j + extra_batch))
                vals = values_of(np.full(cur.size, ref), cur)
                extra_ref, extra = ref, {int(c): vals[k] for k, c in enumerate(cur)}
            v = extra[j]
        trace.values[j] = v
        masked = blink_mask & bool(blinking[j] or blinking[ref])
        closed, opened = detector.step(float(times[j]), v, float(times[ref]), masked)
        trace.floors[j] = detector.floors
        trace.in_event[j] = detector.in_event
        if opened:
            frozen = ref
        events.extend(closed)
        if j in blink_at:
            events.append(_blink_event(blink_at[j]))
    events.extend(detector.finish())
    blink = blinks.finish(float(times[-1]) if n else None)
    if blink is not None:
        events.append(_blink_event(blink))
    return events, trace
