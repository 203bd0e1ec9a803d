"""Short LOSO runs on a small synthetic set: end to end, resume, determinism, errors."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import re
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from realtime_mer.errors import DatasetError
from training.data.megc3db import Megc3DB
from training.loso import (
    LosoConfig, LosoWorkerError, class_weighted_loss, hflip_maps, run_loso, shift_images,
    train_models,
)
from training.metrics import uf1_uar

torch.set_num_threads(1)


def _synthetic(n_subjects: int = 4, per_subject: int = 9, seed: int = 0) -> Megc3DB:
    """Separable maps: the class sets the mean of one channel."""
    rng = np.random.default_rng(seed)
    n = n_subjects * per_subject
    y = np.tile(np.arange(3), n // 3 + 1)[:n].astype(np.int64)
    x = rng.random((n, 3, 28, 28), dtype=np.float32) * 0.3
    for i, c in enumerate(y):
        x[i, c] += 0.6
    subjects = np.repeat([f"casme2/s{i}" for i in range(n_subjects)], per_subject)
    dbs = np.array(["casme2"] * n)
    return Megc3DB(x=x, y=y, subjects=subjects, databases=dbs,
                   videos=np.array([f"v{i}" for i in range(n)]),
                   files=np.array([f"f{i}.png" for i in range(n)]), root="synthetic")


CFG = LosoConfig(epochs=4, batch_size=8, eval_every=2, lr=5e-3)


def test_short_loso_end_to_end(tmp_path):
    data = _synthetic()
    out = tmp_path / "res.json"
    res = run_loso(data, CFG, tmp_path / "run", folds=[0, 1, 2], results_path=out,
                   checkpoint_every=2)
    assert res["folds_run"] == 3 and res["complete"] is False
    assert len(res["predictions"]) == 27
    assert res["uf1"] > 0.9  # separable data
    # The reported scores are those of the pooled predictions it lists, each the argmax.
    preds = res["predictions"]
    y_true = np.array([p["label"] for p in preds])
    y_pred = np.array([p["pred"] for p in preds])
    assert all(p["pred"] == int(np.argmax(p["probs"])) for p in preds)
    assert (res["uf1"], res["uar"]) == pytest.approx(uf1_uar(y_true, y_pred), abs=1e-12)
    assert y_true.tolist() == data.y[[p["index"] for p in preds]].tolist()
    assert "LEAKY" in res["leaky_best_epoch"]["WARNING"]
    saved = json.loads(out.read_text())
    for key in ("model", "model_kwargs", "epochs", "lr", "batch_size", "optimizer", "seed",
                "augment"):
        assert key in saved["config"]
    assert saved["environment"]["torch"] == torch.__version__
    # The host CPU is named so that a rerun elsewhere can be told apart from drift.
    cpu = saved["environment"]["cpu"]
    assert cpu["capability"] == torch.backends.cpu.get_cpu_capability()
    if "MKL-DNN v" in torch.__config__.show():  # torch built with oneDNN names its version
        assert cpu["onednn"][0].isdigit() and cpu["onednn"] in torch.__config__.show()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists() and "model name" in cpuinfo.read_text():
        assert cpu["model_name"] and cpu["family"].isdigit()
    assert "wall_time_s" in saved and saved["per_database"]["casme2"]["n"] == 27
    assert not list((tmp_path / "run").glob("chunk_*.pt"))  # checkpoint removed when done


@pytest.mark.parametrize("dropout,mixup,shift", [(0.0, 0.0, 0), (0.5, 0.0, 0), (0.0, 0.4, 0),
                                                 (0.0, 0.0, 2)])
def test_resume_skips_done_folds_and_checkpoint(tmp_path, dropout, mixup, shift):
    """With dropout, mixup or shifts too: the checkpoint carries the global and the folds'
    generators' states, so the resumed run draws the masks, mixing weights and offsets an
    uninterrupted run draws."""
    data = _synthetic()
    cfg = dataclasses.replace(CFG, model_kwargs={"dropout": dropout}, mixup_alpha=mixup,
                              shift_pixels=shift)
    ref = run_loso(data, cfg, tmp_path / "ref", folds=[0, 1, 2])

    class Stop(Exception):
        pass

    def interrupt(msg: str) -> None:
        if "epoch 3/4" in msg:
            raise Stop

    with pytest.raises(Stop):
        run_loso(data, cfg, tmp_path / "run", folds=[0, 1, 2], checkpoint_every=2,
                 progress=interrupt)
    assert list((tmp_path / "run").glob("chunk_*.pt"))
    msgs: list[str] = []
    res = run_loso(data, cfg, tmp_path / "run", folds=[0, 1, 2], checkpoint_every=2,
                   progress=msgs.append)
    assert any("resuming from epoch 2" in m for m in msgs)
    a = np.array([p["probs"] for p in ref["predictions"]])
    b = np.array([p["probs"] for p in res["predictions"]])
    np.testing.assert_allclose(a, b, atol=1e-5)
    # A finished fold is not trained again.
    msgs.clear()
    run_loso(data, cfg, tmp_path / "run", folds=[0, 1, 2], progress=msgs.append)
    assert any("3 of 3 folds already done" in m for m in msgs)
    assert not any("epoch" in m for m in msgs)


def test_fold_result_independent_of_chunking(tmp_path):
    data = _synthetic()
    together = run_loso(data, CFG, tmp_path / "a", folds=[0, 1], chunk_size=2)
    alone = run_loso(data, CFG, tmp_path / "b", folds=[0, 1], chunk_size=1)
    a = np.array([p["probs"] for p in together["predictions"]])
    b = np.array([p["probs"] for p in alone["predictions"]])
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_worker_processes_train_the_same_folds(tmp_path):
    data = _synthetic()
    serial = run_loso(data, CFG, tmp_path / "a", folds=[0, 1, 2], chunk_size=1)
    parallel = run_loso(data, CFG, tmp_path / "b", folds=[0, 1, 2], chunk_size=1, workers=2)
    a = np.array([p["probs"] for p in serial["predictions"]])
    b = np.array([p["probs"] for p in parallel["predictions"]])
    # Same seeds, same single thread per process: only summation order could differ.
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert parallel["environment"]["workers"] == 2
    assert parallel["total_wall_time_s"] > 0


NESTED = dataclasses.replace(CFG, select_epochs="nested", inner_folds=2)


def test_nested_selection_in_workers_matches_serial_and_resumes(tmp_path):
    data = _synthetic()
    serial = run_loso(data, NESTED, tmp_path / "a", folds=[0, 1], chunk_size=1)
    parallel = run_loso(data, NESTED, tmp_path / "b", folds=[0, 1], chunk_size=1, workers=2)
    assert (parallel["nested_selection"]["chosen_epochs"]
            == serial["nested_selection"]["chosen_epochs"])
    assert ([p["pred"] for p in parallel["predictions"]]
            == [p["pred"] for p in serial["predictions"]])
    assert sorted(p.name for p in (tmp_path / "b").glob("nested_*.json")) == [
        "nested_00.json", "nested_01.json"]
    msgs: list[str] = []
    again = run_loso(data, NESTED, tmp_path / "b", folds=[0, 1], chunk_size=1, workers=2,
                     progress=msgs.append)
    assert not any("worker" in m or "trained" in m for m in msgs)  # nothing retrained
    assert again["uf1"] == parallel["uf1"]


def test_outer_models_stopped_at_their_chosen_epoch_give_the_same_honest_results(tmp_path):
    """``outer_epochs="chosen"`` trains each outer model only to its fold's chosen epoch. The
    learning rate is constant and evaluations do not touch the weights, so the honest
    predictions and the CV ensemble are those of the run to the schedule's end, bit for bit in
    one process; the figures that need the later epochs are left out, not made up."""
    data = _synthetic()
    cfg = dataclasses.replace(NESTED, epochs=6)  # candidates 2, 4, 6
    full = run_loso(data, cfg, tmp_path / "all", folds=[0, 1, 2], chunk_size=1)
    msgs: list[str] = []
    short = run_loso(data, cfg, tmp_path / "chosen", folds=[0, 1, 2], chunk_size=1,
                     outer_epochs="chosen", progress=msgs.append)
    chosen = full["nested_selection"]["chosen_epochs"]
    assert short["nested_selection"]["chosen_epochs"] == chosen
    trained = [json.loads((tmp_path / "chosen" / f"fold_{f:02d}.json").read_text())
               ["trained_epochs"] for f in (0, 1, 2)]
    assert trained == [chosen[data.subject_list[f]] for f in (0, 1, 2)]
    assert min(trained) < cfg.epochs  # the test exercises a model that stopped early
    # The selection ran before the outer models (they need its choices).
    first_outer = next(i for i, m in enumerate(msgs) if m.startswith("folds 0..0"))
    assert any("epochs chosen" in m for m in msgs[:first_outer])
    assert [p["probs"] for p in short["predictions"]] == [p["probs"] for p in full["predictions"]]
    assert short["nested_cv_ensemble"]["probs"] == full["nested_cv_ensemble"]["probs"]
    assert (short["uf1"], short["uar"]) == (full["uf1"], full["uar"])
    assert "leaky_best_epoch" not in short and "leaky_best_epoch" in full
    assert "fixed_final_epoch_same_run" not in short["nested_selection"]
    assert "LEAKY" in short["outer_epochs"]["not_measured"]
    # Worker processes: the same choices and predictions (one thread each, as here).
    parallel = run_loso(data, cfg, tmp_path / "workers", folds=[0, 1, 2], chunk_size=1,
                        workers=2, outer_epochs="chosen")
    np.testing.assert_allclose(np.array([p["probs"] for p in parallel["predictions"]]),
                               np.array([p["probs"] for p in full["predictions"]]), atol=1e-5)
    # A run directory of one kind does not resume as the other.
    with pytest.raises(ValueError, match="different configuration"):
        run_loso(data, cfg, tmp_path / "chosen", folds=[0, 1, 2], chunk_size=1)
    with pytest.raises(ValueError, match="only when the epochs are chosen"):
        run_loso(data, CFG, tmp_path / "fixed", folds=[0], outer_epochs="chosen")


def test_shift_tta_changes_the_test_predictions_and_no_choice(tmp_path):
    """tta_shift acts on the predictions of test subjects only: the inner validation
    predictions (the choices' inputs) and so the chosen epochs are bit for bit those of the run
    without it; the outer scores and the CV ensemble are the translation-averaged ones (the
    outer ones checked against predict_probs of the model rebuilt from its fold's seed)."""
    from training.loso import predict_probs, train_models

    data = _synthetic()
    cfg = dataclasses.replace(NESTED, tta="hflip", lr=5e-4)
    plain = run_loso(data, cfg, tmp_path / "plain", folds=[0, 1], chunk_size=1,
                     outer_epochs="chosen")
    shifted_cfg = dataclasses.replace(cfg, tta_shift=1)
    shifted = run_loso(data, shifted_cfg, tmp_path / "shift", folds=[0, 1], chunk_size=1,
                       outer_epochs="chosen")
    assert (shifted["nested_selection"]["chosen_epochs"]
            == plain["nested_selection"]["chosen_epochs"])
    for f in (0, 1):
        a = json.loads((tmp_path / "plain" / f"nested_{f:02d}.json").read_text())
        b = json.loads((tmp_path / "shift" / f"nested_{f:02d}.json").read_text())
        assert a["inner_uf1"] == b["inner_uf1"]
    p_plain = np.array([p["probs"] for p in plain["predictions"]])
    p_shift = np.array([p["probs"] for p in shifted["predictions"]])
    assert np.abs(p_plain - p_shift).max() > 1e-4
    e_plain = np.array(plain["nested_cv_ensemble"]["probs"])
    e_shift = np.array(shifted["nested_cv_ensemble"]["probs"])
    assert np.abs(e_plain - e_shift).max() > 1e-4
    test = np.flatnonzero(data.subjects == data.subject_list[0])
    chosen = shifted["nested_selection"]["chosen_epochs"][data.subject_list[0]]
    (model,), _ = train_models(data.x, data.y, [np.setdiff1d(np.arange(len(data)), test)],
                               dataclasses.replace(shifted_cfg, epochs=chosen), [0])
    np.testing.assert_allclose(p_shift[:len(test)], predict_probs(model, data.x[test],
                                                                  shifted_cfg), atol=1e-5)


def test_cv_ensemble_averages_the_outer_and_the_retrained_inner_models(tmp_path):
    """The ensemble's probabilities are the mean of the outer model and the inner models at
    the chosen epoch; the inner models are rebuilt here from their documented seed ids and
    training sets, independently of the runner's bookkeeping."""
    from training.loso import inner_jobs, train_models

    data = _synthetic()
    res = run_loso(data, NESTED, tmp_path / "run", folds=[0, 1], chunk_size=1)
    ens = res["nested_cv_ensemble"]
    assert ens["n_models"] == NESTED.inner_folds + 1
    outer = np.array([p["probs"] for p in res["predictions"]])
    k = NESTED.inner_folds
    offset = 0
    for f in (0, 1):
        chosen = res["nested_selection"]["chosen_epochs"][data.subject_list[f]]
        test = np.flatnonzero(data.subjects == data.subject_list[f])
        inner = []
        for key, g, train, _ in inner_jobs(data, NESTED, f, [data.subject_list[f]]):
            cfg = dataclasses.replace(NESTED, epochs=chosen)
            (model,), _ = train_models(data.x, data.y, [train], cfg, [10_000 + key * k + g])
            with torch.no_grad():
                inner.append(torch.softmax(model(torch.as_tensor(
                    (data.x[test] - 0.5) / 0.5)), -1).numpy())
        want = (outer[offset:offset + len(test)] + np.sum(inner, axis=0)) / (k + 1)
        got = np.array(ens["probs"][offset:offset + len(test)])
        np.testing.assert_allclose(got, want, atol=1e-4)
        offset += len(test)
    y = np.array([p["label"] for p in res["predictions"]])
    assert (ens["uf1"], ens["uar"]) == pytest.approx(
        uf1_uar(y, np.array(ens["probs"]).argmax(1)), abs=1e-12)
    assert set(ens["per_database"]) == {"casme2"}


def test_the_test_subjects_labels_cannot_reach_its_fold(tmp_path):
    """Black-box leak check of the honest protocol: relabel every sample of the held-out
    subject and rerun. Its fold's chosen epoch count, predictions and CV-ensemble probabilities
    must be bit-identical (only the LEAKY per-subject figure may look at those labels), while
    the score, which is computed against them, changes."""
    data = _synthetic()
    test = data.subjects == data.subject_list[0]
    y = data.y.copy()
    y[test] = (y[test] + 1) % 3
    a = run_loso(data, NESTED, tmp_path / "a", folds=[0], chunk_size=1)
    b = run_loso(dataclasses.replace(data, y=y), NESTED, tmp_path / "b", folds=[0],
                 chunk_size=1)
    assert a["nested_selection"]["chosen_epochs"] == b["nested_selection"]["chosen_epochs"]
    assert [p["probs"] for p in a["predictions"]] == [p["probs"] for p in b["predictions"]]
    assert a["nested_cv_ensemble"]["probs"] == b["nested_cv_ensemble"]["probs"]
    assert a["uf1"] != b["uf1"]


def test_killed_worker_is_reported_and_the_rerun_completes_the_run(tmp_path):
    """A worker killed mid-run (say by the OOM killer) fails the run with a resume hint;
    rerunning the same call finishes it, with the same predictions as an uninterrupted run."""
    data = _synthetic()
    killed: list[int] = []

    def kill_first_worker() -> None:
        while True:
            children = [c for c in multiprocessing.active_children()
                        if c.name.startswith("loso-worker")]
            if children:
                time.sleep(0.5)  # still importing torch: spawn takes seconds
                os.kill(children[0].pid, signal.SIGKILL)
                killed.append(children[0].pid)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_first_worker, daemon=True)
    killer.start()
    with pytest.raises(LosoWorkerError, match="rerun the same command to resume"):
        run_loso(data, CFG, tmp_path / "run", folds=[0, 1, 2, 3], chunk_size=1, workers=2)
    killer.join(timeout=60)
    assert killed
    res = run_loso(data, CFG, tmp_path / "run", folds=[0, 1, 2, 3], chunk_size=1, workers=2)
    ref = run_loso(data, CFG, tmp_path / "ref", folds=[0, 1, 2, 3], chunk_size=1)
    np.testing.assert_allclose(np.array([p["probs"] for p in res["predictions"]]),
                               np.array([p["probs"] for p in ref["predictions"]]), atol=1e-5)


def test_network_that_does_not_fit_is_refused_before_the_run_dir_records_it(tmp_path):
    data = _synthetic()
    bad = dataclasses.replace(CFG, model_kwargs={"no_such_option": 1})
    with pytest.raises(ValueError, match="no_such_option"):
        run_loso(data, bad, tmp_path / "run", folds=[0], workers=2)
    assert not (tmp_path / "run" / "config.json").exists()
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        run_loso(data, dataclasses.replace(CFG, model="nope"), tmp_path / "run", folds=[0])
    run_loso(data, CFG, tmp_path / "run", folds=[0])  # the fixed command runs in that dir


def test_folds_beyond_the_dataset_are_refused_briefly_before_any_work(tmp_path):
    data = _synthetic()  # 4 subjects: folds 0..3
    with pytest.raises(ValueError) as info:
        run_loso(data, CFG, tmp_path / "run", folds=range(1, 1000))
    message = str(info.value)
    assert message.startswith("fold index(es) 4, 5, 6, 7, 8, ... (996 in all) outside 0..3")
    assert len(message) < 200
    assert not (tmp_path / "run").exists()


def test_unreadable_checkpoint_restarts_its_chunk(tmp_path):
    data = _synthetic()
    run_dir = tmp_path / "run"
    ref = run_loso(data, CFG, tmp_path / "ref", folds=[0])
    run_dir.mkdir()
    (run_dir / "chunk_00_00.pt").write_bytes(b"not a checkpoint")
    msgs: list[str] = []
    res = run_loso(data, CFG, run_dir, folds=[0], progress=msgs.append)
    assert any("unreadable" in m for m in msgs)
    assert [p["probs"] for p in res["predictions"]] == [p["probs"] for p in ref["predictions"]]


def test_workers_refused_on_gpu(tmp_path):
    with pytest.raises(ValueError, match="worker processes are for CPU"):
        run_loso(_synthetic(), CFG, tmp_path / "run", folds=[0], device="cuda", workers=2)


def test_config_mismatch_refused(tmp_path):
    data = _synthetic()
    run_loso(data, CFG, tmp_path / "run", folds=[0])
    with pytest.raises(ValueError, match="different configuration"):
        run_loso(data, LosoConfig(epochs=5, batch_size=8), tmp_path / "run", folds=[0])


def test_training_set_missing_a_class(tmp_path):
    data = _synthetic()
    y = data.y.copy()
    y[(data.subjects != "casme2/s0") & (y == 2)] = 1  # only s0 has surprise
    bad = Megc3DB(**{**data.__dict__, "y": y})
    with pytest.raises(DatasetError, match="surprise"):
        run_loso(bad, CFG, tmp_path / "run", folds=[0])


def test_hflip_negates_u_and_mirrors():
    x = torch.rand(2, 3, 28, 28)
    f = hflip_maps(x)
    assert torch.allclose(f[:, 0], 1 - torch.flip(x[:, 0], dims=(-1,)))
    assert torch.equal(f[:, 1:], torch.flip(x[:, 1:], dims=(-1,)))
    assert torch.allclose(hflip_maps(f), x, atol=1e-6)


def test_training_loss_matches_pytorchs_weighted_and_soft_target_cross_entropy():
    gen = torch.Generator().manual_seed(0)
    m, b, c = 3, 16, 3
    logits = torch.randn(m, b, c, generator=gen)
    y = torch.randint(0, c, (m, b), generator=gen)
    y_partner = torch.randint(0, c, (m, b), generator=gen)
    lam = torch.rand(m, b, generator=gen)
    class_w = torch.rand(m, c, generator=gen) + 0.5
    weighted = sum(torch.nn.functional.cross_entropy(logits[i], y[i], weight=class_w[i])
                   for i in range(m))
    # Unmixed: the class-weighted CE per model; so is a sample mixed with one of its own
    # class, whatever lam is.
    torch.testing.assert_close(class_weighted_loss(logits, y, class_w), weighted,
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(class_weighted_loss(logits, y, class_w, (lam, y)), weighted,
                               rtol=1e-6, atol=1e-6)
    # Mixed, unweighted: the cross-entropy against the mixed one-hot targets.
    soft = lam[..., None] * torch.nn.functional.one_hot(y, c) + \
        (1 - lam[..., None]) * torch.nn.functional.one_hot(y_partner, c)
    reference = sum(torch.nn.functional.cross_entropy(logits[i], soft[i].float())
                    for i in range(m))
    torch.testing.assert_close(
        class_weighted_loss(logits, y, torch.ones(m, c), (lam, y_partner)), reference,
        rtol=1e-6, atol=1e-6)
    # Label smoothing eps: each sample's CE is against (1 - eps) * one-hot + eps / C, written
    # out here from the log-softmax, weighted by the class weight of the sample's label.
    eps = 0.1
    log_p = torch.log_softmax(logits, dim=-1)
    smooth = (1 - eps) * torch.nn.functional.one_hot(y, c) + eps / c
    per_sample = -(smooth * log_p).sum(-1)  # (M, B)
    w = torch.gather(class_w, 1, y)
    reference = ((per_sample * w).sum(1) / w.sum(1)).sum()
    torch.testing.assert_close(class_weighted_loss(logits, y, class_w, label_smoothing=eps),
                               reference, rtol=1e-6, atol=1e-6)
    # ... and differs from the unsmoothed loss (the logits are not uniform).
    assert abs(float(reference) - float(weighted)) > 1e-3


# Shifted batches are harder than mixed ones: that run gets twice the steps of CFG. Label
# smoothing changes the loss, not the inputs, but the run must still learn.
@pytest.mark.parametrize("option,value,epochs", [("mixup_alpha", 0.4, 4), ("shift_pixels", 2, 8),
                                                 ("label_smoothing", 0.1, 4)])
def test_training_augmentation_trains_on_other_inputs_and_still_learns(tmp_path, option, value,
                                                                        epochs):
    data = _synthetic()
    cfg = dataclasses.replace(CFG, epochs=epochs)
    plain = run_loso(data, cfg, tmp_path / "a", folds=[0, 1])
    augmented = run_loso(data, dataclasses.replace(cfg, **{option: value}), tmp_path / "b",
                         folds=[0, 1])
    assert augmented["config"][option] == value
    assert augmented["uf1"] > 0.9  # separable data
    a = np.array([p["probs"] for p in plain["predictions"]])
    b = np.array([p["probs"] for p in augmented["predictions"]])
    assert np.abs(a - b).max() > 1e-3


def test_shift_images_matches_edge_padded_crops():
    """Reference: numpy's edge padding, then the crop that moves content by (dy, dx)."""
    rng = np.random.default_rng(3)
    x = rng.random((2, 5, 3, 7, 9)).astype(np.float32)
    k = 2
    offsets = rng.integers(-k, k + 1, size=(2, 5, 2))
    offsets[0, 0] = (0, 0)
    offsets[0, 1] = (k, -k)
    got = shift_images(torch.from_numpy(x), torch.from_numpy(offsets), k).numpy()
    for m in range(2):
        for b in range(5):
            dy, dx = offsets[m, b]
            pad = np.pad(x[m, b], ((0, 0), (k, k), (k, k)), mode="edge")
            want = pad[:, k - dy:k - dy + 7, k - dx:k - dx + 9]
            np.testing.assert_array_equal(got[m, b], want)
    np.testing.assert_array_equal(got[0, 0], x[0, 0])
    # Content moves down and left: the top-left pixel lands at row 2, column -2 (off-image).
    np.testing.assert_array_equal(got[0, 1, :, 2, 0], x[0, 1, :, 0, 2])
    with pytest.raises(ValueError, match="max_shift"):
        shift_images(torch.from_numpy(x), torch.from_numpy(offsets * 0 + 3), k)


def test_bad_config():
    with pytest.raises(ValueError):
        LosoConfig(augment="rotate")
    for shift in (-1, 1.5):
        with pytest.raises(ValueError, match="shift_pixels"):
            LosoConfig(shift_pixels=shift)
    for shift in (-1, 1.5):
        with pytest.raises(ValueError, match="tta_shift"):
            LosoConfig(tta_shift=shift)
    for alpha in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="mixup_alpha"):
            LosoConfig(mixup_alpha=alpha)
    for eps in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match="label_smoothing"):
            LosoConfig(label_smoothing=eps)
    with pytest.raises(ValueError):
        LosoConfig(epochs=0)
    cfg = LosoConfig.from_dict(CFG.to_dict())
    assert cfg == CFG


