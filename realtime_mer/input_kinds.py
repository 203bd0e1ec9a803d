"""Input builders for the four papers' networks: one function per input kind, numpy in and out,
shared by training (from the 3DB maps or from frames) and the live pipeline.

- STSTNet, AHMSA-Net: (28, 28, 3) (u, v, strain) map from ``features.flow_strain_map``;
  AHMSA-Net may take its :func:`five_region_crop`.
- MJFN: (224, 224, 3) colour-coded flow, :func:`colour_coded_flow`.
- MCNet: (224, 224, 3) colour-coded magnified, AU-region-weighted flow, :func:`mcnet_input`
  (= :func:`magnify_flow` + :func:`au_region_mask` + :func:`colour_coded_flow`).
- multi-scale 3D-ResNet50: (16, 134, 134, 3) flow stack, :func:`flow_stack` (+ :func:`clip_layout`).

From a published 3DB map, ``uv_from_3db_map`` recovers signed (u, v) up to the lost per-map
scale, so MJFN and MCNet can be trained on the same 442 samples.

Conventions: flow (u, v) in pixels of the image it was computed on, u positive to the right,
v positive downwards, defined as in :mod:`realtime_mer.flow` (``prev(x) ≈ nxt(x + flow(x))``).
Images returned as colour are RGB (not OpenCV's BGR). Landmarks are (x, y) in pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import cv2
import numpy as np


__all__ = [
    "MIDDLEBURY_NCOLS", "colour_wheel", "colour_coded_flow", "flow_direction_from_colour",
    "magnify_flow", "magnify_frame", "au_region_mask", "mcnet_input", "five_region_windows",
    "five_region_crop", "flow_stack", "clip_layout", "uv_from_3db_map", "InputKind",
    "INPUT_KINDS", "input_kind", "NETWORK_INPUT_KINDS", "LANDMARK_KINDS", "INPUT_OPTIONS",
    "hflip_landmarks", "network_inputs",
]

# Hue segments of the Middlebury colour wheel (Baker et al., IJCV 2011): red→yellow 15,
# yellow→green 6, green→cyan 4, cyan→blue 11, blue→magenta 13, magenta→red 6; 55 hues in all,
# the n_c = 55 of MJFN's Eq. 6.
_WHEEL_SEGMENTS = (15, 6, 4, 11, 13, 6)
MIDDLEBURY_NCOLS = sum(_WHEEL_SEGMENTS)


def _check_uv(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    u = np.asarray(u, dtype=np.float32)
    v = np.asarray(v, dtype=np.float32)
    if u.ndim != 2 or u.shape != v.shape or u.size == 0:
        raise ValueError(f"u and v must be 2-D arrays of one shape; got {u.shape} and {v.shape}")
    if not (np.isfinite(u).all() and np.isfinite(v).all()):
        raise ValueError("u and v contain NaN or inf")
    return u, v


def colour_wheel() -> np.ndarray:
    """The 55 Middlebury wheel colours, (55, 3) float32 RGB in [0, 1], fully saturated."""
    stops = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 1, 1], [0, 0, 1], [1, 0, 1]],
                     np.float32)
    rows = []
    for i, n in enumerate(_WHEEL_SEGMENTS):
        a, b = stops[i], stops[(i + 1) % len(stops)]
        t = np.arange(n, dtype=np.float32)[:, None] / n
        rows.append(a * (1 - t) + b * t)
    return np.concatenate(rows, axis=0)


def _wheel_position(angle_over_pi: np.ndarray) -> np.ndarray:
    # MJFN Eq. 6 (0-based): θ = atan2(v, u)/π in (−1, 1] → (θ + 1)/2 · (n_c − 1).
    return (angle_over_pi + 1.0) / 2.0 * (MIDDLEBURY_NCOLS - 1)


def _wheel_colour(pos: np.ndarray) -> np.ndarray:
    wheel = colour_wheel()
    k0 = np.floor(pos).astype(np.int64)
    f = (pos - k0)[..., None].astype(np.float32)
    k0 = np.clip(k0, 0, MIDDLEBURY_NCOLS - 1)
    k1 = (k0 + 1) % MIDDLEBURY_NCOLS
    return wheel[k0] * (1 - f) + wheel[k1] * f


def colour_coded_flow(u: np.ndarray, v: np.ndarray, size: int | None = 224,
                      scheme: str = "middlebury", max_magnitude: float | None = None
                      ) -> np.ndarray:
    """Colour-code a flow field as an RGB image (MJFN Eqs. 5-6; MCNet's input image).

    u, v: (H, W) float, any consistent unit (pixels, or the range units of
    :func:`uv_from_3db_map`). The field is first resized to ``size``×``size`` (bilinear; ``None``
    keeps H×W), then coded. Returns (size, size, 3) uint8 RGB.

    Hue encodes direction θ = atan2(v, u) (v down), magnitude m = sqrt(u² + v²) is normalised
    by ``max_magnitude`` (default: the field's own maximum, MJFN's m̃ = m / max m) and clipped
    to [0, 1]:

    - ``scheme="middlebury"`` (default, MJFN's colour system with n_c = 55 hues): the wheel
      colour at position (θ/π + 1)/2·54 is desaturated towards white by the magnitude,
      colour = 1 − m̃·(1 − wheel): **saturation = magnitude**, zero motion is white.
    - ``scheme="hsv"``: hue = θ mapped to 0..360°, saturation = 1, **value = magnitude**, zero
      motion is black (OpenCV's customary flow picture).

    Direction can be read back with :func:`flow_direction_from_colour` wherever m̃ > 0.
    """
    u, v = _check_uv(u, v)
    if scheme not in ("middlebury", "hsv"):
        raise ValueError(f"scheme must be 'middlebury' or 'hsv', got {scheme!r}")
    if size is not None:
        if size < 1:
            raise ValueError(f"size must be positive, got {size}")
        if u.shape != (size, size):
            u = cv2.resize(u, (size, size), interpolation=cv2.INTER_LINEAR)
            v = cv2.resize(v, (size, size), interpolation=cv2.INTER_LINEAR)
    mag = np.sqrt(u * u + v * v)
    top = float(mag.max()) if max_magnitude is None else float(max_magnitude)
    m = np.clip(mag / top, 0.0, 1.0) if top > 0 else np.zeros_like(mag)
    theta = np.arctan2(v, u)
    if scheme == "middlebury":
        wheel = _wheel_colour(_wheel_position(theta / np.pi))
        rgb = 1.0 - m[..., None] * (1.0 - wheel)
        return np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)
    hsv = np.empty(u.shape + (3,), np.float32)
    hsv[..., 0] = np.mod(np.degrees(theta), 360.0)
    hsv[..., 1] = 1.0
    hsv[..., 2] = m
    rgb = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)  # float HSV: H in degrees, S and V in [0, 1]
    return np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)


def flow_direction_from_colour(image: np.ndarray, scheme: str = "middlebury") -> np.ndarray:
    """Inverse of :func:`colour_coded_flow` for direction: (H, W, 3) uint8 RGB → θ (H, W)
    float32 radians in (−π, π], θ = atan2(v, u). Undefined (returned as 0) where the magnitude
    was 0 (white in Middlebury, black in HSV).

    Middlebury: 1 − colour = m̃·(1 − wheel(θ)), so the direction of the vector 1 − colour
    identifies the wheel position regardless of m̃; it is matched against a fine table of the
    wheel (0.05° steps).
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected (H, W, 3) RGB, got {image.shape}")
    rgb = image.astype(np.float32) / 255.0
    if scheme == "hsv":
        hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
        deg = hsv[..., 0]
        return np.radians(np.where(deg > 180.0, deg - 360.0, deg)).astype(np.float32)
    if scheme != "middlebury":
        raise ValueError(f"scheme must be 'middlebury' or 'hsv', got {scheme!r}")
    table_theta = np.linspace(-np.pi, np.pi, 7201, dtype=np.float32)
    table = 1.0 - _wheel_colour(_wheel_position(table_theta / np.pi))
    table /= np.linalg.norm(table, axis=1, keepdims=True)
    d = (1.0 - rgb).reshape(-1, 3)
    norm = np.linalg.norm(d, axis=1, keepdims=True)
    d = np.divide(d, norm, out=np.zeros_like(d), where=norm > 0)
    best = np.argmax(d @ table.T, axis=1)
    theta = np.where(norm[:, 0] > 0, table_theta[best], 0.0)
    return theta.reshape(image.shape[:2]).astype(np.float32)


def magnify_flow(u: np.ndarray, v: np.ndarray, alpha: float, limit: float | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """OMAM-style motion magnification applied to a flow field.

    MCNet computes optical flow on motion-magnified frames. For a magnifier that scales every
    displacement δ to (1 + α)·δ (Eulerian magnification's ideal, I(x) = f(x + (1 + α)δ); also the
    training target of the flow-based magnifier MCNet cites), the flow of the magnified pair is
    (1 + α)·(u, v). Real magnifiers saturate for large (1 + α)δ; with ``limit`` the magnified
    magnitude is soft-limited, |d'| = limit·tanh((1 + α)|d| / limit), direction kept.

    u, v: (H, W) float in any unit; ``limit`` in the same unit. Returns (u', v') float32.
    Note: a purely linear magnification does not change a max-normalised colour coding; only the
    saturation (``limit``), a fixed ``max_magnitude``, or recomputing flow on magnified frames
    (:func:`magnify_frame`) does.
    """
    u, v = _check_uv(u, v)
    if not alpha >= 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    gain = 1.0 + float(alpha)
    if limit is None:
        return u * gain, v * gain
    if not limit > 0:
        raise ValueError(f"limit must be > 0, got {limit}")
    mag = np.sqrt(u * u + v * v)
    new = limit * np.tanh(gain * mag / limit)
    scale = np.divide(new, mag, out=np.full_like(mag, gain), where=mag > 0)
    return (u * scale).astype(np.float32), (v * scale).astype(np.float32)


def magnify_frame(onset: np.ndarray, u: np.ndarray, v: np.ndarray, alpha: float) -> np.ndarray:
    """A Lagrangian motion-magnified apex frame: the onset frame moved by (1 + α)·flow.

    onset: (H, W) or (H, W, 3) image; (u, v): (H, W) flow onset→apex in pixels. With
    ``onset(x) ≈ apex(x + d(x))`` the magnified frame is M(y) = onset(y − (1 + α)·d(y))
    (backward warp, bilinear, border replicated; first order in d). Computing flow on
    (onset, M) is OMAM's "optical flow estimation on motion-magnified images".
    Returns an image of onset's shape and dtype.
    """
    u, v = _check_uv(u, v)
    onset = np.asarray(onset)
    if onset.shape[:2] != u.shape:
        raise ValueError(f"onset {onset.shape[:2]} and flow {u.shape} differ in size")
    if not alpha >= 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    h, w = u.shape
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    gain = 1.0 + float(alpha)
    return cv2.remap(onset, gx - gain * u, gy - gain * v, cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_REPLICATE)


def _check_points(landmarks: np.ndarray) -> np.ndarray:
    pts = np.asarray(landmarks, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2 or pts.shape[0] not in (5, 468, 478):
        raise ValueError("landmarks must be (5, 2) [eye left, eye right, nose tip, mouth left, "
                         f"mouth right] or (468|478, 2) MediaPipe face mesh; got {pts.shape}")
    if not np.isfinite(pts).all():
        raise ValueError("landmarks contain NaN or inf (face not found?)")
    return pts


def _ellipse(mask: np.ndarray, centre, axes, angle_deg: float, sub: int) -> None:
    cv2.ellipse(mask, (int(round(centre[0] * sub)), int(round(centre[1] * sub))),
                (max(1, int(round(axes[0] * sub))), max(1, int(round(axes[1] * sub)))),
                angle_deg, 0, 360, 1, thickness=-1, lineType=cv2.LINE_8, shift=4)


_MESH_REGIONS: dict[str, tuple[int, ...]] | None = None


def _mesh_regions() -> dict[str, tuple[int, ...]]:
    global _MESH_REGIONS
    if _MESH_REGIONS is None:
        from mediapipe.python.solutions import face_mesh_connections as fmc

        def idx(*conns):
            return tuple(sorted({i for c in conns for edge in c for i in edge}))

        _MESH_REGIONS = {
            "left": idx(fmc.FACEMESH_LEFT_EYE, fmc.FACEMESH_LEFT_EYEBROW),
            "right": idx(fmc.FACEMESH_RIGHT_EYE, fmc.FACEMESH_RIGHT_EYEBROW),
            "nose": idx(fmc.FACEMESH_NOSE),
            "mouth": idx(fmc.FACEMESH_LIPS),
        }
    return _MESH_REGIONS


def au_region_mask(landmarks: np.ndarray, size: int, frame_size: float | None = None,
                   margin: float = 0.08) -> np.ndarray:
    """OAUM-style mask of the facial action-unit regions: brows + eyes (each side), nose, mouth.

    landmarks: (5, 2) points (image-left eye centre, image-right eye centre, nose tip,
    image-left and image-right mouth corner, the order of ``landmarks5.csv`` and of
    ``face.CANONICAL_POINTS_28``) or (468|478, 2) MediaPipe face-mesh points; (x, y) pixels in a
    ``frame_size``×``frame_size`` frame (default ``size``), rescaled to the mask.

    From 5 points, with D the inter-ocular distance: an ellipse per eye centred 0.15·D above
    the eye, semi-axes 0.32·D × 0.30·D (eye and brow); a nose ellipse centred 0.1·D above the
    tip, 0.22·D × 0.30·D; a mouth ellipse on the corners' midpoint, along the corner line,
    semi-axes half the mouth width + 0.12·D × 0.25·D. From the mesh: the filled convex hulls of
    MediaPipe's eye+eyebrow, nose and lips landmark sets, dilated by ``margin``·D.

    Returns (size, size) float32 with 1 inside the regions and 0 elsewhere.
    """
    pts = _check_points(landmarks)
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    pts = pts * (size / float(frame_size if frame_size is not None else size))
    sub = 16  # cv2 drawing with 4 fractional bits
    mask = np.zeros((size, size), np.uint8)
    if pts.shape[0] == 5:
        le, re, nose, ml, mr = pts
        d = float(np.linalg.norm(re - le))
        for eye in (le, re):
            _ellipse(mask, (eye[0], eye[1] - 0.15 * d), (0.32 * d, 0.30 * d), 0.0, sub)
        _ellipse(mask, (nose[0], nose[1] - 0.10 * d), (0.22 * d, 0.30 * d), 0.0, sub)
        mc = (ml + mr) / 2
        half = float(np.linalg.norm(mr - ml)) / 2
        ang = math.degrees(math.atan2(mr[1] - ml[1], mr[0] - ml[0]))
        _ellipse(mask, mc, (half + 0.12 * d, 0.25 * d), ang, sub)
        return mask.astype(np.float32)
    regions = _mesh_regions()
    d = float(np.linalg.norm(pts[468 if len(pts) > 468 else 33] - pts[473 if len(pts) > 468
                                                                        else 263]))
    for idx in regions.values():
        hull = cv2.convexHull(np.round(pts[list(idx)] * sub).astype(np.int32))
        cv2.fillConvexPoly(mask, hull, 1, lineType=cv2.LINE_8, shift=4)
    r = max(1, int(round(margin * d)))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    return cv2.dilate(mask, kernel).astype(np.float32)


def mcnet_input(u: np.ndarray, v: np.ndarray, landmarks: np.ndarray, alpha: float = 2.0,
                size: int = 224, frame_size: float | None = None, local_weight: float = 1.0,
                saturation_quantile: float = 0.99, scheme: str = "middlebury",
                use_omam: bool = True, use_oaum: bool = True) -> np.ndarray:
    """MCNet's input image: global magnified flow integrated with the flow of the AU regions.

    u, v: (H, W) onset→apex flow (pixels, or :func:`uv_from_3db_map` units); landmarks in the
    (H, W) frame (``frame_size`` defaults to W; the flow must be square). Steps:

    1. OMAM (``use_omam``): :func:`magnify_flow` with ``alpha``, soft-limited at the
       ``saturation_quantile`` of the original magnitudes (so the weakest motions gain up to
       (1 + α)× relative to the strongest, which saturate).
    2. OAUM (``use_oaum``): local flow = magnified flow × :func:`au_region_mask` (eyes+brows,
       nose, mouth); integrated by addition, flow' = global + ``local_weight`` · local.
    3. :func:`colour_coded_flow` at ``size`` (max-normalised).

    Returns (size, size, 3) uint8 RGB; the network normalises it to [0, 1].
    """
    u, v = _check_uv(u, v)
    if u.shape[0] != u.shape[1]:
        raise ValueError(f"mcnet_input expects a square flow field, got {u.shape}")
    if use_omam:
        mag = np.sqrt(u * u + v * v)
        lim = float(np.quantile(mag, saturation_quantile))
        u, v = magnify_flow(u, v, alpha, limit=lim if lim > 0 else None)
    if use_oaum:
        mask = au_region_mask(landmarks, u.shape[0], frame_size=frame_size or u.shape[0])
        u = u * (1.0 + local_weight * mask)
        v = v * (1.0 + local_weight * mask)
    return colour_coded_flow(u, v, size=size, scheme=scheme)


def five_region_windows(landmarks5: np.ndarray, map_size: int = 28
                        ) -> list[tuple[str, tuple[int, int, int, int], tuple[int, int, int, int]]]:
    """Where :func:`five_region_crop` takes each region from and puts it.

    Returns [(name, (y0, y1, x0, x1) in the source map, (y0, y1, x0, x1) on the canvas)] for
    left eye, right eye, left mouth corner, nose, right mouth corner. Layout on the
    ``map_size``² canvas (28: top row two 14×14 eye windows; bottom row 14×9 left mouth,
    14×10 nose, 14×9 right mouth): eyes and brows above, nose between the mouth corners below,
    pixels copied at native scale (no interpolation). Source windows are centred on the
    landmark and shifted to lie inside the map.
    """
    pts = _check_points(landmarks5)
    if pts.shape[0] != 5:
        raise ValueError(f"five_region_crop needs the 5 landmarks, got {pts.shape}")
    s = int(map_size)
    half = s // 2
    side = (s * 9) // 28
    mid = s - 2 * side
    layout = [  # name, landmark index, height, width, canvas y0, canvas x0
        ("eye_left", 0, half, half, 0, 0),
        ("eye_right", 1, half, s - half, 0, half),
        ("mouth_left", 3, s - half, side, half, 0),
        ("nose", 2, s - half, mid, half, side),
        ("mouth_right", 4, s - half, side, half, side + mid),
    ]
    out = []
    for name, k, h, w, cy, cx in layout:
        x, y = pts[k]
        y0 = int(np.clip(int(round(y - h / 2)), 0, s - h))
        x0 = int(np.clip(int(round(x - w / 2)), 0, s - w))
        out.append((name, (y0, y0 + h, x0, x0 + w), (cy, cy + h, cx, cx + w)))
    return out


def five_region_crop(map28: np.ndarray, landmarks5: np.ndarray) -> np.ndarray:
    """AHMSA-Net's five-region recombination of a (u, v, strain) map.

    map28: (S, S, C) map (28×28×3 for the 3DB maps, any dtype); landmarks5: (5, 2) (x, y) in the
    map's pixel frame (``landmarks5.csv`` gives them for every 3DB sample in 28×28 coordinates).
    The left eye, right eye, nose and the two mouth corners (located by MediaPipe on the apex
    frame in the paper) are cropped and recombined into one S×S map, layout in
    :func:`five_region_windows`. Returns (S, S, C), same dtype and value range as the input.
    """
    m = np.asarray(map28)
    if m.ndim != 3 or m.shape[0] != m.shape[1]:
        raise ValueError(f"map must be (S, S, C), got {m.shape}")
    canvas = np.empty_like(m)
    for _, (y0, y1, x0, x1), (cy0, cy1, cx0, cx1) in five_region_windows(landmarks5, m.shape[0]):
        canvas[cy0:cy1, cx0:cx1] = m[y0:y1, x0:x1]
    return canvas


def flow_stack(frames: Sequence[np.ndarray], n: int = 16, size: int = 134,
               flow: str | object = "opencv-tvl1", reference: str = "first") -> np.ndarray:
    """The multi-scale 3D-ResNet50's flow sequence from raw (aligned face) frames.

    frames: T >= 2 images, (H, W) grey or (H, W, 3) BGR, uint8; each is resized to
    ``size``×``size``. ``n`` target frames are sampled uniformly in index over frames[1:]
    (repeated when T − 1 < n). ``reference="first"``: flow from frame 0 (the onset) to each
    target, so the stack shows the expression building up; ``"consecutive"``: flow between
    successive sampled frames. ``flow`` is a :func:`realtime_mer.flow.create_flow` name or a
    ``FlowEstimator``.

    Returns (n, size, size, 3) float32: u, v in pixels of the resized frame, and optical strain
    |ε| (dimensionless). :func:`clip_layout` turns it into the network's (C, T, H, W).
    """
    from realtime_mer.features import to_grey  # only here: it brings the flow stage
    from realtime_mer.flow import create_flow, optical_strain

    if len(frames) < 2:
        raise ValueError(f"need at least 2 frames, got {len(frames)}")
    if n < 1 or size < 8:
        raise ValueError(f"n must be >= 1 and size >= 8, got n={n}, size={size}")
    if reference not in ("first", "consecutive"):
        raise ValueError(f"reference must be 'first' or 'consecutive', got {reference!r}")
    estimator = create_flow(flow) if isinstance(flow, str) else flow
    t = len(frames)
    targets = np.round(np.linspace(1, t - 1, n)).astype(int)
    if reference == "first":
        sources = np.zeros(n, dtype=int)
    else:
        sources = np.concatenate([[0], targets[:-1]])
    cache: dict[int, np.ndarray] = {}

    def get(i: int) -> np.ndarray:
        if i not in cache:
            cache[i] = cv2.resize(to_grey(frames[i], "frame"), (size, size), interpolation=cv2.INTER_AREA)
        return cache[i]

    # Short clips repeat targets: each distinct (source, target) pair is computed once.
    pairs, where = np.unique(np.stack([sources, targets], 1), axis=0, return_inverse=True)
    prev = np.stack([get(int(a)) for a, _ in pairs])
    nxt = np.stack([get(int(b)) for _, b in pairs])
    uv = estimator.compute_batch(prev, nxt).astype(np.float32)
    strain = np.stack([optical_strain(f) for f in uv])[..., None].astype(np.float32)
    return np.concatenate([uv, strain], axis=-1)[np.asarray(where).reshape(-1)]


def clip_layout(stack: np.ndarray) -> np.ndarray:
    """(T, H, W, C) flow stack → (C, T, H, W) float32, the layout of one 3D-network sample."""
    stack = np.asarray(stack, dtype=np.float32)
    if stack.ndim != 4:
        raise ValueError(f"expected (T, H, W, C), got {stack.shape}")
    return np.ascontiguousarray(stack.transpose(3, 0, 1, 2))


def uv_from_3db_map(map28: np.ndarray, zero: str = "median") -> tuple[np.ndarray, np.ndarray]:
    """Signed (u, v) from a published 3DB map, up to the map's lost scale.

    map28: (H, W, 3) float in [0, 1], channels (u, v, strain) as :func:`features.load_3db_map`
    returns them; each of u and v was min-max normalised on its own, u_n = (u − min u) / (max u −
    min u). The zero level is estimated as the channel's median (``zero="median"``, most of a
    face does not move between onset and apex) or mean (``"mean"``). Returns (u', v') float32,
    u' = u_n − median(u_n), in units of the channel's original range.

    What is lost, and cannot be recovered: the pixel scale (max − min) of each channel, hence
    absolute magnitudes in pixels; the ratio between the u and v scales, so directions are
    distorted by an unknown per-map anisotropic stretch; the true zero (the median is an
    estimate, wrong when most of the map moves); and detail below 1/255 of the range (8-bit PNG).
    """
    m = np.asarray(map28, dtype=np.float32)
    if m.ndim != 3 or m.shape[2] < 2:
        raise ValueError(f"map must be (H, W, >=2) with channels (u, v, ...), got {m.shape}")
    if zero not in ("median", "mean"):
        raise ValueError(f"zero must be 'median' or 'mean', got {zero!r}")
    out = []
    for c in (0, 1):
        ch = m[..., c]
        ref = float(np.median(ch)) if zero == "median" else float(ch.mean())
        out.append((ch - ref).astype(np.float32))
    return out[0], out[1]


@dataclass(frozen=True)
class InputKind:
    """One way of feeding a network from the (u, v, strain) maps that both the 3DB files and
    the live pipeline produce. ``keeps_map_size``: its input has the maps' own shape (else an
    image of ``size`` x ``size``, by default ``default_size``); ``uses_landmarks``: it is built
    from the face's five landmarks; ``options``: the switches it accepts, with their defaults.
    Training and the runtime both build inputs through :func:`network_inputs`, by name, so an
    engine's manifest names its kind and the runtime asks that object."""

    name: str
    keeps_map_size: bool
    uses_landmarks: bool = False
    default_size: int | None = None
    options: Mapping[str, bool | float] = field(default_factory=dict)

    @property
    def is_identity(self) -> bool:
        """The maps are fed as they are (nothing to build)."""
        return self.name == "map28"


#: The registered kinds: the maps themselves, AHMSA-Net's five-region recombination of them,
#: the colour-coded flow image (MJFN), and MCNet's magnified, AU-weighted colour image.
INPUT_KINDS: dict[str, InputKind] = {kind.name: kind for kind in (
    InputKind("map28", keeps_map_size=True),
    InputKind("regions5", keeps_map_size=True, uses_landmarks=True),
    InputKind("colour", keeps_map_size=False, default_size=224),
    InputKind("mcnet", keeps_map_size=False, uses_landmarks=True, default_size=224,
              options={"use_omam": True, "use_oaum": True, "alpha": 2.0}),
)}
# Names for callers that only need the names.
NETWORK_INPUT_KINDS = tuple(INPUT_KINDS)
LANDMARK_KINDS = tuple(name for name, kind in INPUT_KINDS.items() if kind.uses_landmarks)
INPUT_OPTIONS = {name: dict(kind.options) for name, kind in INPUT_KINDS.items()}


def input_kind(name: str) -> InputKind:
    """The registered kind ``name``; ValueError naming the known ones."""
    try:
        return INPUT_KINDS[name]
    except KeyError:
        raise ValueError(f"unknown input kind {name!r}; known: "
                         f"{', '.join(INPUT_KINDS)}") from None


def check_input_options(kind: str, options: dict | None) -> dict:
    """``options`` for input kind ``kind`` merged over its defaults; ValueError for an unknown
    kind or option, or a value of the wrong type (a JSON ``"false"`` string would otherwise
    read as True and silently turn an ablation into the full model)."""
    defaults = dict(input_kind(kind).options)
    unknown = sorted(set(options or {}) - set(defaults))
    if unknown:
        raise ValueError(f"input kind {kind!r} has no option(s) {unknown}; known: "
                         f"{sorted(defaults) or 'none'}")
    for name, value in (options or {}).items():
        want = defaults[name]
        if isinstance(want, bool):
            ok = isinstance(value, bool)
        else:  # a number: int or float, but not a bool
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok:
            raise ValueError(f"input option {name!r} of kind {kind!r} must be a "
                             f"{'true/false' if isinstance(want, bool) else 'number'}, got "
                             f"{value!r}")
    return {**defaults, **(options or {})}


# Mirroring a face swaps its left and right points: eyes (0, 1) and mouth corners (3, 4).
_MIRROR_ORDER = (1, 0, 2, 4, 3)


def hflip_landmarks(landmarks: np.ndarray, size: float) -> np.ndarray:
    """Five-point landmarks of the left-right mirrored map.

    landmarks: (N, 5, 2) or (5, 2) (x, y) in the "normalised × size" frame of
    ``landmarks5.csv`` (0 = left edge, ``size`` = right edge); x → size − x, and the image-left
    and image-right points trade places so the order stays (left eye, right eye, nose, left
    mouth corner, right mouth corner). NaN rows stay NaN.
    """
    pts = np.array(landmarks, dtype=np.float64, copy=True)
    if pts.shape[-2:] != (5, 2):
        raise ValueError(f"landmarks must be (..., 5, 2), got {pts.shape}")
    pts[..., 0] = float(size) - pts[..., 0]
    return pts[..., list(_MIRROR_ORDER), :]


def _landmarks_for(landmarks: np.ndarray | None, n: int, size: int) -> np.ndarray:
    """(N, 5, 2) landmarks for a batch of ``size``×``size`` maps; None, or a row holding NaN
    (no face found on the apex frame), gives the aligned-face template: the live pipeline's
    crops are aligned to it, and it is the 3DB landmarks' median."""
    from realtime_mer.face import CANONICAL_POINTS_28

    template = CANONICAL_POINTS_28 * (size / 28.0)
    if landmarks is None:
        return np.broadcast_to(template, (n, 5, 2)).copy()
    pts = np.asarray(landmarks, dtype=np.float64)
    if pts.shape != (n, 5, 2):
        raise ValueError(f"landmarks must be (N, 5, 2) = ({n}, 5, 2) for {n} maps, got "
                         f"{pts.shape}")
    missing = ~np.isfinite(pts).all(axis=(1, 2))
    if missing.any():
        pts = pts.copy()
        pts[missing] = template
    return pts


def network_inputs(maps: np.ndarray, kind: str = "map28", size: int | None = None,
                   landmarks: np.ndarray | None = None, options: dict | None = None
                   ) -> np.ndarray:
    """Turn a batch of (N, 3, H, W) (u, v, strain) maps in [0, 1] into network inputs.

    - ``"map28"``: the maps, unchanged (``size`` must be None or H); also (N, 6, H, W), the
      onset→apex and apex→offset maps of each movement stacked.
    - ``"regions5"``: AHMSA-Net's :func:`five_region_crop` of each map (same shape).
    - ``"colour"``: per map, signed (u, v) by :func:`uv_from_3db_map`, then
      :func:`colour_coded_flow` at ``size``×``size`` (default 224), scaled to [0, 1].
    - ``"mcnet"``: per map, signed (u, v), then :func:`mcnet_input` (OMAM magnification and
      OAUM region weighting, switched by ``options`` ``use_omam``/``use_oaum``, gain
      ``alpha``) at ``size``×``size`` (default 224), scaled to [0, 1].

    landmarks: (N, 5, 2) five points per map (:func:`au_region_mask` order) in the map's
    "normalised × H" frame, for the kinds in :data:`LANDMARK_KINDS`; None or a NaN row means
    the aligned-face template (``face.CANONICAL_POINTS_28``). Returns float32, (N, 3, H, W) or
    (N, 3, size, size). Training (the LOSO runner, export) and the runtime both call this, so
    an engine is fed at run time exactly what it was trained on.
    """
    x = np.asarray(maps, dtype=np.float32)
    spec = input_kind(kind)
    phases = x.shape[1] // 3 if x.ndim == 4 and x.shape[1] % 3 == 0 else 0
    if x.ndim != 4 or not phases or (phases > 1 and not spec.is_identity):
        raise ValueError(f"maps must be (N, 3, H, W) (map28 also takes two phases' maps, "
                         f"(N, 6, H, W)), got {x.shape} for input kind {kind!r}")
    opts = check_input_options(kind, options)
    if spec.keeps_map_size:
        if size is not None and size != x.shape[-1]:
            raise ValueError(f"input kind {kind!r} keeps the maps' size {x.shape[-1]}; got "
                             f"size={size}")
        if spec.is_identity:
            return x
        pts = _landmarks_for(landmarks, x.shape[0], x.shape[-1])
        return np.stack([np.moveaxis(five_region_crop(np.moveaxis(m, 0, -1), p), -1, 0)
                         for m, p in zip(x, pts)]).astype(np.float32, copy=False)
    size = spec.default_size if size is None else int(size)
    out = np.empty((x.shape[0], 3, size, size), np.float32)
    pts = _landmarks_for(landmarks, x.shape[0], x.shape[-1]) if spec.uses_landmarks else None
    for i, m in enumerate(x):
        u, v = uv_from_3db_map(np.moveaxis(m, 0, -1))
        if kind == "colour":
            img = colour_coded_flow(u, v, size)
        else:
            img = mcnet_input(u, v, pts[i], alpha=float(opts["alpha"]), size=size,
                              frame_size=float(x.shape[-1]), use_omam=bool(opts["use_omam"]),
                              use_oaum=bool(opts["use_oaum"]))
        out[i] = np.moveaxis(img, -1, 0) / np.float32(255.0)
    return out
