"""Face stage: MediaPipe Face Mesh tracking, then a similarity alignment on points that
expressions do not move (eye corners, nose bridge and tip), then a greyscale crop.

The framing matters: the recognition networks are trained on 3DB maps computed from dataset face
crops (eyebrows to chin). A crop framed differently moves the facial regions the networks learned
to look at, so the framing is measured on the 3DB maps themselves (five points: eyes, nose tip,
mouth corners). The crop is not fitted on those five points, though: the mouth corners move with
every smile and the iris centres with every glance, and a fit on them moves the crop instead of
showing the movement in it. The stable points' template is where those points fall, on real
faces, under the five-point fit to the 3DB framing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from realtime_mer.native_logs import quiet_native_logs

log = logging.getLogger(__name__)

__all__ = ["FaceOptions", "FaceResult", "FaceAligner", "CANONICAL_POINTS_28", "CANONICAL_STRETCH_X",
           "ALIGN_LANDMARKS", "STABLE_LANDMARKS", "CANONICAL_STABLE_28", "canonical_points",
           "similarity_transform", "alignment_transform",
           "aligned_face", "as_bgr", "cut_thumbnail", "cut_score", "upsampling_eye_distance",
           "small_face_note"]

#: MediaPipe Face Mesh indices (refined mesh, 478 points) of the five alignment points: image-left
#: iris centre, image-right iris centre, nose tip, image-left and image-right mouth corner.
ALIGN_LANDMARKS = (468, 473, 1, 61, 291)

#: The five points of ALIGN_LANDMARKS in the 28x28 coordinate frame of the 3DB flow maps: the
#: per-coordinate median over the 440 rows with found=1 of ../shared/data/megc2019_3db/
#: landmarks5.csv (MediaPipe on HTNet's 224x224 apex crops, divided by 8). Hard-coded so the
#: product does not need ../shared at run time; tests/realtime_mer/test_face.py re-derives it.
#: Coordinates are "normalised x size" (0 = left edge of the map, 28 = right edge).
CANONICAL_POINTS_28 = np.array(
    [
        [6.2750, 7.6730],    # image-left eye centre
        [21.3565, 7.6220],   # image-right eye centre
        [13.8975, 15.4760],  # nose tip
        [8.5100, 20.3405],   # image-left mouth corner
        [19.5850, 20.2265],  # image-right mouth corner
    ],
    dtype=np.float64,
)
CANONICAL_POINTS_28.setflags(write=False)

#: MediaPipe Face Mesh indices of the points the crop is fitted on: the four eye corners (image-left
#: eye outer 33, inner 133; image-right eye inner 362, outer 263), then the nose from the bridge
#: to the tip (168, 6, 197, 195, 5, 4, 1). Eye corners sit on bone; expressions, gaze and speech
#: leave them and the nasal ridge in place to a fraction of a pixel.
STABLE_LANDMARKS = (33, 133, 362, 263, 168, 6, 197, 195, 5, 4, 1)

#: STABLE_LANDMARKS in the 28x28 frame of the 3DB maps: per video, the median position of each
#: point under the five-point fit (ALIGN_LANDMARKS onto CANONICAL_POINTS_28) over every frame of
#: the eight real face videos of ../shared/media; the median of those over the videos; then made
#: mirror-symmetric (left and right corners averaged, the nose on the eyes' midline), since a
#: template is of no person in particular. tests/realtime_mer/test_face.py re-derives it.
CANONICAL_STABLE_28 = np.array(
    [
        [3.890, 7.749],    # image-left eye, outer corner
        [9.912, 8.074],    # image-left eye, inner corner
        [17.758, 8.074],   # image-right eye, inner corner
        [23.780, 7.749],   # image-right eye, outer corner
        [13.834, 6.868],   # nose bridge (between the eyes)
        [13.834, 8.515],
        [13.834, 9.797],
        [13.834, 11.052],
        [13.834, 12.408],
        [13.834, 14.053],
        [13.834, 15.283],  # nose tip
    ],
    dtype=np.float64,
)
CANONICAL_STABLE_28.setflags(write=False)

#: Horizontal stretch of the 3DB face crops. The dataset crops are taller than wide (CASME II
#: and SMIC crops are 280x340 and 140x170, i.e. 340/280 = 1.214) and were resized to a square,
#: so every face the networks saw is ~1.21x wider than life. Measured, not assumed: MediaPipe on
#: the SMIC calibration onset frame gives an eye-to-mouth / eye-to-eye distance ratio of 1.007
#: at its true aspect and 0.832 after the square resize, and the 3DB landmarks' median is 0.817.
#: A similarity transform alone cannot reproduce that shape, so alignment is a similarity fit in
#: un-stretched template space followed by this fixed stretch (1.0 = plain similarity).
CANONICAL_STRETCH_X = 1.214


def upsampling_eye_distance(options: "FaceOptions") -> float:
    """The eye distance (frame px) below which the aligned crop is made by enlarging the face:
    the template's eye distance at ``crop_size``, without the horizontal dataset stretch (56.8 px
    at 128). A smaller face holds less detail than the crop the flow is computed on, so the
    movements of a pixel or two that the networks learned from dataset faces of 140-400 px
    approach the video's own resolution."""
    template = canonical_points(options.crop_size)
    return float(np.linalg.norm(template[1] - template[0])) / options.stretch_x


