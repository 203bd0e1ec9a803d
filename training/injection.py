"""Ground truth for spotting on real video: micro-movements rendered into real face videos at
known times, places and sizes.

An evaluation tool, outside the product's runtime path. It tracks the face with MediaPipe
directly (not the product's face stage), so the truth does not inherit the product's alignment,
and it never calls the spotter.

A movement is a displacement field shaped like a facial action unit (AU): Gaussian bumps
anchored on the landmarks that the AU moves, each pushed in a direction given in the face's own
frame (x along the eyes' line, y perpendicular to it), so the field follows the head as it moves
and turns. Its size is the peak displacement in % of the inter-ocular distance (IOD, iris centre
to iris centre, per frame). In time it rises from the onset to the apex and falls to the offset
with sin² ramps (zero slope at all three), 200–500 ms in all. Every frame is warped by backward
mapping (bicubic) where the field is non-zero and the video is re-encoded near-losslessly
(H.264, crf 10), its audio copied packet for packet.

Spatial patterns from the 3DB maps (:func:`pattern_field`) carry a published micro-expression's
own flow, with its label, for spot-then-recognize: the (u, v) map's shape, scaled to the same
amplitudes, laid over the face through the five alignment points of the 3DB template.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Sequence

import cv2
import numpy as np

__all__ = ["ActionUnit", "ACTION_UNITS", "Injection", "FaceTrack", "track_faces",
           "plan_injections", "au_field", "pattern_field", "render_video", "temporal_profile",
           "write_truth", "read_truth", "IRIS_LEFT", "IRIS_RIGHT"]

IRIS_LEFT, IRIS_RIGHT = 468, 473  # image-left and image-right iris centres (refined mesh)


@dataclass(frozen=True)
class ActionUnit:
    """An AU as anchors ``(landmark, dx, dy, weight)``: at each anchor the skin moves in
    direction (dx, dy) of the face frame (x: image-left eye → image-right eye; y: down the face)
    with the given weight; ``radius`` is each bump's σ in IOD. ``region`` names the facial region
    the truth records, ``label`` the 3DB class the AU usually belongs to."""

    name: str
    region: str
    label: str
    anchors: tuple[tuple[int, float, float, float], ...]
    radius: float = 0.10


def _both(left: Sequence[int], right: Sequence[int], dx: float, dy: float,
          weight: float = 1.0) -> tuple[tuple[int, float, float, float], ...]:
    """Mirror-symmetric anchors: image-left points move (dx, dy), image-right ones (-dx, dy)."""
    norm = math.hypot(dx, dy)
    ux, uy = dx / norm, dy / norm
    return tuple((i, ux, uy, weight) for i in left) + tuple((i, -ux, uy, weight) for i in right)


#: MediaPipe Face Mesh indices: image-left brow 70 63 105 66 107 (outer → inner), image-right
#: 300 293 334 296 336; lower lids 145 153 144 / 374 380 373; cheeks 117 118 / 346 347; upper
#: lip 0 37 267 39 269; nose wings 48 278; mouth corners 61 (image-left) and 291.
ACTION_UNITS: dict[str, ActionUnit] = {au.name: au for au in (
    ActionUnit("AU1+2", "brows", "surprise", _both((70, 63, 105, 66, 107),
                                                   (300, 293, 334, 296, 336), 0.0, -1.0)),
    ActionUnit("AU4", "brows", "negative", _both((66, 107, 55), (296, 336, 285), 0.5, 0.87)),
    ActionUnit("AU6/7", "lids", "positive", _both((145, 153, 144), (374, 380, 373), 0.0, -1.0)
               + _both((117, 118), (346, 347), 0.0, -1.0, 0.6), radius=0.08),
    ActionUnit("AU9/10", "upper lip", "negative", _both((37, 39), (267, 269), 0.0, -1.0)
               + ((0, 0.0, -1.0, 1.0),) + _both((48,), (278,), 0.0, -1.0, 0.6)),
    ActionUnit("AU12", "lip corners", "positive", _both((61,), (291,), -0.6, -0.8)),
    ActionUnit("AU14", "lip corners", "negative", _both((61,), (291,), -1.0, 0.0)),
    ActionUnit("AU15", "lip corners", "negative", _both((61,), (291,), -0.3, 0.95)),
)}


@dataclass(frozen=True)
class Injection:
    """One rendered movement: times in ms on the video's clock (presentation times), amplitude
    in % of the IOD (peak displacement of the field), the AU (or ``3DB:<sample>`` for a map
    pattern), its region and class label."""

    onset_ms: float
    apex_ms: float
    offset_ms: float
    amplitude_pct: float
    au: str
    region: str
    label: str

    @property
    def duration_ms(self) -> float:
        return self.offset_ms - self.onset_ms


@dataclass
class FaceTrack:
    """MediaPipe landmarks per frame (frame pixels, edge origin), NaN where no face was found,
    and the frames' presentation times."""

    times_ms: np.ndarray                 # (N,)
    landmarks: np.ndarray                # (N, 478, 2) float32
    width: int = 0
    height: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def found(self) -> np.ndarray:
        return np.isfinite(self.landmarks[:, 0, 0])

    def iod(self) -> np.ndarray:
        return np.linalg.norm(self.landmarks[:, IRIS_RIGHT] - self.landmarks[:, IRIS_LEFT], axis=1)


