"""Every face in view, each tracked apart under an id that stays with it.

MediaPipe's full-range face detector (faces up to ~5 m, small in the frame) finds faces; each
face is then followed by a Face Mesh of its own, in video mode, on a window of the frame around
it. The window is a plain cut of the frame (a translation, no resampling), so a face's landmarks
are what a Face Mesh on the whole frame would give when that face is alone in it, and the face
keeps its own tracking state however many others are in view. A single Face Mesh over the whole
frame would not do: its short-range detector misses faces that fill little of the frame (one of
the five in a group photo) and it hands its faces back in no particular order.

A face that is lost (turned away, covered, out of the frame) keeps its id for ``reid_ms``: a face
found again near where it was, of about its size and with about its landmark geometry, is the
same face. Faces whose eyes are closer than ``min_eye_distance_px`` are too small to analyse;
they are ignored and counted, as are tracks that the end of the input shows to have been
short-lived (spurious detections: a pattern in the background that looks like a face for a
frame or two).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any

import cv2
import numpy as np

from realtime_mer.face import (
    ALIGN_LANDMARKS, FaceOptions, FaceResult, aligned_face, as_bgr, cut_score, cut_thumbnail,
)
from realtime_mer.native_logs import quiet_native_logs

log = logging.getLogger(__name__)

__all__ = ["TrackerOptions", "TrackedFace", "FaceTracker", "face_geometry"]

#: Landmarks whose distances describe a face's build rather than its expression: the outer eye
#: corners (the unit), the inner eye corners, the nose from the bridge to the tip, the chin,
#: and the cheeks' outline at eye level.
_GEOMETRY_PAIRS = ((133, 362), (168, 1), (168, 152), (234, 454))
_EYE_OUTER = (33, 263)


@dataclass(frozen=True)
class TrackerOptions:
    """``detect_every_ms``: how often the detector looks for faces that came into view (always
    on the first frame and after a hard cut; every ``search_every_ms`` while a face is lost).
    ``window_scale``: each face's window, in face widths (the face moves inside it without the
    window following). ``reid_ms``: a lost face keeps its id this long. ``max_geometry_change``:
    a face found again is the lost one only if its landmark proportions differ by at most this
    fraction. ``min_eye_distance_px``: smaller faces are ignored (and counted).
    ``min_track_frames``: a track seen in fewer frames is short-lived (left out of the per-face
    results and counted), unless the input itself had no more frames than that. ``max_faces``:
    faces followed at once, at most (the largest first)."""

    detect_every_ms: float = 1000.0
    search_every_ms: float = 250.0
    min_detection_confidence: float = 0.5
    window_scale: float = 3.0
    reid_ms: float = 3000.0
    max_geometry_change: float = 0.2
    min_eye_distance_px: float = 12.0
    min_track_frames: int = 5
    duplicate_iou: float = 0.5
    max_faces: int = 8

    def __post_init__(self) -> None:
        if not self.window_scale >= 1.5:
            raise ValueError(f"window_scale must be >= 1.5, got {self.window_scale}")
        if self.max_faces < 1:
            raise ValueError(f"max_faces must be >= 1, got {self.max_faces}")
        if self.min_track_frames < 1:
            raise ValueError(f"min_track_frames must be >= 1, got {self.min_track_frames}")
        for name in ("detect_every_ms", "search_every_ms", "reid_ms", "min_eye_distance_px"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class TrackedFace:
    """One face in one frame: its id for the whole input and its aligned crop (``face``, in the
    frame's coordinates like the single-face path's)."""

    face_id: int
    face: FaceResult


@dataclass
class _Track:
    face_id: int
    window: tuple[int, int, int, int]  # x0, y0, x1, y1 in frame pixels
    mesh: Any
    box: tuple[float, float, float, float]
    geometry: np.ndarray | None = None
    last_seen_ms: float = 0.0
    frames: int = 0
    lost: bool = False


@dataclass
class TrackStats:
    """What the tracker saw over the input: per id, frames with the face and its first and
    last time; ``ignored_small``: the most faces too small to analyse seen at once (a face is
    not followed, so it is not known from one look to the next); duplicates dropped."""

    frames: dict[int, int] = field(default_factory=dict)
    first_ms: dict[int, float] = field(default_factory=dict)
    last_ms: dict[int, float] = field(default_factory=dict)
    ignored_small: int = 0
    duplicates: int = 0


class FaceTracker:
    """``process(frame, t_ms)`` per frame in time order → every face found, with its id.

    Memory and per-frame cost grow with the number of faces in view: one Face Mesh (and its
    landmark pass) per face, one detector pass per ``detect_every_ms``. At most
    ``options.max_faces`` faces are followed at once (the largest detections first)."""

    def __init__(self, face: FaceOptions | None = None,
                 options: TrackerOptions | None = None) -> None:
        self.face_options = face or FaceOptions()
        self.options = options or TrackerOptions()
        self._detector: Any = None
        self._tracks: list[_Track] = []
        self._next_id = 1
        self._last_detect_ms: float | None = None
        self._last_t_ms: float | None = None
        self._last_thumbnail: np.ndarray | None = None
        self.frames_seen = 0
        self.stats = TrackStats()
        #: Ids dropped at the last frame (lost for longer than ``reid_ms``, a duplicate, or a
        #: hard cut): they will not come back, so their owner can let go of their state.
        self.forgotten: list[int] = []

    # -- per frame ---------------------------------------------------------------------------
    def process(self, frame_bgr: np.ndarray, t_ms: float) -> tuple[list[TrackedFace], bool]:
        """The faces in this frame (largest first) and whether the frame is a hard cut."""
        image = as_bgr(frame_bgr)
        self.forgotten = []
        if self._last_t_ms is not None and t_ms < self._last_t_ms:
            self._drop_all_tracks()  # a new clip: nothing carries over, and faces are looked for
            self._last_thumbnail = None
            self._last_detect_ms = None
        self._last_t_ms = float(t_ms)
        self.frames_seen += 1
        thumbnail = cut_thumbnail(image)
        cut = self._last_thumbnail is not None and \
            cut_score(self._last_thumbnail, thumbnail) > self.face_options.cut_threshold
        self._last_thumbnail = thumbnail
        rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        if cut:
            # A new shot: the faces in it get new ids. Place, size and proportions do not tell
            # people apart across a cut (an edited interview shows one person, then the other,
            # at the same spot), and two people under one id would mix their events.
            self._drop_all_tracks()
        self._forget_old(t_ms)

        found: list[TrackedFace] = []
        for track in self._tracks:
            if not track.lost:
                face = self._follow(track, image, rgb, t_ms, cut)
                if face is not None:
                    found.append(face)
        if self._detection_due(t_ms, cut):
            found += self._detect(image, rgb, t_ms, cut)
        found = self._without_duplicates(found)
        for tracked in found:
            self.stats.frames[tracked.face_id] = self.stats.frames.get(tracked.face_id, 0) + 1
            self.stats.first_ms.setdefault(tracked.face_id, float(t_ms))
            self.stats.last_ms[tracked.face_id] = float(t_ms)
        n = len(found)
        found = [TrackedFace(t.face_id, _with_count(t.face, n)) for t in found]
        found.sort(key=lambda t: -_area(t.face.box_xyxy))
        return found, cut

    def short_lived(self) -> set[int]:
        """Ids seen in fewer than ``min_track_frames`` frames, when the input was longer."""
        limit = min(self.options.min_track_frames, self.frames_seen)
        return {face_id for face_id, frames in self.stats.frames.items() if frames < limit}

    def reset(self) -> None:
        """Forget every face (ids start again at 1) and the counts."""
        self._drop_all_tracks()
        self._next_id = 1
        self._last_detect_ms = self._last_t_ms = None
        self._last_thumbnail = None
        self.frames_seen = 0
        self.stats = TrackStats()

    def close(self) -> None:
        self._drop_all_tracks()
        if self._detector is not None:
            self._detector.close()
            self._detector = None

    def __enter__(self) -> "FaceTracker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------------
    def _follow(self, track: _Track, image: np.ndarray, rgb: np.ndarray, t_ms: float,
                cut: bool) -> TrackedFace | None:
        others = [t.box for t in self._tracks if t is not track and not t.lost]
        points = self._landmarks(track, rgb, others)
        if points is None:
            self._lose(track)
            return None
        if not cut and _iou(_box(points), track.box) < 0.3:
            # Its Face Mesh lost this face and found another one in the window: that face is
            # followed (or found by the detector) under its own id, and this one is lost.
            self._lose(track)
            return None
        track.last_seen_ms = float(t_ms)
        track.frames += 1
        track.box = _box(points)
        if track.geometry is None:
            track.geometry = face_geometry(points)
        face = aligned_face(image, points, self.face_options, n_faces=1, cut=cut)
        if not _inside(track.box, track.window, margin=0.1, frame=image.shape):
            # The face reached its window's edge (or outgrew it): a new window around it, and
            # its Face Mesh starts from a detection there at the next frame.
            track.window = _window(track.box, self.options.window_scale, image.shape)
            track.mesh.reset()  # its graph restarts from a detection (cheaper than a new one)
        return TrackedFace(track.face_id, face)

    def _landmarks(self, track: _Track, rgb: np.ndarray,
                   others: list[tuple[float, float, float, float]]) -> np.ndarray | None:
        """The face's landmarks (frame pixels) from its Face Mesh on its window, where the
        other faces are blanked out: a Face Mesh that lost its face must not find another."""
        x0, y0, x1, y1 = track.window
        if track.mesh is None:
            track.mesh = self._make_mesh()
        window = np.array(rgb[y0:y1, x0:x1])
        for box in others:
            if _intersection(box, track.window) > 0:
                pad = 0.15 * (box[2] - box[0])
                bx0, by0 = int(max(box[0] - pad - x0, 0)), int(max(box[1] - pad - y0, 0))
                bx1, by1 = int(max(box[2] + pad - x0, 0)), int(max(box[3] + pad - y0, 0))
                window[by0:by1, bx0:bx1] = 127
        window.flags.writeable = False
        with quiet_native_logs(enabled=track.frames == 0):
            found = track.mesh.process(window).multi_face_landmarks
        if not found:
            return None
        w, h = x1 - x0, y1 - y0
        return np.array([(p.x * w + x0, p.y * h + y0) for p in found[0].landmark], np.float64)

    def _detection_due(self, t_ms: float, cut: bool) -> bool:
        if cut or self._last_detect_ms is None:
            return True
        every = self.options.search_every_ms if any(t.lost for t in self._tracks) \
            else self.options.detect_every_ms
        return t_ms - self._last_detect_ms >= every

    def _detect(self, image: np.ndarray, rgb: np.ndarray, t_ms: float,
                cut: bool) -> list[TrackedFace]:
        """Faces the detector finds that no face being followed covers: a lost face found again
        (same place, size and build) or a new one."""
        self._last_detect_ms = float(t_ms)
        if self._detector is None:
            import mediapipe as mp  # deferred, as in face.py

            with quiet_native_logs():
                self._detector = mp.solutions.face_detection.FaceDetection(
                    model_selection=1,  # full range: small faces, far from the camera
                    min_detection_confidence=self.options.min_detection_confidence)
        h, w = image.shape[:2]
        detections = self._detector.process(rgb).detections or []
        boxes, small = [], 0
        for detection in detections:
            b = detection.location_data.relative_bounding_box
            # The detector's first two key points are the eyes: a face too small to analyse
            # is dropped here, before a Face Mesh is built for it.
            eyes = detection.location_data.relative_keypoints[:2]
            if len(eyes) == 2 and np.hypot((eyes[0].x - eyes[1].x) * w, (eyes[0].y - eyes[1].y)
                                           * h) < self.options.min_eye_distance_px:
                small += 1
                continue
            boxes.append((b.xmin * w, b.ymin * h, (b.xmin + b.width) * w,
                          (b.ymin + b.height) * h))
        self.stats.ignored_small = max(self.stats.ignored_small, small)
        boxes.sort(key=lambda b: -_area(b))
        followed = [t.box for t in self._tracks if not t.lost and t.last_seen_ms == t_ms]
        new: list[TrackedFace] = []
        for box in boxes:
            if any(_overlap(box, other) > 0.3 for other in followed):
                continue
            if sum(not t.lost for t in self._tracks) >= self.options.max_faces:
                break
            window = _window(box, self.options.window_scale, image.shape)
            track = _Track(face_id=0, window=window, mesh=None, box=box)
            points = self._landmarks(track, rgb, followed + [b for b in boxes if b is not box])
            if points is None:
                _close(track.mesh)
                continue
            eyes = float(np.linalg.norm(points[ALIGN_LANDMARKS[1]] - points[ALIGN_LANDMARKS[0]]))
            if eyes < self.options.min_eye_distance_px:  # the detector's eyes were just above
                _close(track.mesh)
                continue
            track.box = _box(points)
            track.geometry = face_geometry(points)
            if any(_overlap(track.box, other) > 0.3 for other in followed):
                _close(track.mesh)  # the landmarks fell on a face already followed
                continue
            lost = self._match_lost(track)
            if lost is not None:
                _close(lost.mesh)
                track.face_id, track.frames = lost.face_id, lost.frames
                self._tracks.remove(lost)
                log.debug("face %d found again at %.0f ms", track.face_id, t_ms)
            else:
                track.face_id, self._next_id = self._next_id, self._next_id + 1
                log.debug("face %d appears at %.0f ms", track.face_id, t_ms)
            track.last_seen_ms, track.frames = float(t_ms), track.frames + 1
            self._tracks.append(track)
            followed.append(track.box)
            new.append(TrackedFace(track.face_id, aligned_face(image, points, self.face_options,
                                                               n_faces=1, cut=cut)))
        return new

    def _match_lost(self, track: _Track) -> _Track | None:
        """The lost face this new one is: the nearest of those about as large, close to where
        they were last seen, with about the same landmark proportions."""
        best, best_distance = None, np.inf
        width = track.box[2] - track.box[0]
        for lost in (t for t in self._tracks if t.lost):
            lost_width = lost.box[2] - lost.box[0]
            if not 2 / 3 <= width / max(lost_width, 1e-6) <= 1.5:
                continue
            distance = float(np.hypot(*(np.subtract(_centre(track.box), _centre(lost.box)))))
            if distance > lost_width:
                continue
            if lost.geometry is not None and track.geometry is not None and \
                    np.max(np.abs(track.geometry / lost.geometry - 1)) > \
                    self.options.max_geometry_change:
                continue
            if distance < best_distance:
                best, best_distance = lost, distance
        return best

    def _without_duplicates(self, found: list[TrackedFace]) -> list[TrackedFace]:
        """Two windows can lock onto one face (a face that moved into another's window): the
        younger track goes."""
        keep: list[TrackedFace] = []
        for tracked in sorted(found, key=lambda t: t.face_id):
            if any(_iou(tracked.face.box_xyxy, k.face.box_xyxy) > self.options.duplicate_iou
                   for k in keep):
                self.stats.duplicates += 1
                track = next(t for t in self._tracks if t.face_id == tracked.face_id)
                _close(track.mesh)
                self._tracks.remove(track)
                self.forgotten.append(track.face_id)
                continue
            keep.append(tracked)
        return keep

    def _lose(self, track: _Track) -> None:
        track.lost = True
        _close(track.mesh)
        track.mesh = None

    def _forget_old(self, t_ms: float) -> None:
        old = [t for t in self._tracks if t.lost and t_ms - t.last_seen_ms > self.options.reid_ms]
        for track in old:
            self._tracks.remove(track)
            self.forgotten.append(track.face_id)

    def _drop_all_tracks(self) -> None:
        for track in self._tracks:
            _close(track.mesh)
            self.forgotten.append(track.face_id)
        self._tracks = []

    def _make_mesh(self) -> Any:
        import mediapipe as mp

        o = self.face_options
        with quiet_native_logs():
            return mp.solutions.face_mesh.FaceMesh(
                static_image_mode=False, max_num_faces=1, refine_landmarks=True,
                min_detection_confidence=o.min_detection_confidence,
                min_tracking_confidence=o.min_tracking_confidence)


def face_geometry(points: np.ndarray) -> np.ndarray:
    """Proportions of a face that expressions hardly change (inner eye span, nose, eyes to
    chin, face width), each divided by the outer eye-corner span: who a face is, roughly, when
    it comes back after an absence."""
    unit = float(np.linalg.norm(points[_EYE_OUTER[1]] - points[_EYE_OUTER[0]]))
    return np.array([np.linalg.norm(points[b] - points[a]) / max(unit, 1e-6)
                     for a, b in _GEOMETRY_PAIRS])


def _with_count(face: FaceResult, n_faces: int) -> FaceResult:
    return replace(face, n_faces=n_faces)


def _box(points: np.ndarray) -> tuple[float, float, float, float]:
    (x0, y0), (x1, y1) = points.min(axis=0) - 0.5, points.max(axis=0) - 0.5
    return float(x0), float(y0), float(x1), float(y1)


def _area(box) -> float:
    return 0.0 if box is None else max(box[2] - box[0], 0.0) * max(box[3] - box[1], 0.0)


def _centre(box) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def _intersection(a, b) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(w, 0.0) * max(h, 0.0)


def _iou(a, b) -> float:
    inter = _intersection(a, b)
    union = _area(a) + _area(b) - inter
    return inter / union if union > 0 else 0.0


def _overlap(a, b) -> float:
    """The share of the smaller box that the other covers."""
    smaller = min(_area(a), _area(b))
    return _intersection(a, b) / smaller if smaller > 0 else 0.0


def _window(box, scale: float, shape) -> tuple[int, int, int, int]:
    """A square of ``scale`` face sizes around the face, cut to the frame, on whole pixels (so
    the window is a translation of the frame: no resampling)."""
    h, w = shape[:2]
    cx, cy = _centre(box)
    half = max(box[2] - box[0], box[3] - box[1]) * scale / 2
    x0, y0 = int(max(0, np.floor(cx - half))), int(max(0, np.floor(cy - half)))
    x1, y1 = int(min(w, np.ceil(cx + half))), int(min(h, np.ceil(cy + half)))
    return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)


def _inside(box, window, margin: float, frame) -> bool:
    """Whether the face stays clear of its window's edges (by ``margin`` of the window), an
    edge that is the frame's own edge excepted."""
    h, w = frame[:2]
    x0, y0, x1, y1 = window
    mx, my = margin * (x1 - x0), margin * (y1 - y0)
    return ((box[0] >= x0 + mx or x0 == 0) and (box[1] >= y0 + my or y0 == 0)
            and (box[2] <= x1 - mx or x1 == w) and (box[3] <= y1 - my or y1 == h))


def _close(mesh: Any) -> None:
    if mesh is not None:
        mesh.close()