def small_face_note(eye_distance_px: float, limit_px: float, sentence: bool = False) -> str:
    """The one wording of the small-face warning, for the log, the report and the demo;
    ``sentence``: capitalised, with a full stop, to stand alone in a page."""
    note = (f"the face is small: its eyes are {eye_distance_px:.0f} px apart (median), below the "
            f"{limit_px:.0f} px at which the face crop needs no enlarging, so movements of a "
            "pixel or two approach the video's resolution")
    return f"{note[0].upper()}{note[1:]}." if sentence else note


def canonical_points(crop_size: int) -> np.ndarray:
    """The template in crop pixel coordinates, OpenCV convention (pixel centres at integers):
    MediaPipe's and the CSV's coordinates run from the image edge, hence the half-pixel shift."""
    return CANONICAL_POINTS_28 * (crop_size / 28.0) - 0.5


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation; no reflection) mapping
    ``src`` (N, 2) onto ``dst`` (N, 2), as a 2x3 matrix for ``cv2.warpAffine``.

    Least squares over all five points rather than a robust subset fit: a robust fit switches
    subsets between frames, and the resulting crop jitter is larger than the pixel-sized motion
    a micro-expression produces."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or src.shape[0] < 2:
        raise ValueError(f"expected two (N>=2, 2) point arrays, got {src.shape} and {dst.shape}")
    mu_s, mu_d = src.mean(axis=0), dst.mean(axis=0)
    s, d = src - mu_s, dst - mu_d
    norm = float((s * s).sum())
    if norm <= 1e-12:
        raise ValueError("source points coincide; no transform is defined")
    a = float((s * d).sum()) / norm
    b = float((s[:, 0] * d[:, 1] - s[:, 1] * d[:, 0]).sum()) / norm
    rot = np.array([[a, -b], [b, a]])
    t = mu_d - rot @ mu_s
    return np.hstack([rot, t[:, None]])


def alignment_transform(points: np.ndarray, crop_size: int,
                        stretch_x: float = CANONICAL_STRETCH_X,
                        template_28: np.ndarray = CANONICAL_STABLE_28) -> np.ndarray:
    """2x3 frame->crop matrix (OpenCV pixel convention) taking ``points`` (K, 2), given in
    MediaPipe's edge-origin pixel coordinates (normalised x size), onto ``template_28`` (K, 2,
    the 28x28 map frame; by default the stable points, CANONICAL_POINTS_28 for the five points):
    the least-squares similarity onto the template with its stretch undone, then the stretch."""
    template = np.asarray(template_28, np.float64) * (crop_size / 28.0)
    unstretched = template / np.array([stretch_x, 1.0])
    m = np.diag([stretch_x, 1.0]) @ similarity_transform(points, unstretched)
    # Edge-origin to centre-origin on both sides: x_cv = x_edge - 0.5.
    a = m[:, :2]
    t = m[:, 2] + a @ np.array([0.5, 0.5]) - 0.5
    return np.hstack([a, t[:, None]])


