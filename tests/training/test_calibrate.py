"""Class-prior calibration of a nested run (training/calibrate.py): the shift's formula, the
choice of tau on validation predictions, and a real nested run calibrated end to end."""

import json

import numpy as np
import pytest

from training.calibrate import (BIASES, CalibrationError, TAUS, calibrate_run, choose_bias,
                                choose_tau, offset_shift, prior_shift)
from training.data import Megc3DB
from training.loso import LosoConfig, run_loso
from training.metrics import uf1_uar


def test_prior_shift_is_the_posterior_times_the_prior_to_the_power_tau():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=20)
    counts = np.array([50, 30, 20])
    assert prior_shift(probs, counts, 0.0) == pytest.approx(probs, abs=1e-12)
    for tau in (0.5, 1.0):
        ref = probs * (counts / counts.sum()) ** tau
        ref /= ref.sum(1, keepdims=True)
        assert prior_shift(probs, counts, tau) == pytest.approx(ref, abs=1e-12)
    with pytest.raises(CalibrationError, match="must be positive"):
        prior_shift(probs, np.array([5, 0, 3]), 0.5)


def test_tau_is_the_smallest_that_recovers_the_under_predicted_frequent_class():
    # Class 0 is 8 times as frequent as the others. Its validation samples lean to class 1
    # by a log-ratio of log(0.7/0.3) = 0.847; the shift moves them back once
    # tau * log(8) > 0.847, i.e. tau > 0.41: the smallest grid value is 0.5. Class 1's samples
    # (log-ratio 2.94 > log 8) stay right at every tau.
    counts = np.array([8, 1, 1])
    val = np.array([[0.3, 0.7 - 1e-3, 1e-3]] * 6 + [[0.05, 0.95 - 1e-3, 1e-3]] * 3
                   + [[0.01, 0.01, 0.98]] * 3)
    labels = np.array([0] * 6 + [1] * 3 + [2] * 3)
    tau, curve = choose_tau(val, labels, counts)
    assert tau == 0.5
    assert len(curve) == len(TAUS) and curve[TAUS.index(0.5)] == pytest.approx(1.0)
    assert max(curve[:TAUS.index(0.5)]) < 1.0
    # Already right as trained: no shift (the smallest tau on ties).
    assert choose_tau(np.array([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]]),
                      np.array([0, 1, 2]), counts)[0] == 0.0


def test_bias_is_the_centre_of_the_plateau_that_recovers_the_frequent_class():
    # The validation set of the tau test: class 0's samples lean to class 1 by a log-ratio of
    # 0.847, class 1's by 2.94 the other way, class 2's are far from both. UF1 is 1 exactly
    # when b_1 is in (-2.94, -0.847): on the grid -1.5 to -0.9 (7 values), with any b_2 of the
    # 31. The centroid of that plateau is (-1.2, 0.0), itself a grid point.
    val = np.array([[0.3, 0.7 - 1e-3, 1e-3]] * 6 + [[0.05, 0.95 - 1e-3, 1e-3]] * 3
                   + [[0.01, 0.01, 0.98]] * 3)
    labels = np.array([0] * 6 + [1] * 3 + [2] * 3)
    offsets, uf1, plateau = choose_bias(val, labels)
    assert offsets.tolist() == pytest.approx([0.0, -1.2, 0.0], abs=1e-12)
    assert uf1 == pytest.approx(1.0) and plateau == 7 * len(BIASES)
    assert offset_shift(val, offsets).argmax(1).tolist() == labels.tolist()
    # The prior shift is the bias (0, tau log(pi_1/pi_0), tau log(pi_2/pi_0)).
    counts = np.array([8, 1, 1])
    assert prior_shift(val, counts, 0.5) == pytest.approx(
        offset_shift(val, [0.0, 0.5 * np.log(1 / 8), 0.5 * np.log(1 / 8)]), abs=1e-12)


