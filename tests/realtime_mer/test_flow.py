"""Flow stage: input checks, strain against analytic fields, and recovery of a known sub-pixel
translation of a real face crop."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from realtime_mer.flow import (
    DISFlow, FarnebackFlow, FlowEstimator, OpenCVTVL1, TVL1Options, check_pair, create_flow, optical_strain,
)

# Mean end-point error (px) allowed in the interior when recovering a uniform sub-pixel shift.
# TV-L1 measures ~0.02 px here; DIS (patch-based, coarse-to-fine, no global regularity) ~0.06.
TVL1_EPE_TOL = 0.1
DIS_EPE_TOL = 0.15
STRAIN_TOL = 1e-5
SHIFT = (0.7, -0.4)  # (dx, dy) in px: right and up


def _grey(h: int = 32, w: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)


# --- check_pair: error paths -----------------------------------------------------------------

def test_check_pair_returns_float32_copies_of_valid_pair():
    a, b = check_pair(_grey(), _grey(seed=1))
    assert a.dtype == np.float32 and b.dtype == np.float32
    assert a.shape == (32, 40)


def test_check_pair_rejects_colour():
    colour = np.zeros((32, 40, 3), np.uint8)
    with pytest.raises(ValueError, match="greyscale"):
        check_pair(colour, colour)


def test_check_pair_rejects_size_mismatch():
    with pytest.raises(ValueError, match="differ in size"):
        check_pair(_grey(32, 40), _grey(40, 32))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_check_pair_rejects_non_finite(bad):
    a = _grey().astype(np.float32)
    b = a.copy()
    b[3, 4] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        check_pair(a, b)


def test_check_pair_rejects_empty():
    empty = np.zeros((0, 10), np.uint8)
    with pytest.raises(ValueError, match="empty"):
        check_pair(empty, empty)


# --- optical_strain against analytic flow fields ---------------------------------------------

def _grid(h: int = 24, w: int = 30) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    return x, y


@pytest.mark.parametrize("a,b", [(0.3, -0.2), (0.05, 0.05), (-1.5, 0.0)])
def test_strain_of_pure_normal_strain(a, b):
    x, y = _grid()
    strain = optical_strain(np.stack([a * x, b * y], axis=-1))
    assert strain.dtype == np.float32 and strain.shape == x.shape
    # np.gradient is exact on linear fields, borders included (one-sided differences)
    np.testing.assert_allclose(strain[1:-1, 1:-1], np.hypot(a, b), atol=STRAIN_TOL)


def test_strain_of_simple_shear():
    c = 0.2
    x, y = _grid()
    strain = optical_strain(np.stack([c * y, np.zeros_like(x)], axis=-1))
    np.testing.assert_allclose(strain[1:-1, 1:-1], np.sqrt(0.5) * c, atol=STRAIN_TOL)


def test_rigid_rotation_and_translation_have_no_strain():
    w = 0.1
    x, y = _grid()
    flow = np.stack([-w * y + 2.5, w * x - 1.0], axis=-1)
    np.testing.assert_allclose(optical_strain(flow)[1:-1, 1:-1], 0.0, atol=STRAIN_TOL)


@pytest.mark.parametrize("shape", [(8, 8), (8, 8, 3), (8, 8, 1)])
def test_strain_rejects_bad_shape(shape):
    with pytest.raises(ValueError, match=r"\(H, W, 2\)"):
        optical_strain(np.zeros(shape, np.float32))


# --- estimators -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shifted_face(media_dir):
    """A 128×128 crop of a real CASME II face and the same crop moved by SHIFT px."""
    path = media_dir / "casme2_frames" / "001.jpg"
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    assert image is not None, f"cannot read {path}"
    h, w = image.shape
    move = np.float32([[1, 0, SHIFT[0]], [0, 1, SHIFT[1]]])
    # warpAffine maps dst(x) = src(x - shift), so prev(x) = nxt(x + shift): flow == SHIFT
    moved = cv2.warpAffine(image, move, (w, h), flags=cv2.INTER_CUBIC,
                           borderMode=cv2.BORDER_REFLECT)
    crop = (slice(110, 238), slice(76, 204))  # eyes, nose and mouth; away from the borders
    return image[crop], moved[crop]


def _interior_epe(flow: np.ndarray, margin: int = 12) -> float:
    inner = flow[margin:-margin, margin:-margin]
    return float(np.hypot(inner[..., 0] - SHIFT[0], inner[..., 1] - SHIFT[1]).mean())


def test_tvl1_recovers_subpixel_translation(shifted_face):
    prev, nxt = shifted_face
    flow = OpenCVTVL1().compute(prev, nxt)
    assert flow.shape == prev.shape + (2,) and flow.dtype == np.float32
    assert _interior_epe(flow) < TVL1_EPE_TOL


def test_dis_recovers_subpixel_translation(shifted_face):
    prev, nxt = shifted_face
    flow = DISFlow("medium").compute(prev, nxt)
    assert flow.shape == prev.shape + (2,) and flow.dtype == np.float32
    assert _interior_epe(flow) < DIS_EPE_TOL


def test_tvl1_accepts_float_input_like_uint8():
    a = cv2.GaussianBlur(_grey(48, 48), (0, 0), 2)
    b = np.roll(a, 1, axis=1)
    tvl1 = OpenCVTVL1(TVL1Options(nscales=2, warps=2))
    np.testing.assert_allclose(tvl1.compute(a.astype(np.float32), b.astype(np.float32)),
                               tvl1.compute(a, b), atol=1e-6)


@pytest.mark.parametrize("estimator", [DISFlow("ultrafast"), OpenCVTVL1(TVL1Options(nscales=1))],
                         ids=["dis", "tvl1"])
def test_compute_batch_is_compute_per_pair(estimator):
    """Offline spotting uses compute_batch; it must give each pair's own compute()."""
    prev = np.stack([_grey(24, 20, s) for s in range(2)])
    nxt = np.stack([_grey(24, 20, s + 5) for s in range(2)])
    batch = estimator.compute_batch(prev, nxt)
    assert batch.shape == (2, 24, 20, 2)
    for k in range(2):
        np.testing.assert_allclose(batch[k], estimator.compute(prev[k], nxt[k]), atol=1e-6)
    assert not np.allclose(batch[0], batch[1])  # different pairs, different flows
    assert estimator.compute_batch(prev[:0], nxt[:0]).shape == (0, 24, 20, 2)


