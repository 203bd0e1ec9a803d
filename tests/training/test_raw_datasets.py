"""Raw-database adapters and preprocessing, on generated folder trees of real face frames
(CASME II frames and frames of single_face.mp4 from ../shared) in each database's layout."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from realtime_mer.errors import DatasetError
from realtime_mer.features import FeatureOptions, flow_strain_map
from training.data.preprocess import load_preprocessed, preprocess
from training.data.raw import (
    Casme2Adapter, Casme3Adapter, SammAdapter, SmicAdapter, estimate_apex, load_frame,
    make_adapter,
)

CASME_HEADER = "Subject,Filename,OnsetFrame,ApexFrame,OffsetFrame,Action Units,Estimated Emotion"


@pytest.fixture(scope="session")
def casme_frames(media_dir: Path) -> list[Path]:
    frames = sorted((media_dir / "casme2_frames").glob("*.jpg"))
    if len(frames) < 10:
        pytest.skip("../shared/media/casme2_frames is incomplete")
    return frames


@pytest.fixture(scope="session")
def video_frames(media_dir: Path, tmp_path_factory) -> list[Path]:
    cap = cv2.VideoCapture(str(media_dir / "single_face.mp4"))
    out = tmp_path_factory.mktemp("single_face")
    paths = []
    while len(paths) < 10:
        ok, frame = cap.read()
        if not ok:
            break
        paths.append(out / f"{len(paths):03d}.jpg")
        cv2.imwrite(str(paths[-1]), frame)
    cap.release()
    if len(paths) < 10:
        pytest.skip("could not decode single_face.mp4")
    return paths


def _video(folder: Path, sources: list[Path], name) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, src in enumerate(sources):
        shutil.copy(src, folder / name(i))  # copies: the broken-file tests write into them


def _casme2(root: Path, frames: list[Path]) -> tuple[Path, Path]:
    data = root / "CASME2"
    _video(data / "sub01" / "EP02_01f", frames, lambda i: f"img{46 + i}.jpg")
    _video(data / "sub01" / "EP19_05f", frames, lambda i: f"img{1 + i}.jpg")
    _video(data / "sub02" / "EP01_11f", frames, lambda i: f"reg_img{100 + i}.jpg")
    _video(data / "sub02" / "EP03_01", frames, lambda i: f"img{10 + i}.jpg")
    sheet = root / "casme2.csv"
    sheet.write_text("\n".join([
        CASME_HEADER,
        "01,EP02_01f,46,50,55,12,happiness",
        "1,EP19_05f,1,/,10,4,disgust",         # no apex: estimated
        "02,EP01_11f,100,104,0,14,repression",  # offset 0: not coded
        "sub02,EP03_01,10,13,19,1+2,surprise",
        "01,EP07_01,1,2,3,4,fear",              # dropped (MEGC2019 CASME II: only disgust,
        "02,EP05_02,1,2,3,4,others",            # repression are negative), no folder needed
    ]) + "\n")
    return data, sheet


def _samm(root: Path, frames: list[Path]) -> tuple[Path, Path]:
    data = root / "SAMM"
    _video(data / "006" / "006_1_2", frames, lambda i: f"006_{5562 + i:05d}.jpg")
    _video(data / "007" / "007_3_1", frames, lambda i: f"007_{i + 1:05d}.jpg")
    sheet = root / "samm.csv"
    sheet.write_text("\n".join([
        "SAMM micro-movement FACS codes,,,,,,,,",  # title rows above the header, as in SAMM
        ",,,,,,,,",
        "Subject,Filename,Inducement Code,Onset Frame,Apex Frame,Offset Frame,Duration,"
        "Action Units,Estimated Emotion",
        "6,006_1_2,1,5562,5566,5571,10,R12,Anger",
        "006,006_1_2,1,5563,5565,5570,8,R12,Contempt",
        "7,007_3_1,3,1,4,10,10,12,Happiness",
        "7,007_3_1,3,2,3,9,8,1+2,Other",
    ]) + "\n")
    return data, sheet


def _casme3(root: Path, frames: list[Path]) -> tuple[Path, Path]:
    data = root / "part_A"
    _video(data / "spNO.1" / "a" / "color", frames, lambda i: f"{i}.jpg")
    _video(data / "spNO.2" / "b" / "color", frames, lambda i: f"{i + 20}.jpg")
    sheet = root / "casme3.csv"
    sheet.write_text("\n".join([
        "Subject,Filename,Onset,Apex,Offset,AU,Objective class,emotion",
        "spNO.1,a,0,3,9,4,1,disgust",
        "spNO.1,a,1,5,8,12,2,happy",     # a second sample in the same video
        "2,b,20,24,29,1+2,3,surprise",
        "spNO.2,b,21,23,28,4,1,sad",
        "spNO.2,b,20,22,27,4,7,others",
    ]) + "\n")
    return data, sheet


SHIFTED = 3  # index of the clearly most displaced frame in the SMIC clip


def _smic(root: Path, frames: list[Path]) -> Path:
    data = root / "SMIC"
    clip = data / "HS" / "s3" / "micro" / "positive" / "s3_po_11"
    clip.mkdir(parents=True)
    onset = cv2.imread(str(frames[0]), cv2.IMREAD_GRAYSCALE)
    for i, src in enumerate(frames[:8]):
        image = cv2.imread(str(src), cv2.IMREAD_GRAYSCALE)
        if i == SHIFTED:  # the onset moved 6 px right and 4 px down: far more than 200 fps drift
            image = cv2.warpAffine(onset, np.float32([[1, 0, 6], [0, 1, 4]]), onset.shape[::-1],
                                   borderMode=cv2.BORDER_REPLICATE)
        cv2.imwrite(str(clip / f"image{134500 + i:07d}.bmp"), image)
    for emo, name in (("negative", "s3_ne_02"), ("surprise", "s12_sur_01")):
        subj = name.split("_")[0]
        d = data / "HS" / subj / "micro" / emo / name
        d.mkdir(parents=True)
        for i, src in enumerate(frames[:4]):
            cv2.imwrite(str(d / f"image{200 + i:07d}.bmp"),
                        cv2.imread(str(src), cv2.IMREAD_GRAYSCALE))
    return data


# ----------------------------------------------------------------------------- adapters


def test_casme2_samples_and_mapping(tmp_path, casme_frames):
    data, sheet = _casme2(tmp_path, casme_frames)
    adapter = Casme2Adapter(data, sheet, apex="middle")
    samples = {s.sample_id: s for s in adapter.samples()}
    assert sorted(samples) == ["sub01_EP02_01f", "sub01_EP19_05f", "sub02_EP01_11f",
                               "sub02_EP03_01"]
    assert {k: s.class_name for k, s in samples.items()} == {
        "sub01_EP02_01f": "positive", "sub01_EP19_05f": "negative",
        "sub02_EP01_11f": "negative", "sub02_EP03_01": "surprise"}
    r = adapter.report
    assert (r.rows, r.kept, r.dropped) == (6, 4, {"fear": 1, "others": 1})
    assert r.class_counts == {"negative": 2, "positive": 1, "surprise": 1}
    assert r.apex_estimated == 1 and r.offset_missing == 1
    s = samples["sub01_EP02_01f"]
    assert (s.onset, s.apex, s.offset, s.apex_source) == (46, 50, 55, "annotated")
    assert s.frame_numbers == tuple(range(46, 56)) and s.apex_path.endswith("img50.jpg")
    assert s.megc_key == ("casme2", "sub01", "EP02_01f")
    no_offset = samples["sub02_EP01_11f"]
    assert no_offset.offset is None and no_offset.frame_numbers == tuple(range(100, 105))
    estimated = samples["sub01_EP19_05f"]
    assert estimated.apex is None and estimated.apex_source == "middle"
    assert adapter.resolve_apex(estimated).apex == 6  # frames 1..10, middle index 5


def test_samm_title_rows_and_negative_classes(tmp_path, video_frames):
    data, sheet = _samm(tmp_path, video_frames)
    adapter = SammAdapter(data, sheet)
    samples = adapter.samples()
    # two samples in one video get the onset appended to their id
    assert [s.sample_id for s in samples] == ["006_006_1_2_5562", "006_006_1_2_5563",
                                              "007_007_3_1"]
    assert [s.label for s in samples] == [0, 0, 1]
    assert adapter.report.dropped == {"Other": 1}
    assert samples[0].onset_path.endswith("006_05562.jpg")


def test_casme3_layout(tmp_path, casme_frames):
    data, sheet = _casme3(tmp_path, casme_frames)
    adapter = make_adapter("casme3", data, sheet)
    assert isinstance(adapter, Casme3Adapter)
    samples = adapter.samples()
    assert [(s.subject, s.video, s.class_name) for s in samples] == [
        ("spNO.1", "a", "negative"), ("spNO.1", "a", "positive"),
        ("spNO.2", "b", "surprise"), ("spNO.2", "b", "negative")]
    assert samples[0].sample_id == "spNO.1_a_0"
    assert adapter.report.dropped == {"others": 1}
    assert Path(samples[2].apex_path) == data / "spNO.2" / "b" / "color" / "24.jpg"


def test_smic_apex_by_max_flow(tmp_path, casme_frames):
    data = _smic(tmp_path, casme_frames)
    adapter = SmicAdapter(data)  # max_flow with DIS by default
    samples = {s.video: s for s in adapter.samples()}
    assert {v: s.class_name for v, s in samples.items()} == {
        "s3_po_11": "positive", "s3_ne_02": "negative", "s12_sur_01": "surprise"}
    s = samples["s3_po_11"]
    assert (s.onset, s.offset, s.apex) == (134500, 134507, None)
    assert s.megc_key == ("smic", "s03", "s03_po_11")
    assert adapter.resolve_apex(s).apex == 134500 + SHIFTED
    middle = SmicAdapter(data / "HS", smic_apex="middle")  # the HS folder itself works too
    s_mid = {x.video: x for x in middle.samples()}["s3_po_11"]
    assert middle.resolve_apex(s_mid).apex == 134504
    # the same choice from arrays
    frames = [load_frame(p) for p in s.frames]
    assert estimate_apex(frames, "max_flow") == SHIFTED


# ----------------------------------------------------------------------------- errors


def _break(case: str, root: Path, frames: list[Path]):
    data, sheet = _casme2(root, frames)
    if case == "no root":
        return Casme2Adapter(root / "nowhere", sheet), "does not exist"
    if case == "no sheet":
        return Casme2Adapter(data, root / "missing.csv"), "missing.csv is missing"
    if case == "missing column":
        text = sheet.read_text().replace("ApexFrame", "Peak")
        sheet.write_text(text)
        return Casme2Adapter(data, sheet), "apexframe / apex"
    if case == "absent frame":
        (data / "sub01" / "EP02_01f" / "img50.jpg").unlink()
        return Casme2Adapter(data, sheet), "casme2.csv line 2: frame(s) [50] not in"
    if case == "no video folder":
        shutil.rmtree(data / "sub02" / "EP03_01")
        return Casme2Adapter(data, sheet), "line 5: video folder"
    if case == "unreadable image":
        (data / "sub01" / "EP02_01f" / "img50.jpg").write_bytes(b"not a jpeg at all")
        return Casme2Adapter(data, sheet), "img50.jpg cannot be read as an image"
    if case == "bad number":
        sheet.write_text(sheet.read_text().replace(",46,50,55,", ",46,fifty,55,"))
        return Casme2Adapter(data, sheet), "line 2: apex frame 'fifty' is not a whole number"
    if case == "order":
        sheet.write_text(sheet.read_text().replace(",46,50,55,", ",46,56,55,"))
        return Casme2Adapter(data, sheet), "line 2: frames out of order"
    if case == "xlsx":
        xlsx = root / "casme2.xlsx"
        xlsx.write_bytes(b"PK")
        return Casme2Adapter(data, xlsx), "xlsx"
    if case == "smic no HS":
        return SmicAdapter(data), "no HS/ folder"
    if case == "smic one frame":
        smic = _smic(root, frames)
        clip = smic / "HS" / "s3" / "micro" / "negative" / "s3_ne_02"
        for p in sorted(clip.iterdir())[1:]:
            p.unlink()
        return SmicAdapter(smic), "s3_ne_02: 1 numbered image(s)"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["no root", "no sheet", "missing column", "absent frame",
                                  "no video folder", "unreadable image", "bad number", "order",
                                  "xlsx", "smic no HS", "smic one frame"])
def test_dataset_errors(case, tmp_path, casme_frames):
    if case == "xlsx":
        try:
            import openpyxl  # noqa: F401
            pytest.skip("openpyxl is installed: .xlsx sheets are read")
        except ImportError:
            pass
    adapter, message = _break(case, tmp_path, casme_frames)
    with pytest.raises(DatasetError) as info:
        adapter.samples()
    assert message in str(info.value), str(info.value)


def test_preprocess_validates_before_any_work(tmp_path, casme_frames):
    adapter, _ = _break("absent frame", tmp_path, casme_frames)
    with pytest.raises(DatasetError):
        preprocess(adapter, tmp_path / "cache", flow="dis", align=False)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.npz"))


# ----------------------------------------------------------------------------- preprocessing


def test_preprocess_maps_equal_features_and_resume(tmp_path, casme_frames):
    data, sheet = _casme2(tmp_path, casme_frames)
    adapter = Casme2Adapter(data, sheet)
    cache = tmp_path / "cache"
    seen = []
    res = preprocess(adapter, cache, kinds=("map28", "colour224"), flow="opencv-tvl1",
                     align=False, progress=lambda i, n, s, st: seen.append((i, n, st)))
    assert (res.computed, res.cached, res.failed) == (4, 0, [])
    assert seen == [(1, 4, "computed"), (2, 4, "computed"), (3, 4, "computed"),
                    (4, 4, "computed")]
    options = FeatureOptions(flow="opencv-tvl1")
    for s in adapter.samples():
        with np.load(cache / "casme2" / f"{s.sample_id}.npz") as z:
            m, colour, apex = z["map28"], z["colour224"], int(z["apex"])
        assert m.shape == (28, 28, 3) and m.dtype == np.float32
        assert 0.0 <= m.min() and m.max() <= 1.0 and m.max() == 1.0
        assert colour.shape == (224, 224, 3) and colour.dtype == np.uint8
        expected = flow_strain_map(load_frame(s.onset_path), load_frame(s.path_of(apex)),
                                   options)
        np.testing.assert_allclose(m, expected, atol=1e-6)
    index = (cache / "casme2" / "index.csv").read_text().splitlines()
    assert len(index) == 5 and "max_flow" in index[2]

    stamps = {p.name: p.stat().st_mtime_ns for p in (cache / "casme2").glob("*.npz")}
    seen.clear()
    again = preprocess(adapter, cache, kinds=("map28", "colour224"), flow="opencv-tvl1",
                       align=False, progress=lambda i, n, s, st: seen.append(st))
    assert (again.computed, again.cached) == (0, 4) and seen == ["cached"] * 4
    assert stamps == {p.name: p.stat().st_mtime_ns for p in (cache / "casme2").glob("*.npz")}
    # another flow implementation is another cache entry
    other = preprocess(adapter, cache, kinds=("map28",), flow="dis", align=False)
    assert (other.computed, other.cached) == (4, 0)

    loaded = load_preprocessed(cache)
    assert loaded.x.shape == (4, 3, 28, 28) and sorted(loaded.y.tolist()) == [0, 0, 1, 2]
    assert set(loaded.subjects) == {"casme2/sub01", "casme2/sub02"}


def test_preprocess_aligned_with_stack_and_no_face(tmp_path, video_frames):
    data, sheet = _samm(tmp_path, video_frames)
    # the onset of the second video shows no face: that sample fails, the rest go on
    black = data / "007" / "007_3_1" / "007_00001.jpg"
    cv2.imwrite(str(black), np.zeros((360, 640, 3), np.uint8))
    res = preprocess(SammAdapter(data, sheet), tmp_path / "cache", kinds=("map28", "stack16"),
                     flow="dis", align=True, stack_frames=4, stack_size=32)
    assert res.computed == 2 and [f[0] for f in res.failed] == ["007_007_3_1"]
    assert "no face" in res.failed[0][1]
    with np.load(tmp_path / "cache" / "samm" / "006_006_1_2_5562.npz") as z:
        assert z["map28"].shape == (28, 28, 3)
        assert z["stack16"].shape == (4, 32, 32, 3)
        assert z["landmarks"].shape[1] == 2 and np.isfinite(z["landmarks"]).all()
    loaded = load_preprocessed(tmp_path / "cache", ["samm"])
    assert len(loaded) == 2
    # a failed sample is retried on the next run
    again = preprocess(SammAdapter(data, sheet), tmp_path / "cache",
                       kinds=("map28", "stack16"), flow="dis", align=True, stack_frames=4,
                       stack_size=32)
    assert (again.cached, len(again.failed)) == (2, 1)


def test_cli_preprocess(tmp_path, casme_frames, capsys):
    from training.__main__ import main

    data, sheet = _casme2(tmp_path, casme_frames)
    rc = main(["preprocess", "--database", "casme2", "--root", str(data), "--sheet", str(sheet),
               "--cache", str(tmp_path / "cache"), "--flow", "dis", "--no-align"])
    out = capsys.readouterr().out
    assert rc == 0 and "4 computed" in out and "dropped: fear 1, others 1" in out
    rc = main(["preprocess", "--database", "samm", "--root", str(tmp_path / "nowhere"),
               "--sheet", str(sheet), "--cache", str(tmp_path / "cache")])
    assert rc == 4 and "does not exist" in capsys.readouterr().err


def _casme2_every_class(root: Path, frames: list[Path]) -> tuple[Path, Path]:
    """Three subjects with one video of each class, the frames in another order per video (so
    the movements differ); the happiness videos' offsets are not coded."""
    data, rows = root / "CASME2", [CASME_HEADER]
    for subject in (1, 2, 3):
        for k, emotion in enumerate(("disgust", "happiness", "surprise")):
            order = np.roll(frames, subject + 3 * k)
            _video(data / f"sub0{subject}" / f"EP0{k}_0{subject}", list(order),
                   lambda i: f"img{1 + i}.jpg")
            offset = 0 if emotion == "happiness" else 9
            rows.append(f"0{subject},EP0{k}_0{subject},1,4,{offset},4,{emotion}")
    sheet = root / "casme2.csv"
    sheet.write_text("\n".join(rows) + "\n")
    return data, sheet