def _imbalanced(n_subjects: int = 4, per_subject: int = 12, seed: int = 0) -> Megc3DB:
    """Weakly separable maps with a frequent class 0 (half the samples), so the prior matters."""
    rng = np.random.default_rng(seed)
    n = n_subjects * per_subject
    y = np.tile(np.array([0, 0, 0, 1, 0, 0, 2, 0, 1, 2, 1, 2]), n_subjects)[:n].astype(np.int64)
    x = rng.random((n, 3, 28, 28), dtype=np.float32) * 0.6
    for i, c in enumerate(y):
        x[i, c] += 0.12
    subjects = np.repeat([f"casme2/s{i}" for i in range(n_subjects)], per_subject)
    return Megc3DB(x=x, y=y, subjects=subjects, databases=np.array(["casme2"] * n),
                   videos=np.array([f"v{i}" for i in range(n)]),
                   files=np.array([f"f{i}.png" for i in range(n)]), root="synthetic")


NESTED = LosoConfig(epochs=4, batch_size=8, eval_every=2, lr=5e-3, select_epochs="nested",
                    inner_folds=2)


@pytest.fixture(scope="module")
def nested_run(tmp_path_factory):
    data = _imbalanced()
    run_dir = tmp_path_factory.mktemp("cal") / "run"
    out = run_dir.parent / "res.json"
    run_loso(data, NESTED, run_dir, results_path=out)
    return data, run_dir, out


def test_nested_files_keep_the_validation_probabilities_the_epoch_was_chosen_on(nested_run):
    data, run_dir, _ = nested_run
    for fold, subject in enumerate(data.subject_list):
        rec = json.loads((run_dir / f"nested_{fold:02d}.json").read_text())
        train = np.flatnonzero(data.subjects != subject)
        val_idx = np.array(rec["inner_val_indices"])
        assert sorted(val_idx.tolist()) == train.tolist()  # every training sample once
        probs = np.array(rec["inner_val_probs"])
        assert probs.sum(1) == pytest.approx(np.ones(len(train)), abs=1e-5)
        best = rec["epochs"].index(rec["chosen"])
        assert uf1_uar(data.y[val_idx], probs.argmax(1))[0] == pytest.approx(
            rec["inner_uf1"][best], abs=1e-4)


def test_calibrated_run_shifts_each_fold_by_its_inner_tau(nested_run, tmp_path):
    data, run_dir, out = nested_run
    doc = json.loads(out.read_text())
    cal = calibrate_run(run_dir, out)
    taus = cal["calibration"]["tau_per_subject"]
    assert sorted(taus) == sorted(data.subject_list)
    assert all(t in TAUS for t in taus.values()) and any(t > 0 for t in taus.values())
    ens_in = np.array(doc["nested_cv_ensemble"]["probs"])
    ens_out = np.array(cal["nested_cv_ensemble"]["probs"])
    for r, (p_in, p_out) in enumerate(zip(doc["predictions"], cal["predictions"])):
        assert p_in["index"] == p_out["index"] and p_in["label"] == p_out["label"]
        counts = np.bincount(data.y[data.subjects != p_in["subject"]], minlength=3)
        tau = taus[p_in["subject"]]
        assert p_out["probs"] == pytest.approx(
            prior_shift(np.array([p_in["probs"]]), counts, tau)[0], abs=2e-6)
        assert ens_out[r] == pytest.approx(prior_shift(ens_in[r:r + 1], counts, tau)[0],
                                           abs=2e-6)
    y = np.array([p["label"] for p in cal["predictions"]])
    pred = np.array([p["pred"] for p in cal["predictions"]])
    assert pred.tolist() == np.array([p["probs"] for p in cal["predictions"]]).argmax(1).tolist()
    assert (cal["uf1"], cal["uar"]) == pytest.approx(uf1_uar(y, pred), abs=1e-12)
    assert cal["calibration"]["uncalibrated"]["single"]["uf1"] == doc["uf1"]
    # compare reads it like a LOSO results file (the :cv_ensemble source too).
    from training.compare import load_results, paired_comparison

    path = tmp_path / "cal.json"
    path.write_text(json.dumps(cal))
    r = paired_comparison(load_results(out), load_results(path), n_boot=50)
    assert r["variant"]["uf1"] == pytest.approx(cal["uf1"], abs=1e-12)
    assert load_results(f"{path}:cv_ensemble")["uf1"] == pytest.approx(
        cal["nested_cv_ensemble"]["uf1"], abs=1e-12)