def test_estimators_reject_colour_pairs():
    colour = np.zeros((16, 16, 3), np.uint8)
    for estimator in (DISFlow("ultrafast"), OpenCVTVL1(TVL1Options(nscales=1))):
        with pytest.raises(ValueError, match="greyscale"):
            estimator.compute(colour, colour)


def test_create_flow_names():
    assert isinstance(create_flow("auto"), OpenCVTVL1)
    tvl1 = create_flow("opencv-tvl1", options=TVL1Options(lambda_=0.3))
    assert isinstance(tvl1, OpenCVTVL1) and tvl1.options.lambda_ == 0.3
    dis = create_flow("dis", preset="fast")
    assert isinstance(dis, DISFlow) and dis.preset == "fast"
    for estimator in (tvl1, dis):
        assert isinstance(estimator, FlowEstimator)
    farneback = create_flow("farneback", winsize=13)
    assert isinstance(farneback, FarnebackFlow) and isinstance(farneback, FlowEstimator)
    with pytest.raises(ValueError, match="unknown flow"):
        create_flow("lucas-kanade")


def test_dis_rejects_unknown_preset():
    with pytest.raises(ValueError, match="unknown DIS preset"):
        DISFlow("slowest")


def test_farneback_keeps_a_local_movements_size_where_dis_loses_it(media_dir):
    """The spotter's flow must measure a small local movement at its size: a 1.7 px bump (σ
    5.7 px, a mouth corner moving out and up) on a real face crop comes back at >= 75 % of its
    size from Farnebäck and 70 % from TV-L1, where DIS (built for large motion) returns under
    half (measured 0.95, 0.75, 0.41)."""
    image = cv2.imread(str(media_dir / "calibration" / "s03_s03_po_11_onset.png"),
                       cv2.IMREAD_GRAYSCALE)
    crop = cv2.resize(image, (128, 128), interpolation=cv2.INTER_AREA)
    ys, xs = np.mgrid[0:128, 0:128].astype(np.float32)
    cx, cy = 40.0, 92.0
    bump = np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * 5.7 ** 2))
    dx, dy = -0.6 * 1.7 * bump, -0.8 * 1.7 * bump
    moved = cv2.remap(crop, xs - dx, ys - dy, cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE)
    recovered = {}
    for estimator in (FarnebackFlow(), OpenCVTVL1(), DISFlow("medium")):
        flow = estimator.compute(crop, moved)
        recovered[estimator.name] = float(np.hypot(*flow[int(cy), int(cx)])) / 1.7
    print({k: round(v, 2) for k, v in recovered.items()})
    assert recovered["farneback"] >= 0.75 and recovered["opencv-tvl1"] >= 0.70
    assert recovered["dis"] < 0.5