@dataclass(frozen=True)
class FaceOptions:
    """``max_faces`` > 1 lets the subject be the largest face even when others are in view, at
    the price of running MediaPipe's detector on every frame (it stops only once max_faces faces
    are tracked); 1 is about a third cheaper per frame when only one person can appear.
    ``stretch_x``: see ``CANONICAL_STRETCH_X``; 1.0 gives an undistorted (similarity) crop.
    ``cut_threshold``: a frame whose 32x32 grey thumbnail differs from the previous frame's by
    more than this mean absolute difference (grey levels) is a hard cut, and tracking restarts
    there (``math.inf`` disables it). Without the restart MediaPipe keeps tracking the previous
    shot's face regions on the new image, and a landmark model that accepts what it finds there
    reports phantom faces for as long as the shot lasts. Measured on the shared videos: frame to
    frame at most 6.6 for a moving head, 92 to 96 for a cut between two people; a needless
    restart costs ~3 ms and one fresh detection."""

    crop_size: int = 128
    max_faces: int = 4
    min_detection_confidence: float = 0.5
    min_tracking_confidence: float = 0.5
    stretch_x: float = CANONICAL_STRETCH_X
    cut_threshold: float = 20.0

    def __post_init__(self) -> None:
        if not 0.5 <= self.stretch_x <= 2.0:
            raise ValueError(f"stretch_x must be in [0.5, 2], got {self.stretch_x}")
        if self.crop_size < 16:
            raise ValueError(f"crop_size must be >= 16, got {self.crop_size}")
        if self.max_faces < 1:
            raise ValueError(f"max_faces must be >= 1, got {self.max_faces}")
        if not self.cut_threshold > 0:
            raise ValueError(f"cut_threshold must be > 0, got {self.cut_threshold}")
        for name in ("min_detection_confidence", "min_tracking_confidence"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")


@dataclass(frozen=True)
class FaceResult:
    """``landmarks``: (478, 2) float32 in crop pixel coordinates (OpenCV convention);
    ``box_xyxy``: the subject's landmark extent in frame pixels; ``transform``: 2x3 frame->crop
    (for ``cv2.warpAffine``; invert with ``cv2.invertAffineTransform``). All None when
    ``found`` is False. ``n_faces`` counts every face seen, the subject included. ``cut``: this
    frame is a hard cut from the previous one (a new shot; see ``FaceOptions.cut_threshold``).
    ``eye_distance_px``: the subject's iris centres' distance in frame pixels, its size in the
    video (see :func:`upsampling_eye_distance`)."""

    found: bool
    n_faces: int
    crop: np.ndarray | None = None
    landmarks: np.ndarray | None = None
    box_xyxy: tuple[float, float, float, float] | None = None
    transform: np.ndarray | None = None
    cut: bool = False
    eye_distance_px: float | None = None


class FaceAligner:
    """Tracks faces through a video and returns the aligned crop of the largest one per frame.

    Call ``process`` in time order; a timestamp that goes backwards (a new clip) or a hard cut
    (see ``FaceOptions.cut_threshold``) resets tracking so the tracker does not look for the
    previous clip's or shot's faces; ``FaceResult.cut`` marks the frame of a hard cut.
    """

    def __init__(self, options: FaceOptions | None = None) -> None:
        self.options = options or FaceOptions()
        self._mesh: Any = None
        self._last_t_ms: float | None = None
        self._last_thumbnail: np.ndarray | None = None

    def _make_mesh(self) -> Any:
        import mediapipe as mp  # deferred: loading the graph costs ~0.2 s, only pay when used

        o = self.options
        return mp.solutions.face_mesh.FaceMesh(
            static_image_mode=False,
            max_num_faces=o.max_faces,
            refine_landmarks=True,
            min_detection_confidence=o.min_detection_confidence,
            min_tracking_confidence=o.min_tracking_confidence,
        )

    def process(self, frame_bgr: np.ndarray, t_ms: float) -> FaceResult:
        image = as_bgr(frame_bgr)
        if self._last_t_ms is not None and t_ms < self._last_t_ms:
            log.debug("time went back (%.1f -> %.1f ms); resetting face tracking",
                      self._last_t_ms, t_ms)
            self.reset()
        self._last_t_ms = float(t_ms)
        thumbnail = cut_thumbnail(image)
        cut = self._last_thumbnail is not None and \
            cut_score(self._last_thumbnail, thumbnail) > self.options.cut_threshold
        self._last_thumbnail = thumbnail
        rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        rgb.flags.writeable = False  # lets MediaPipe wrap the buffer instead of copying it
        # A graph start (a new mesh, or a restart after a cut) and its first frame are when
        # MediaPipe prints its native start-up warnings; they go to the debug log instead.
        with quiet_native_logs(enabled=self._mesh is None or cut):
            if cut and self._mesh is not None:
                log.debug("hard cut at %.1f ms; restarting face tracking", t_ms)
                self._mesh.reset()  # restarts the graph (~3 ms) without reloading its models
            if self._mesh is None:
                self._mesh = self._make_mesh()
            found = self._mesh.process(rgb).multi_face_landmarks
        if not found:
            return FaceResult(found=False, n_faces=0, cut=cut)

        h, w = image.shape[:2]
        best_pts, best_area = None, -1.0
        for face in found:
            pts = np.array([(p.x * w, p.y * h) for p in face.landmark], dtype=np.float64)
            span = pts.max(axis=0) - pts.min(axis=0)
            area = float(span[0] * span[1])
            if area > best_area:
                best_pts, best_area = pts, area
        assert best_pts is not None
        return aligned_face(image, best_pts, self.options, n_faces=len(found), cut=cut)

    def reset(self) -> None:
        """Forget tracked faces (the next frame runs detection from scratch)."""
        if self._mesh is not None:
            self._mesh.close()
            self._mesh = None
        self._last_t_ms = None
        self._last_thumbnail = None

    def close(self) -> None:
        self.reset()

    def __enter__(self) -> "FaceAligner":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def aligned_face(image: np.ndarray, points: np.ndarray, options: FaceOptions, n_faces: int,
                 cut: bool = False) -> FaceResult:
    """The aligned greyscale crop of the face whose Face Mesh landmarks (478, 2) are ``points``
    (frame pixels from the image edge, as MediaPipe gives them), with its box and transform."""
    size = options.crop_size
    transform = alignment_transform(points[list(STABLE_LANDMARKS)], size, options.stretch_x)
    # MediaPipe's coordinates run from the image edge; OpenCV's pixel centres sit at integers.
    pts_px = points - 0.5
    x0, y0 = pts_px.min(axis=0)
    x1, y1 = pts_px.max(axis=0)
    # Warping the colour frame and converting the small crop is cheaper than converting
    # the whole frame, and bilinear interpolation commutes with the linear grey conversion.
    crop_bgr = cv2.warpAffine(image, transform, (size, size), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_REPLICATE)
    crop = cv2.cvtColor(crop_bgr, cv2.COLOR_BGR2GRAY)
    landmarks = (pts_px @ transform[:, :2].T + transform[:, 2]).astype(np.float32)
    return FaceResult(
        found=True,
        n_faces=n_faces,
        crop=crop,
        landmarks=landmarks,
        box_xyxy=(float(x0), float(y0), float(x1), float(y1)),
        transform=transform.astype(np.float32),
        cut=cut,
        eye_distance_px=float(np.linalg.norm(points[ALIGN_LANDMARKS[1]]
                                             - points[ALIGN_LANDMARKS[0]])),
    )


def cut_thumbnail(image: np.ndarray) -> np.ndarray:
    """32x32 grey thumbnail (float32) for cut detection. Area-averaging a strided view: a few
    tenths of a millisecond on a 1080p frame, where area-averaging every pixel costs ~7 ms."""
    step = max(1, min(image.shape[:2]) // 128)
    small = np.ascontiguousarray(image[::step, ::step])
    grey = cv2.cvtColor(cv2.resize(small, (32, 32), interpolation=cv2.INTER_AREA),
                        cv2.COLOR_BGR2GRAY)
    return grey.astype(np.float32)


def cut_score(previous: np.ndarray, current: np.ndarray) -> float:
    """Mean absolute difference (grey levels) of two ``cut_thumbnail``s; above
    ``FaceOptions.cut_threshold`` the second frame is a hard cut."""
    return float(np.abs(current - previous).mean())


def as_bgr(frame: np.ndarray) -> np.ndarray:
    if not isinstance(frame, np.ndarray):
        raise ValueError(f"expected a numpy image, got {type(frame).__name__}")
    if frame.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {frame.dtype}")
    if frame.ndim == 2:
        return cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
    if frame.ndim == 3 and frame.shape[2] == 3:
        return frame
    if frame.ndim == 3 and frame.shape[2] == 4:
        return cv2.cvtColor(frame, cv2.COLOR_BGRA2BGR)
    raise ValueError(f"expected an (H, W, 3) BGR or (H, W) grey image, got shape {frame.shape}")