def test_bias_calibrated_run_shifts_each_fold_by_its_inner_biases(nested_run):
    data, run_dir, out = nested_run
    doc = json.loads(out.read_text())
    cal = calibrate_run(run_dir, out, rule="bias")
    rec = cal["calibration"]
    assert rec["kind"] == "bias" and sorted(rec["bias_per_subject"]) == sorted(data.subject_list)
    for fold, subject in enumerate(data.subject_list):
        bias = np.array(rec["bias_per_subject"][subject])
        assert bias[0] == 0.0 and all(b in BIASES for b in bias[1:].tolist())
        # The recorded inner UF1 is the chosen biases' on the fold's inner predictions, and
        # no worse than the network as trained (b = 0 is on the grid).
        nested = json.loads((run_dir / f"nested_{fold:02d}.json").read_text())
        val_y = data.y[np.array(nested["inner_val_indices"])]
        val_p = np.array(nested["inner_val_probs"])
        inner = rec["inner_uf1_per_subject"][subject]
        assert uf1_uar(val_y, offset_shift(val_p, bias).argmax(1))[0] == pytest.approx(
            inner["best"], abs=1e-6)
        assert inner["best"] >= inner["unshifted"] - 1e-9
    ens_in = np.array(doc["nested_cv_ensemble"]["probs"])
    ens_out = np.array(cal["nested_cv_ensemble"]["probs"])
    for r, (p_in, p_out) in enumerate(zip(doc["predictions"], cal["predictions"])):
        bias = rec["bias_per_subject"][p_in["subject"]]
        assert p_out["probs"] == pytest.approx(offset_shift(np.array([p_in["probs"]]), bias)[0],
                                               abs=2e-6)
        assert ens_out[r] == pytest.approx(offset_shift(ens_in[r:r + 1], bias)[0], abs=2e-6)
    with pytest.raises(CalibrationError, match="unknown calibration rule"):
        calibrate_run(run_dir, out, rule="temperature")


def test_calibration_refuses_another_runs_results_and_old_runs(nested_run, tmp_path):
    data, run_dir, out = nested_run
    doc = json.loads(out.read_text())
    edited = json.loads(json.dumps(doc))
    edited["predictions"][0]["probs"] = [1.0, 0.0, 0.0]
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(edited))
    with pytest.raises(CalibrationError, match="not the same run"):
        calibrate_run(run_dir, path)
    fixed = {k: v for k, v in doc.items() if k not in ("nested_selection", "nested_cv_ensemble")}
    path.write_text(json.dumps(fixed))
    with pytest.raises(CalibrationError, match="not a nested run"):
        calibrate_run(run_dir, path)
    # A run made before the validation probabilities were kept.
    old_dir = tmp_path / "old"
    old_dir.mkdir()
    for f in run_dir.glob("*.json"):
        rec = json.loads(f.read_text())
        if f.name.startswith("nested_"):
            rec.pop("inner_val_probs")
        (old_dir / f.name).write_text(json.dumps(rec))
    with pytest.raises(CalibrationError, match="rerun its nested selection"):
        calibrate_run(old_dir, out)


def test_cli_calibrates_and_refuses_a_missing_run(nested_run, tmp_path, capsys):
    from training.__main__ import main

    _, run_dir, out = nested_run
    dest = tmp_path / "cal.json"
    assert main(["calibrate", "--run-dir", str(run_dir), "--results", str(out),
                 "--out", str(dest)]) == 0
    text = capsys.readouterr().out
    res = json.loads(dest.read_text())
    assert f"calibrated CV ensemble  UF1 {res['nested_cv_ensemble']['uf1']:.4f}" in text
    assert main(["calibrate", "--run-dir", str(run_dir), "--results", str(out), "--rule",
                 "bias", "--out", str(dest)]) == 0
    text = capsys.readouterr().out
    res = json.loads(dest.read_text())
    assert res["calibration"]["kind"] == "bias" and "biases chosen by the inner CV" in text
    assert f"calibrated CV ensemble  UF1 {res['nested_cv_ensemble']['uf1']:.4f}" in text
    assert main(["calibrate", "--run-dir", str(tmp_path / "absent"), "--results",
                 str(tmp_path / "absent.json")]) == 2
    assert "cannot read the LOSO results" in capsys.readouterr().err
