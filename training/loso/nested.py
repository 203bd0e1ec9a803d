"""Nested epoch selection: an inner subject-wise cross-validation on each fold's training subjects
chooses how long its outer model trains; nothing looks at the held-out subject."""

from __future__ import annotations

import logging
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np

from training.data.megc3db import Megc3DB
from training.loso.config import LosoConfig
from training.loso.provenance import _atomic_write_json, _time_left
from training.loso.trainer import train_models

log = logging.getLogger(__name__)


def inner_groups(train_subjects: list[str], k: int) -> list[list[str]]:
    # Round robin over the subjects in dataset order (one database after another), so the
    # split is deterministic and every inner group holds subjects of every database.
    return [train_subjects[g::k] for g in range(k)]


# The rule, in words, written beside every choice it makes (results files, manifests).
NESTED_RULE = ("inner subject-wise CV over the training subjects only: {k} groups by round "
               "robin over the subjects in dataset order; one model per group trained on the "
               "other groups with the same schedule (seed id 10000 + {k} * key + group), "
               "evaluated every eval_every epochs; the candidate epoch with the best pooled "
               "inner UF1 (all groups' validation predictions pooled) is chosen, the earliest "
               "on ties")


def inner_jobs(data: Megc3DB, cfg: LosoConfig, key: int,
                exclude: list[str]) -> list[tuple[int, int, np.ndarray, np.ndarray]]:
    """(key, inner group, train idx, val idx) for the inner CV over every subject not in
    ``exclude`` (the outer test subject; nothing for training on all data)."""
    rest = [s for s in data.subject_list if s not in exclude]
    if len(rest) < cfg.inner_folds:
        raise ValueError(f"{len(rest)} training subjects cannot form {cfg.inner_folds} "
                         "inner groups (--inner-folds)")
    jobs = []
    primary = data.is_primary  # epochs are chosen on the map set trained on
    for g, group in enumerate(inner_groups(rest, cfg.inner_folds)):
        val = np.flatnonzero(np.isin(data.subjects, group) & primary)
        train = np.flatnonzero(~np.isin(data.subjects, group + list(exclude)) & primary)
        jobs.append((key, g, train, val))
    return jobs


def _inner_file(run_dir: Path, key: int, group: int) -> Path:
    return Path(run_dir) / f"inner_{key:02d}_{group}.json"


def _drop_inner_files(run_dir: Path, key: int, k: int) -> None:
    """The inner-model files of one fold, once its choice is in ``nested_XX.json``."""
    for g in range(k):
        _inner_file(run_dir, key, g).unlink(missing_ok=True)


def _save_inner(path: Path, val_probs: dict[int, np.ndarray],
                test_probs: dict[int, np.ndarray] | None, wall_s: float) -> None:
    # float32 values written as exact doubles (no rounding), so a resumed selection averages
    # and chooses exactly as an uninterrupted one does.
    _atomic_write_json(path, {
        "val_probs": {str(e): p.tolist() for e, p in val_probs.items()},
        "test_probs": (None if test_probs is None else
                       {str(e): p.tolist() for e, p in test_probs.items()}),
        "wall_s": wall_s})


def _load_inner(path: Path
                ) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray] | None, float] | None:
    try:
        doc = json.loads(path.read_text())
        # (Files of runs before validation probabilities were kept lack "val_probs": that
        # model is trained again, like a damaged one.)
        probs = {int(e): np.asarray(p, dtype=np.float32) for e, p in doc["val_probs"].items()}
        tp = doc["test_probs"]
        return probs, (None if tp is None else
                       {int(e): np.asarray(p, dtype=np.float32) for e, p in tp.items()}), \
            float(doc.get("wall_s", 0.0))
    except (OSError, ValueError, KeyError, TypeError):  # damaged: that model is retrained
        return None


