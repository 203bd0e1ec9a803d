"""Input builders of the papers' networks (realtime_mer.input_kinds): shapes, value ranges,
invertibility of the colour coding for direction, the AU mask and five-region crop on the real
3DB landmarks, the flow stack on real CASME II frames."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest

from realtime_mer import input_kinds as ik

LANDMARK_KEYS = ("eye_image_left", "eye_image_right", "nose_tip", "mouth_image_left",
                 "mouth_image_right")


def _radial_field(n: int = 64) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    return xx - (n - 1) / 2, yy - (n - 1) / 2


def _angle_error_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.degrees(np.abs(np.angle(np.exp(1j * (a - b)))))


def _read_3db(megc_dir: Path, name: str) -> np.ndarray:
    bgr = cv2.imread(str(megc_dir / "flow" / f"{name}.png"))
    assert bgr is not None, name
    return bgr[..., ::-1].astype(np.float32) / 255.0  # (u, v, strain), as load_3db_map


def _landmarks(megc_dir: Path, limit: int | None = None) -> list[tuple[str, np.ndarray]]:
    with open(megc_dir / "landmarks5.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["found"] == "1"]
    out = [(f"{r['subject']}_{r['video']}",
            np.array([[float(r[k + "_x"]), float(r[k + "_y"])] for k in LANDMARK_KEYS]))
           for r in rows]
    return out[:limit] if limit else out


# ---- colour coding -------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["middlebury", "hsv"])
def test_colour_coding_shape_dtype_and_direction_is_invertible(scheme):
    u, v = _radial_field(64)
    img = ik.colour_coded_flow(u, v, size=None, scheme=scheme)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    theta = ik.flow_direction_from_colour(img, scheme)
    mag = np.hypot(u, v) / np.hypot(u, v).max()
    err = _angle_error_deg(theta, np.arctan2(v, u))
    # 8-bit quantisation: the weaker the motion, the fewer colour levels encode its direction.
    assert err[mag > 0.2].max() < 2.0
    assert err[mag > 0.5].max() < 1.0


@pytest.mark.parametrize("scheme", ["middlebury", "hsv"])
def test_colour_coding_resizes_and_keeps_direction(scheme):
    u, v = _radial_field(28)
    img = ik.colour_coded_flow(u, v, size=224, scheme=scheme)
    assert img.shape == (224, 224, 3)
    big_u, big_v = (c[::4, ::4] for c in _radial_field(224))  # every 4th pixel: fast enough
    mag = np.hypot(big_u, big_v) / np.hypot(big_u, big_v).max()
    err = _angle_error_deg(ik.flow_direction_from_colour(img[::4, ::4], scheme),
                           np.arctan2(big_v, big_u))
    assert np.median(err[mag > 0.3]) < 2.0


def test_colour_coding_magnitude_channels():
    u = np.zeros((8, 8), np.float32)
    v = np.zeros((8, 8), np.float32)
    u[4, 4] = 1.0  # one pixel moving right, the rest still
    mb = ik.colour_coded_flow(u, v, size=None, scheme="middlebury")
    hsv = ik.colour_coded_flow(u, v, size=None, scheme="hsv")
    assert (mb[0, 0] == 255).all()          # no motion: white (saturation = magnitude)
    assert (hsv[0, 0] == 0).all()           # no motion: black (value = magnitude)
    assert mb[4, 4].min() == 0 and mb[4, 4].max() == 255   # full magnitude: saturated colour
    assert hsv[4, 4].max() == 255
    # All-zero flow is defined (all white), not a division by zero.
    assert (ik.colour_coded_flow(v, v, size=None) == 255).all()
    # A fixed max_magnitude halves the saturation of a motion of half that size.
    half = ik.colour_coded_flow(u, v, size=None, max_magnitude=2.0)
    assert 120 <= int(half[4, 4].min()) <= 135


def test_colour_wheel_has_mjfn_hue_count():
    wheel = ik.colour_wheel()
    assert ik.MIDDLEBURY_NCOLS == 55 and wheel.shape == (55, 3)
    assert wheel.min() >= 0 and wheel.max() <= 1


def test_colour_coding_rejects_bad_input():
    with pytest.raises(ValueError):
        ik.colour_coded_flow(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(ValueError):
        ik.colour_coded_flow(np.full((4, 4), np.nan), np.zeros((4, 4)))
    with pytest.raises(ValueError):
        ik.colour_coded_flow(np.zeros((4, 4)), np.zeros((4, 4)), scheme="rainbow")


# ---- magnification -------------------------------------------------------------------------

def test_magnify_flow_linear_and_saturating():
    u, v = _radial_field(16)
    mu, mv = ik.magnify_flow(u, v, alpha=3.0)
    np.testing.assert_allclose(mu, 4.0 * u, rtol=1e-6)
    np.testing.assert_allclose(mv, 4.0 * v, rtol=1e-6)
    su, sv = ik.magnify_flow(u, v, alpha=3.0, limit=5.0)
    mag, smag = np.hypot(u, v), np.hypot(su, sv)
    assert smag.max() < 5.0
    moving = mag > 0
    assert _angle_error_deg(np.arctan2(sv, su), np.arctan2(v, u))[moving].max() < 1e-3
    # small motions get (almost) the full gain, large ones are compressed
    small = (mag > 0) & (mag < 0.8)
    assert np.allclose(smag[small] / mag[small], 4.0, rtol=0.1)
    with pytest.raises(ValueError):
        ik.magnify_flow(u, v, alpha=-1.0)


def test_magnify_frame_scales_the_measured_flow():
    rng = np.random.default_rng(0)
    texture = cv2.GaussianBlur(rng.uniform(0, 255, (96, 96)).astype(np.float32), (0, 0), 2.0)
    shift = 0.4  # px to the right: apex(x + d) = onset(x)
    apex = cv2.warpAffine(texture, np.float32([[1, 0, shift], [0, 1, 0]]), (96, 96),
                          borderMode=cv2.BORDER_REFLECT)
    u = np.full((96, 96), shift, np.float32)
    v = np.zeros((96, 96), np.float32)
    magnified = ik.magnify_frame(texture, u, v, alpha=4.0)
    assert magnified.shape == texture.shape and magnified.dtype == texture.dtype
    flow = cv2.optflow.DualTVL1OpticalFlow_create().calc(
        np.clip(texture, 0, 255).astype(np.uint8), np.clip(magnified, 0, 255).astype(np.uint8),
        None)
    inner = flow[16:-16, 16:-16]
    assert abs(float(np.median(inner[..., 0])) - 5 * shift) < 0.25
    assert abs(float(np.median(inner[..., 1]))) < 0.1
    base = cv2.optflow.DualTVL1OpticalFlow_create().calc(
        np.clip(texture, 0, 255).astype(np.uint8), np.clip(apex, 0, 255).astype(np.uint8), None)
    assert float(np.median(inner[..., 0])) > 3 * float(np.median(base[16:-16, 16:-16, 0]))


# ---- AU mask ---------------------------------------------------------------------------------

def test_au_region_mask_covers_landmark_regions_on_3db(megc_dir):
    for name, lm in _landmarks(megc_dir):
        mask = ik.au_region_mask(lm, 28)
        assert mask.shape == (28, 28) and mask.dtype == np.float32
        assert set(np.unique(mask)) <= {0.0, 1.0}
        for x, y in lm:
            assert mask[int(round(min(y, 27))), int(round(min(x, 27)))] == 1, name
        d = np.linalg.norm(lm[1] - lm[0])
        for x, y in lm[:2]:  # the brow, above each eye
            yb = int(round(y - 0.3 * d))
            if yb >= 0:
                assert mask[yb, int(round(x))] == 1, name
        # between eyes and mouth, outside the nose: the cheeks stay unmasked
        cheek_y = int(round((lm[0, 1] + lm[3, 1]) / 2 + 2))
        assert mask[cheek_y, 0] == 0 and mask[cheek_y, 27] == 0, name
        assert 0.2 < mask.mean() < 0.65, (name, mask.mean())


def test_au_region_mask_rescales_landmarks(megc_dir):
    _, lm = _landmarks(megc_dir, limit=1)[0]
    small = ik.au_region_mask(lm, 28)
    big = ik.au_region_mask(lm, 224, frame_size=28)
    down = cv2.resize(big, (28, 28), interpolation=cv2.INTER_AREA)
    assert np.abs(down - small).mean() < 0.08
    assert big[int(lm[2, 1] * 8), int(lm[2, 0] * 8)] == 1


def test_au_region_mask_from_face_mesh(media_dir):
    mp = pytest.importorskip("mediapipe")
    image = cv2.imread(str(media_dir / "single_face.jpg"))
    assert image is not None
    with mp.solutions.face_mesh.FaceMesh(static_image_mode=True, refine_landmarks=True,
                                         max_num_faces=1) as mesh:
        result = mesh.process(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
    assert result.multi_face_landmarks, "no face found in single_face.jpg"
    h, w = image.shape[:2]
    pts = np.array([[p.x * w, p.y * h] for p in result.multi_face_landmarks[0].landmark])
    # a square frame around the face, as the aligned crops are
    x0, y0 = pts.min(0)
    side = float((pts.max(0) - pts.min(0)).max())
    local = (pts - [x0, y0]) * (128.0 / side)
    mask = ik.au_region_mask(local, 128)
    for idx in (468, 473, 1, 61, 291, 13, 14, 105, 334):  # irises, nose, mouth, lips, brows
        x, y = np.clip(np.round(local[idx]).astype(int), 0, 127)
        assert mask[y, x] == 1, idx
    assert 0.1 < mask.mean() < 0.6
    assert mask[int(local[234, 1]), max(int(local[234, 0]) - 1, 0)] == 0  # face-oval edge


def test_au_region_mask_rejects_bad_landmarks():
    with pytest.raises(ValueError):
        ik.au_region_mask(np.zeros((4, 2)), 28)
    with pytest.raises(ValueError):
        ik.au_region_mask(np.full((5, 2), np.nan), 28)


def test_mcnet_input_on_3db_map(megc_dir):
    name, lm = _landmarks(megc_dir, limit=1)[0]
    u, v = ik.uv_from_3db_map(_read_3db(megc_dir, name))
    img = ik.mcnet_input(u, v, lm, alpha=2.0)
    assert img.shape == (224, 224, 3) and img.dtype == np.uint8
    plain = ik.mcnet_input(u, v, lm, use_omam=False, use_oaum=False)
    np.testing.assert_array_equal(plain, ik.colour_coded_flow(u, v, 224))
    # uniform motion: AU regions come out more saturated than the rest
    ones = np.ones((28, 28), np.float32)
    img = ik.mcnet_input(ones, 0 * ones, lm, use_omam=False)
    mask = ik.au_region_mask(lm, 224, frame_size=28) > 0
    whiteness = img.astype(np.float32).min(axis=2)
    assert whiteness[mask].mean() + 50 < whiteness[~mask].mean()


# ---- five-region crop ------------------------------------------------------------------------

def test_five_region_crop_on_3db(megc_dir):
    for name, lm in _landmarks(megc_dir, limit=40):
        m = _read_3db(megc_dir, name)
        out = ik.five_region_crop(m, lm)
        assert out.shape == (28, 28, 3) and out.dtype == m.dtype
        assert 0.0 <= out.min() and out.max() <= 1.0
        windows = ik.five_region_windows(lm)
        covered = np.zeros((28, 28), int)
        for (rname, (y0, y1, x0, x1), (cy0, cy1, cx0, cx1)), (x, y) in zip(
                windows, lm[[0, 1, 3, 2, 4]]):
            np.testing.assert_array_equal(out[cy0:cy1, cx0:cx1], m[y0:y1, x0:x1])
            assert y0 <= y <= y1 and x0 <= x <= x1, (name, rname)  # window holds its landmark
            covered[cy0:cy1, cx0:cx1] += 1
        assert (covered == 1).all()  # the five tiles partition the canvas


def test_five_region_crop_rejects_mesh_and_bad_map():
    with pytest.raises(ValueError):
        ik.five_region_crop(np.zeros((28, 28, 3)), np.zeros((468, 2)))
    with pytest.raises(ValueError):
        ik.five_region_crop(np.zeros((28, 30, 3)), np.zeros((5, 2)))


# ---- flow stack ------------------------------------------------------------------------------

def _casme_frames(media_dir: Path) -> list[np.ndarray]:
    paths = sorted((media_dir / "casme2_frames").glob("*.jpg"))
    if not paths:
        pytest.skip("casme2_frames not present")
    return [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in paths]


def test_flow_stack_on_casme2_frames(media_dir):
    frames = _casme_frames(media_dir)
    stack = ik.flow_stack(frames, n=4, size=64)  # OpenCV TV-L1, small for speed
    assert stack.shape == (4, 64, 64, 3) and stack.dtype == np.float32
    assert np.isfinite(stack).all() and (stack[..., 2] >= 0).all()
    # frames 1..9 at 200 fps drift further and further from frame 0
    energy = np.abs(stack[..., :2]).mean(axis=(1, 2, 3))
    assert energy[-1] > energy[0]
    clip = ik.clip_layout(stack)
    assert clip.shape == (3, 4, 64, 64)
    np.testing.assert_array_equal(clip[:, 2], stack[2].transpose(2, 0, 1))


def test_flow_stack_repeats_short_clips_and_consecutive_mode(media_dir):
    frames = _casme_frames(media_dir)[:4]
    stack = ik.flow_stack(frames, n=16, size=32, flow="dis")
    assert stack.shape == (16, 32, 32, 3)
    np.testing.assert_array_equal(stack[0], stack[1])  # 3 distinct targets for 16 slots
    cons = ik.flow_stack(frames, n=3, size=32, flow="dis", reference="consecutive")
    np.testing.assert_allclose(cons[0], stack[0])  # first pair is (0, 1) in both modes
    bgr = [cv2.cvtColor(f, cv2.COLOR_GRAY2BGR) for f in frames]
    np.testing.assert_allclose(ik.flow_stack(bgr, n=2, size=32, flow="dis"),
                               ik.flow_stack(frames, n=2, size=32, flow="dis"))
    with pytest.raises(ValueError):
        ik.flow_stack(frames[:1])


# ---- 3DB maps back to signed flow ------------------------------------------------------------

def test_uv_from_3db_map_inverts_min_max_up_to_scale():
    rng = np.random.default_rng(1)
    u = rng.normal(0, 0.2, (28, 28)).astype(np.float32)
    v = rng.normal(0, 0.5, (28, 28)).astype(np.float32)
    norm = lambda c: (c - c.min()) / (c.max() - c.min())  # noqa: E731
    m = np.stack([norm(u), norm(v), np.zeros_like(u)], axis=-1)
    ru, rv = ik.uv_from_3db_map(m)
    np.testing.assert_allclose(ru, (u - np.median(u)) / (u.max() - u.min()), atol=1e-5)
    np.testing.assert_allclose(rv, (v - np.median(v)) / (v.max() - v.min()), atol=1e-5)


def test_uv_from_3db_map_on_real_maps(megc_dir):
    for name, _ in _landmarks(megc_dir, limit=20):
        u, v = ik.uv_from_3db_map(_read_3db(megc_dir, name))
        assert u.shape == v.shape == (28, 28) and u.dtype == np.float32
        assert abs(float(np.median(u))) < 1e-6 and abs(float(np.median(v))) < 1e-6
        assert -1.0 <= u.min() and u.max() <= 1.0 and u.max() - u.min() == pytest.approx(1.0)
        img = ik.colour_coded_flow(u, v, 224)
        assert img.shape == (224, 224, 3)


def _3db_batch(megc_dir: Path, limit: int = 6) -> np.ndarray:
    names = sorted(p.stem for p in (megc_dir / "flow").glob("*.png"))[:limit]
    return np.stack([np.moveaxis(_read_3db(megc_dir, n), -1, 0) for n in names])


def test_network_inputs_colour_is_the_per_map_builder(megc_dir):
    maps = _3db_batch(megc_dir)
    x = ik.network_inputs(maps, "colour", 112)
    assert x.shape == (len(maps), 3, 112, 112) and x.dtype == np.float32
    for m, xi in zip(maps, x):
        ref = ik.colour_coded_flow(*ik.uv_from_3db_map(np.moveaxis(m, 0, -1)), 112)
        np.testing.assert_allclose(np.moveaxis(xi, 0, -1) * 255.0, ref, atol=1e-3)
    np.testing.assert_array_equal(ik.network_inputs(maps, "map28"), maps)


def test_network_inputs_colour_of_a_mirrored_map_is_the_mirrored_motion(megc_dir):
    """Training mirrors the maps (u -> 1 - u) before building the input: the colour image of a
    mirrored map must show the mirrored picture with directions reflected, theta -> pi - theta."""
    maps = _3db_batch(megc_dir, limit=3)
    flipped = maps[..., ::-1].copy()
    flipped[:, 0] = 1.0 - flipped[:, 0]
    a = ik.network_inputs(maps, "colour", 112)
    b = ik.network_inputs(flipped, "colour", 112)
    for xa, xb in zip(a, b):
        img_a = np.round(np.moveaxis(xa, 0, -1) * 255).astype(np.uint8)
        img_b = np.round(np.moveaxis(xb, 0, -1) * 255).astype(np.uint8)
        np.testing.assert_array_equal(img_b.min(axis=2), img_a[:, ::-1].min(axis=2))
        moving = 255 - img_a[:, ::-1].min(axis=2) > 60  # saturated: direction well defined
        theta_a = ik.flow_direction_from_colour(img_a)[:, ::-1]
        theta_b = ik.flow_direction_from_colour(img_b)
        err = _angle_error_deg(theta_b[moving], np.pi - theta_a[moving])
        assert moving.sum() > 100 and np.median(err) < 2.0


def test_network_inputs_refuses_bad_requests():
    maps = np.zeros((2, 3, 28, 28), np.float32)
    with pytest.raises(ValueError, match="unknown input kind"):
        ik.network_inputs(maps, "stack16")
    with pytest.raises(ValueError, match="must be a true/false, got 0"):
        ik.network_inputs(maps, "mcnet", 56, options={"use_oaum": 0})
    with pytest.raises(ValueError, match="must be a number, got '2'"):
        ik.network_inputs(maps, "mcnet", 56, options={"alpha": "2"})
    with pytest.raises(ValueError, match="keeps the maps' size"):
        ik.network_inputs(maps, "map28", 112)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        ik.network_inputs(maps[0], "colour")


def _3db_batch_with_landmarks(megc_dir: Path, limit: int = 6) -> tuple[np.ndarray, np.ndarray]:
    rows = _landmarks(megc_dir, limit=limit)
    maps = np.stack([np.moveaxis(_read_3db(megc_dir, n), -1, 0) for n, _ in rows])
    return maps, np.stack([p for _, p in rows])


def test_network_inputs_landmark_kinds_are_the_per_map_builders(megc_dir):
    maps, pts = _3db_batch_with_landmarks(megc_dir)
    regions = ik.network_inputs(maps, "regions5", landmarks=pts)
    mcnet = ik.network_inputs(maps, "mcnet", 112, landmarks=pts)
    assert regions.shape == maps.shape and mcnet.shape == (len(maps), 3, 112, 112)
    for m, p, r, c in zip(maps, pts, regions, mcnet):
        hwc = np.moveaxis(m, 0, -1)
        np.testing.assert_array_equal(np.moveaxis(r, 0, -1), ik.five_region_crop(hwc, p))
        ref = ik.mcnet_input(*ik.uv_from_3db_map(hwc), p, size=112)
        np.testing.assert_allclose(np.moveaxis(c, 0, -1) * 255.0, ref, atol=1e-3)
    # Both preprocessing switches off: MCNet's input is the plain colour-coded flow.
    off = ik.network_inputs(maps, "mcnet", 112, landmarks=pts,
                            options={"use_omam": False, "use_oaum": False})
    np.testing.assert_array_equal(off, ik.network_inputs(maps, "colour", 112))
    # Each switch changes the image on its own.
    for opts in ({"use_omam": False}, {"use_oaum": False}):
        part = ik.network_inputs(maps, "mcnet", 112, landmarks=pts, options=opts)
        assert np.abs(part - mcnet).mean() > 0.005 and np.abs(part - off).mean() > 0.005


def test_network_inputs_without_landmarks_use_the_aligned_face_template(megc_dir):
    from realtime_mer.face import CANONICAL_POINTS_28

    maps, pts = _3db_batch_with_landmarks(megc_dir, limit=3)
    template = np.broadcast_to(CANONICAL_POINTS_28, pts.shape)
    for kind in ("regions5", "mcnet"):
        ref = ik.network_inputs(maps, kind, landmarks=template)
        np.testing.assert_array_equal(ik.network_inputs(maps, kind), ref)
        missing = pts.copy()
        missing[1] = np.nan  # no face found on that apex frame
        got = ik.network_inputs(maps, kind, landmarks=missing)
        np.testing.assert_array_equal(got[1], ref[1])
        np.testing.assert_array_equal(got[0], ik.network_inputs(maps[:1], kind,
                                                                landmarks=pts[:1])[0])


def test_hflip_landmarks_mirrors_the_regions(megc_dir):
    _, pts = _3db_batch_with_landmarks(megc_dir, limit=20)
    flipped = ik.hflip_landmarks(pts, 28)
    np.testing.assert_allclose(ik.hflip_landmarks(flipped, 28), pts)
    # Left stays left: the image-left eye of the mirrored face is left of its right eye.
    assert (flipped[:, 0, 0] < flipped[:, 1, 0]).all() and (flipped[:, 3, 0] < flipped[:, 4, 0]).all()
    for p, q in zip(pts, flipped):
        a = ik.au_region_mask(p, 112, frame_size=28)[:, ::-1]
        b = ik.au_region_mask(q, 112, frame_size=28)
        # x -> 28 - x is the mirror of the edge-based frame; the mask draws at x * 4 as pixel
        # index, whose mirror is 111 - 4x: the mirrored mask sits one column to the right.
        a, b = a[:, :-1], b[:, 1:]
        iou = (a * b).sum() / np.maximum(a, b).sum()
        assert iou > 0.98, iou


def test_network_inputs_refuses_bad_landmarks_and_options():
    maps = np.full((2, 3, 28, 28), 0.5, np.float32)
    with pytest.raises(ValueError, match=r"\(N, 5, 2\)"):
        ik.network_inputs(maps, "regions5", landmarks=np.zeros((1, 5, 2)))
    with pytest.raises(ValueError, match="no option"):
        ik.network_inputs(maps, "mcnet", 56, options={"gain": 3})
    with pytest.raises(ValueError, match="no option"):
        ik.network_inputs(maps, "colour", 56, options={"use_omam": False})
    with pytest.raises(ValueError, match="keeps the maps' size"):
        ik.network_inputs(maps, "regions5", 56)
    with pytest.raises(ValueError, match=r"\(\.\.\., 5, 2\)"):
        ik.hflip_landmarks(np.zeros((4, 2)), 28)