def decode_frames(path: str | Path) -> tuple[list[np.ndarray], np.ndarray]:
    """All frames (BGR uint8) and their presentation times in ms from the first frame."""
    import av

    frames, times = [], []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        for frame in container.decode(stream):
            frames.append(frame.to_ndarray(format="bgr24"))
            times.append(float(frame.pts * stream.time_base) * 1000.0)
    t = np.asarray(times)
    return frames, t - t[0]


def track_faces(frames: Iterable[np.ndarray], times_ms: np.ndarray) -> FaceTrack:
    """Landmarks of the largest face in each frame (MediaPipe Face Mesh, video mode)."""
    import mediapipe as mp

    out = []
    h = w = 0
    with mp.solutions.face_mesh.FaceMesh(static_image_mode=False, max_num_faces=1,
                                         refine_landmarks=True) as mesh:
        for image in frames:
            h, w = image.shape[:2]
            found = mesh.process(cv2.cvtColor(image, cv2.COLOR_BGR2RGB)).multi_face_landmarks
            if not found:
                out.append(np.full((478, 2), np.nan, np.float32))
                continue
            out.append(np.array([(p.x * w, p.y * h) for p in found[0].landmark], np.float32))
    return FaceTrack(np.asarray(times_ms, np.float64), np.stack(out), w, h)


def temporal_profile(t_ms: np.ndarray | float, onset: float, apex: float,
                     offset: float) -> np.ndarray:
    """Fraction of the apex displacement at ``t_ms``: sin² rise from the onset to the apex and
    sin² fall to the offset, 0 outside."""
    t = np.asarray(t_ms, np.float64)
    rise = np.sin(0.5 * np.pi * np.clip((t - onset) / (apex - onset), 0, 1)) ** 2
    fall = np.sin(0.5 * np.pi * np.clip((offset - t) / (offset - apex), 0, 1)) ** 2
    return np.where(t <= apex, rise, fall) * ((t > onset) & (t < offset))


