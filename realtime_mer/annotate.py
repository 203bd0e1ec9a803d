"""Drawing the pipeline's state on a frame: face box, spotting signal against its threshold, each
region's detection floor, blink and speech, the last event. Used by the live app and by the
annotated video of ``analyze``."""

from __future__ import annotations

import functools
from fractions import Fraction
from typing import Mapping

import av
import cv2
import numpy as np

from realtime_mer.pipeline import FrameResult
from realtime_mer.events import EventRecord
from realtime_mer.spotting import REGION_NAMES

_GREEN, _RED, _WHITE, _ORANGE = (80, 200, 80), (60, 60, 230), (255, 255, 255), (0, 165, 255)


def annotate(image_bgr: np.ndarray, result: FrameResult, last_event: EventRecord | None,
             fps: float = 0.0, last_events: Mapping[int, EventRecord] | None = None,
             face_ids: bool = False) -> np.ndarray:
    """Face box (and a note when the face is too small), the spotting signal against its
    threshold, each region's detection floor (% of the eye distance: the smallest movement the
    spotter would report there now; micro-expressions move 1-3 %), blink and speech, the last
    event. ``face_ids`` (every face tracked apart): each face's box with its id and its own
    last event (from ``last_events``, by face id); the signal and floors are the largest
    face's."""
    out = image_bgr.copy()
    height, width = out.shape[:2]
    scale = max(0.4, min(width, height) / 720)
    face = result.face
    if face_ids:
        for view in result.faces:
            _draw_face(out, view, (last_events or {}).get(view.face_id), scale)
        if not result.faces:
            _text(out, "no face", (10, int(30 * scale) + 10), scale, _RED)
    elif face.found and face.box_xyxy is not None:
        x0, y0, x1, y1 = (int(round(v)) for v in face.box_xyxy)
        cv2.rectangle(out, (x0, y0), (x1, y1), _GREEN, 2)
        if face.n_faces > 1:
            _text(out, f"{face.n_faces} faces: tracking the largest", (x0, max(15, y0 - 8)),
                  scale, _ORANGE)
        if result.face_small:
            _text(out, "face small: come closer", (x0, min(height - 30, y1 + int(28 * scale) + 6)),
                  scale, _ORANGE)
    else:
        _text(out, "no face", (10, int(30 * scale) + 10), scale, _RED)
    if result.signal is not None and result.threshold:
        level = min(result.signal / (2 * result.threshold), 1.0)
        bar_h = int(height * 0.4)
        x, y = width - 30, height - 20
        cv2.rectangle(out, (x, y - bar_h), (x + 14, y), _WHITE, 1)
        colour = _RED if result.signal > result.threshold else _GREEN
        cv2.rectangle(out, (x + 1, y - int(bar_h * level)), (x + 13, y - 1), colour, -1)
        cv2.line(out, (x - 4, y - bar_h // 2), (x + 18, y - bar_h // 2), _ORANGE, 2)
        _text(out, f"signal {result.signal:.2f} / thr {result.threshold:.2f}",
              (10, height - 15), scale * 0.8, _WHITE)
    if result.floors is not None:
        if face_ids and result.faces:  # the signal and floors are the largest face's: say whose
            _text(out, f"face {result.faces[0].face_id}:", (10, int(60 * scale) + 10), scale,
                  _WHITE)
        y = int(90 * scale) + 10
        for name, floor in zip(REGION_NAMES, result.floors):
            text = "masked" if np.isinf(floor) else "warming up" if np.isnan(floor) \
                else f"{floor:.1f} %"
            colour = _GREEN if np.isfinite(floor) and floor <= 3.0 else _ORANGE
            _text(out, f"{name}: floor {text}", (10, y), scale * 0.7, colour)
            y += int(22 * scale) + 4
        states = [s for s, on in (("blink", result.blinking), ("talking", result.speaking)) if on]
        if states:
            _text(out, " + ".join(states), (10, y), scale * 0.8, _ORANGE)
    if last_event is not None and not face_ids:
        colour = _RED if last_event.kind == "micro" else _ORANGE
        what = "blink" if last_event.kind == "blink" else \
            f"{last_event.kind} {last_event.label} {last_event.confidence:.2f}"
        _text(out, f"last: {what} at {last_event.onset_ms / 1000:.1f}s "
                   f"(apex {last_event.apex_ms / 1000:.1f}s)", (10, int(60 * scale) + 10),
              scale, colour)
    if fps:
        _text(out, f"{fps:.0f} fps", (width - int(110 * scale), int(30 * scale)), scale * 0.8,
              _WHITE)
    return out


def _draw_face(out: np.ndarray, view, last_event: EventRecord | None, scale: float) -> None:
    """One face of several: its box, its id, and its last event under the box."""
    height = out.shape[0]
    x0, y0, x1, y1 = (int(round(v)) for v in view.face.box_xyxy)
    colour = _RED if view.signal is not None and view.threshold and \
        view.signal > view.threshold else _GREEN
    cv2.rectangle(out, (x0, y0), (x1, y1), colour, 2)
    _text(out, f"face {view.face_id}" + (" (small)" if view.face_small else ""),
          (x0, max(15, y0 - 8)), scale, colour)
    if last_event is not None:
        what = "blink" if last_event.kind == "blink" else \
            f"{last_event.kind} {last_event.label} {last_event.confidence:.2f}"
        _text(out, f"{what} at {last_event.onset_ms / 1000:.1f}s",
              (x0, min(height - 8, y1 + int(24 * scale) + 4)), scale * 0.8,
              _RED if last_event.kind == "micro" else _ORANGE)


def signal_strip(t_ms: np.ndarray, values: np.ndarray, thresholds: np.ndarray,
                 marks: np.ndarray, span_ms: float, width: int = 480,
                 row_height: int = 44) -> np.ndarray:
    """The spotting signal of the last ``span_ms`` as one row per region (BGR image): each
    region's value (% IOD, white) against its threshold (orange), red where it stands above;
    ``marks`` (N,) 1 where a blink masked the lids, 2 where the person talked, shaded under the
    rows. ``t_ms`` (N,), ``values`` and ``thresholds`` (N, R), NaN where there was no face."""
    regions = values.shape[1] if values.ndim == 2 else len(REGION_NAMES)
    out = np.full((row_height * regions + 16, width, 3), 24, np.uint8)
    if len(t_ms) == 0:
        return out
    end = float(t_ms[-1])
    x = np.round((1 - (end - t_ms) / span_ms) * (width - 1)).astype(np.int32)
    # state shading first, so the lines stay on top: each pixel column takes the state of the
    # last sample at or before it
    columns = np.searchsorted(x, np.arange(width), side="right") - 1
    column_marks = np.where(columns >= 0, np.asarray(marks)[np.maximum(columns, 0)], 0)
    for mark, shade in ((1, (70, 45, 45)), (2, (45, 60, 45))):
        out[:-16, column_marks == mark] = shade
    for r in range(regions):
        top, bottom = r * row_height + 2, (r + 1) * row_height - 2
        value, threshold = values[:, r], thresholds[:, r]
        known = np.isfinite(value) & np.isfinite(threshold) & (x >= 0)
        scale = max(1.5 * threshold[known].max(), value[known].max()) if known.any() else 1.0
        y = np.round(bottom - np.clip(np.nan_to_num(value) / max(scale, 1e-6), 0, 1)
                     * (bottom - top)).astype(np.int32)
        y_thr = np.round(bottom - np.clip(np.nan_to_num(threshold) / max(scale, 1e-6), 0, 1)
                         * (bottom - top)).astype(np.int32)
        cv2.line(out, (0, bottom + 1), (width - 1, bottom + 1), (70, 70, 70), 1)
        if known.sum() >= 2:
            cv2.polylines(out, [np.stack([x[known], y_thr[known]], 1).reshape(-1, 1, 2)],
                          False, _ORANGE, 1, cv2.LINE_AA)
            cv2.polylines(out, [np.stack([x[known], y[known]], 1).reshape(-1, 1, 2)],
                          False, _WHITE, 1, cv2.LINE_AA)
            above = known & (value > threshold)
            pairs = np.flatnonzero(above[:-1] & above[1:])
            if pairs.size:  # above the threshold: drawn again, thick and red
                segments = np.stack([np.stack([x[pairs], y[pairs]], 1),
                                     np.stack([x[pairs + 1], y[pairs + 1]], 1)], 1)
                cv2.polylines(out, list(segments.reshape(-1, 2, 1, 2)), False, _RED, 3)
    labels, drawn = _strip_labels(regions, width, row_height, span_ms)
    out[drawn] = labels[drawn]
    return out


@functools.lru_cache(maxsize=8)
def _strip_labels(regions: int, width: int, row_height: int, span_ms: float):
    """The strip's text, drawn once (text is the costliest thing to draw) → (image, mask)."""
    labels = np.zeros((row_height * regions + 16, width, 3), np.uint8)
    for r in range(regions):
        name = REGION_NAMES[r] if r < len(REGION_NAMES) else f"region {r}"
        _text(labels, name, (6, r * row_height + 16), 0.45, _WHITE)
    _text(labels, f"last {span_ms / 1000:.0f} s; orange: threshold; blue: blink; "
                  "green: talking", (6, labels.shape[0] - 4), 0.4, _WHITE)
    # the black outline of the text counts as drawn too (it is what keeps it readable)
    drawn = cv2.dilate(np.any(labels > 0, axis=2).astype(np.uint8), np.ones((3, 3))) > 0
    return labels, drawn


def flow_map_image(feature_map: np.ndarray, size: int = 96) -> np.ndarray:
    """An event's (28, 28, 3) map (u, v, strain) as a BGR picture: the flow's direction as hue,
    its magnitude as brightness (scaled to the map's own largest), nearest-neighbour enlarged."""
    u, v = feature_map[..., 0].astype(np.float32), feature_map[..., 1].astype(np.float32)
    magnitude, angle = cv2.cartToPolar(u, v, angleInDegrees=True)
    hsv = np.zeros((*u.shape, 3), np.uint8)
    hsv[..., 0] = (angle / 2).astype(np.uint8)
    hsv[..., 1] = 255
    peak = float(magnitude.max())
    hsv[..., 2] = np.clip(magnitude / peak * 255 if peak > 0 else 0, 0, 255).astype(np.uint8)
    return cv2.resize(cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR), (size, size),
                      interpolation=cv2.INTER_NEAREST)


def _text(image, text, origin, scale, colour) -> None:
    cv2.putText(image, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(image, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, colour, 1, cv2.LINE_AA)


class AnnotatedVideoWriter:
    """Writes annotated frames to an H.264 MP4 with PyAV, keeping each frame's own timestamp
    (variable frame rates survive). Frames are resized to the first frame's size."""

    def __init__(self, path, fps_hint: float = 30.0) -> None:
        self.path = path
        self._container = av.open(str(path), mode="w")
        self._stream = None
        self._fps_hint = fps_hint
        self._last_pts = -1
        self.frames = 0

    def write(self, image_bgr: np.ndarray, t_ms: float) -> None:
        if self._stream is None:
            height, width = image_bgr.shape[:2]
            self._stream = self._container.add_stream("libx264", rate=round(self._fps_hint))
            # even sizes: yuv420p needs them
            self._stream.width, self._stream.height = width - width % 2, height - height % 2
            self._stream.pix_fmt = "yuv420p"
            self._stream.codec_context.time_base = Fraction(1, 1000)  # pts in milliseconds
        width, height = self._stream.width, self._stream.height
        if image_bgr.shape[1] != width or image_bgr.shape[0] != height:
            image_bgr = cv2.resize(image_bgr, (width, height))
        frame = av.VideoFrame.from_ndarray(image_bgr, format="bgr24")
        frame.pts = max(int(round(t_ms)), self._last_pts + 1)
        frame.time_base = Fraction(1, 1000)
        self._last_pts = frame.pts
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        if self._container is None:
            return
        if self._stream is not None:
            for packet in self._stream.encode():
                self._container.mux(packet)
        self._container.close()
        self._container = None

    def __enter__(self) -> "AnnotatedVideoWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
