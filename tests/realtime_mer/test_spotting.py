"""Spotting on real face images: the streaming spotter and its offline twin agree, a synthetic
micro-expression on a real face is found with its timing, head motion does not fire, a long
movement is a macro-expression, irregular clocks and reset() behave.

The synthetic movements are smooth local deformations of a real aligned CASME II face (cv2.remap
with a Gaussian-windowed displacement field), with fresh sensor noise (σ = 1 grey level) on every
frame. Their true onset / apex / offset are known exactly, which no labelled video here offers.
"""

from __future__ import annotations

import functools
from pathlib import Path

import cv2
import numpy as np
import pytest

from realtime_mer.spotting import (
    SpotEvent, Spotter, SpotterOptions, _nearest, _refine_apex, compute_signal, region_signals,
    spot_offline,
)

SIZE = 128
# MediaPipe Face Mesh points 468, 473, 1, 61, 291 (eye centres, nose tip, mouth corners) on
# casme2_frames/001.jpg (280×340), measured once; the template is the median of
# ../shared/data/megc2019_3db/landmarks5.csv in 28×28 units, as realtime_mer.face uses.
CASME_001_POINTS = np.array([[58.4, 91.3], [218.5, 92.8], [143.2, 192.3], [81.4, 258.4],
                             [199.1, 259.9]], np.float32)
TEMPLATE_28 = np.array([[6.275, 7.673], [21.3565, 7.622], [13.8975, 15.476], [8.51, 20.3405],
                        [19.585, 20.2265]], np.float32)

ONSET, APEX, OFFSET = 1500.0, 1650.0, 1800.0  # the synthetic micro-expression (300 ms)


# -- synthetic sequences on a real face ---------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _base_crop(path: str) -> np.ndarray:
    image = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
    assert image is not None, path
    m, _ = cv2.estimateAffinePartial2D(CASME_001_POINTS, TEMPLATE_28 * (SIZE / 28.0) - 0.5)
    return cv2.warpAffine(image, m, (SIZE, SIZE), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE).astype(np.float32)


@pytest.fixture(scope="module")
def base_crop(media_dir: Path) -> np.ndarray:
    return _base_crop(str(media_dir / "casme2_frames" / "001.jpg"))


def _bump(t: np.ndarray | float, onset: float, duration: float) -> np.ndarray:
    """Smooth 0 → 1 → 0 over [onset, onset + duration] (sin²), apex in the middle."""
    phase = np.clip((np.asarray(t, float) - onset) / duration, 0.0, 1.0)
    return np.sin(np.pi * phase) ** 2


