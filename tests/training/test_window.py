"""The checkpoint window of a nested LOSO run: each fold's outer-model probabilities averaged
over the evaluation epochs around its nested choice, checked against models retrained from
their seeds."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from tests.training.test_loso import _synthetic
from training.compare import load_results, paired_comparison
from training.loso import LosoConfig, run_loso, train_models
from training.metrics import uf1_uar
from training.window import WindowError, checkpoint_window, window_epochs

torch.set_num_threads(1)

NESTED = LosoConfig(epochs=6, batch_size=8, eval_every=2, lr=5e-3, select_epochs="nested",
                    inner_folds=2)


@pytest.fixture(scope="module")
def nested_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("window")
    data = _synthetic()
    out = root / "nested.json"
    res = run_loso(data, NESTED, root / "run", chunk_size=1, results_path=out)
    assert res["complete"]
    return data, root / "run", out, res


def test_window_epochs_are_the_evaluation_epochs_near_the_choice():
    candidates = list(range(10, 301, 10))
    assert window_epochs(50, candidates, 20) == [30, 40, 50, 60, 70]
    assert window_epochs(20, candidates, 20) == [10, 20, 30, 40]
    assert window_epochs(300, candidates, 20) == [280, 290, 300]
    assert window_epochs(50, candidates, 0) == [50]
    with pytest.raises(WindowError, match="not an evaluation epoch"):
        window_epochs(55, candidates, 20)
    with pytest.raises(WindowError, match=">= 0"):
        window_epochs(50, candidates, -10)


def test_window_averages_the_outer_models_retrained_at_each_checkpoint(nested_run, tmp_path):
    data, run_dir, out, res = nested_run
    win = checkpoint_window(run_dir, out, width=2)
    probs = {p["index"]: np.array(p["probs"]) for p in win["predictions"]}
    for f, subject in enumerate(data.subject_list):
        chosen = res["nested_selection"]["chosen_epochs"][subject]
        epochs = win["window"]["epochs_per_subject"][subject]
        assert epochs == [e for e in (chosen - 2, chosen, chosen + 2) if 2 <= e <= 6]
        test = np.flatnonzero(data.subjects == subject)
        train = np.flatnonzero(data.subjects != subject)
        at_epoch = []
        for e in epochs:  # Adam at a constant rate: training to e reproduces checkpoint e
            (model,), _ = train_models(data.x, data.y, [train],
                                       dataclasses.replace(NESTED, epochs=e), [f])
            with torch.no_grad():
                at_epoch.append(torch.softmax(model(torch.as_tensor(
                    (data.x[test] - 0.5) / 0.5)), -1).numpy())
        np.testing.assert_allclose([probs[int(i)] for i in test], np.mean(at_epoch, axis=0),
                                   atol=1e-4)
    y = np.array([p["label"] for p in win["predictions"]])
    pred = np.array([p["probs"] for p in win["predictions"]]).argmax(1)
    assert (win["uf1"], win["uar"]) == pytest.approx(uf1_uar(y, pred), abs=1e-12)
    assert win["single_model"]["uf1"] == res["uf1"]


def test_zero_width_is_the_single_model_and_compare_reads_the_window(nested_run, tmp_path):
    _, run_dir, out, res = nested_run
    win = checkpoint_window(run_dir, out, width=0)
    assert [p["pred"] for p in win["predictions"]] == \
        [p["pred"] for p in sorted(res["predictions"], key=lambda p: p["index"])]
    assert win["uf1"] == pytest.approx(res["uf1"], abs=1e-12)
    path = tmp_path / "window.json"
    path.write_text(json.dumps(checkpoint_window(run_dir, out, width=2)))
    r = paired_comparison(load_results(out), load_results(path), n_boot=50)
    assert r["variant"]["uf1"] == pytest.approx(json.loads(path.read_text())["uf1"], abs=1e-12)


def test_window_refuses_a_results_file_of_another_run(nested_run, tmp_path):
    from training.__main__ import main

    data, run_dir, out, _ = nested_run
    other = tmp_path / "other.json"
    run_loso(data, dataclasses.replace(NESTED, seed=1), tmp_path / "other", chunk_size=1,
             results_path=other)
    with pytest.raises(WindowError, match="not the same run"):
        checkpoint_window(run_dir, other, width=2)
    fixed = tmp_path / "fixed.json"
    run_loso(data, dataclasses.replace(NESTED, select_epochs="fixed"), tmp_path / "fixed",
             chunk_size=1, results_path=fixed)
    with pytest.raises(WindowError, match="not a nested run"):
        checkpoint_window(tmp_path / "fixed", fixed, width=2)
    assert main(["window", "--run-dir", str(tmp_path / "missing"), "--results", str(out)]) == 2


def test_window_refuses_a_run_whose_outer_models_stopped_at_their_chosen_epoch(nested_run,
                                                                               tmp_path):
    """Such a run has no checkpoints after a fold's choice: averaging only the earlier ones
    would be another estimator, so the window says why it cannot be made."""
    data = nested_run[0]
    out = tmp_path / "chosen.json"
    res = run_loso(data, NESTED, tmp_path / "chosen", chunk_size=1, results_path=out,
                   outer_epochs="chosen")
    assert min(res["nested_selection"]["chosen_epochs"].values()) < NESTED.epochs
    with pytest.raises(WindowError, match="outer-epochs chosen"):
        checkpoint_window(tmp_path / "chosen", out, width=NESTED.epochs)