def _train_inner(data: Megc3DB, cfg: LosoConfig, jobs: list, *, chunk_size: int,
                 device: str, say: Callable[[str], None],
                 test_of: dict[int, np.ndarray] | None = None,
                 cache_dir: Path | None = None) -> tuple[dict, dict, dict]:
    """Train every inner model (vectorised, ``chunk_size`` at a time). Returns
    {(key, group): {epoch: (n_val, C) validation probabilities}}, for the keys in ``test_of`` (outer
    fold -> its test indices) {(key, group): {epoch: test probabilities}} (the inner models
    also predict the outer test subject, for the CV ensemble; never used to choose), and
    {(key, group): training seconds} (its chunk's time shared among the chunk's models).

    With ``cache_dir``, each inner model's predictions are saved there
    (``inner_KK_G.json``) as soon as its chunk is trained, and models found there are not
    trained again: an interrupted selection loses at most the chunk in progress."""
    test_of = test_of or {}
    preds: dict[tuple[int, int], dict[int, np.ndarray]] = {}
    test_probs: dict[tuple[int, int], dict[int, np.ndarray]] = {}
    walls: dict[tuple[int, int], float] = {}
    if cache_dir is not None:
        todo = []
        for job in jobs:
            cached = _load_inner(_inner_file(cache_dir, job[0], job[1]))
            if cached is None or (job[0] in test_of) != (cached[1] is not None):
                todo.append(job)
                continue
            preds[(job[0], job[1])] = cached[0]
            walls[(job[0], job[1])] = cached[2]
            if cached[1] is not None:
                test_probs[(job[0], job[1])] = cached[1]
        if len(todo) < len(jobs):
            say(f"nested selection: {len(jobs) - len(todo)} of {len(jobs)} inner models "
                "already trained")
        jobs = todo
    t0 = time.perf_counter()
    for c0 in range(0, len(jobs), chunk_size):
        chunk = jobs[c0:c0 + chunk_size]
        chunk_t0 = time.perf_counter()
        rows = [np.concatenate([j[3], test_of.get(j[0], np.empty(0, np.int64))]) for j in chunk]
        width = max(len(r) for r in rows)
        padded = np.stack([np.resize(r, width) for r in rows])

        # The test subjects' rows again on their own, when they get the test-time translations
        # (the validation rows, which the choices are made on, never do). The joint call above
        # stays as it is, so a run without translations keeps its floats; a model of the chunk
        # without a test subject is given one of its validation rows, whose result is unused.
        test_padded = None
        if cfg.tta_shift and any(j[0] in test_of for j in chunk):
            test_rows = [test_of.get(j[0], j[3][:1]) for j in chunk]
            test_width = max(len(r) for r in test_rows)
            test_padded = np.stack([np.resize(r, test_width) for r in test_rows])

        def hook(epoch: int, predict, chunk=chunk, padded=padded,
                 test_padded=test_padded) -> None:
            probs = predict(padded)
            test_part = None if test_padded is None else predict(test_padded, cfg.tta_shift)
            for m, (f, g, _, val) in enumerate(chunk):
                preds.setdefault((f, g), {})[epoch] = probs[m, :len(val)].numpy()
                if f in test_of:
                    n_test = len(test_of[f])
                    test_probs.setdefault((f, g), {})[epoch] = (
                        probs[m, len(val):len(val) + n_test] if test_part is None
                        else test_part[m, :n_test]).numpy()

        # Seeds distinct from the outer folds' (which use 0..67) and the full model's (68).
        ids = [10_000 + f * cfg.inner_folds + g for f, g, _, _ in chunk]
        train_models(data.x, data.y, [j[2] for j in chunk], cfg, ids, device=device,
                     eval_hook=hook, landmarks=data.landmarks, other_offset=data.n_primary)
        per_model_s = (time.perf_counter() - chunk_t0) / len(chunk)
        for f, g, _, _ in chunk:
            walls[(f, g)] = per_model_s
            if cache_dir is not None:
                _save_inner(_inner_file(cache_dir, f, g), preds[(f, g)],
                            test_probs.get((f, g)), walls[(f, g)])
        say(f"nested selection: {min(c0 + chunk_size, len(jobs))}/{len(jobs)} inner models "
            f"trained  {time.perf_counter() - t0:.0f} s")
    return preds, test_probs, walls