def _deformation(region: str) -> tuple[np.ndarray, np.ndarray]:
    """Unit-peak displacement field (dx, dy) of a facial action, Gaussian-windowed in space:
    mouth corners pulled outwards and up (a smile), or brows raised."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    cx, cy, sigma = (64.0, 95.0, 12.0) if region == "mouth" else (64.0, 20.0, 10.0)
    window = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma ** 2))
    dx = window * np.tanh((xx - cx) / 8.0) * (0.6 if region == "mouth" else 0.2)
    dy = -window
    peak = np.hypot(dx, dy).max()
    return dx / peak, dy / peak


def make_sequence(base: np.ndarray, times: np.ndarray, kind: str, onset: float = ONSET,
                  duration: float = OFFSET - ONSET, amplitude: float = 1.5,
                  seed: int = 0) -> np.ndarray:
    """uint8 crops at ``times``: ``kind`` "mouth"/"brows" (local deformation peaking at
    ``amplitude`` px), "head" (the whole crop translated 2.5 px right, 1 px down and rotated
    0.8° about the centre: ≈3 px at the crop's edge), or "still"."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    field = _deformation(kind) if kind in ("mouth", "brows") else None
    out = np.empty((len(times), SIZE, SIZE), np.uint8)
    for i, t in enumerate(times):
        s = float(_bump(t, onset, duration))
        image = base
        if kind == "head" and s > 0:
            m = cv2.getRotationMatrix2D((SIZE / 2, SIZE / 2), 0.8 * s, 1.0)
            m[:, 2] += (2.5 * s, 1.0 * s)
            image = cv2.warpAffine(base, m, (SIZE, SIZE), flags=cv2.INTER_LINEAR,
                                   borderMode=cv2.BORDER_REPLICATE)
        elif field is not None and s > 0:
            a = amplitude * s
            # Backward map: the content at x moves to x + d (d smooth and small, so x - d(x)
            # is the inverse to well under a hundredth of a pixel).
            image = cv2.remap(base, xx - a * field[0], yy - a * field[1], cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_REPLICATE)
        noisy = image + rng.normal(0.0, 1.0, image.shape).astype(np.float32)
        out[i] = np.clip(noisy + 0.5, 0, 255).astype(np.uint8)
    return out


def times_at(fps: float, duration_ms: float = 3000.0) -> np.ndarray:
    return np.arange(0.0, duration_ms, 1000.0 / fps)


def resample_30fps(times: np.ndarray, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Frames of a 200 fps sequence nearest a 30 fps grid: what a webcam would have caught."""
    idx = np.unique([_nearest(times, t) for t in np.arange(times[0], times[-1], 1000.0 / 30)])
    return times[idx], crops[idx]


def push_all(spotter: Spotter, times, crops) -> tuple[list[SpotEvent], np.ndarray]:
    events, signal = [], []
    for t, crop in zip(times, crops):
        event = spotter.push(float(t), crop)
        signal.append(spotter.signal)
        if event is not None:
            events.append(event)
    return events, np.asarray(signal, float)


def _report(label: str, event: SpotEvent) -> str:
    return (f"{label}: onset {event.onset_ms - ONSET:+.1f} ms, apex {event.apex_ms - APEX:+.1f} "
            f"ms, offset {event.offset_ms - OFFSET:+.1f} ms, peak {event.peak:.3f}, "
            f"threshold {event.threshold:.3f}")


@pytest.fixture(scope="module")
def mouth_200(base_crop):
    times = times_at(200)
    return times, make_sequence(base_crop, times, "mouth")


# -- 1. the twin gives the same events ----------------------------------------------------------

def test_twin_equality_real_video(media_dir: Path):
    face = pytest.importorskip("realtime_mer.face")
    capture = pytest.importorskip("realtime_mer.capture")
    times, crops = [], []
    with face.FaceAligner(face.FaceOptions(crop_size=SIZE, max_faces=1)) as aligner:
        for frame in capture.open_video(media_dir / "WolfgangLanger_Pexels.mp4"):
            if frame.index >= 150:
                break
            result = aligner.process(frame.image_bgr, frame.t_ms)
            if result.found:
                times.append(frame.t_ms)
                crops.append(result.crop)
    assert len(times) > 100, "the face should be found in most of the first 150 frames"
    crops = np.stack(crops)
    # A short forced close exercises the frozen reference, the post-event reference clamp and
    # the max_event_ms rule on a real, very expressive face.
    options = SpotterOptions(max_event_ms=1200.0)
    streamed, streamed_signal = push_all(Spotter(options), times, crops)
    events, signal = spot_offline(times, crops, options=options)
    assert len(events) >= 1, "the first 6 s of this video hold strong expressions"
    assert events == streamed
    assert np.allclose(signal, streamed_signal, atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", ["micro-30fps", "macro-jittered-forced-close"])
def test_twin_equality_synthetic(base_crop, case):
    rng = np.random.default_rng(3)
    if case == "micro-30fps":
        times = times_at(30)
        crops = make_sequence(base_crop, times, "mouth")
        options = SpotterOptions()
    else:
        times = times_at(30, 4000.0) + rng.uniform(-8, 8, len(times_at(30, 4000.0)))
        crops = make_sequence(base_crop, times, "brows", onset=1200.0, duration=1500.0)
        options = SpotterOptions(max_event_ms=600.0)
    streamed, streamed_signal = push_all(Spotter(options), times, crops)
    events, signal = spot_offline(times, crops, options=options, batch_size=7)
    assert events and events == streamed
    assert np.allclose(signal, streamed_signal, atol=1e-6, rtol=0)
    if case != "micro-30fps":
        assert len(events) >= 2, "a 1.5 s movement with max_event_ms=600 is closed and reopened"


# -- 2. a synthetic micro-expression on a real face ---------------------------------------------

@pytest.mark.parametrize("region", ["mouth", "brows"])
def test_micro_expression_200fps(base_crop, mouth_200, region):
    times = mouth_200[0]
    crops = mouth_200[1] if region == "mouth" else make_sequence(base_crop, times, "brows")
    events, signal = spot_offline(times, crops)
    assert len(events) == 1, events
    event = events[0]
    print(_report(f"{region} 200 fps", event))
    assert event.kind == "micro"
    assert abs(event.apex_ms - APEX) <= 30
    assert abs(event.onset_ms - ONSET) <= 80
    assert abs(event.offset_ms - OFFSET) <= 80
    assert event.peak > 2 * event.threshold


def test_micro_expression_30fps(mouth_200):
    # Looser tolerances at webcam rate: apex ±40 ms (a frame is 33 ms; the parabolic refinement
    # usually does far better), onset/offset ±100 ms.
    times, crops = resample_30fps(*mouth_200)
    events, _ = spot_offline(times, crops)
    assert len(events) == 1, events
    event = events[0]
    print(_report("mouth 30 fps", event))
    assert event.kind == "micro"
    assert abs(event.apex_ms - APEX) <= 40
    assert abs(event.onset_ms - ONSET) <= 100
    assert abs(event.offset_ms - OFFSET) <= 100


# -- 3. head motion does not fire ---------------------------------------------------------------

@pytest.mark.parametrize("fps", [200, 30])
def test_head_motion_does_not_fire(base_crop, fps):
    times = times_at(fps)
    events, signal = spot_offline(times, make_sequence(base_crop, times, "head"))
    assert events == []
    moving = (times > ONSET) & (times < OFFSET + 200)
    # The same-size local movement reaches ~0.2 px; the head movement stays at noise level.
    print(f"head motion {fps} fps: peak signal {signal[moving].max():.3f}")
    assert signal[moving].max() < SpotterOptions().min_threshold


def test_head_motion_with_micro_expression_still_found(base_crop):
    """Head motion subtraction must not remove the expression riding on it."""
    times = times_at(30)
    head = make_sequence(base_crop, times, "head", onset=1400.0, duration=500.0, seed=1)
    both = []
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    dx, dy = _deformation("mouth")
    for t, crop in zip(times, head):
        a = 1.5 * float(_bump(t, ONSET, OFFSET - ONSET))
        both.append(cv2.remap(crop, xx - a * dx, yy - a * dy, cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_REPLICATE) if a > 0 else crop)
    events, _ = spot_offline(times, np.stack(both))
    assert len(events) == 1 and events[0].kind == "micro"
    assert abs(events[0].apex_ms - APEX) <= 50


# -- 4. a long movement is a macro-expression ---------------------------------------------------

def test_long_movement_is_macro(base_crop):
    times = times_at(50, 3500.0)
    crops = make_sequence(base_crop, times, "mouth", onset=1000.0, duration=1200.0)
    events, _ = spot_offline(times, crops)
    assert len(events) == 1, events
    event = events[0]
    assert event.kind == "macro"
    assert event.duration_ms > SpotterOptions().max_micro_ms
    assert abs(event.apex_ms - 1600.0) <= 60


# -- 5. irregular clocks and reset --------------------------------------------------------------

def test_irregular_timestamps_and_reset(base_crop):
    rng = np.random.default_rng(7)
    # A webcam's clock: nominal 30 fps, ±10 ms jitter, a few dropped frames.
    times = times_at(30) + rng.uniform(-10.0, 10.0, len(times_at(30)))
    keep = np.ones(len(times), bool)
    keep[rng.choice(len(times), 6, replace=False)] = False
    times = times[keep]
    crops = make_sequence(base_crop, times, "mouth", seed=2)
    spotter = Spotter()
    first, first_signal = push_all(spotter, times, crops)
    assert len(first) == 1 and first[0].kind == "micro", first
    print(_report("mouth 30 fps jittered", first[0]))
    assert abs(first[0].apex_ms - APEX) <= 40
    assert abs(first[0].onset_ms - ONSET) <= 100
    assert abs(first[0].offset_ms - OFFSET) <= 100
    spotter.reset()
    assert spotter.signal is None and spotter.threshold is None and not spotter.in_event
    second, second_signal = push_all(spotter, times, crops)
    assert second == first
    assert np.array_equal(second_signal, first_signal)


def test_reset_drops_open_event(base_crop):
    times = times_at(30)
    crops = make_sequence(base_crop, times, "mouth")
    spotter = Spotter()
    cut = int(np.searchsorted(times, APEX))
    push_all(spotter, times[:cut], crops[:cut])
    assert spotter.in_event
    spotter.reset()
    events, _ = push_all(spotter, times[cut:] + 10_000.0, crops[cut:])
    # The tail alone (falling half of the movement, during warm-up) holds no complete event.
    assert events == []


# -- the signal ---------------------------------------------------------------------------------

def test_signal_of_local_vs_global_motion(base_crop):
    still = make_sequence(base_crop, np.array([0.0, 1.0]), "still")
    apex_mouth = make_sequence(base_crop, np.array([APEX]), "mouth", seed=5)[0]
    apex_head = make_sequence(base_crop, np.array([APEX]), "head", seed=5)[0]
    noise = compute_signal(still[0], still[1])
    mouth = compute_signal(still[0], apex_mouth)
    head = compute_signal(still[0], apex_head)
    assert mouth > 5 * max(head, noise, 0.01)
    regions = region_signals(Spotter().flow.compute(still[0], apex_mouth))
    names = [r[0] for r in SpotterOptions().regions]
    assert names[int(np.argmax(regions))] == "mouth"


# -- contracts and errors (no shared data needed) -----------------------------------------------

def _texture(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur(rng.uniform(0, 255, (SIZE, SIZE)).astype(np.float32), (0, 0), 2.0) \
        .astype(np.uint8)


def test_push_rejects_bad_input():
    spotter = Spotter()
    with pytest.raises(ValueError, match="greyscale"):
        spotter.push(0.0, np.zeros((SIZE, SIZE, 3), np.uint8))
    with pytest.raises(ValueError, match="greyscale"):
        spotter.push(0.0, np.zeros((64, 64), np.uint8))
    spotter.push(10.0, _texture())
    with pytest.raises(ValueError, match="increase"):
        spotter.push(10.0, _texture())
    with pytest.raises(ValueError, match="finite"):
        spotter.push(float("nan"), _texture())
    with pytest.raises(ValueError, match="increasing"):
        spot_offline([0.0, 5.0, 5.0], np.stack([_texture()] * 3))
    with pytest.raises(ValueError, match="timestamps"):
        spot_offline([0.0, 5.0], np.stack([_texture()] * 3))


def test_options_are_validated():
    with pytest.raises(ValueError, match="combine"):
        SpotterOptions(combine="median")
    with pytest.raises(ValueError, match="reference_lag_ms"):
        SpotterOptions(reference_lag_ms=0.0)
    with pytest.raises(ValueError, match="unknown flow"):
        Spotter(SpotterOptions(flow="no-such-flow"))


def test_small_pieces():
    assert SpotEvent(100.0, 150.0, 350.0, "micro", 1.0, 0.5).duration_ms == 250.0
    times = np.array([0.0, 10.0, 30.0])
    assert [_nearest(times, t) for t in (-5, 4, 5, 6, 20, 25, 99)] == [0, 0, 0, 1, 1, 2, 2]
    # Parabola through samples of -(t - 13)² at uneven times finds the vertex exactly.
    t = np.array([0.0, 10.0, 25.0])
    assert _refine_apex(t, -(t - 13.0) ** 2, 1, 40.0, -1e9) == pytest.approx(13.0)
    # A still (identical) pair gives zero region motion.
    crop = _texture()
    assert compute_signal(crop, crop) == pytest.approx(0.0, abs=1e-6)


def test_first_frame_and_warmup():
    spotter = Spotter()
    assert spotter.push(0.0, _texture()) is None
    assert spotter.signal == 0.0 and spotter.threshold is None
    for i in range(1, 20):
        spotter.push(i * 33.0, _texture(i % 2))
    assert spotter.threshold is None, "no threshold before warmup_ms has passed"
    for i in range(20, 60):
        spotter.push(i * 33.0, _texture(i % 2))
    assert spotter.threshold is not None and spotter.threshold >= SpotterOptions().min_threshold


def _release_crossing(t0, s0, t1, s1, level):
    """Time where the straight line through (t0, s0), (t1, s1) meets ``level``."""
    return t0 + (t1 - t0) * (level - s0) / (s1 - s0)


def test_event_rules_on_a_known_signal():
    """The decision rules on a signal whose answers are worked out here by hand: the robust
    threshold (median + k·1.4826·MAD over the baseline), onset and offset at the release
    level's linear crossings, the apex at the peak, micro vs macro by duration, and a spike
    shorter than min_event_ms dropped."""
    from realtime_mer.spotting import _EventDetector

    o = SpotterOptions()
    detector = _EventDetector(o)
    step = 10.0

    def baseline(k):  # 0.10, 0.11, 0.12 in turn: median 0.11, MAD 0.01
        return 0.10 + 0.01 * (k % 3)

    def bump(t):  # a triangle from 0.11 to 0.41 at 3100 ms, 200 ms wide at its foot
        return 0.11 + 0.3 * max(0.0, 1.0 - abs(t - 3100.0) / 100.0)

    signal = {}
    for k, t in enumerate(np.arange(0.0, 9000.0, step)):
        if 3000 <= t <= 3200:
            signal[t] = bump(t)
        elif t == 5000:
            signal[t] = 0.5  # one frame: an 18 ms event, below min_event_ms
        elif 7000 <= t < 7800:
            signal[t] = 0.5  # 0.8 s: macro
        else:
            signal[t] = baseline(k)
    threshold = 0.11 + o.threshold_k * 1.4826 * 0.01
    release = 0.11 + o.release_fraction * (threshold - 0.11)

    events, frozen_ref = [], 0.0
    for t, s in signal.items():
        ref = detector.reference_target(t)
        frozen_ref = frozen_ref if ref is None else ref
        event, opened = detector.step(t, s, frozen_ref)
        if t == 2990.0:
            assert detector.threshold == pytest.approx(threshold, abs=1e-9)
        if event is not None:
            events.append(event)
    assert len(events) == 2  # the triangle and the plateau; the one-frame spike is dropped
    micro, macro = events
    assert micro.kind == "micro" and macro.kind == "macro"
    assert micro.threshold == pytest.approx(threshold, abs=1e-9)
    assert micro.onset_ms == pytest.approx(
        _release_crossing(3010, bump(3010), 3020, bump(3020), release), abs=1e-6)
    assert micro.offset_ms == pytest.approx(
        _release_crossing(3180, bump(3180), 3190, bump(3190), release), abs=1e-6)
    assert micro.apex_ms == pytest.approx(3100.0, abs=1e-6) and micro.peak == pytest.approx(0.41)
    assert macro.onset_ms == pytest.approx(
        _release_crossing(6990, signal[6990.0], 7000, 0.5, release), abs=1e-6)
    assert macro.offset_ms == pytest.approx(
        _release_crossing(7790, 0.5, 7800, signal[7800.0], release), abs=1e-6)
    assert macro.duration_ms > o.max_micro_ms