def _face_frame(landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    left, right = landmarks[IRIS_LEFT].astype(np.float64), landmarks[IRIS_RIGHT].astype(np.float64)
    iod = float(np.linalg.norm(right - left))
    ex = (right - left) / iod
    ey = np.array([-ex[1], ex[0]])  # x right, y down: rotate +90° in image coordinates
    return ex, ey, iod


def _bumps_field(shape: tuple[int, int], centres: np.ndarray, vectors: np.ndarray,
                 sigma_px: float) -> np.ndarray:
    """Sum of Gaussian bumps (σ ``sigma_px``) at ``centres`` (K, 2) carrying ``vectors`` (K, 2),
    evaluated on a (H, W) grid, then scaled so the largest displacement equals the largest
    vector's length: the amplitude is the field's peak, not a sum of overlapping bumps."""
    h, w = shape
    out = np.zeros((h, w, 2), np.float32)
    reach = 3.0 * sigma_px
    x0 = int(max(0, math.floor(centres[:, 0].min() - reach)))
    x1 = int(min(w, math.ceil(centres[:, 0].max() + reach) + 1))
    y0 = int(max(0, math.floor(centres[:, 1].min() - reach)))
    y1 = int(min(h, math.ceil(centres[:, 1].max() + reach) + 1))
    if x1 <= x0 or y1 <= y0:
        return out
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    acc = np.zeros((y1 - y0, x1 - x0, 2), np.float32)
    for (cx, cy), v in zip(centres - 0.5, vectors):  # edge-origin → pixel-centre coordinates
        g = np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2.0 * sigma_px ** 2))
        acc[..., 0] += g * v[0]
        acc[..., 1] += g * v[1]
    peak = float(np.sqrt((acc ** 2).sum(-1)).max())
    target = float(np.linalg.norm(vectors, axis=1).max())
    if peak > 0:
        acc *= target / peak
    out[y0:y1, x0:x1] = acc
    return out


def au_field(landmarks: np.ndarray, au: ActionUnit, amplitude_pct: float,
             shape: tuple[int, int]) -> np.ndarray:
    """(H, W, 2) displacement (pixels) of ``au`` at its apex, peak ``amplitude_pct`` % of the
    IOD, anchored on this frame's ``landmarks`` (478, 2)."""
    ex, ey, iod = _face_frame(landmarks)
    amp = amplitude_pct / 100.0 * iod
    centres = np.array([landmarks[i] for i, *_ in au.anchors], np.float64)
    vectors = np.array([w * amp * (dx * ex + dy * ey) for _, dx, dy, w in au.anchors])
    return _bumps_field(shape, centres, vectors, au.radius * iod)


#: The 3DB template's five points (28×28 map frame): eye centres, nose tip, mouth corners; the
#: same numbers as realtime_mer.face.CANONICAL_POINTS_28, measured on the 3DB maps.
_MAP_POINTS = np.array([[6.2750, 7.6730], [21.3565, 7.6220], [13.8975, 15.4760],
                        [8.5100, 20.3405], [19.5850, 20.2265]])
_FIVE = (IRIS_LEFT, IRIS_RIGHT, 1, 61, 291)


def pattern_field(landmarks: np.ndarray, uv: np.ndarray, amplitude_pct: float,
                  shape: tuple[int, int], face_only: bool = True) -> np.ndarray:
    """(H, W, 2) displacement of a 3DB map's (u, v) pattern (28, 28, 2; any scale: it is
    normalised so its largest vector is ``amplitude_pct`` % of the IOD) laid onto the frame by the
    affine map from the template's five points to this frame's. Smoothed (σ 1 map px) so the
    map's 28-px blockiness does not become texture."""
    uv = np.asarray(uv, np.float64)
    uv = uv - np.median(uv.reshape(-1, 2), axis=0)  # the map's own global shift is not motion
    uv = cv2.GaussianBlur(uv.astype(np.float32), (0, 0), 1.0).astype(np.float64)
    if face_only:
        yy, xx = np.mgrid[0:28, 0:28] + 0.5
        inside = ((xx - 14.0) / 12.0) ** 2 + ((yy - 14.5) / 13.5) ** 2 <= 1.0
        uv *= inside[..., None]
    src = _MAP_POINTS.astype(np.float32)
    dst = np.array([landmarks[i] for i in _FIVE], np.float32)
    m, _ = cv2.estimateAffine2D(src, dst, method=cv2.LMEDS)
    if m is None:
        return np.zeros((*shape, 2), np.float32)
    # Vectors map through the linear part; the field is pulled back by the inverse affine.
    lin = m[:, :2]
    vec = uv @ lin.T
    peak = float(np.sqrt((vec ** 2).sum(-1)).max())
    _, _, iod = _face_frame(landmarks)
    if peak > 0:
        vec *= amplitude_pct / 100.0 * iod / peak
    inv = cv2.invertAffineTransform(m)
    h, w = shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    mx = (inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]) - 0.5
    my = (inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]) - 0.5
    out = np.stack([cv2.remap(vec[..., k].astype(np.float32), mx, my, cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=0)
                    for k in range(2)], axis=-1)
    return out


