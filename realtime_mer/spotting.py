"""Spotting: find facial movements (onset → apex → offset) in a stream of aligned face crops.

The signal of a frame is optical flow (cheap DIS by default) between that crop and a reference
crop, with the head's own motion (a robust affine fit of the whole face's flow) subtracted, then
the mean residual flow magnitude in each facial region (brows, eyes, mouth), combined by max.
While nothing happens the reference is the crop ``reference_lag_ms`` earlier; when the signal
crosses a threshold made from this person's own running statistics the reference is frozen, so
during an event the signal is the displacement from the last neutral face: it rises to the apex
and falls back at the offset in one lobe (a sliding reference would give a second lobe ``lag``
after the apex, when the reference itself sits on the apex).

:class:`Spotter` is the push-based state machine; :func:`spot_offline` computes the flow in
batches (``FlowEstimator.compute_batch``, one call per batch for a GPU flow) ahead of the same
detection rules (the same :class:`_EventDetector`, the same reference rule, the same signal
code, written so that a frame's value does not depend on its batch), so both give the same
events and signals to the bit. See
``docs/SPOTTING.md`` for the rules, the parameters and what the tests measured.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from realtime_mer.flow import FlowEstimator, create_flow

log = logging.getLogger(__name__)

__all__ = [
    "SpotterOptions", "SpotEvent", "Spotter", "spot_offline", "compute_signal",
    "signal_from_flow", "region_signals", "make_flow", "DEFAULT_REGIONS",
]

#: Facial regions as rectangles ``(name, x0, y0, x1, y1)`` in the 28×28 coordinates of the
#: canonical template (eye centres ≈ (6, 7.6) and (21.5, 7.6), nose tip ≈ (14, 15.5), mouth
#: corners ≈ (8.5, 20.3) and (19.6, 20.2)); they scale with ``crop_size``. Crops are aligned on
#: that template, so fixed rectangles stay on the same facial parts frame after frame.
DEFAULT_REGIONS: tuple[tuple[str, float, float, float, float], ...] = (
    ("brows", 2.5, 2.0, 25.5, 6.0),
    ("eyes", 2.0, 6.0, 26.0, 10.0),
    ("mouth", 5.0, 17.0, 23.0, 25.0),
)


@dataclass(frozen=True)
class SpotterOptions:
    """Spotting parameters. Every window is in milliseconds, never frames: datasets are recorded
    at 100–200 fps and webcams deliver 15–60 fps, often irregularly."""

    # Compare frame t with the stored crop nearest t - lag while idle. About half a
    # micro-expression: long enough that the rise to the apex shows in full, short enough that
    # slow drift (lighting, posture) does not accumulate into the signal.
    reference_lag_ms: float = 200.0
    # Running statistics of this person's idle signal (median and MAD) over this window.
    baseline_window_ms: float = 4000.0
    # No event before this much of the stream was seen: the statistics need samples first.
    warmup_ms: float = 1000.0
    min_baseline_samples: int = 8
    # Trigger threshold = median + threshold_k · 1.4826 · MAD (a robust σ), at least
    # min_threshold (pixels of residual flow), so a perfectly still face cannot fire on noise.
    threshold_k: float = 8.0
    min_threshold: float = 0.06
    # The event ends (and its onset is searched back to) where the signal crosses the release
    # level, this fraction of the way from the median to the threshold (hysteresis).
    release_fraction: float = 0.35
    # Shorter events are dropped as noise; longer than max_micro_ms → "macro"; events still open
    # after max_event_ms are closed there (a slow pose change must not hold the spotter forever).
    min_event_ms: float = 60.0
    max_micro_ms: float = 500.0
    max_event_ms: float = 2000.0
    crop_size: int = 128
    # Any name create_flow accepts, with its keyword arguments as (name, value) pairs.
    flow: str = "dis"
    flow_kwargs: tuple[tuple[str, object], ...] = ()
    regions: tuple[tuple[str, float, float, float, float], ...] = DEFAULT_REGIONS
    # "max": a movement of one region counts in full; "mean": all regions alike.
    combine: str = "max"
    # Head motion = affine fit of the flow inside this ellipse (cx, cy, rx, ry; 28×28 units),
    # refitted on the trim_fraction of points that fit best, so a local expression (a minority
    # of the face) does not bend the fit.
    face_ellipse: tuple[float, float, float, float] = (14.0, 14.5, 12.0, 13.5)
    trim_fraction: float = 0.5
    # Flow error grows with motion (DIS errs by a few % of a head movement, everywhere on the
    # face); subtracting this quantile of the residual magnitude over the face ellipse cancels
    # that uniform part, while a local expression (well under half the face) barely moves it.
    # 0 disables. A movement of most of the face lowers the signal: fine for the macro
    # expressions that do that, which stay far above threshold.
    floor_quantile: float = 0.5
    # Flow is sampled every `stride` pixels for the fit and the region means (4× cheaper at 2,
    # and DIS flow is smooth at that scale anyway).
    stride: int = 2
    # Sizes the preallocated history rings: frames arriving faster than this shorten the
    # history (logged once) rather than growing memory.
    max_fps: float = 250.0

    def __post_init__(self) -> None:
        for name in ("reference_lag_ms", "baseline_window_ms", "max_micro_ms", "max_event_ms",
                     "max_fps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0; got {getattr(self, name)}")
        if self.crop_size < 16:
            raise ValueError(f"crop_size must be >= 16; got {self.crop_size}")
        if self.combine not in ("max", "mean"):
            raise ValueError(f"combine must be 'max' or 'mean'; got {self.combine!r}")
        if not 0.0 < self.trim_fraction <= 1.0:
            raise ValueError(f"trim_fraction must be in (0, 1]; got {self.trim_fraction}")
        if not 0.0 <= self.release_fraction < 1.0:
            raise ValueError(f"release_fraction must be in [0, 1); got {self.release_fraction}")
        if not self.regions:
            raise ValueError("at least one region is needed")
        if not 0.0 <= self.floor_quantile < 1.0:
            raise ValueError(f"floor_quantile must be in [0, 1); got {self.floor_quantile}")
        if self.stride < 1:
            raise ValueError(f"stride must be >= 1; got {self.stride}")


@dataclass(frozen=True)
class SpotEvent:
    """One spotted movement. Times in ms on the caller's clock; ``peak`` is the signal at the
    apex sample and ``threshold`` the trigger threshold in force when the event opened (both in
    pixels of residual flow)."""

    onset_ms: float
    apex_ms: float
    offset_ms: float
    kind: str  # "micro" | "macro"
    peak: float
    threshold: float

    @property
    def duration_ms(self) -> float:
        return self.offset_ms - self.onset_ms


# -- the signal ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Geometry:
    size: int
    stride: int
    grid_x: np.ndarray       # (G,) x of each sampled point, crop px, centred and scaled
    grid_y: np.ndarray
    fit_idx: np.ndarray      # indices into the G sampled points: the face ellipse
    region_idx: tuple[np.ndarray, ...]
    region_names: tuple[str, ...]


@functools.lru_cache(maxsize=8)
def _geometry(crop_size: int, stride: int, regions: tuple, ellipse: tuple) -> _Geometry:
    coords = np.arange(0, crop_size, stride, dtype=np.float64)
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    xx, yy = xx.ravel(), yy.ravel()
    scale = crop_size / 28.0
    # Template coordinates run from the image edge; pixel centres sit half a pixel in.
    tx, ty = (xx + 0.5) / scale, (yy + 0.5) / scale
    cx, cy, rx, ry = ellipse
    fit_idx = np.flatnonzero(((tx - cx) / rx) ** 2 + ((ty - cy) / ry) ** 2 <= 1.0)
    region_idx = []
    for name, x0, y0, x1, y1 in regions:
        idx = np.flatnonzero((tx >= x0) & (tx < x1) & (ty >= y0) & (ty < y1))
        if idx.size == 0:
            raise ValueError(f"region {name!r} contains no sampled pixel at crop_size "
                             f"{crop_size}, stride {stride}")
        region_idx.append(idx)
    # Centred, unit-scale coordinates keep the 3×3 normal equations well conditioned.
    half = crop_size / 2.0
    return _Geometry(crop_size, stride, (xx - half) / half, (yy - half) / half, fit_idx,
                     tuple(region_idx), tuple(r[0] for r in regions))


def _geometry_of(options: SpotterOptions) -> _Geometry:
    return _geometry(options.crop_size, options.stride,
                     tuple(tuple(region) for region in options.regions),
                     tuple(options.face_ellipse))


def _weighted_affine(f: np.ndarray, x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Least-squares affine model per frame and flow component.

    f: (N, 2, M) flow at M points; x, y: (M,); w: (N, M) weights. Returns (N, 2, 3) parameters
    (a0, ax, ay) of f ≈ a0 + ax·x + ay·y. Every sum runs along the last, contiguous axis and the
    3×3 systems are solved by elementwise arithmetic, so a frame's result does not depend on the
    batch it came in (the streaming and offline paths must agree to the bit).
    """
    moments = (w[:, None, :] * np.stack([np.ones_like(x), x, y, x * x, x * y, y * y])).sum(-1)
    wf = w[:, None, :] * f                                          # (N, 2, M)
    rhs = np.stack([wf.sum(-1), (wf * x).sum(-1), (wf * y).sum(-1)], axis=-1)  # (N, 2, 3)
    return _solve_sym3(moments, rhs)