def test_dropout_network_on_colour_input_is_reproducible(tmp_path):
    """MJFN has dropout (random draws inside vmap) and is fed the colour-coded image built from
    the maps: the runner must accept both, and a seeded run must repeat exactly."""
    data = _synthetic(n_subjects=3, per_subject=6)
    cfg = LosoConfig(model="mjfn", model_kwargs={"input_size": 112}, input_kind="colour",
                     input_size=112, epochs=2, batch_size=4, eval_every=1)
    a = run_loso(data, cfg, tmp_path / "a", folds=[0, 1], chunk_size=2)
    b = run_loso(data, cfg, tmp_path / "b", folds=[0, 1], chunk_size=2)
    assert a["config"]["input_kind"] == "colour" and a["config"]["input_size"] == 112
    pa = np.array([p["probs"] for p in a["predictions"]])
    pb = np.array([p["probs"] for p in b["predictions"]])
    np.testing.assert_allclose(pa, pb, atol=1e-6)
    c = run_loso(data, dataclasses.replace(cfg, seed=1), tmp_path / "c", folds=[0, 1],
                 chunk_size=2)
    assert not np.allclose(pa, np.array([p["probs"] for p in c["predictions"]]), atol=1e-4)


def test_unknown_input_kind_refused():
    with pytest.raises(ValueError, match="input_kind"):
        LosoConfig(input_kind="stack16")