def test_both_phases_of_the_raw_samples_train_and_export_as_the_live_pipeline_makes_them(
        tmp_path, casme_frames, capsys):
    """phases28: each sample's onset→apex and apex→offset maps by the live pipeline's own
    features code (a sample with no annotated offset ends at its apex: an all-zero second
    phase); `loso --maps live --phases 2` trains and scores on them, and `export` writes an
    engine of six channels whose manifest says what it learned."""
    import json

    from realtime_mer.features import movement_map
    from realtime_mer.runtime import load_engine
    from training.__main__ import main

    data, sheet = _casme2_every_class(tmp_path, casme_frames)
    adapter = Casme2Adapter(data, sheet)
    cache = tmp_path / "cache"
    preprocess(adapter, cache, kinds=("map28", "phases28"), flow="opencv-tvl1", align=False)
    options = FeatureOptions(flow="opencv-tvl1")
    for s in adapter.samples():
        with np.load(cache / "casme2" / f"{s.sample_id}.npz") as z:
            one, both = z["map28"], z["phases28"]
        offset = s.path_of(s.apex if s.offset is None else s.offset)
        want = movement_map(load_frame(s.onset_path), load_frame(s.path_of(s.apex)),
                            load_frame(offset), options)
        np.testing.assert_allclose(both, want, atol=1e-6)
        np.testing.assert_array_equal(both[..., :3], one)
        assert (both[..., 3:].max() == 0) == (s.offset is None)
    assert load_preprocessed(cache, kind="phases28").x.shape == (9, 6, 28, 28)

    quick = ["--maps", "live", "--phases", "2", "--cache", str(cache), "--epochs", "2",
             "--select-epochs", "fixed", "--batch-size", "3"]
    assert main(["loso", *quick, "--run-dir", str(tmp_path / "run"),
                 "--out", str(tmp_path / "loso.json")]) == 0
    res = json.loads((tmp_path / "loso.json").read_text())
    assert res["config"]["maps"] == "live" and res["config"]["phases"] == 2
    assert len(res["predictions"]) == 9 and res["complete"]
    assert "live pipeline's maps" in res["dataset"]["name"]
    assert main(["export", *quick, "--loso-results", str(tmp_path / "loso.json"),
                 "--out", str(tmp_path / "live.onnx")]) == 0
    engine = load_engine(tmp_path / "live.onnx", backend="onnxruntime")
    assert engine.manifest.phases == 2 and engine.manifest.loso["uf1"] == res["uf1"]
    assert "live pipeline's own" in engine.manifest.training["data"]
    # the same schedule on maps made another way (another flow) cannot quote that score
    preprocess(adapter, tmp_path / "dis", kinds=("phases28",), flow="dis", align=False)
    capsys.readouterr()
    other = [a if a != str(cache) else str(tmp_path / "dis") for a in quick]
    assert main(["export", *other, "--loso-results", str(tmp_path / "loso.json"),
                 "--out", str(tmp_path / "dis.onnx")]) == 2
    assert "other live maps" in capsys.readouterr().err
    assert not (tmp_path / "dis.onnx").exists()
    # nor resume the first run's folds
    assert main(["loso", *other, "--run-dir", str(tmp_path / "run")]) == 2
    assert "different configuration or data" in capsys.readouterr().err
    # the live maps come from a cache, and a cache is read for them only
    assert main(["loso", "--maps", "live", "--run-dir", str(tmp_path / "r2")]) == 2
    assert "give its --cache folder" in capsys.readouterr().err
    assert main(["loso", "--cache", str(cache), "--run-dir", str(tmp_path / "r3")]) == 2
    assert "--cache and --databases are read with --maps live only" in capsys.readouterr().err