def warp(image: np.ndarray, displacement: np.ndarray) -> np.ndarray:
    """The image with its content moved by ``displacement`` (H, W, 2, pixels): output pixel p
    takes the input at p − d(p) (bicubic), which for fields this smooth and small is the forward
    motion within a few hundredths of a pixel. Pixels where the field is zero are copied."""
    moving = np.abs(displacement).max(-1) > 1e-4
    if not moving.any():
        return image
    ys, xs = np.nonzero(moving)
    y0, y1 = max(0, ys.min() - 3), min(image.shape[0], ys.max() + 4)
    x0, x1 = max(0, xs.min() - 3), min(image.shape[1], xs.max() + 4)
    gy, gx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    d = displacement[y0:y1, x0:x1]
    out = image.copy()
    out[y0:y1, x0:x1] = cv2.remap(image, gx - d[..., 0], gy - d[..., 1], cv2.INTER_CUBIC,
                                  borderMode=cv2.BORDER_REPLICATE)
    return out


def plan_injections(track: FaceTrack, rng: np.random.Generator, *,
                    aus: Sequence[str], amplitudes: Sequence[float],
                    start_ms: float = 1500.0, gap_ms: tuple[float, float] = (900.0, 1500.0),
                    duration_ms: tuple[float, float] = (200.0, 500.0)) -> list[Injection]:
    """Movements one after another with quiet gaps between them, cycling through every
    (AU, amplitude) pair in a shuffled order; only where the face is found through the whole
    movement."""
    combos = [(au, a) for au in aus for a in amplitudes]
    rng.shuffle(combos)
    times, found = track.times_ms, track.found
    end = times[-1] - 300.0
    out: list[Injection] = []
    t, k = start_ms, 0
    while True:
        duration = float(rng.uniform(*duration_ms))
        if t + duration > end:
            break
        inside = (times >= t - 100) & (times <= t + duration + 100)
        if inside.any() and found[inside].all():
            au, amp = combos[k % len(combos)]
            k += 1
            apex = t + duration * float(rng.uniform(0.4, 0.6))
            unit = ACTION_UNITS[au]
            out.append(Injection(round(t, 3), round(apex, 3), round(t + duration, 3), amp, au,
                                 unit.region, unit.label))
            t += duration + float(rng.uniform(*gap_ms))
        else:
            t += 200.0
    return out