def test_landmark_input_kinds_train_and_need_landmarks(tmp_path):
    """regions5 (AHMSA-Net's five-region recombination) and mcnet are built from each map's
    landmarks; a data set without them is refused before the run directory is written."""
    data = _synthetic(n_subjects=3, per_subject=6)
    with pytest.raises(DatasetError, match="landmarks5.csv"):
        run_loso(data, dataclasses.replace(CFG, input_kind="regions5"), tmp_path / "none",
                 folds=[0])
    assert not (tmp_path / "none" / "config.json").exists()
    rng = np.random.default_rng(1)
    from realtime_mer.face import CANONICAL_POINTS_28

    pts = CANONICAL_POINTS_28[None] + rng.normal(0, 1.0, (len(data), 5, 2))
    pts[2] = np.nan  # no face found: the template is used
    data = dataclasses.replace(data, landmarks=pts)
    res = run_loso(data, dataclasses.replace(CFG, input_kind="regions5"), tmp_path / "r",
                   folds=[0, 1])
    assert res["config"]["input_kind"] == "regions5" and res["uf1"] > 0.9  # separable
    cfg = dataclasses.replace(CFG, input_kind="mcnet", input_size=28, epochs=2,
                              input_options={"alpha": 3.0})
    res = run_loso(data, cfg, tmp_path / "m", folds=[0])
    assert res["config"]["input_options"] == {"alpha": 3.0} and len(res["predictions"]) == 6
    with pytest.raises(ValueError, match="no option"):
        LosoConfig(input_kind="colour", input_options={"use_omam": False})


