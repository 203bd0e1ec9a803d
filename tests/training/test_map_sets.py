"""Two preprocessings of the same samples: CausalNet's four maps per sample load and check
against labels.csv; a LOSO run trains on one set (or draws the other in a share of its draws),
chooses on it, and scores every held-out subject on both."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from realtime_mer.errors import DatasetError
from training.data.megc3db import (CAUSALNET_SUFFIXES, load_causalnet_maps, load_map_sets,
                                   load_megc3db, with_other_maps)
from training.loso import LosoConfig, run_loso
from tests.training.test_loso import _synthetic

CFG = LosoConfig(epochs=4, batch_size=8, eval_every=2, lr=5e-3)


def _other(data):
    """The same samples made another way: the class sits in the same channel, weaker and
    with other noise (a second preprocessing agrees only roughly with the first)."""
    rng = np.random.default_rng(7)
    x = rng.random(data.x.shape, dtype=np.float32) * 0.5
    for i, c in enumerate(data.y):
        x[i, c] += 0.4
    return x


def test_adding_the_other_set_to_score_leaves_the_run_on_its_own_set_unchanged(tmp_path):
    data = _synthetic()
    both = with_other_maps(data, _other(data), "3db", "causalnet")
    assert len(both) == 2 * len(data) and both.class_counts() == data.class_counts()
    alone = run_loso(data, CFG, tmp_path / "alone", folds=[0, 1])
    scored = run_loso(both, CFG, tmp_path / "both", folds=[0, 1])
    # the figures on the set trained on are those of the run without the other set: the same
    # models and classes; the probabilities (written to 6 decimals) within 2e-6, as the held-out
    # maps are fed in a batch of another size and the CPU kernels' rounding depends on it on
    # some machines (a last digit apart on an Intel Xeon, bit for bit on an AMD EPYC)
    assert [{k: v for k, v in p.items() if k != "probs"} for p in scored["predictions"]] == \
        [{k: v for k, v in p.items() if k != "probs"} for p in alone["predictions"]]
    np.testing.assert_allclose([p["probs"] for p in scored["predictions"]],
                               [p["probs"] for p in alone["predictions"]], rtol=0, atol=2e-6)
    assert scored["uf1"] == alone["uf1"] and scored["dataset"]["n_samples"] == len(data)
    other = scored["other_maps"]
    assert other["maps"] == "causalnet"
    # the other set: the same held-out samples (indexed as samples), by the same models
    assert [p["index"] for p in other["predictions"]] == \
        [p["index"] for p in scored["predictions"]]
    assert [p["label"] for p in other["predictions"]] == \
        [p["label"] for p in scored["predictions"]]
    assert other["predictions"] != scored["predictions"]
    assert 0.0 <= other["uf1"] <= 1.0


def test_compare_pairs_a_run_on_the_other_maps_with_a_run_on_its_own(tmp_path):
    from training.compare import load_results, paired_comparison

    data = _synthetic()
    both = with_other_maps(data, _other(data), "3db", "causalnet")
    alone_path, both_path = tmp_path / "alone.json", tmp_path / "both.json"
    run_loso(data, CFG, tmp_path / "alone", folds=[0, 1], results_path=alone_path)
    scored = run_loso(both, CFG, tmp_path / "both", folds=[0, 1], results_path=both_path)
    other = load_results(f"{both_path}:other_maps")
    assert other["uf1"] == scored["other_maps"]["uf1"]
    r = paired_comparison(load_results(alone_path), other, n_boot=200)
    assert r["n"] == len(scored["predictions"])
    assert r["variant"]["uf1"] == pytest.approx(scored["other_maps"]["uf1"])
    from training.compare import CompareError
    with pytest.raises(CompareError, match="another map set"):
        load_results(f"{alone_path}:other_maps")


def test_a_share_of_draws_from_the_other_set_changes_training(tmp_path):
    data = _synthetic()
    both = with_other_maps(data, _other(data), "3db", "causalnet")
    plain = run_loso(both, CFG, tmp_path / "plain", folds=[0])
    mixed = run_loso(both, dataclasses.replace(CFG, other_maps_share=0.5), tmp_path / "mixed",
                     folds=[0])
    assert mixed["predictions"] != plain["predictions"]
    assert mixed["config"]["other_maps_share"] == 0.5
    assert "other_maps_share" not in plain["config"]  # a one-set schedule reads as before
    with pytest.raises(ValueError, match="other map set"):
        run_loso(data, dataclasses.replace(CFG, other_maps_share=0.5), tmp_path / "bad",
                 folds=[0])


def test_schedules_on_the_other_set_are_checked():
    with pytest.raises(ValueError, match="maps"):
        LosoConfig(maps="phases")
    with pytest.raises(ValueError, match="other_maps_share"):
        LosoConfig(other_maps_share=1.5)
    with pytest.raises(ValueError, match="map28 only"):
        LosoConfig(maps="causalnet", input_kind="regions5")
    cfg = LosoConfig(maps="causalnet", other_maps_share=0.5)
    assert LosoConfig.from_dict(cfg.to_dict()) == cfg


def test_the_causalnet_maps_are_four_per_labelled_sample(megc_dir):
    causalnet = megc_dir.parent / "megc2019_3db_causalnet"
    ours = load_megc3db(megc_dir)
    maps = load_causalnet_maps(causalnet, ours)
    assert maps.shape == (442, len(CAUSALNET_SUFFIXES), 3, 28, 28)
    assert maps.min() >= 0.0 and maps.max() <= 1.0
    # _2 and _3 (the direction images) have no strain; the flow maps have
    assert np.ptp(maps[:, 2:, 2], axis=(2, 3)).max() == 0.0
    assert (np.ptp(maps[:, :2, 2], axis=(2, 3)) > 0).all()
    # the base map is a different computation of the onset→apex movement than ours:
    # correlated, far from equal (u channel, mean over samples)
    r = np.mean([np.corrcoef(a[0].ravel(), b[0].ravel())[0, 1]
                 for a, b in zip(maps[:, 0], ours.x)])
    assert 0.3 < r < 0.7
    both = load_map_sets(megc_dir, causalnet, primary="causalnet")
    assert both.maps[0] == "causalnet" and both.maps[-1] == "3db"
    np.testing.assert_array_equal(both.x[:442], maps[:, 0])
    np.testing.assert_array_equal(both.x[442:], ours.x)


def test_a_causalnet_folder_that_lacks_a_map_is_refused(megc_dir, tmp_path):
    ours = load_megc3db(megc_dir)
    (tmp_path / "flow").mkdir()
    with pytest.raises(DatasetError, match="missing"):
        load_causalnet_maps(tmp_path, ours)


def _direction_image(flow_bgr: np.ndarray) -> np.ndarray:
    """A flow map's direction as a colour: the hue is half the angle (degrees) of its own
    (u, v) pixel values, saturation and value full (OpenCV's HSV)."""
    import cv2

    u, v = flow_bgr[..., 2].astype(np.float32), flow_bgr[..., 1].astype(np.float32)
    _, angle = cv2.cartToPolar(u, v, angleInDegrees=True)
    hsv = np.full(flow_bgr.shape, 255, np.uint8)
    hsv[..., 0] = (angle / 2).astype(np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)


def test_causalnet_direction_images_are_their_flow_maps_angles(megc_dir):
    """What training/data/README.md says of _2 and _3: each is the direction image of the
    flow map before it (_2 of the onset→apex map, _3 of the apex→offset map), bit for bit."""
    import cv2

    flow = megc_dir.parent / "megc2019_3db_causalnet" / "flow"
    stems = [f.removeprefix("flow/").removesuffix(".png")
             for f in np.loadtxt(megc_dir / "labels.csv", dtype=str, delimiter=",",
                                 skiprows=1, usecols=5)]
    assert len(stems) == 442
    for stem in stems:
        for source, direction in (("", "_2"), ("_1", "_3")):
            image = cv2.imread(str(flow / f"{stem}{source}.png"))
            expected = cv2.imread(str(flow / f"{stem}{direction}.png"))
            assert np.array_equal(_direction_image(image), expected), f"{stem}{direction}"


def test_a_nested_run_on_two_sets_calibrates_windows_and_exports_on_its_own_set(tmp_path):
    """calibrate, window and export act on the map set the run trained on: the other set's
    copies of the held-out samples are scored apart and never enter them."""
    import json

    from training.calibrate import calibrate_run
    from training.export import export_default
    from training.window import checkpoint_window

    data = _synthetic(n_subjects=6)
    both = with_other_maps(data, _other(data), "3db", "causalnet")
    cfg = dataclasses.replace(CFG, select_epochs="nested", inner_folds=3, epochs=4)
    out = tmp_path / "res.json"
    res = run_loso(both, cfg, tmp_path / "run", results_path=out)
    assert len(res["predictions"]) == len(data) and "nested_cv_ensemble" in res["other_maps"]
    cal = calibrate_run(tmp_path / "run", out)
    assert len(cal["predictions"]) == len(data)
    win = checkpoint_window(tmp_path / "run", out, width=2)
    assert len(win["predictions"]) == len(data)
    manifest = export_default(both, cfg, tmp_path / "e.onnx", loso_results=out,
                              ensemble=True)
    training = manifest["training"]
    assert training["n_samples"] == len(data)
    assert training["class_counts"] == list(data.class_counts())
    assert "causalnet" not in json.dumps(training["schedule"])  # trained on 3db alone
    assert "3db preprocessing" in training["data"]


def test_a_run_scored_on_both_sets_feeds_the_maps_as_they_are(megc_dir):
    from training.data.megc3db import load_for_schedule

    causalnet = megc_dir.parent / "megc2019_3db_causalnet"
    with pytest.raises(ValueError, match="map28"):
        load_for_schedule(megc_dir, causalnet, "3db", 0.0, "regions5", score_other_maps=True)
    assert load_for_schedule(megc_dir, causalnet, "3db", 0.0, "regions5").maps is None
