"""RingBuffer: wrap-around order, nearest lookup, window bounds, no per-push allocation.

Crops are real CASME II face frames (200 fps recording, so the timestamps below are the dataset's
real 5 ms spacing); each pushed crop gets its push number written into one pixel so that order
after wrap-around can be checked exactly."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from realtime_mer.buffer import OutOfRange, RingBuffer

CROP = 64
N_LM = 478
STEP_MS = 5.0  # CASME II is recorded at 200 fps


@pytest.fixture(scope="module")
def real_crops(media_dir) -> list[np.ndarray]:
    paths = sorted((media_dir / "casme2_frames").glob("*.jpg"))
    assert len(paths) == 10, paths
    return [cv2.resize(cv2.imread(str(p), cv2.IMREAD_GRAYSCALE), (CROP, CROP),
                       interpolation=cv2.INTER_AREA) for p in paths]


def _frame(real_crops, k: int) -> tuple[np.ndarray, np.ndarray]:
    crop = real_crops[k % len(real_crops)].copy()
    crop[0, 0] = k % 256
    landmarks = np.full((N_LM, 2), float(k), dtype=np.float32)
    return crop, landmarks


def _fill(buf: RingBuffer, real_crops, n: int, t0: float = 1000.0) -> list[float]:
    times = []
    for k in range(n):
        t = t0 + k * STEP_MS
        buf.push(t, *_frame(real_crops, k))
        times.append(t)
    return times


def test_capacity_follows_the_formula():
    buf = RingBuffer(capacity_ms=2000, fps_hint=30, crop_size=CROP, n_landmarks=N_LM)
    assert buf.capacity == math.ceil(2.0 * 30 * 1.5) + 1 == 91
    assert buf.crops.shape == (91, CROP, CROP) and buf.crops.dtype == np.uint8
    assert buf.landmarks.shape == (91, N_LM, 2) and buf.landmarks.dtype == np.float32
    assert buf.times_ms.dtype == np.float64
    assert len(buf) == 0


def test_wraparound_keeps_newest_capacity_frames_in_order(real_crops):
    buf = RingBuffer(capacity_ms=100, fps_hint=200, crop_size=CROP, n_landmarks=N_LM)
    cap = buf.capacity  # 31
    n = 2 * cap + 7
    times = _fill(buf, real_crops, n)
    assert len(buf) == cap
    assert buf.oldest_ms == times[n - cap] and buf.newest_ms == times[-1]
    win = buf.window(buf.oldest_ms, buf.newest_ms)
    assert len(win) == cap
    np.testing.assert_array_equal(win.times_ms, times[n - cap:])
    for j, k in enumerate(range(n - cap, n)):
        expected_crop, expected_lm = _frame(real_crops, k)
        np.testing.assert_array_equal(win.crops[j], expected_crop)
        assert win.landmarks[j, 0, 0] == k
    latest = buf.latest()
    assert latest.t_ms == times[-1] and latest.crop[0, 0] == (n - 1) % 256


def test_no_allocation_per_push(real_crops):
    buf = RingBuffer(capacity_ms=100, fps_hint=200, crop_size=CROP, n_landmarks=N_LM)
    arrays = (buf.crops, buf.landmarks, buf.times_ms)
    pointers = [a.__array_interface__["data"][0] for a in arrays]
    _fill(buf, real_crops, 3 * buf.capacity)
    assert all(a is b for a, b in zip((buf.crops, buf.landmarks, buf.times_ms), arrays))
    assert [a.__array_interface__["data"][0] for a in
            (buf.crops, buf.landmarks, buf.times_ms)] == pointers
    # get/latest hand out views into the ring, not copies
    stored = buf.latest()
    assert np.shares_memory(stored.crop, buf.crops)
    with pytest.raises(ValueError):
        stored.crop[0, 0] = 0  # read-only: writing would corrupt the ring


def test_nearest_lookup(real_crops):
    buf = RingBuffer(capacity_ms=100, fps_hint=200, crop_size=CROP, n_landmarks=N_LM)
    times = _fill(buf, real_crops, buf.capacity + 5)  # wrapped
    k = buf.capacity  # a frame stored after the wrap
    t = times[k]
    assert buf.get(t).t_ms == t
    assert buf.get(t + 0.4 * STEP_MS).t_ms == t
    assert buf.get(t + 0.6 * STEP_MS).t_ms == times[k + 1]
    assert buf.get(t - 0.6 * STEP_MS).t_ms == times[k - 1]
    got = buf.get(t + 0.2)
    np.testing.assert_array_equal(got.crop, _frame(real_crops, k)[0])
    assert got.landmarks[5, 1] == k
    assert buf.get(buf.oldest_ms).t_ms == buf.oldest_ms
    assert buf.get(buf.newest_ms).t_ms == buf.newest_ms


def test_lookup_outside_the_held_span_is_an_error(real_crops):
    buf = RingBuffer(capacity_ms=100, fps_hint=200, crop_size=CROP, n_landmarks=N_LM)
    with pytest.raises(KeyError, match="empty"):
        buf.get(0.0)
    times = _fill(buf, real_crops, buf.capacity + 5)
    with pytest.raises(KeyError, match="outside"):
        buf.get(times[0])  # overwritten
    with pytest.raises(OutOfRange, match="outside"):
        buf.get(times[-1] + STEP_MS)  # not arrived yet


def test_window_bounds_are_inclusive_and_ordered(real_crops):
    buf = RingBuffer(capacity_ms=100, fps_hint=200, crop_size=CROP, n_landmarks=N_LM)
    times = _fill(buf, real_crops, buf.capacity + 10)
    lo, hi = times[20], times[30]
    win = buf.window(lo, hi)
    np.testing.assert_array_equal(win.times_ms, times[20:31])
    assert buf.window(lo + 0.1, hi - 0.1).times_ms.tolist() == times[21:30]
    assert len(buf.window(times[-1] + 1, times[-1] + 50)) == 0
    assert len(buf.window(0, times[0])) == 0  # overwritten span
    # window returns copies: later pushes must not change it
    before = win.crops.copy()
    _fill(buf, real_crops, buf.capacity, t0=times[-1] + STEP_MS)
    np.testing.assert_array_equal(win.crops, before)
    with pytest.raises(ValueError):
        buf.window(hi, lo)


def test_push_validates_and_reset_empties(real_crops):
    buf = RingBuffer(capacity_ms=100, fps_hint=200, crop_size=CROP, n_landmarks=N_LM)
    crop, lm = _frame(real_crops, 0)
    buf.push(10.0, crop, lm)
    with pytest.raises(ValueError, match="increase"):
        buf.push(10.0, crop, lm)
    with pytest.raises(ValueError, match="crop"):
        buf.push(20.0, crop[:32], lm)
    with pytest.raises(ValueError, match="landmarks"):
        buf.push(20.0, crop, lm[:468])
    buf.push(20.0, crop, None)
    assert np.isnan(buf.get(20.0).landmarks).all()
    buf.reset()
    assert len(buf) == 0
    buf.push(0.0, crop, lm)  # time may restart after reset
    assert buf.latest().t_ms == 0.0
