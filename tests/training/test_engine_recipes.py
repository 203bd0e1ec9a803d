"""Engines that are not shipped are rebuilt from their recipes (engines/recipes): the command
lists them, refuses an unknown name in one line, and a rebuild trains the recorded schedule."""

from __future__ import annotations

import numpy as np
import pytest

from training.__main__ import REPO_ROOT, main
from training.engine_recipes import recipe, rebuild, recipes


def test_every_recipe_is_an_engine_that_is_not_shipped():
    names = {item.name for item in recipes()}
    assert names == {"ststnet_3db.onnx", "ststnet_cv6_3db.onnx",
                     "ststnet_cv6_mirror_shift2_3db.onnx",
                     "ststnet_cv6_mirror_shift2_calbias_3db.onnx"}
    shipped = {path.name for path in (REPO_ROOT / "engines").glob("*.onnx")}
    assert shipped == {"ststnet_cv6_mirror_shift2_cal_3db.onnx", "ststnet_mirror_3db.onnx"}
    assert not names & shipped
    for item in recipes():  # each is a schedule the trainer accepts
        assert item.config.model == "ststnet" and item.sha256


def test_rebuild_engine_lists_the_recipes_and_refuses_an_unknown_name(capsys):
    assert main(["rebuild-engine", "--list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) == 4
    assert "ststnet_cv6_3db.onnx: ststnet, CV ensemble of 6; honest LOSO UF1 0.7232" in listed
    assert main(["rebuild-engine", "ststnet_cv9_3db"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no recipe for ststnet_cv9_3db.onnx" in err[0]
    assert "ststnet_3db.onnx" in err[0]  # it names the recipes there are


@pytest.mark.slow
def test_a_rebuilt_ensemble_is_the_recorded_one_and_the_default_is_it_calibrated(megc_dir,
                                                                                 tmp_path):
    """The uncalibrated ensemble rebuilt from its recipe (under 3 minutes on 2 cores) has the
    recorded training accuracy, and the shipped default engine, made from the same training,
    is its probabilities shifted by the default's calibration offsets."""
    from realtime_mer.runtime import default_engine_path, load_engine
    from training.calibrate import offset_shift
    from training.data import load_megc3db

    done = rebuild(recipe("ststnet_cv6_mirror_shift2_3db"), tmp_path / "base.onnx", megc_dir)
    assert done.train_accuracy == pytest.approx(done.recorded_train_accuracy, abs=0.005)
    x = load_megc3db(megc_dir).x
    base = load_engine(tmp_path / "base.onnx", backend="onnxruntime").predict(x)
    default = load_engine(default_engine_path(), backend="onnxruntime")
    offsets = default.manifest.training["calibration"]["offsets"]
    shifted, shipped = offset_shift(base, offsets), default.predict(x)
    # The same training to CPU rounding (a rebuild's probabilities move by under 0.01).
    assert np.abs(shifted - shipped).max() < 0.02
    assert (shifted.argmax(1) == shipped.argmax(1)).mean() > 0.98
    # The offsets matter: the calibrated engine does not predict like the base one.
    assert (shipped.argmax(1) != base.argmax(1)).sum() > 10