@pytest.mark.parametrize("args,message", [
    (["--input-options", "{bad"], "--input-options is not valid JSON"),
    (["--model-kwargs", "[1]"], "--model-kwargs must be a JSON object"),
    (["--input-kind", "colour", "--input-options", '{"use_omam": false}'], "has no option"),
    # A string "false" would read as True and run the full model instead of the ablation.
    (["--input-kind", "mcnet", "--input-options", '{"use_omam": "false"}'],
     "'use_omam' of kind 'mcnet' must be a true/false"),
    (["--input-kind", "mcnet", "--input-options", '{"alpha": true}'], "must be a number"),
    (["--folds", "1,x"], "--folds takes N or a comma list"),
    (["--folds", "0"], "--folds N needs N >= 1"),
    (["--model", "nosuch"], "unknown model 'nosuch'"),
    (["--outer-epochs", "chosen", "--select-epochs", "fixed"],
     "--outer-epochs chosen needs --select-epochs nested"),
])
def test_cli_refuses_bad_options_before_any_work(tmp_path, capsys, args, message):
    from training.__main__ import main

    assert main(["loso", "--data", str(tmp_path / "absent"), "--run-dir",
                 str(tmp_path / "run"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_folds_option_reads_a_count_or_a_list():
    from training.__main__ import _parse_folds

    assert _parse_folds(None) is None
    assert _parse_folds("3") == [0, 1, 2]
    assert _parse_folds("5,") == [5]
    assert _parse_folds("12, 4,4") == [4, 12]


def test_interrupted_nested_selection_keeps_its_trained_inner_models(tmp_path):
    """An interruption during the nested selection costs only the inner model in training:
    the rerun reuses the inner models trained before it and chooses what an uninterrupted
    run chooses."""
    data = _synthetic()
    ref = run_loso(data, NESTED, tmp_path / "ref", folds=[0, 1], chunk_size=1)

    class Stop(Exception):
        pass

    trained: list[str] = []

    def interrupt(msg: str) -> None:
        if "inner models trained" in msg:
            trained.append(msg)
            if len(trained) == 3:  # fold 0 chosen, fold 1 half way
                raise Stop

    run_dir = tmp_path / "run"
    with pytest.raises(Stop):
        run_loso(data, NESTED, run_dir, folds=[0, 1], chunk_size=1, progress=interrupt)
    assert (run_dir / "nested_00.json").exists()
    assert not list(run_dir.glob("inner_00_*.json"))  # summed up in nested_00.json
    assert sorted(p.name for p in run_dir.glob("inner_*.json")) == ["inner_01_0.json"]
    cached_wall = json.loads((run_dir / "inner_01_0.json").read_text())["wall_s"]
    # A file of a fold outside this call (another worker's, say) is left alone.
    (run_dir / "inner_03_0.json").write_text("{}")
    msgs: list[str] = []
    res = run_loso(data, NESTED, run_dir, folds=[0, 1], chunk_size=1, progress=msgs.append)
    assert any("1 of 2 inner models already trained" in m for m in msgs)
    assert [m for m in msgs if "inner models trained" in m] == [
        m for m in msgs if "1/1 inner models trained" in m]  # only the missing one
    assert [p.name for p in run_dir.glob("inner_*.json")] == ["inner_03_0.json"]
    # One left behind by an interruption after its fold's choice was written goes.
    (run_dir / "inner_00_0.json").write_text("{}")
    run_loso(data, NESTED, run_dir, folds=[0, 1], chunk_size=1)
    assert [p.name for p in run_dir.glob("inner_*.json")] == ["inner_03_0.json"]
    # The fold's time counts the inner model trained before the interruption too.
    assert json.loads((run_dir / "nested_01.json").read_text())["wall_s"] > cached_wall > 0
    assert (res["nested_selection"]["chosen_epochs"]
            == ref["nested_selection"]["chosen_epochs"])
    # Exactly: the cached predictions are the float32 values themselves, not rounded.
    assert res["nested_cv_ensemble"]["probs"] == ref["nested_cv_ensemble"]["probs"]
    assert [p["pred"] for p in res["predictions"]] == [p["pred"] for p in ref["predictions"]]
    # The validation probabilities kept for calibration too.
    for f in (0, 1):
        assert (json.loads((run_dir / f"nested_{f:02d}.json").read_text())["inner_val_probs"]
                == json.loads((tmp_path / "ref" / f"nested_{f:02d}.json").read_text())[
                    "inner_val_probs"])


def test_checkpoint_stranded_after_its_folds_finished_is_removed(tmp_path):
    """Interrupted after a chunk's fold files were written but before its checkpoint was
    deleted: the rerun deletes the checkpoint (its folds are done)."""
    data = _synthetic()

    class Stop(Exception):
        pass

    def interrupt(msg: str) -> None:
        if msg.startswith("fold  0"):  # said after fold_00.json is written
            raise Stop

    run_dir = tmp_path / "run"
    with pytest.raises(Stop):
        run_loso(data, CFG, run_dir, folds=[0, 1], chunk_size=1, checkpoint_every=2,
                 progress=interrupt)
    assert (run_dir / "fold_00.json").exists() and (run_dir / "chunk_00_00.pt").exists()
    msgs: list[str] = []
    run_loso(data, CFG, run_dir, folds=[0], progress=msgs.append)
    assert not (run_dir / "chunk_00_00.pt").exists()
    assert any("removed chunk_00_00.pt" in m for m in msgs)


def test_progress_counts_folds_and_estimates_the_time_left(tmp_path):
    data = _synthetic()
    msgs: list[str] = []
    run_loso(data, NESTED, tmp_path / "run", folds=[0, 1, 2], chunk_size=1,
             progress=msgs.append)
    done = [m for m in msgs if "folds done" in m]
    assert [m.split(" folds done")[0] for m in done] == ["1/3", "2/3", "3/3"]
    assert all(re.search(r"about \d+ (s|min) left$", m) for m in done[:2])
    assert done[2] == "3/3 folds done"
    chosen = [m for m in msgs if "epochs chosen for" in m]
    assert chosen[-1].endswith("epochs chosen for 3/3 folds")
    assert "left" in chosen[0]


def test_mirror_tta_scores_the_mean_of_the_maps_and_their_mirror(tmp_path):
    """With tta=hflip each prediction (the final score and those of the evaluation epochs,
    made inside training) is the mean of the model's probabilities on the maps and on their
    mirror image; the model is rebuilt here from its fold's seed."""
    from training.loso import predict_probs, train_models

    data = _synthetic()
    cfg = dataclasses.replace(CFG, tta="hflip", lr=5e-4)  # slow enough to stay uncertain
    res = run_loso(data, cfg, tmp_path / "run", folds=[0])
    test = np.flatnonzero(data.subjects == data.subject_list[0])
    (model,), _ = train_models(data.x, data.y, [np.setdiff1d(np.arange(len(data)), test)],
                               cfg, [0])
    x = torch.as_tensor(data.x[test])
    with torch.no_grad():
        plain = torch.softmax(model((x - 0.5) / 0.5), -1).numpy()
        mirrored = torch.softmax(model((hflip_maps(x) - 0.5) / 0.5), -1).numpy()
    want = (plain + mirrored) / 2
    assert np.abs(want - plain).max() > 1e-3  # the mirror image changes the prediction
    np.testing.assert_allclose([p["probs"] for p in res["predictions"]], want, atol=1e-5)
    final = json.loads((tmp_path / "run" / "fold_00.json").read_text())["history"][-1]
    assert final["epoch"] == cfg.epochs
    np.testing.assert_allclose(final["probs"], want, atol=1e-5)
    # Mirroring the input leaves the averaged prediction unchanged.
    np.testing.assert_allclose(predict_probs(model, hflip_maps(x).numpy(), cfg), want,
                               atol=1e-6)


def test_shift_tta_scores_the_mean_over_the_mirror_and_every_translation(tmp_path):
    """With tta=hflip and tta_shift=k each prediction is the mean of the model's probabilities
    on the maps and on their mirror image, each translated by every offset of [-k, k]^2 (the
    reference translates with shift_images, one offset at a time); the evaluation inside
    training and predict_probs on the trained model agree."""
    from training.loso import predict_probs, train_models

    data = _synthetic()
    k = 1
    cfg = dataclasses.replace(CFG, tta="hflip", tta_shift=k, lr=5e-4)
    res = run_loso(data, cfg, tmp_path / "run", folds=[0])
    test = np.flatnonzero(data.subjects == data.subject_list[0])
    (model,), _ = train_models(data.x, data.y, [np.setdiff1d(np.arange(len(data)), test)],
                               cfg, [0])
    x = torch.as_tensor(data.x[test])
    parts = []
    with torch.no_grad():
        for view in (x, hflip_maps(x)):
            for dy in range(-k, k + 1):
                for dx in range(-k, k + 1):
                    off = torch.tensor([[dy, dx]] * len(x))
                    parts.append(torch.softmax(
                        model(shift_images((view - 0.5) / 0.5, off, k)), -1).numpy())
    want = np.mean(parts, axis=0)
    assert len(parts) == 18
    mirror_only = (parts[4] + parts[13]) / 2  # offset (0, 0) of each view
    assert np.abs(want - mirror_only).max() > 1e-4  # the translations change the prediction
    np.testing.assert_allclose([p["probs"] for p in res["predictions"]], want, atol=1e-5)
    np.testing.assert_allclose(predict_probs(model, data.x[test], cfg), want, atol=1e-6)
    # tta_shift 0 is the mirror-only prediction
    np.testing.assert_allclose(
        predict_probs(model, data.x[test], dataclasses.replace(cfg, tta_shift=0)),
        mirror_only, atol=1e-6)


def test_run_dir_written_before_a_schedule_field_existed_resumes(tmp_path):
    """A run directory whose config.json predates a field (here tta) holds that field's
    default: it resumes without retraining its folds; any other value is refused."""
    data = _synthetic()
    run_loso(data, CFG, tmp_path / "run", folds=[0])
    path = tmp_path / "run" / "config.json"
    doc = json.loads(path.read_text())
    del doc["config"]["tta"]
    path.write_text(json.dumps(doc))
    msgs: list[str] = []
    res = run_loso(data, CFG, tmp_path / "run", folds=[0, 1], progress=msgs.append)
    assert res["folds_run"] == 2
    assert any("1 of 2 folds already done" in m for m in msgs)
    with pytest.raises(ValueError, match="different configuration"):
        run_loso(data, dataclasses.replace(CFG, tta="hflip"), tmp_path / "run", folds=[0])


@pytest.mark.parametrize("model, declared", [("ststnet", True), ("ahmsa", False)])
def test_channels_last_layout_changes_only_float_order(model, declared):
    """A network that declares channels_last_on_cpu trains on a CPU in that layout by default
    (bit-identical to asking for it), others in the default layout; either way the trained
    model agrees with the other layout's to float tolerance."""
    data = _synthetic()
    train = np.flatnonzero(data.subjects != data.subject_list[0])
    test = torch.as_tensor((data.x[data.subjects == data.subject_list[0]] - 0.5) / 0.5)
    cfg = dataclasses.replace(CFG, model=model)

    def probs(channels_last):
        (m,), _ = train_models(data.x, data.y, [train], cfg, [0], channels_last=channels_last)
        with torch.no_grad():
            return torch.softmax(m(test), -1).numpy()

    auto, on, off = probs(None), probs(True), probs(False)
    np.testing.assert_array_equal(auto, on if declared else off)
    np.testing.assert_allclose(on, off, atol=1e-4)