def _planes(yuv: np.ndarray, h: int, w: int) -> list[np.ndarray]:
    """Views of the Y, U and V planes of a yuv420p frame as PyAV lays it out ((3H/2, W))."""
    q = h // 4
    return [yuv[:h], yuv[h:h + q].reshape(h // 2, w // 2), yuv[h + q:].reshape(h // 2, w // 2)]


def render_video(source: str | Path, target: str | Path, injections: Sequence[Injection],
                 track: FaceTrack, *, crf: int = 10,
                 patterns: dict[str, np.ndarray] | None = None) -> None:
    """Re-encode ``source`` into ``target`` (H.264, ``crf``, yuv420p, the source's timestamps)
    with ``injections`` warped in; audio streams are copied as they are. The planes are warped
    as decoded (luma at full size, chroma at half size with half the displacement): no colour
    conversion adds its rounding to the encoder's. ``patterns`` maps an injection's ``au`` of
    the form ``3DB:<stem>`` to its (28, 28, 2) (u, v) map."""
    import av

    with av.open(str(source)) as src, av.open(str(target), "w") as dst:
        vin = src.streams.video[0]
        w, h = vin.codec_context.width, vin.codec_context.height
        if w % 2 or h % 4:
            raise ValueError(f"{source}: frame size {w}x{h}; the planes are warped as PyAV "
                             "lays out yuv420p, which needs an even width and a height divisible "
                             "by 4")
        vout = dst.add_stream("libx264", rate=vin.average_rate or Fraction(30))
        vout.width, vout.height = w, h
        vout.pix_fmt = "yuv420p"
        vout.options = {"crf": str(crf), "preset": "medium"}
        vout.time_base = vin.time_base
        audio = [(a, dst.add_stream_from_template(a)) for a in src.streams.audio]
        packets = []
        for ain, aout in audio:
            for packet in src.demux(ain):
                if packet.dts is not None:
                    packets.append((float(packet.dts * ain.time_base) * 1000.0, packet, aout))
        packets.sort(key=lambda p: p[0])
        src.seek(0)
        pts0, audio_i = None, 0
        for i, frame in enumerate(src.decode(vin)):
            if pts0 is None:
                pts0 = frame.pts
            t = float((frame.pts - pts0) * vin.time_base) * 1000.0
            yuv = frame.to_ndarray(format="yuv420p")
            lm = track.landmarks[i] if i < len(track.landmarks) else None
            total = None
            if lm is not None and np.isfinite(lm[0, 0]):
                for inj in injections:
                    s = float(temporal_profile(t, inj.onset_ms, inj.apex_ms, inj.offset_ms))
                    if s <= 0:
                        continue
                    if inj.au.startswith("3DB:"):
                        f = pattern_field(lm, patterns[inj.au[4:]], inj.amplitude_pct, (h, w))
                    else:
                        f = au_field(lm, ACTION_UNITS[inj.au], inj.amplitude_pct, (h, w))
                    total = s * f if total is None else total + s * f
            if total is not None:
                yuv = yuv.copy()
                y, u, v = _planes(yuv, h, w)
                y[...] = warp(y, total)
                half = cv2.resize(total, (w // 2, h // 2), interpolation=cv2.INTER_AREA) * 0.5
                u[...] = warp(u, half)
                v[...] = warp(v, half)
            while audio_i < len(packets) and packets[audio_i][0] <= t:
                _, packet, aout = packets[audio_i]
                packet.stream = aout
                dst.mux(packet)
                audio_i += 1
            out = av.VideoFrame.from_ndarray(yuv, format="yuv420p")
            out.pts = frame.pts - pts0
            out.time_base = vin.time_base
            for packet in vout.encode(out):
                dst.mux(packet)
        for packet in vout.encode():
            dst.mux(packet)
        for _, packet, aout in packets[audio_i:]:
            packet.stream = aout
            dst.mux(packet)


def reencode(source: str | Path, target: str | Path, crf: int) -> None:
    """``source`` re-encoded at ``crf`` with nothing added (the robustness check)."""
    render_video(source, target, [], FaceTrack(np.zeros(0), np.zeros((0, 478, 2), np.float32)),
                 crf=crf)


def write_truth(path: str | Path, clip: str, injections: Sequence[Injection],
                extra: dict | None = None) -> None:
    Path(path).write_text(json.dumps({"clip": clip, **(extra or {}),
                                      "injections": [asdict(i) for i in injections]},
                                     indent=1))


def read_truth(path: str | Path) -> tuple[dict, list[Injection]]:
    data = json.loads(Path(path).read_text())
    return data, [Injection(**i) for i in data.pop("injections")]
