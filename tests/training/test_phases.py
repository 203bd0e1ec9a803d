"""Two phases of each movement: CausalNet's onset→apex and apex→offset maps stacked as six
channels, the mirror acting on both, a network built for six channels that learns from the
second phase, the schedules that cannot have it refused, and its engine fed as it was trained."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from training.data.megc3db import Megc3DB, load_causalnet_maps, load_megc3db, load_phases
from training.loso import LosoConfig, hflip_maps, normalise, run_loso
from tests.training.test_loso import _synthetic

PHASES = LosoConfig(epochs=6, batch_size=8, eval_every=2, lr=5e-3, maps="causalnet", phases=2,
                    model_kwargs={"in_channels": 6})


def _second_phase_only(data: Megc3DB) -> Megc3DB:
    """Six channels where only the second phase (channels 3-5) tells the classes apart: the
    first phase is noise."""
    rng = np.random.default_rng(3)
    first = rng.random(data.x.shape, dtype=np.float32)
    return dataclasses.replace(data, x=np.concatenate([first, data.x], axis=1))


def test_the_mirror_acts_on_each_phase_as_on_one():
    x = torch.rand(4, 6, 28, 28)
    both = hflip_maps(x)
    torch.testing.assert_close(both[:, :3], hflip_maps(x[:, :3]), rtol=0, atol=0)
    torch.testing.assert_close(both[:, 3:], hflip_maps(x[:, 3:]), rtol=0, atol=0)
    torch.testing.assert_close(hflip_maps(both), x, rtol=0, atol=1e-7)
    # a phase that never went back (all zeros) has no motion to reverse: it stays zeros
    still = x.clone()
    still[:, 3:] = 0.0
    assert (hflip_maps(still)[:, 3:] == 0).all()
    # the (u, v, strain) normalisation applies to each phase's three channels
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    torch.testing.assert_close(normalise(x, mean, std)[:, 3:], normalise(x[:, 3:], mean, std))


def test_a_network_of_six_channels_learns_from_the_second_phase(tmp_path):
    data = _second_phase_only(_synthetic())
    res = run_loso(data, PHASES, tmp_path / "run", folds=[0, 1, 2])
    assert res["uf1"] > 0.9 and res["config"]["phases"] == 2
    # the same network fed only the first phase (noise) cannot: the second phase is what it used
    noise = dataclasses.replace(data, x=np.ascontiguousarray(data.x[:, :3]))
    alone = run_loso(noise, dataclasses.replace(PHASES, phases=1, model_kwargs={}, maps="3db"),
                     tmp_path / "noise", folds=[0, 1, 2])
    assert alone["uf1"] < res["uf1"] - 0.3


def test_schedules_that_cannot_have_two_phases_are_refused(tmp_path):
    with pytest.raises(ValueError, match="CausalNet's maps and"):
        LosoConfig(phases=2)  # the 3DB maps have no second phase
    with pytest.raises(ValueError, match="CausalNet's maps and"):
        LosoConfig(maps="causalnet", phases=2, other_maps_share=0.5)
    with pytest.raises(ValueError, match="phases must be 1 or 2"):
        LosoConfig(maps="causalnet", phases=3)
    assert "phases" not in LosoConfig().to_dict()  # one phase is written as before
    assert LosoConfig.from_dict(PHASES.to_dict()) == PHASES
    three = _synthetic()  # three channels where the schedule wants six
    with pytest.raises(ValueError, match="2 phase"):
        run_loso(three, PHASES, tmp_path / "run", folds=[0])


def test_two_phases_are_causalnets_base_and_apex_to_offset_maps(megc_dir):
    causalnet = megc_dir.parent / "megc2019_3db_causalnet"
    data = load_phases(megc_dir, causalnet)
    maps = load_causalnet_maps(causalnet, load_megc3db(megc_dir), suffixes=("", "_1"))
    assert data.x.shape == (442, 6, 28, 28) and data.maps is None
    np.testing.assert_array_equal(data.x[:, :3], maps[:, 0])
    np.testing.assert_array_equal(data.x[:, 3:], maps[:, 1])
    assert data.class_counts() == (250, 109, 83)


def test_the_command_line_builds_six_channels_and_refuses_what_cannot_be(tmp_path, capsys):
    from training.__main__ import _config, build_parser, main

    cfg = _config(build_parser().parse_args(["loso", "--maps", "causalnet", "--phases", "2"]))
    assert cfg.model_kwargs == {"in_channels": 6} and cfg.phases == 2
    assert main(["loso", "--phases", "2", "--data", str(tmp_path / "absent"),
                 "--run-dir", str(tmp_path / "run")]) == 2
    assert "CausalNet's maps and" in capsys.readouterr().err


def test_an_engine_of_two_phases_predicts_as_its_training_scored(tmp_path):
    """An engine trained on both phases takes the six channels (its manifest says which), is
    normalised per phase as in training, mirrors both phases as the LOSO scoring did, and is
    moved by its second phase; three channels are refused, not guessed at."""
    from realtime_mer.errors import InputError
    from realtime_mer.features import MOVEMENT_CHANNELS
    from realtime_mer.runtime import load_engine
    from training.export import export_default, fit_full, save_weights
    from training.loso import predict_probs

    data = _second_phase_only(_synthetic())
    cfg = dataclasses.replace(PHASES, epochs=3, select_epochs="fixed", tta="hflip",
                              mean=(0.4, 0.5, 0.6), std=(0.3, 0.5, 0.4))
    model = fit_full(data, cfg)[0]
    save_weights(model, cfg, tmp_path / "w.pt")
    manifest = export_default(data, cfg, tmp_path / "phases.onnx", weights=tmp_path / "w.pt")
    assert manifest["input"]["shape"] == ["N", 6, 28, 28]
    assert manifest["input"]["channels"] == list(MOVEMENT_CHANNELS)
    assert manifest["normalization"]["mean"] == [0.4, 0.5, 0.6] * 2
    assert "both phases" in manifest["training"]["data"]
    engine = load_engine(tmp_path / "phases.onnx", backend="onnxruntime")
    assert engine.manifest.phases == 2
    want = predict_probs(model, data.x, cfg)
    np.testing.assert_allclose(engine.predict(data.x), want, atol=1e-5)
    swapped = data.x.copy()
    swapped[:, 3:] = data.x[::-1, 3:]  # the second phases of other samples
    assert np.abs(engine.predict(swapped) - want).max() > 0.1
    with pytest.raises(InputError, match="6, 28, 28"):
        engine.predict(data.x[:, :3])
    # an ensemble feeds its members one batch of onset→apex maps: no member of two phases
    from realtime_mer.errors import EngineError
    from realtime_mer.runtime.ensemble import EnsembleBackend
    from training.ensemble import EnsembleError, write_ensemble_engine

    with pytest.raises(EngineError, match="both phases"):
        EnsembleBackend(tmp_path / "x.ens", engine.manifest, [engine])
    scored = {"members": [{"results": "loso.json", "uf1": 0.5}], "class_names": ["a"]}
    with pytest.raises(EnsembleError, match="both phases"):
        write_ensemble_engine(scored, [tmp_path / "phases.onnx"], tmp_path / "x.ens")
    assert not (tmp_path / "x.ens").exists()