def _choose(data: Megc3DB, jobs: list, preds: dict, key: int) -> tuple[list[int], list, list]:
    """Candidate epochs, pooled inner (UF1, UAR) per candidate, and the index of the chosen
    one (first maximum of UF1: the earliest epoch on ties)."""
    from training.metrics import uf1_uar

    kjobs = [j for j in jobs if j[0] == key]
    yv = np.concatenate([data.y[j[3]] for j in kjobs])
    epochs = sorted(preds[(key, kjobs[0][1])])
    scores = []
    for e in epochs:
        pv = np.concatenate([preds[(key, j[1])][e] for j in kjobs]).argmax(-1)
        scores.append(uf1_uar(yv, pv))
    best = int(np.argmax([s[0] for s in scores]))
    return epochs, scores, best


def _nested_file(run_dir: Path, fold: int) -> Path:
    return Path(run_dir) / f"nested_{fold:02d}.json"


def _nested_todo(run_dir: Path, folds: list[int]) -> list[int]:
    """Folds whose nested epoch choice is not yet in the run directory."""
    legacy = Path(run_dir) / "nested_epochs.json"  # one file for all folds (older runs)
    done = set(json.loads(legacy.read_text())["chosen"]) if legacy.exists() else set()
    return [f for f in folds if str(f) not in done and not _nested_file(run_dir, f).exists()]


