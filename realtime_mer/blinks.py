"""Blinks from the eyelid landmarks: a blink is not a micro-expression, so the spotter reports it
as its own kind and keeps the lids' movement out of its micro-expression events.

The measure is the eyes' openness: the lids' distance at three points across each eye over the
eye's width (MediaPipe Face Mesh points; a ratio, so the face's size and the crop's scale do not
matter), averaged over both eyes. Its open level is a running upper quantile of the recent
frames, so a person with narrow eyes or a squint is measured against their own open eyes. A blink
is a dip below ``closed_fraction`` of that level; its onset and offset are where the openness
crosses ``edge_fraction`` of it on either side of the dip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from realtime_mer.buffer import TimeSeries

__all__ = ["BlinkOptions", "Blink", "BlinkDetector", "eye_openness", "gaze", "crossing",
           "EYELID_PAIRS", "EYE_CORNERS", "IRIS_CENTRES"]

#: (upper lid, lower lid) pairs across each eye: image-left eye 160/144, 159/145, 158/153,
#: image-right eye 387/373, 386/374, 385/380.
EYELID_PAIRS = (((160, 144), (159, 145), (158, 153)), ((387, 373), (386, 374), (385, 380)))
#: Each eye's corners, for its width: image-left 33/133, image-right 362/263.
EYE_CORNERS = ((33, 133), (362, 263))
#: Each eye's iris centre (MediaPipe's refined landmarks), image-left then image-right.
IRIS_CENTRES = (468, 473)


def eye_openness(landmarks: np.ndarray) -> float:
    """Mean over both eyes of the lids' mean distance over the eye's width (about 0.3 for open
    eyes, under 0.1 closed); NaN when the landmarks are missing or degenerate."""
    pts = np.asarray(landmarks, np.float64)
    if pts.ndim != 2 or pts.shape[0] < 468 or not np.isfinite(pts[:468]).all():
        return math.nan
    values = []
    for pairs, (a, b) in zip(EYELID_PAIRS, EYE_CORNERS):
        width = float(np.hypot(*(pts[a] - pts[b])))
        if width <= 1e-6:
            return math.nan
        gaps = [float(np.hypot(*(pts[u] - pts[d]))) for u, d in pairs]
        values.append(sum(gaps) / len(gaps) / width)
    return float(sum(values) / len(values))


def gaze(landmarks: np.ndarray) -> np.ndarray:
    """Where the irises sit in the eyes: the mean over both eyes of the iris centre's offset
    from the middle of the eye's corners, along and across the corners' line, in eye widths
    (2,). A glance moves it by a tenth of the eye's width or more; the lids moving by a few %
    of the eye distance hardly at all. NaN without the iris landmarks (fewer than 478 points)
    or with degenerate eyes."""
    pts = np.asarray(landmarks, np.float64)
    if pts.ndim != 2 or pts.shape[0] <= max(IRIS_CENTRES) or not np.isfinite(pts).all():
        return np.full(2, np.nan)
    out = np.zeros(2)
    for (a, b), iris in zip(EYE_CORNERS, IRIS_CENTRES):
        axis = pts[b] - pts[a]
        width = float(np.hypot(*axis))
        if width <= 1e-6:
            return np.full(2, np.nan)
        along = axis / width
        across = np.array([-along[1], along[0]])
        offset = pts[iris] - 0.5 * (pts[a] + pts[b])
        out += np.array([offset @ along, offset @ across]) / width
    return out / len(IRIS_CENTRES)


@dataclass(frozen=True)
class BlinkOptions:
    """``open_quantile`` of the openness over ``open_window_ms`` is the open level; below
    ``closed_fraction`` of it the eyes are closed (a blink under way); ``mask_fraction``: below
    this the lids are moving too much for the spotter to use them (it masks them); the blink's
    edges are the ``edge_fraction`` crossings; the lids stay masked ``hold_ms`` after they last
    moved too much (a reopening lid settles). Shorter dips than ``min_blink_ms`` are landmark
    noise; no blink is reported before ``warmup_ms`` of frames gave an open level."""

    open_window_ms: float = 3000.0
    open_quantile: float = 0.75
    closed_fraction: float = 0.5
    mask_fraction: float = 0.75
    edge_fraction: float = 0.8
    min_blink_ms: float = 30.0
    hold_ms: float = 150.0
    warmup_ms: float = 500.0
    max_fps: float = 250.0

    def __post_init__(self) -> None:
        if not 0.0 < self.closed_fraction < self.mask_fraction <= self.edge_fraction < 1.0:
            raise ValueError("need 0 < closed_fraction < mask_fraction <= edge_fraction < 1; got "
                             f"{self.closed_fraction}, {self.mask_fraction}, "
                             f"{self.edge_fraction}")
        if not 0.5 <= self.open_quantile < 1.0:
            raise ValueError(f"open_quantile must be in [0.5, 1); got {self.open_quantile}")
        for name in ("open_window_ms", "max_fps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0; got {getattr(self, name)}")


@dataclass(frozen=True)
class Blink:
    """One blink: times in ms on the caller's clock; ``closure``: how far the eyes closed (1 −
    lowest openness / open level); ``truncated``: the input ended before the eyes reopened."""

    onset_ms: float
    apex_ms: float
    offset_ms: float
    closure: float
    truncated: bool = False


class BlinkDetector:
    """Push one frame's landmarks at a time; a :class:`Blink` comes back from the push at which
    the eyes reopen. ``masking`` is True while the lids move too much to be measured (a blink
    starting, under way or ending)."""

    def __init__(self, options: BlinkOptions = BlinkOptions()) -> None:
        self.options = options
        self._open = TimeSeries(TimeSeries.capacity_for(options.open_window_ms, options.max_fps))
        self.reset()

    def reset(self) -> None:
        self._open.clear()
        self._t_first: float | None = None
        self.open_level: float | None = None
        self.openness: float = math.nan
        self.masking = False
        self._closed = False        # the dip went below closed_fraction
        self._dip_start: float | None = None  # edge crossing going down
        self._dip_min = math.inf
        self._dip_min_t = 0.0
        self._prev: tuple[float, float] | None = None
        self._masked_t = -math.inf

    def push(self, t_ms: float, landmarks: np.ndarray | None) -> Blink | None:
        o = self.options
        value = eye_openness(landmarks) if landmarks is not None else math.nan
        self.openness = value
        if self._t_first is None:
            self._t_first = t_ms
        if not math.isfinite(value):
            self.masking = False
            return None
        level = self._level(t_ms)
        prev, self._prev = self._prev, (t_ms, value)
        if level is None:
            self._remember(t_ms, value)
            return None
        edge = o.edge_fraction * level
        blink = None
        if self._dip_start is None:
            if value < edge:
                start = t_ms if prev is None else crossing(prev[0], prev[1], t_ms, value, edge)
                self._dip_start, self._dip_min, self._dip_min_t = start, value, t_ms
                self._closed = value < o.closed_fraction * level
        else:
            if value < self._dip_min:
                self._dip_min, self._dip_min_t = value, t_ms
            self._closed |= value < o.closed_fraction * level
            if value >= edge:
                end = crossing(prev[0], prev[1], t_ms, value, edge) if prev else t_ms
                if self._closed and end - self._dip_start >= o.min_blink_ms:
                    blink = Blink(self._dip_start, self._dip_min_t, end,
                                  1.0 - self._dip_min / level)
                self._dip_start, self._closed = None, False
        if value < o.mask_fraction * level or self._closed:
            self._masked_t = t_ms
        self.masking = t_ms - self._masked_t <= o.hold_ms
        # A dip is not the open level: only frames at or above the edge feed it.
        if value >= edge:
            self._remember(t_ms, value)
        return blink

    def finish(self, t_ms: float | None = None) -> Blink | None:
        """The blink under way when the input ends, closed there and marked truncated."""
        blink = None
        if self._dip_start is not None and self._closed and self.open_level:
            end = t_ms if t_ms is not None else (self._prev[0] if self._prev else self._dip_start)
            blink = Blink(self._dip_start, self._dip_min_t, max(end, self._dip_min_t),
                          1.0 - self._dip_min / self.open_level, truncated=True)
        self._dip_start, self._closed = None, False
        return blink

    def _remember(self, t_ms: float, value: float) -> None:
        self._open.append(t_ms, value)

    def _level(self, t_ms: float) -> float | None:
        o = self.options
        if self._open.n == 0 or t_ms - self._t_first < o.warmup_ms:
            return self.open_level if self.open_level is not None and self._open.n else None
        recent = self._open.since(t_ms - o.open_window_ms)[:, 0]
        if recent.size < 4:
            return self.open_level
        self.open_level = float(np.quantile(recent, o.open_quantile))
        return self.open_level


def crossing(t0: float, v0: float, t1: float, v1: float, level: float) -> float:
    """Time where the straight line between two samples crosses ``level`` (clamped to them);
    the spotter's onsets and offsets use it too."""
    if v1 == v0:
        return t1
    a = min(max((level - v0) / (v1 - v0), 0.0), 1.0)
    return t0 + a * (t1 - t0)
