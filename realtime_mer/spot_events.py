"""From region values to events: each region's running threshold from its own recent values,
onset when a region rises over it, apex, offset when it falls back, the regions that moved
together grouped into one event, and blinks reported as their own kind. The spotter
(:mod:`realtime_mer.spotting`) measures the values; this module decides what is an event."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from realtime_mer.blinks import Blink
from realtime_mer.blinks import crossing as _crossing
from realtime_mer.buffer import TimeSeries

if TYPE_CHECKING:  # the options are read, never built, here
    from realtime_mer.spotting import SpotterOptions

log = logging.getLogger(__name__)

# The current frame's values against the stored frame nearest a given time: (values, which
# regions a blink or a glance masks in that pair).
Remeasure = Callable[[float], tuple[np.ndarray, np.ndarray]]

__all__ = ["SpotEvent", "EventDetector", "refine_apex", "blink_event"]


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


class EventDetector:
    """The causal event rules, fed one frame's region values at a time by both the streaming
    and the offline path. It also decides which reference the next frame's values must use
    (``reference_target``), since that depends on whether an event is open.

    Each region opens and closes its own event against its own threshold; they share one
    reference, frozen when the first of them opens and released when the last closes (one
    frozen-reference flow per frame, whatever the number of regions). The region events of that
    span are then merged where they overlap (IoU >= ``merge_iou``: one movement seen in two
    regions) and returned."""

    merge_iou = 0.3

    def __init__(self, options: SpotterOptions) -> None:
        self.o = options
        width = len(options.regions)
        self._gains = np.asarray(options.region_gains, np.float64)
        self._min_threshold = options.min_floor_pct * self._gains
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
        while a blink or a glance masks the region): the threshold as a movement, and while the
        region is itself moving, what it is doing plus the threshold (a new movement must stand
        out of it)."""
        levels = self._ev if self.in_event else self.levels
        if levels is None:
            return np.full(len(self.o.regions), np.nan)
        floor = levels.threshold / self._gains
        if self.in_event and self._open.any():
            current = np.where(np.isfinite(self._last), self._last, 0.0)
            floor = np.where(self._open, (current + levels.threshold) / self._gains, floor)
        return np.where(np.isnan(self._last), np.inf, floor)

    def reference_target(self, t_ms: float) -> float | None:
        """Time of the reference for a frame at ``t_ms`` while idle: ``lag`` back. None while an
        event is open and for a lag after it: the frozen reference, the neutral face before the
        event, is used. A frame a lag back would still be a frame of the event, and the face
        going back to neutral would look like a second, phantom movement."""
        if self.in_event or t_ms - self.clamp_t < self.o.reference_lag_ms:
            return None
        return t_ms - self.o.reference_lag_ms

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

    def step(self, t_ms: float, values: np.ndarray, ref_t: float, masked: np.ndarray,
             baseline: tuple[np.ndarray, float, np.ndarray],
             remeasure: Remeasure | None = None) -> tuple[list[SpotEvent], bool]:
        """Feed one frame: its region values against the reference ``reference_target`` asked
        for (taken at ``ref_t``), which regions a blink or a glance makes unusable, and
        ``baseline``: the same (values, ref_t, masked) against the frame ``reference_lag_ms``
        back, whatever the event state. ``remeasure`` measures this frame against an earlier
        stored one; it is called only at a crossing by regions that moved within
        ``max_micro_ms`` before the reference (``_returning``). Returns (the events that closed
        here, whether the reference froze here).

        The thresholds' statistics are taken from the baseline values of every frame, in an
        event or not: they then depend on the input alone, never on which events the rules
        opened. Statistics of idle frames only would hinge on the event history: after a long
        event a handful of samples set the thresholds, and two near-identical inputs (a
        re-encode) could open different events and drift apart for seconds."""
        o = self.o
        if self.t_first is None:
            self.t_first = t_ms
        base_values, base_ref_t, base_masked = baseline
        if t_ms - base_ref_t >= 0.5 * o.reference_lag_ms:
            base_sample = np.where(base_masked, np.nan, base_values)
        else:  # the first frames: no frame a lag back yet, a smaller value, no fair sample
            base_sample = None
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
            self._sample(t_ms, base_sample)
            if not self._open.any():
                return self._end_group(t_ms), False
            return [], False
        self.levels = self._compute_levels(t_ms)
        self._sample(t_ms, base_sample)
        # No trigger against a reference much nearer than the lag (the first frames: a smaller
        # value), nor for a lag after an event: a face that has not quite settled back would
        # reopen it at once.
        if self.levels is not None and t_ms - ref_t >= 0.5 * o.reference_lag_ms and \
                t_ms - self.clamp_t >= o.reference_lag_ms:
            above = (usable > self.levels.threshold) & ~masked
            if above.any() and remeasure is not None:
                above &= ~self._returning(ref_t, above, remeasure)
            if above.any():
                self.in_event = True
                self._ev = self.levels
                self._group_start = t_ms
                for r in np.flatnonzero(above):
                    self._open_region(r, t_ms)
                return [], True
        return [], False

    def _returning(self, ref_t: float, above: np.ndarray, remeasure: Remeasure) -> np.ndarray:
        """Which of the crossing regions are only going back to where they rested before the
        reference. A movement too slow or small to cross on its way out can cross on its way
        back: the face back at rest against a reference near the movement's apex. Frozen there,
        the reference would hold the apex and the event would not end for seconds. So when those
        regions moved shortly before the reference, this frame is measured once more against
        the last face at rest before that movement (``_rest_before``); a region that is not over
        its threshold against that one is on its way back, and opens nothing. A region the
        second pair cannot measure (a blink or a glance in it) keeps its crossing."""
        rest_t = self._rest_before(ref_t, above)
        if rest_t is None:
            return np.zeros_like(above)
        values, masked = remeasure(rest_t)
        return above & ~masked & ~(values > self.levels.threshold)

    def _rest_before(self, ref_t: float, regions: np.ndarray) -> float | None:
        """The last face at rest before the latest movement of ``regions`` up to ``ref_t``.
        Walking back from the reference over at most ``max_micro_ms`` (the longest movement
        that matters here), never to before the last event's end: a frame moved when its own
        value against the frame a lag before it is over the release level in one of
        ``regions``, and the first frame at rest before such a frame is the one. The reference's
        own value alone would not do: a movement too slow to cross moves little in one lag, so
        a reference near its apex can look at rest. None when nothing moved (the reference
        stands where the face rested) or no frame at rest is found."""
        times, values, _ = self._stats.last(self._stats.n)
        release = self.levels.release[regions]
        i = int(np.searchsorted(times, ref_t))  # the reference's own sample, or the next
        if i > 0 and (i == len(times) or ref_t - times[i - 1] < times[i] - ref_t):
            i -= 1
        if i >= len(times) or abs(times[i] - ref_t) > 0.5 * self.o.reference_lag_ms:
            return None  # no fair sample of the reference (the first frames)

        def at_rest(k: int) -> bool:
            sample = values[k, regions]
            return bool(np.all(np.isfinite(sample)) and np.all(sample <= release))

        moved = False
        for k in range(i, -1, -1):
            if times[k] < ref_t - self.o.max_micro_ms or times[k] < self.clamp_t:
                break
            if not at_rest(k):
                moved = True
            elif moved:
                return float(times[k])
        return None

    def _sample(self, t_ms: float, sample: np.ndarray | None) -> None:
        if sample is not None:
            self._stats.append(t_ms, sample)

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
        # Too brief, or over the threshold too briefly (each frame for the frame interval):
        # noise, unless the input ended mid-movement.
        over_ms = _longest_run(series > ev.threshold[r]) * float(np.median(np.diff(times)))
        if not truncated and (offset - onset < o.min_event_ms or over_ms < o.min_over_ms):
            return
        apex = min(max(refine_apex(times, series, apex_i), onset), offset)
        self._closed.append(_RegionEvent(r, float(onset), float(apex), float(offset), peak,
                                         truncated))

    def _end_group(self, t_ms: float) -> list[SpotEvent]:
        """Release the reference and turn the span's region events into events: overlapping
        ones (IoU >= merge_iou) are one movement, named by the region that stood highest above
        its floor (its apex and peak), from the first onset to the last offset of the regions
        that overlap that one (IoU >= merge_iou): edges that do not hang on which of two
        near-tied regions stands highest."""
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
            # The regions that moved with the main one (not those a chain of overlaps joined):
            # a near tie between two of them, whichever wins on a re-encode, gives one span.
            alike = [e for e in cluster if e is main or _iou(e, main) >= self.merge_iou]
            onset = min(e.onset for e in alike)
            offset = max(e.offset for e in alike)
            duration = offset - onset
            kind = "micro" if duration <= o.max_micro_ms and amplitude <= o.max_micro_pct \
                else "macro"
            out.append(SpotEvent(onset, main.apex, offset, kind, main.peak,
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


def _longest_run(flags: np.ndarray) -> int:
    """The most consecutive True values in ``flags``: frames over a threshold one after the
    other (two lone frames apart are two calls, not a movement)."""
    best = run = 0
    for flag in flags:
        run = run + 1 if flag else 0
        best = max(best, run)
    return best


def _iou(a: _RegionEvent, b: _RegionEvent) -> float:
    inter = min(a.offset, b.offset) - max(a.onset, b.onset)
    union = max(a.offset, b.offset) - min(a.onset, b.onset)
    return inter / union if inter > 0 and union > 0 else 0.0


def refine_apex(times: np.ndarray, values: np.ndarray, i: int) -> float:
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


def blink_event(blink: Blink) -> SpotEvent:
    return SpotEvent(blink.onset_ms, blink.apex_ms, blink.offset_ms, "blink", blink.closure,
                     0.0, ("lids",), 100.0 * blink.closure, 0.0, blink.truncated)