def _solve_sym3(m: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Solve the symmetric systems [[m0 m1 m2] [m1 m3 m4] [m2 m4 m5]] · p = b, m (N, 6),
    b (N, C, 3) → p (N, C, 3), by the adjugate (np.linalg.solve costs ~1 ms per call here in
    LAPACK thread start-up, more than the whole fit)."""
    a00, a01, a02, a11, a12, a22 = (m[:, k] for k in range(6))
    c00 = a11 * a22 - a12 * a12
    c01 = a02 * a12 - a01 * a22
    c02 = a01 * a12 - a02 * a11
    c11 = a00 * a22 - a02 * a02
    c12 = a01 * a02 - a00 * a12
    c22 = a00 * a11 - a01 * a01
    det = a00 * c00 + a01 * c01 + a02 * c02
    # No weight at all (an empty face) leaves the system singular: give zero motion.
    scale = np.abs(m).max(axis=1) ** 3
    inv_det = np.where(np.abs(det) > 1e-12 * scale, 1.0 / np.where(det == 0, 1.0, det), 0.0)
    b0, b1, b2 = b[..., 0], b[..., 1], b[..., 2]
    col = lambda c: c[:, None]  # noqa: E731 (N,) → (N, 1) against b's (N, C)
    p0 = col(c00) * b0 + col(c01) * b1 + col(c02) * b2
    p1 = col(c01) * b0 + col(c11) * b1 + col(c12) * b2
    p2 = col(c02) * b0 + col(c12) * b1 + col(c22) * b2
    return np.stack([p0, p1, p2], axis=-1) * inv_det[:, None, None]


def region_signals(flows: np.ndarray, options: SpotterOptions = SpotterOptions()) -> np.ndarray:
    """Per-region head-motion-free flow magnitude, in pixels.

    flows: (N, S, S, 2) or (S, S, 2) float, pixels, S = ``options.crop_size``. Returns (N, R)
    float64 (or (R,)): for each region of ``options.regions``, the mean magnitude of the flow
    minus a robust affine fit of the flow inside the face ellipse (the head's translation,
    rotation, scale and shear), less the ``floor_quantile`` of that magnitude over the face
    (may be slightly negative on a still face).
    """
    flows = np.asarray(flows)
    single = flows.ndim == 3
    if single:
        flows = flows[None]
    size = options.crop_size
    if flows.ndim != 4 or flows.shape[1:] != (size, size, 2):
        raise ValueError(f"flows must be (N, {size}, {size}, 2); got {flows.shape}")
    geo = _geometry_of(options)
    s = geo.stride
    sampled = flows[:, ::s, ::s, :].astype(np.float64)
    f = np.ascontiguousarray(sampled.reshape(len(flows), -1, 2).transpose(0, 2, 1))  # (N, 2, G)
    fx, fy = geo.grid_x[geo.fit_idx], geo.grid_y[geo.fit_idx]
    f_fit = np.ascontiguousarray(f[:, :, geo.fit_idx])
    params = _weighted_affine(f_fit, fx, fy, np.ones((len(f), fx.size)))
    if options.trim_fraction < 1.0:
        resid = f_fit - _affine_eval(params, fx, fy)
        mag = np.sqrt((resid ** 2).sum(1))                          # (N, M)
        k = max(int(round(options.trim_fraction * mag.shape[1])) - 1, 2)
        cut = np.partition(mag, k, axis=1)[:, k:k + 1]
        params = _weighted_affine(f_fit, fx, fy, (mag <= cut).astype(np.float64))
    resid = f - _affine_eval(params, geo.grid_x, geo.grid_y)
    mag = np.sqrt((resid ** 2).sum(1))                              # (N, G)
    floor = np.zeros((len(f), 1))
    if options.floor_quantile > 0:
        face = np.ascontiguousarray(mag[:, geo.fit_idx])
        k = min(int(round(options.floor_quantile * (face.shape[1] - 1))), face.shape[1] - 1)
        floor = np.partition(face, k, axis=1)[:, k:k + 1]
    # Fancy indexing along the last axis returns a Fortran-ordered array for N > 1, whose sums
    # run in another order than for N = 1: copy to C order so batch and single frames agree.
    out = np.stack([np.ascontiguousarray(mag[:, idx]).mean(-1) for idx in geo.region_idx],
                   axis=1) - floor
    return out[0] if single else out


def _affine_eval(params: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return params[:, :, 0:1] + params[:, :, 1:2] * x + params[:, :, 2:3] * y


def signal_from_flow(flows: np.ndarray, options: SpotterOptions = SpotterOptions()) -> np.ndarray:
    """(N, S, S, 2) flows → (N,) float64 spotting signal (regions combined by ``combine``);
    a single (S, S, 2) flow gives a 0-d array."""
    return _combine(region_signals(flows, options), options)


def make_flow(options: SpotterOptions) -> FlowEstimator:
    """The flow estimator the options name, e.g. ``dis`` (default) or a TV-L1."""
    return create_flow(options.flow, **dict(options.flow_kwargs))


def compute_signal(reference_crop: np.ndarray, crop: np.ndarray,
                   options: SpotterOptions = SpotterOptions(),
                   flow: FlowEstimator | None = None) -> float:
    """Spotting signal of one pair of aligned greyscale crops (crop_size², uint8): how much the
    face moved from ``reference_crop`` to ``crop`` beyond the head's own motion, in pixels.
    Pass ``flow`` to reuse an estimator (building one per call costs more than the flow)."""
    _check_crop(reference_crop, options.crop_size)
    _check_crop(crop, options.crop_size)
    estimator = flow if flow is not None else make_flow(options)
    return float(signal_from_flow(estimator.compute(reference_crop, crop), options))


def _check_crop(crop: np.ndarray, size: int) -> None:
    shape = np.shape(crop)
    if shape != (size, size):
        raise ValueError(f"crop must be a greyscale ({size}, {size}) image (the aligned face "
                         f"crop; SpotterOptions.crop_size={size}); got shape {shape}")


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


def _crossing(t0: float, s0: float, t1: float, s1: float, level: float) -> float:
    """Time where the straight line between two samples crosses ``level`` (clamped to them)."""
    if s1 == s0:
        return t1
    a = min(max((level - s0) / (s1 - s0), 0.0), 1.0)
    return t0 + a * (t1 - t0)


class _Ring:
    """Fixed-capacity (time, value) history, oldest overwritten; no allocation after init."""

    def __init__(self, capacity: int) -> None:
        self.t = np.zeros(capacity)
        self.v = np.zeros(capacity)
        self.capacity = capacity
        self.n = 0       # number of valid entries
        self.head = 0    # next write position

    def clear(self) -> None:
        self.n = self.head = 0

    def append(self, t: float, v: float) -> bool:
        """Returns False when an entry was overwritten."""
        self.t[self.head] = t
        self.v[self.head] = v
        self.head = (self.head + 1) % self.capacity
        full = self.n == self.capacity
        self.n = min(self.n + 1, self.capacity)
        return not full

    def since(self, t_min: float) -> np.ndarray:
        """Values with time >= t_min (any order)."""
        valid = self.v[:self.n] if self.n < self.capacity else self.v
        times = self.t[:self.n] if self.n < self.capacity else self.t
        return valid[times >= t_min]

    def get(self, back: int) -> tuple[float, float]:
        """(t, v) of the entry ``back`` steps before the newest (0 = newest)."""
        i = (self.head - 1 - back) % self.capacity
        return float(self.t[i]), float(self.v[i])


class _EventDetector:
    """The causal event rules, fed one (time, signal, reference time) at a time by both the
    streaming and the offline path. It also decides which reference the next frame's signal
    must use (``reference_target``), since that depends on whether an event is open."""

    def __init__(self, options: SpotterOptions) -> None:
        self.o = options
        per_ms = options.max_fps / 1000.0
        self._stats = _Ring(int(math.ceil(options.baseline_window_ms * per_ms)) + 2)
        self._hist = _Ring(int(math.ceil(
            (options.max_event_ms + 2 * options.reference_lag_ms) * per_ms)) + 4)
        self._warned = False
        self.reset()

    def reset(self) -> None:
        self._stats.clear()
        self._hist.clear()
        self.t_first: float | None = None
        self.clamp_t = -math.inf
        self.in_event = False
        self.threshold: float | None = None
        self._ev_onset = self._ev_thr = self._ev_release = 0.0
        self._ev_start = 0   # samples since the trigger (the trigger sample is 0)
        self._ev_back = 0    # samples of the onset walk-back before the trigger

    def reference_target(self, t_ms: float) -> float | None:
        """Time of the reference for a frame at ``t_ms`` while idle: ``lag`` back, but never
        across the end of the last event (a reference inside an event would make a second,
        phantom event). None while an event is open: the frozen reference is used."""
        if self.in_event:
            return None
        return max(t_ms - self.o.reference_lag_ms, self.clamp_t)

    def _levels(self, t_ms: float) -> tuple[float, float, float] | None:
        values = self._stats.since(t_ms - self.o.baseline_window_ms)
        if self.t_first is None or t_ms - self.t_first < self.o.warmup_ms or \
                values.size < self.o.min_baseline_samples:
            return None
        median = float(np.median(values))
        sigma = 1.4826 * float(np.median(np.abs(values - median)))
        threshold = max(median + self.o.threshold_k * sigma, self.o.min_threshold)
        release = median + self.o.release_fraction * (threshold - median)
        return median, threshold, release

    def step(self, t_ms: float, signal: float, ref_t: float) -> tuple[SpotEvent | None, bool]:
        """Feed one frame. Returns (closed event or None, whether an event opened here)."""
        o = self.o
        if self.t_first is None:
            self.t_first = t_ms
        if not self._hist.append(t_ms, signal) and self.in_event and not self._warned:
            self._warned = True
            log.warning("frames arrive faster than SpotterOptions.max_fps=%s: event history is "
                        "truncated", o.max_fps)
        if self.in_event:
            self._ev_start += 1
            if signal < self._ev_release or t_ms - self._ev_onset >= o.max_event_ms:
                return self._close(t_ms, signal), False
            return None, False
        levels = self._levels(t_ms)
        self.threshold = None if levels is None else levels[1]
        # A reference much nearer than the lag (right after an event or at the start) makes a
        # smaller signal: neither a fair trigger nor a fair baseline sample.
        full_lag = t_ms - ref_t >= 0.5 * o.reference_lag_ms
        if levels is not None and full_lag and signal > levels[1]:
            self._open(t_ms, levels)
            return None, True
        if full_lag:
            self._stats.append(t_ms, signal)
        return None, False

    def _open(self, t_ms: float, levels: tuple[float, float, float]) -> None:
        _, threshold, release = levels
        self.in_event = True
        self._ev_thr, self._ev_release = threshold, release
        self._ev_start = 0
        # The rise began before the crossing: walk back over the samples above the release
        # level (at most one lag: older samples were compared with an older reference).
        back, t_k, s_k = 0, t_ms, self._hist.get(0)[1]
        onset = t_ms
        while back + 1 < self._hist.n:
            t_prev, s_prev = self._hist.get(back + 1)
            if t_prev < t_ms - self.o.reference_lag_ms or t_prev <= self.clamp_t:
                onset = t_k
                break
            if s_prev <= release:
                onset = _crossing(t_prev, s_prev, t_k, s_k, release)
                break
            back, t_k, s_k = back + 1, t_prev, s_prev
            onset = t_k
        self._ev_onset = onset
        self._ev_back = back   # samples of the walk-back before the trigger

    def _close(self, t_ms: float, signal: float) -> SpotEvent | None:
        o = self.o
        self.in_event = False
        self.clamp_t = t_ms
        n_event = self._ev_start + self._ev_back  # samples from the onset run up to the close
        n_avail = min(n_event, self._hist.n - 1)
        # Samples oldest → newest, the closing sample excluded from the apex search.
        times = np.array([self._hist.get(b)[0] for b in range(n_avail, 0, -1)])
        values = np.array([self._hist.get(b)[1] for b in range(n_avail, 0, -1)])
        if signal < self._ev_release:
            t_prev, s_prev = self._hist.get(1)
            offset = _crossing(t_prev, s_prev, t_ms, signal, self._ev_release)
        else:
            offset = t_ms
        onset = self._ev_onset
        duration = offset - onset
        if duration < o.min_event_ms or values.size == 0:
            return None
        apex_i = int(np.argmax(values))
        apex = _refine_apex(times, values, apex_i, t_ms, signal)
        kind = "micro" if duration <= o.max_micro_ms else "macro"
        return SpotEvent(float(onset), float(min(max(apex, onset), offset)), float(offset), kind,
                         float(values[apex_i]), float(self._ev_thr))


def _refine_apex(times: np.ndarray, values: np.ndarray, i: int, t_close: float,
                 s_close: float) -> float:
    """Vertex of the parabola through the maximum and its two neighbours (uneven spacing
    allowed): at webcam rates the true apex usually falls between two frames."""
    if i == 0:
        return float(times[0])
    t0, s0 = times[i - 1], values[i - 1]
    t1, s1 = times[i], values[i]
    t2, s2 = (times[i + 1], values[i + 1]) if i + 1 < len(times) else (t_close, s_close)
    d0, d2 = t0 - t1, t2 - t1
    denom = d0 * d2 * (d0 - d2)
    if denom == 0:
        return float(t1)
    a = ((s0 - s1) * d2 - (s2 - s1) * d0) / denom
    b = ((s2 - s1) * d0 * d0 - (s0 - s1) * d2 * d2) / denom
    if a >= 0:
        return float(t1)
    return float(t1 + min(max(-b / (2 * a), d0), d2))


# -- the two paths ------------------------------------------------------------------------------

def _to_uint8(crops: np.ndarray) -> np.ndarray:
    """uint8 as given; float crops (0..255) rounded the way the flow estimators round them."""
    crops = np.asarray(crops)
    if crops.dtype == np.uint8:
        return crops
    return np.clip(crops.astype(np.float32) + 0.5, 0, 255).astype(np.uint8)


class Spotter:
    """Streaming spotter: ``push`` one aligned crop at a time; an event comes back from the push
    that closes it (at its offset, or ``max_event_ms`` after its onset).

    ``signal``: the last frame's signal (pixels of residual flow), None before the first frame;
    ``threshold``: the trigger threshold in force, None during warm-up; ``region_values``: the
    last frame's per-region values (order of ``options.regions``); ``in_event``.
    Memory is preallocated: a ring of crops covering the reference lag at ``max_fps``, one frozen
    reference crop, and fixed-size histories of the signal.
    """

    def __init__(self, options: SpotterOptions = SpotterOptions(),
                 flow: FlowEstimator | None = None) -> None:
        self.options = options
        self.flow = flow if flow is not None else make_flow(options)
        size = options.crop_size
        self._capacity = _crop_capacity(options)
        self._crops = np.zeros((self._capacity, size, size), np.uint8)
        self._times = np.zeros(self._capacity)
        self._order = np.arange(self._capacity)
        self._frozen = np.zeros((size, size), np.uint8)
        self._detector = _EventDetector(options)
        self.reset()

    def reset(self) -> None:
        """Forget everything: history, statistics, an open event (it is dropped)."""
        self._head = self._n = 0
        self._frozen_t = 0.0
        self._detector.reset()
        self._signal: float | None = None
        self.region_values: np.ndarray | None = None

    @property
    def signal(self) -> float | None:
        return self._signal

    @property
    def threshold(self) -> float | None:
        return self._detector.threshold

    @property
    def in_event(self) -> bool:
        return self._detector.in_event

    def push(self, t_ms: float, crop: np.ndarray,
             landmarks: np.ndarray | None = None) -> SpotEvent | None:
        """Feed one aligned greyscale crop (crop_size², uint8) taken at ``t_ms``; timestamps must
        increase. ``landmarks`` is accepted for the pipeline's convenience and not used: on
        aligned crops fixed regions already sit on the facial parts, and per-frame landmark
        jitter would add noise to the region means."""
        t = float(t_ms)
        _check_crop(crop, self.options.crop_size)
        if not math.isfinite(t):
            raise ValueError(f"t_ms must be finite; got {t_ms}")
        if self._n and t <= self._times[(self._head - 1) % self._capacity]:
            raise ValueError(f"timestamps must increase: got {t} after "
                             f"{self._times[(self._head - 1) % self._capacity]}")
        pos = self._head
        self._crops[pos] = _to_uint8(crop)
        self._times[pos] = t
        self._head = (pos + 1) % self._capacity
        self._n = min(self._n + 1, self._capacity)

        det = self._detector
        target = det.reference_target(t)
        if target is None:
            ref, ref_t = self._frozen, self._frozen_t
        else:
            order = (self._order[:self._n] + (self._head - self._n)) % self._capacity
            ref_pos = int(order[_nearest(self._times[order], target)])
            ref, ref_t = self._crops[ref_pos], float(self._times[ref_pos])
        if ref_t == t:
            regions = np.zeros(len(self.options.regions))
        else:
            regions = region_signals(self.flow.compute(ref, self._crops[pos])[None],
                                     self.options)[0]
        self.region_values = regions
        signal = float(_combine(regions[None], self.options)[0])
        self._signal = signal
        event, opened = det.step(t, signal, ref_t)
        if opened:
            self._frozen[...] = ref
            self._frozen_t = ref_t
        if event is not None:
            log.debug("event %s", event)
        return event


def _combine(regions: np.ndarray, options: SpotterOptions) -> np.ndarray:
    return regions.max(-1) if options.combine == "max" else regions.mean(-1)


def spot_offline(times_ms: Sequence[float] | np.ndarray, crops: np.ndarray,
                 landmarks: np.ndarray | None = None,
                 options: SpotterOptions = SpotterOptions(),
                 flow: FlowEstimator | None = None,
                 batch_size: int = 32) -> tuple[list[SpotEvent], np.ndarray]:
    """Spot a whole recorded sequence: the same events as pushing it frame by frame into a
    :class:`Spotter`, with the flow computed in batches (``flow.compute_batch``, which a batched
    GPU TV-L1 runs in one call).

    times_ms: (N,) increasing; crops: (N, S, S) aligned greyscale crops; landmarks: ignored (see
    :meth:`Spotter.push`). Returns (events in time order, per-frame signal (N,) float64).

    The idle-reference pairs (each frame with the frame ``reference_lag_ms`` before it) are
    computed a batch of frames ahead of the rules. The rules can ask for another reference (the
    frozen one during an event, the end of the last event right after it); those pairs are
    computed on demand, a batch of following frames at a time. A batch cut short by a change of
    reference is wasted work, the price of not knowing the events in advance.
    """
    times = np.asarray(times_ms, dtype=np.float64).ravel()
    crops = _to_uint8(np.asarray(crops))
    size = options.crop_size
    if crops.ndim != 3 or crops.shape[1:] != (size, size):
        raise ValueError(f"crops must be (N, {size}, {size}); got {crops.shape}")
    if len(times) != len(crops):
        raise ValueError(f"{len(times)} timestamps for {len(crops)} crops")
    if not np.isfinite(times).all() or np.any(np.diff(times) <= 0):
        raise ValueError("timestamps must be finite and increasing")
    estimator = flow if flow is not None else make_flow(options)
    n = len(times)
    lag = options.reference_lag_ms
    capacity = _crop_capacity(options)

    def window(j: int) -> int:
        return max(0, j - capacity + 1)

    def signals(ref: np.ndarray, cur: np.ndarray) -> np.ndarray:
        out = np.zeros(len(cur))
        moving = np.flatnonzero(ref != cur)
        for start in range(0, moving.size, batch_size):
            sel = moving[start:start + batch_size]
            out[sel] = _combine(region_signals(
                estimator.compute_batch(crops[ref[sel]], crops[cur[sel]]), options), options)
        return out

    idle_ref = np.array([window(j) + _nearest(times[window(j):j + 1], times[j] - lag)
                         for j in range(n)], dtype=np.int64)
    idle_signal = np.zeros(n)
    idle_done = np.zeros(n, bool)

    detector = _EventDetector(options)
    signal = np.zeros(n)
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
                # Lazily, a batch at a time: frames inside events never need their idle pair.
                cur = np.arange(j, min(n, j + batch_size))
                cur = cur[~idle_done[cur]]
                idle_signal[cur] = signals(idle_ref[cur], cur)
                idle_done[cur] = True
            s = idle_signal[j]
        else:
            if ref != extra_ref or j not in extra:
                # A frozen or post-event reference holds for a run of frames of unknown length
                # (most events are short): batches that start small and double while it lasts.
                extra_batch = 4 if ref != extra_ref else min(2 * extra_batch, batch_size)
                cur = np.arange(j, min(n, j + extra_batch))
                values = signals(np.full(cur.size, ref), cur)
                extra_ref, extra = ref, dict(zip(cur.tolist(), values.tolist()))
            s = extra[j]
        signal[j] = s
        event, opened = detector.step(float(times[j]), float(s), float(times[ref]))
        if opened:
            frozen = ref
        if event is not None:
            events.append(event)
    return events, signal
