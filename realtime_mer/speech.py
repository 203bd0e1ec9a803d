"""Speech: whether the person is talking, so that movements of a talking mouth are flagged and
not mixed silently with micro-expressions.

Two sources. The lips (:class:`LipMotion`): talking opens and closes the mouth several times a
second, a smile or a held expression does not; the mouth's opening (inner lips, in % of the eye
distance) is followed and a stretch with enough swings is speech. The file's audio
(:func:`voice_intervals`): Silero VAD (the ``silero-vad`` package, its ONNX model run by ONNX
Runtime) finds the voiced stretches. A voice in the room may be someone else's (an interviewer),
and lips move without a voice (chewing, a silent gesture), so the subject is talking where the
lips move while a voice is heard; where the recording has no voice at all (no audio track,
music, silence) or there is no audio (a camera), the lips decide alone.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from realtime_mer.buffer import TimeSeries

log = logging.getLogger(__name__)

__all__ = ["SpeechOptions", "LipMotion", "voice_intervals", "in_intervals", "INNER_LIPS"]

#: Inner upper and lower lip, at the middle of the mouth (MediaPipe Face Mesh).
INNER_LIPS = (13, 14)


@dataclass(frozen=True)
class SpeechOptions:
    """Talking = at least ``min_swings`` swings of the mouth's opening, each of at least
    ``swing_pct`` % of the eye distance, within the last ``window_ms``; the state holds for
    ``hold_ms`` after the last swing (pauses between words)."""

    window_ms: float = 1500.0
    swing_pct: float = 2.0
    min_swings: int = 3
    hold_ms: float = 500.0
    max_fps: float = 250.0

    def __post_init__(self) -> None:
        if not self.window_ms > 0 or not self.swing_pct > 0 or self.min_swings < 1:
            raise ValueError("window_ms and swing_pct must be > 0 and min_swings >= 1")


class LipMotion:
    """Push one frame's landmarks (and the eye distance in the same units) at a time;
    ``speaking`` tells whether the lips are moving as in speech."""

    def __init__(self, options: SpeechOptions = SpeechOptions()) -> None:
        self.options = options
        self._opening = TimeSeries(TimeSeries.capacity_for(options.window_ms, options.max_fps))
        self.reset()

    def reset(self) -> None:
        self._opening.clear()
        self._last_speech = -math.inf
        self.speaking = False

    def push(self, t_ms: float, landmarks: np.ndarray | None, eye_distance: float) -> bool:
        if landmarks is not None and eye_distance > 0:
            pts = np.asarray(landmarks, np.float64)
            if pts.ndim == 2 and pts.shape[0] > max(INNER_LIPS):
                gap = float(np.hypot(*(pts[INNER_LIPS[0]] - pts[INNER_LIPS[1]])))
                if math.isfinite(gap):
                    self._opening.append(t_ms, 100.0 * gap / eye_distance)
                    if self._swings(t_ms) >= self.options.min_swings:
                        self._last_speech = t_ms
        self.speaking = t_ms - self._last_speech <= self.options.hold_ms
        return self.speaking

    def _swings(self, t_ms: float) -> int:
        """Swings of at least swing_pct in the window (a zig-zag count over the samples in
        time order)."""
        times, values, _ = self._opening.last(self._opening.n)
        values = values[times >= t_ms - self.options.window_ms, 0]
        if values.size < 3:
            return 0
        swing = self.options.swing_pct
        swings, low, high, direction = 0, values[0], values[0], 0
        for v in values[1:]:
            if direction >= 0:
                high = max(high, v)
                if high - v >= swing:
                    swings += 1
                    direction, low = -1, v
            if direction <= 0:
                low = min(low, v)
                if v - low >= swing:
                    swings += 1
                    direction, high = 1, v
        return swings


def voice_intervals(path: str | Path) -> list[tuple[float, float]] | None:
    """Voiced stretches of a file's audio, in ms on the clock of its first video frame; None
    when the file has no audio track or it cannot be decoded or analysed (the lips then decide
    alone). Runs Silero VAD on 16 kHz mono: about 1 % of real time on a CPU."""
    try:
        import av
    except ImportError:  # pragma: no cover - av is a dependency
        return None
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                return None
            video = container.streams.video[0] if container.streams.video else None
            start = float(video.start_time * video.time_base) \
                if video is not None and video.start_time is not None else 0.0
            audio = container.streams.audio[0]
            resampler = av.AudioResampler(format="flt", layout="mono", rate=16000)
            chunks, first = [], None
            for frame in container.decode(audio):
                if first is None and frame.time is not None:
                    first = float(frame.time)
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().ravel())
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().ravel())
    except Exception as error:  # a damaged audio track must not cost the video its analysis
        log.info("%s: audio not usable for speech detection (%s)", path, error)
        return None
    if not chunks:
        return None
    samples = np.concatenate(chunks).astype(np.float32)
    try:
        import torch
        from silero_vad import get_speech_timestamps, load_silero_vad
    except ImportError as error:
        log.info("speech detection from audio needs silero-vad (%s); using the lips alone", error)
        return None
    model = load_silero_vad(onnx=True)
    stamps = get_speech_timestamps(torch.from_numpy(samples), model, sampling_rate=16000,
                                   return_seconds=True)
    offset = ((first or 0.0) - start) * 1000.0
    return [(float(s["start"]) * 1000.0 + offset, float(s["end"]) * 1000.0 + offset)
            for s in stamps]


def in_intervals(t_ms: float, intervals: Sequence[tuple[float, float]]) -> bool:
    """Whether ``t_ms`` falls in one of the (sorted or not) intervals."""
    return any(a <= t_ms <= b for a, b in intervals)