def select_epochs_nested(data: Megc3DB, cfg: LosoConfig, run_dir: Path, folds: list[int], *,
                         chunk_size: int = 68, device: str = "cpu",
                         progress: Callable[[str], None] | None = None) -> dict:
    """For each outer fold, the evaluation epoch with the best pooled UF1 of an inner
    subject-wise CV over the fold's training subjects (earliest on ties). Uses only training
    subjects' labels. Each inner model's predictions are kept in ``run_dir`` as soon as it is
    trained, and each fold's choice in ``run_dir/nested_XX.json``, so an interrupted
    selection resumes from the last trained inner model."""
    say = progress or log.info
    run_dir = Path(run_dir)
    subjects = data.subject_list
    todo = _nested_todo(run_dir, folds)
    # Inner files of this call's folds whose choice is already written were left by an
    # interruption just after it (other folds' may belong to another worker, still running).
    for f in set(folds) - set(todo):
        _drop_inner_files(run_dir, f, cfg.inner_folds)
    select_t0 = time.perf_counter()
    # Folds in groups whose inner models make about one vectorised chunk.
    group = max(1, chunk_size // cfg.inner_folds)
    for g0 in range(0, len(todo), group):
        part = todo[g0:g0 + group]
        jobs = []  # (outer fold, inner group, train idx, val idx)
        for f in part:
            jobs += inner_jobs(data, cfg, f, [subjects[f]])
        test_of = {f: np.flatnonzero(data.subjects == subjects[f]) for f in part}
        preds, test_probs, train_s = _train_inner(data, cfg, jobs, chunk_size=chunk_size,
                                                device=device, say=say, test_of=test_of,
                                                cache_dir=run_dir)
        for f in part:
            epochs, scores, best = _choose(data, jobs, preds, f)
            # The inner models' mean prediction of the test subject at the chosen epoch
            # (the chosen epoch only: other epochs would invite a leaky choice).
            inner_mean = np.mean([test_probs[(f, g)][epochs[best]]
                                  for g in range(cfg.inner_folds)], axis=0)
            # The inner models' validation probabilities at the chosen epoch (each training
            # subject predicted once, by the inner model that did not see it), for decision
            # rules chosen on training subjects only (training/calibrate.py).
            fold_jobs = [j for j in jobs if j[0] == f]
            _atomic_write_json(_nested_file(run_dir, f), {
                "fold": f, "chosen": epochs[best], "epochs": epochs,
                "inner_uf1": [round(s[0], 4) for s in scores],
                # training time of its inner models, a resumed session's earlier part included
                "wall_s": sum(train_s[(f, g)] for g in range(cfg.inner_folds)),
                "test_indices": test_of[f].tolist(),
                "inner_test_probs_mean": np.round(inner_mean, 6).tolist(),
                "inner_val_indices": np.concatenate([j[3] for j in fold_jobs]).tolist(),
                "inner_val_probs": np.round(np.concatenate(
                    [preds[(f, j[1])][epochs[best]] for j in fold_jobs]), 6).tolist()})
            _drop_inner_files(run_dir, f, cfg.inner_folds)
        done = min(g0 + group, len(todo))
        say(f"nested selection: epochs chosen for {done}/{len(todo)} folds"
            + _time_left(time.perf_counter() - select_t0, done, len(todo)))
    legacy = run_dir / "nested_epochs.json"
    old = json.loads(legacy.read_text()) if legacy.exists() else None
    chosen, curves, walls, epochs, inner_probs = {}, {}, [], None, {}
    for f in folds:
        if old is not None and str(f) in old["chosen"]:
            chosen[str(f)] = old["chosen"][str(f)]
            curves[str(f)] = old["inner_uf1_curves"][str(f)]
            epochs = old["epochs"]
            continue
        rec = json.loads(_nested_file(run_dir, f).read_text())
        chosen[str(f)], curves[str(f)], epochs = rec["chosen"], rec["inner_uf1"], rec["epochs"]
        walls.append(rec["wall_s"])
        if "inner_test_probs_mean" in rec:
            inner_probs[str(f)] = rec["inner_test_probs_mean"]
    wall = float(sum(walls)) + (float(old["wall_s"]) if old is not None else 0.0)
    return {"chosen": chosen, "inner_uf1_curves": curves, "epochs": epochs,
            "inner_folds": cfg.inner_folds, "wall_s": wall,
            # complete only when every fold has it (runs older than the CV ensemble lack it)
            "inner_test_probs_mean": inner_probs if len(inner_probs) == len(folds) else None}


def select_epochs_full(data: Megc3DB, cfg: LosoConfig, *, chunk_size: int = 68,
                       device: str = "cpu",
                       progress: Callable[[str], None] | None = None) -> dict:
    """The nested rule applied to the whole data set, for the model trained on all of it.

    Exactly the inner CV of :func:`select_epochs_nested`, with no subject held out: the same
    round-robin grouping (over all subjects), the same schedule, candidates and criterion.
    The inner models' seed key is ``len(subjects)``, the seed id of the full model itself
    (an outer fold f uses key f), so the seeds follow the same rule and collide with no
    LOSO model. Returns the selection record that goes into the manifest."""
    say = progress or log.info
    subjects = data.subject_list
    key = len(subjects)
    jobs = inner_jobs(data, cfg, key, [])
    t0 = time.perf_counter()
    preds, _, _ = _train_inner(data, cfg, jobs, chunk_size=chunk_size, device=device, say=say)
    epochs, scores, best = _choose(data, jobs, preds, key)
    return {
        "rule": NESTED_RULE.format(k=cfg.inner_folds),
        "inner_folds": cfg.inner_folds,
        "inner_groups": inner_groups(subjects, cfg.inner_folds),
        "inner_seed_ids": [10_000 + key * cfg.inner_folds + g for g in range(cfg.inner_folds)],
        "candidate_epochs": epochs,
        "inner_uf1": [round(float(s[0]), 6) for s in scores],
        "inner_uar": [round(float(s[1]), 6) for s in scores],
        "chosen_epochs": int(epochs[best]),
        "wall_s": round(time.perf_counter() - t0, 1),
        # Every sample's validation probabilities at the chosen epoch, for a decision rule
        # chosen on them (training/calibrate.py); not a manifest field (export removes it).
        "inner_val": (np.concatenate([j[3] for j in jobs]),
                      np.concatenate([preds[(key, j[1])][epochs[best]] for j in jobs])),
    }
