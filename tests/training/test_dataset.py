"""3DB loader: counts on the real set; every validation error path on small fake folders."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from realtime_mer.errors import DatasetError
from training.data import load_megc3db

HEADER = "database,subject,video,label,class,flow_file\n"


def _fake(root: Path, rows: list[tuple[str, str, str, int]]) -> Path:
    (root / "flow").mkdir(parents=True)
    names = ("negative", "positive", "surprise")
    lines = [HEADER]
    rng = np.random.default_rng(0)
    for db, subj, vid, label in rows:
        rel = f"flow/{subj}_{vid}.png"
        cv2.imwrite(str(root / rel), rng.integers(0, 256, (28, 28, 3), dtype=np.uint8))
        lines.append(f"{db},{subj},{vid},{label},{names[label]},{rel}\n")
    (root / "labels.csv").write_text("".join(lines))
    return root


ROWS = [("casme2", "sub01", "a", 0), ("casme2", "sub01", "b", 1), ("smic", "s1", "c", 2),
        ("samm", "006", "d", 0)]


def test_real_counts(megc_dir):
    d = load_megc3db(megc_dir)
    assert len(d) == 442 and len(d.subject_list) == 68
    assert d.class_counts() == (250, 109, 83)
    assert d.x.shape == (442, 3, 28, 28) and d.x.dtype == np.float32
    assert 0.0 <= d.x.min() and d.x.max() <= 1.0
    assert {db: int((d.databases == db).sum()) for db in ("smic", "casme2", "samm")} == \
        {"smic": 164, "casme2": 145, "samm": 133}
    # channel order (u, v, strain): the PNG's R is u; cv2 gives BGR
    bgr = cv2.imread(d.files[0])
    np.testing.assert_allclose(d.x[0, 0], bgr[..., 2] / 255.0, atol=1e-6)
    np.testing.assert_allclose(d.x[0, 2], bgr[..., 0] / 255.0, atol=1e-6)


def test_fake_ok_and_count_check(tmp_path):
    root = _fake(tmp_path / "db", ROWS)
    with pytest.raises(DatasetError, match="published set"):
        load_megc3db(root)
    d = load_megc3db(root, check_counts=False)
    assert len(d) == 4 and d.subject_list == ["casme2/sub01", "smic/s1", "samm/006"]
    assert d.y.tolist() == [0, 1, 2, 0]


def test_missing_folder_and_labels(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_megc3db(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="labels.csv is missing"):
        load_megc3db(tmp_path / "empty")


def test_missing_image(tmp_path):
    root = _fake(tmp_path / "db", ROWS)
    (root / "flow" / "s1_c.png").unlink()
    with pytest.raises(DatasetError, match="missing"):
        load_megc3db(root, check_counts=False)


def test_unlisted_image(tmp_path):
    root = _fake(tmp_path / "db", ROWS)
    shutil.copy(root / "flow" / "s1_c.png", root / "flow" / "extra.png")
    with pytest.raises(DatasetError, match="no row"):
        load_megc3db(root, check_counts=False)


def test_unreadable_image(tmp_path):
    root = _fake(tmp_path / "db", ROWS)
    (root / "flow" / "s1_c.png").write_bytes(b"not a png at all")
    with pytest.raises(DatasetError, match="s1_c.png"):
        load_megc3db(root, check_counts=False)


@pytest.mark.parametrize("old,new,msg", [
    (",0,negative,", ",3,negative,", "not 0, 1 or 2"),
    (",0,negative,", ",0,positive,", "disagrees"),
    ("casme2,", "casme9,", "database"),
])
def test_bad_labels(tmp_path, old, new, msg):
    root = _fake(tmp_path / "db", ROWS)
    csv = root / "labels.csv"
    csv.write_text(csv.read_text().replace(old, new, 1))
    with pytest.raises(DatasetError, match=msg):
        load_megc3db(root, check_counts=False)


def test_missing_column(tmp_path):
    root = _fake(tmp_path / "db", ROWS)
    csv = root / "labels.csv"
    csv.write_text(csv.read_text().replace("flow_file", "file", 1))
    with pytest.raises(DatasetError, match="missing column"):
        load_megc3db(root, check_counts=False)


LANDMARK_HEADER = ("subject,video,found," + ",".join(
    f"{p}_{a}" for p in ("eye_image_left", "eye_image_right", "nose_tip", "mouth_image_left",
                         "mouth_image_right") for a in ("x", "y")) + "\n")


def test_real_landmarks_follow_the_label_rows(megc_dir):
    import csv

    d = load_megc3db(megc_dir)
    assert d.landmarks.shape == (442, 5, 2)
    missing = ~np.isfinite(d.landmarks).all(axis=(1, 2))
    assert sorted(d.videos[missing]) == ["s04_sur_02", "s19_sur_01"]  # found=0 in the CSV
    with open(megc_dir / "landmarks5.csv", newline="") as fh:
        row = next(r for r in csv.DictReader(fh) if r["video"] == d.videos[100])
    np.testing.assert_allclose(d.landmarks[100], [[float(row["eye_image_left_x"]),
                                                   float(row["eye_image_left_y"])],
                                                  [float(row["eye_image_right_x"]),
                                                   float(row["eye_image_right_y"])],
                                                  [float(row["nose_tip_x"]),
                                                   float(row["nose_tip_y"])],
                                                  [float(row["mouth_image_left_x"]),
                                                   float(row["mouth_image_left_y"])],
                                                  [float(row["mouth_image_right_x"]),
                                                   float(row["mouth_image_right_y"])]])


def test_landmark_file_must_match_the_rows(tmp_path):
    root = _fake(tmp_path / "db", ROWS)
    assert load_megc3db(root, check_counts=False).landmarks is None  # optional file
    pts = ",".join(["7.0"] * 10)
    lines = [f"{s},{v},1,{pts}\n" for _, s, v, _ in ROWS]
    (root / "landmarks5.csv").write_text(LANDMARK_HEADER + "".join(lines[:3])
                                         + f"{ROWS[3][1]},{ROWS[3][2]},0" + "," * 10 + "\n")
    d = load_megc3db(root, check_counts=False)
    assert np.isfinite(d.landmarks[:3]).all() and np.isnan(d.landmarks[3]).all()
    (root / "landmarks5.csv").write_text(LANDMARK_HEADER + "".join(lines[:3]))
    with pytest.raises(DatasetError, match="no row for 1 labelled sample"):
        load_megc3db(root, check_counts=False)
    (root / "landmarks5.csv").write_text(LANDMARK_HEADER + "".join(lines + lines[:1]))
    with pytest.raises(DatasetError, match="listed twice"):
        load_megc3db(root, check_counts=False)
    (root / "landmarks5.csv").write_text(LANDMARK_HEADER + "".join(lines)
                                         + f"casme2/sub99,EP01_01,1,{pts}\n")
    with pytest.raises(DatasetError, match="1 row.s. for samples that labels.csv does not list"):
        load_megc3db(root, check_counts=False)
    (root / "landmarks5.csv").write_text("subject,video,found\n")
    with pytest.raises(DatasetError, match="missing column"):
        load_megc3db(root, check_counts=False)
    (root / "landmarks5.csv").write_text(LANDMARK_HEADER + lines[0].replace("7.0", "x", 1))
    with pytest.raises(DatasetError, match="line 2"):
        load_megc3db(root, check_counts=False)
