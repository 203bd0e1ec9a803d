"""Buffer stage: a preallocated ring of aligned face crops, their landmarks and timestamps.

The spotter decides about a frame only after the offset of an expression has passed, so the
features stage needs the onset and apex crops from up to a second or two back. The ring is sized
in milliseconds (sources run at 15 to 200 fps) and allocates once: a per-frame allocation at
30-200 fps is measurable garbage-collector churn in a real-time loop.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["RingBuffer", "StoredFrame", "BufferWindow", "OutOfRange", "TimeSeries"]

#: slack when comparing times: float ms from pts arithmetic are not bit-exact
_EPS_MS = 1e-6


class OutOfRange(KeyError):
    """A time the buffer does not hold (overwritten already, or not arrived yet)."""

    def __str__(self) -> str:  # KeyError's default repr-quotes the message
        return str(self.args[0]) if self.args else "out of range"


class StoredFrame(NamedTuple):
    """One stored frame. ``crop`` and ``landmarks`` are read-only views into the ring, valid
    until ``capacity`` more frames are pushed; copy them to keep them longer. ``transform``: the
    frame → crop matrix (2x3) the crop was cut with, NaN where none was given."""

    crop: np.ndarray
    landmarks: np.ndarray
    t_ms: float
    transform: np.ndarray | None = None


@dataclass(frozen=True)
class BufferWindow:
    """Frames with ``t0_ms <= t <= t1_ms`` in time order; arrays are copies, safe to keep."""

    crops: np.ndarray       # (K, S, S) uint8
    landmarks: np.ndarray   # (K, N, 2) float32
    times_ms: np.ndarray    # (K,) float64

    def __len__(self) -> int:
        return int(self.times_ms.shape[0])


class RingBuffer:
    """Fixed-capacity ring of (crop, landmarks, t_ms), oldest overwritten first.

    ``capacity = ceil(capacity_ms / 1000 * fps_hint * 1.5) + 1`` slots: the 1.5 is head-room for
    a source faster than its hint (webcams that report 30 fps and deliver 40), so the ring still
    spans ``capacity_ms`` in that case. Timestamps must increase strictly.
    """

    @staticmethod
    def slots_for(capacity_ms: float, fps_hint: float) -> int:
        """The slots a buffer of ``capacity_ms`` at ``fps_hint`` has (see the class doc)."""
        return int(math.ceil(capacity_ms / 1000.0 * fps_hint * 1.5)) + 1

    def __init__(self, capacity_ms: float, fps_hint: float, crop_size: int,
                 n_landmarks: int = 478) -> None:
        if not capacity_ms > 0 or not math.isfinite(capacity_ms):
            raise ValueError(f"capacity_ms must be a positive number, got {capacity_ms}")
        if not fps_hint > 0 or not math.isfinite(fps_hint):
            raise ValueError(f"fps_hint must be a positive number, got {fps_hint}")
        if crop_size < 1 or n_landmarks < 0:
            raise ValueError(f"bad crop_size={crop_size} or n_landmarks={n_landmarks}")
        self.capacity_ms = float(capacity_ms)
        self.fps_hint = float(fps_hint)
        self.crop_size = int(crop_size)
        self.n_landmarks = int(n_landmarks)
        self.capacity = self.slots_for(capacity_ms, fps_hint)
        self.crops = np.zeros((self.capacity, crop_size, crop_size), dtype=np.uint8)
        self.landmarks = np.zeros((self.capacity, n_landmarks, 2), dtype=np.float32)
        self.times_ms = np.zeros(self.capacity, dtype=np.float64)
        self.transforms = np.full((self.capacity, 2, 3), np.nan)
        self._start = 0  # slot of the oldest frame
        self._count = 0
        self.pushed = 0  # frames pushed since the last reset, overwritten ones included

    # -- writing -----------------------------------------------------------------------------
    def push(self, t_ms: float, crop: np.ndarray, landmarks: np.ndarray | None,
             transform: np.ndarray | None = None) -> None:
        """Copy one frame into the next slot. ``landmarks`` may be None (stored as NaN) for a
        frame whose crop is kept but whose landmarks are unknown."""
        t = float(t_ms)
        if not math.isfinite(t):
            raise ValueError(f"t_ms must be finite, got {t_ms}")
        if self._count and t <= self.newest_ms + _EPS_MS:
            raise ValueError(f"timestamps must increase: got {t:.3f} ms after "
                             f"{self.newest_ms:.3f} ms"
                             " (call reset() to start a new clip)")
        if crop.shape != (self.crop_size, self.crop_size):
            raise ValueError(f"crop must be ({self.crop_size}, {self.crop_size}), got {crop.shape}")
        if landmarks is not None and landmarks.shape != (self.n_landmarks, 2):
            raise ValueError(f"landmarks must be ({self.n_landmarks}, 2), got {landmarks.shape}")
        slot = (self._start + self._count) % self.capacity
        if self._count == self.capacity:
            self._start = (self._start + 1) % self.capacity
        else:
            self._count += 1
        # Slice assignment copies (and casts) into the existing memory; no new arrays.
        self.crops[slot] = crop
        if landmarks is None:
            self.landmarks[slot] = np.nan
        else:
            self.landmarks[slot] = landmarks
        self.transforms[slot] = np.nan if transform is None else transform
        self.times_ms[slot] = t
        self.pushed += 1

    def reset(self) -> None:
        """Forget every frame (memory is kept)."""
        self._start = 0
        self._count = 0
        self.pushed = 0

    # -- reading -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._count

    def _slot(self, i: int) -> int:
        """Ring slot of the i-th oldest frame."""
        return (self._start + i) % self.capacity

    @property
    def oldest_ms(self) -> float:
        if not self._count:
            raise OutOfRange("the buffer is empty")
        return float(self.times_ms[self._start])

    @property
    def newest_ms(self) -> float:
        if not self._count:
            raise OutOfRange("the buffer is empty")
        return float(self.times_ms[self._slot(self._count - 1)])

    def _stored(self, slot: int) -> StoredFrame:
        crop = self.crops[slot]
        lms = self.landmarks[slot]
        transform = self.transforms[slot]
        crop.flags.writeable = False  # a view; writing through it would corrupt the ring
        lms.flags.writeable = False
        transform.flags.writeable = False
        return StoredFrame(crop, lms, float(self.times_ms[slot]), transform)

    def latest(self) -> StoredFrame:
        if not self._count:
            raise OutOfRange("the buffer is empty")
        return self._stored(self._slot(self._count - 1))

    def _first_at_or_after(self, t: float) -> int:
        """Logical index of the first frame with time >= t (``len`` if none)."""
        lo, hi = 0, self._count
        while lo < hi:
            mid = (lo + hi) // 2
            if self.times_ms[self._slot(mid)] < t:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def get(self, t_ms: float) -> StoredFrame:
        """The stored frame nearest to ``t_ms`` as (crop, landmarks, t_actual). Raises
        ``KeyError`` when ``t_ms`` lies outside [oldest_ms, newest_ms] (too old: overwritten;
        too new: not arrived yet) rather than silently returning an end frame."""
        if not self._count:
            raise OutOfRange(f"no frame near {t_ms:.3f} ms: the buffer is empty")
        t = float(t_ms)
        oldest, newest = self.oldest_ms, self.newest_ms
        if t < oldest - _EPS_MS or t > newest + _EPS_MS:
            raise OutOfRange(
                f"{t:.3f} ms is outside the buffered span [{oldest:.3f}, {newest:.3f}] ms")
        i = self._first_at_or_after(t)
        if i == self._count:
            i -= 1
        elif i > 0:
            before = self.times_ms[self._slot(i - 1)]
            after = self.times_ms[self._slot(i)]
            if t - before <= after - t:
                i -= 1
        return self._stored(self._slot(i))

    def window(self, t0_ms: float, t1_ms: float) -> BufferWindow:
        """Copies of the frames with ``t0_ms <= t <= t1_ms``, oldest first (empty if none)."""
        if t1_ms < t0_ms:
            raise ValueError(f"window end {t1_ms} ms is before its start {t0_ms} ms")
        i0 = self._first_at_or_after(float(t0_ms) - _EPS_MS)
        i1 = self._first_at_or_after(float(t1_ms) + _EPS_MS)
        slots = (self._start + np.arange(i0, i1)) % self.capacity
        return BufferWindow(
            crops=self.crops[slots],
            landmarks=self.landmarks[slots],
            times_ms=self.times_ms[slots],
        )


class TimeSeries:
    """A fixed-capacity history of (time, values, flag), oldest overwritten first: the running
    statistics of the spotter, the blink detector and the lip-motion detector. Allocates once;
    ``capacity_for(window_ms, max_fps)`` sizes it for a window at the fastest expected rate.
    NaN values are allowed (the spotter marks masked regions so)."""

    def __init__(self, capacity: int, width: int = 1) -> None:
        if capacity < 1 or width < 1:
            raise ValueError(f"bad capacity={capacity} or width={width}")
        self.t = np.zeros(capacity)
        self.v = np.zeros((capacity, width))
        self.flag = np.zeros(capacity, bool)
        self.capacity = capacity
        self.n = 0
        self.head = 0

    @staticmethod
    def capacity_for(window_ms: float, max_fps: float, margin: int = 2) -> int:
        return int(math.ceil(window_ms * max_fps / 1000.0)) + margin

    def clear(self) -> None:
        self.n = self.head = 0

    def append(self, t: float, v, flag: bool = False) -> None:
        self.t[self.head] = t
        self.v[self.head] = v
        self.flag[self.head] = flag
        self.head = (self.head + 1) % self.capacity
        self.n = min(self.n + 1, self.capacity)

    def since(self, t_min: float) -> np.ndarray:
        """(K, width) values with time >= t_min (any order)."""
        return self.v[:self.n][self.t[:self.n] >= t_min]

    def last(self, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The newest ``count`` entries, oldest first: times (K,), values (K, width),
        flags (K,)."""
        count = min(count, self.n)
        idx = (self.head - count + np.arange(count)) % self.capacity
        return self.t[idx], self.v[idx], self.flag[idx]
