"""Class-prior calibration of a nested LOSO run, its strength chosen by the inner CV alone.

Cross-entropy with inverse-frequency class weights (the default schedule) fits, in the limit,
p_w(c | x) proportional to p(c | x) / pi_c, where pi is the class frequency of the training
set: the rare classes gain recall at the cost of their precision and of the frequent class's
recall. That is the right trade for UAR; UF1 counts precision too. Adding tau * log(pi_c) to
the log-probabilities moves the decision rule a fraction tau of the way back to the
unweighted posterior (tau = 0: the network as trained; tau = 1: the training prior fully
restored).

For each outer fold, tau is chosen from :data:`TAUS` by the pooled UF1 of the fold's inner
validation predictions at its chosen epoch (``nested_XX.json``: every training subject
predicted once by the inner model that did not see it; the smallest tau on ties), with pi the
class frequencies of the fold's training subjects. The fold's test probabilities (its single
model's and its CV ensemble's) are then shifted by that tau. Nothing looks at a test subject,
so the result is as honest as the nested epoch choice it extends.

The class-bias rule (``rule="bias"``, registered after the prior rule's result; experiments/LOG.md)
frees the direction: it adds a bias b_c to each class's log-probability, b_0 = 0 for the first
class (a common shift changes nothing) and b_c from :data:`BIASES` for the others, chosen per
fold by the same pooled inner UF1. The prior shift is the special case b = tau * log(pi_c / pi_0).
UF1 is piecewise constant in b, so the best value is usually a plateau of grid points; the rule
takes the one nearest the plateau's centroid rather than its edge.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from training.metrics import pooled_scores, uf1_uar

__all__ = ["CalibrationError", "RULES", "TAUS", "BIASES", "prior_offsets", "prior_shift",
           "offset_shift", "choose_tau", "choose_bias", "calibration_kind", "calibrate_run"]

RULES = ("prior", "bias")

# The candidate strengths, fixed before any run was calibrated (experiments/LOG.md).
TAUS = tuple(round(0.1 * i, 1) for i in range(11))

# The candidate biases of each class after the first, fixed before the class-bias rule was run
# (experiments/LOG.md): -1.5 to 1.5 in steps of 0.1 contains the prior shift of every tau <= 1
# on 3DB (log(pi_c / pi_0) is -0.83 for positive and -1.10 for surprise).
BIASES = tuple(round(0.1 * i, 1) for i in range(-15, 16))

# Probabilities in the run directory and in the results file are both rounded to 6 decimals.
_SAME_PROBS_ATOL = 2e-6


class CalibrationError(ValueError):
    """The run directory and results file do not form a complete nested run that kept its
    inner validation probabilities."""


def prior_offsets(class_counts: np.ndarray, tau: float) -> np.ndarray:
    """tau * log pi, pi = class_counts / sum: what the shift adds to the log-probabilities
    (here and inside a calibrated engine, ``training.export.PriorShift``)."""
    counts = np.asarray(class_counts, dtype=np.float64)
    if counts.ndim != 1 or (counts <= 0).any():
        raise CalibrationError(f"class counts must be positive, not {counts.tolist()}")
    return tau * np.log(counts / counts.sum())


def offset_shift(probs: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """softmax(log probs + offsets): (N, C) probabilities, offsets (C,)."""
    logits = np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-12, None))
    logits = logits + np.asarray(offsets, dtype=np.float64)
    logits -= logits.max(axis=-1, keepdims=True)
    out = np.exp(logits)
    return out / out.sum(axis=-1, keepdims=True)


def prior_shift(probs: np.ndarray, class_counts: np.ndarray, tau: float) -> np.ndarray:
    """softmax(log probs + tau * log pi), pi = class_counts / sum: (N, C) probabilities."""
    return offset_shift(probs, prior_offsets(class_counts, tau))


def _uf1_of_offsets(val_probs: np.ndarray, val_labels: np.ndarray, offsets) -> np.ndarray:
    """Pooled UF1 of the validation predictions shifted by each offset vector (argmax of
    log p + offsets: the softmax does not move it)."""
    logp = np.log(np.clip(np.asarray(val_probs, dtype=np.float64), 1e-12, None))
    return np.array([uf1_uar(val_labels, (logp + o).argmax(-1))[0] for o in offsets])


def calibration_kind(doc: dict) -> str | None:
    """The rule of a ``calibrate_run`` results dict (:data:`RULES`; files written before the
    class-bias rule are class-prior), None for an uncalibrated results file."""
    if "calibration" not in doc:
        return None
    return doc["calibration"].get("kind", "prior")


def choose_tau(val_probs: np.ndarray, val_labels: np.ndarray, class_counts: np.ndarray,
               taus: tuple[float, ...] = TAUS) -> tuple[float, list[float]]:
    """The tau of ``taus`` whose shift gives the best pooled UF1 on the validation
    predictions (the smallest on ties), and the UF1 of every candidate."""
    scores = _uf1_of_offsets(val_probs, val_labels,
                             [prior_offsets(class_counts, t) for t in taus])
    return float(taus[int(np.argmax(scores))]), [float(s) for s in scores]


def choose_bias(val_probs: np.ndarray, val_labels: np.ndarray,
                biases: tuple[float, ...] = BIASES) -> tuple[np.ndarray, float, int]:
    """The class-bias offsets (0, b_1, ..., b_{C-1}), each b from ``biases``, whose shift gives
    the best pooled UF1 on the validation predictions: of the grid points that reach it, the
    one nearest their centroid (the first in grid order on ties). Returns the offsets, their
    UF1 and how many grid points reached it."""
    n_classes = np.shape(val_probs)[1]
    grid = np.array(np.meshgrid(*[biases] * (n_classes - 1), indexing="ij"))
    grid = grid.reshape(n_classes - 1, -1).T  # (points, C - 1), grid order
    offsets = np.concatenate([np.zeros((len(grid), 1)), grid], axis=1)
    scores = _uf1_of_offsets(val_probs, val_labels, offsets)
    best = np.flatnonzero(scores >= scores.max() - 1e-12)
    centroid = grid[best].mean(axis=0)
    pick = best[int(np.argmin(((grid[best] - centroid) ** 2).sum(axis=1)))]
    return offsets[pick], float(scores[pick]), int(len(best))


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CalibrationError(f"{path}: cannot read {what} ({exc})") from exc


def calibrate_run(run_dir: str | Path, results_file: str | Path, rule: str = "prior") -> dict:
    """Calibrate the nested LOSO run whose files are in ``run_dir`` and whose results file
    is ``results_file`` by ``rule`` (:data:`RULES`: the class-prior shift or the class
    biases). Returns a results-like dict (config, dataset, uf1/uar/confusion matrix/per
    database of the calibrated single model, ``nested_cv_ensemble`` of the calibrated CV
    ensemble, the tau and inner UF1 curve, or the biases and best inner UF1, of every subject,
    the uncalibrated scores, and predictions) that ``training compare`` and ``training
    ensemble`` read like a LOSO results file."""
    if rule not in RULES:
        raise CalibrationError(f"unknown calibration rule {rule!r}; one of {', '.join(RULES)}")
    run_dir, results_file = Path(run_dir), Path(results_file)
    from training.loso.results import LosoResults, ResultsError

    try:
        doc = LosoResults.from_dict(_read_json(results_file, "the LOSO results"),
                                    str(results_file)).doc
    except ResultsError as exc:
        raise CalibrationError(str(exc)) from None
    if not doc.get("complete") or "predictions" not in doc or "config" not in doc:
        raise CalibrationError(f"{results_file}: not a complete results file of `python -m "
                               "training loso`")
    nested = doc.get("nested_selection")
    ensemble = doc.get("nested_cv_ensemble")
    if not isinstance(nested, dict) or not isinstance(ensemble, dict):
        raise CalibrationError(f"{results_file}: not a nested run with a CV ensemble "
                               "(--select-epochs nested); tau is chosen by its inner CV")
    preds = doc["predictions"]
    if len(ensemble.get("probs", [])) != len(preds):
        raise CalibrationError(f"{results_file}: its CV-ensemble probabilities do not match "
                               "its predictions")
    chosen_epochs = {s: int(e) for s, e in nested["chosen_epochs"].items()}
    n_classes = len(doc["dataset"]["class_names"])
    labels = np.full(doc["dataset"]["n_samples"], -1)
    for p in preds:
        labels[p["index"]] = p["label"]
    row_of = {int(p["index"]): r for r, p in enumerate(preds)}
    single = np.array([p["probs"] for p in preds], dtype=np.float64)
    cv_ens = np.array(ensemble["probs"], dtype=np.float64)
    single_cal, cv_cal = single.copy(), cv_ens.copy()
    chosen, curves = {}, {}
    for fold in range(len(chosen_epochs)):
        path = run_dir / f"nested_{fold:02d}.json"
        rec = _read_json(path, "the fold's nested selection")
        fold_path = run_dir / f"fold_{fold:02d}.json"
        fold_doc = _read_json(fold_path, "the fold's predictions")
        subject = fold_doc.get("subject")
        if chosen_epochs.get(subject) != rec.get("chosen"):
            raise CalibrationError(f"{path}: its epoch choice for {subject} is not "
                                   f"{results_file.name}'s: not the same run")
        if "inner_val_probs" not in rec:
            raise CalibrationError(f"{path}: has no inner validation probabilities (a run "
                                   "made before they were kept); rerun its nested selection")
        # A run given two map sets also scored the other set's copies (indices from n_samples
        # on); the calibration is of the set it trained on.
        on_own_set = [int(i) < len(labels) for i in rec["test_indices"]]
        test = [int(i) for i, own in zip(rec["test_indices"], on_own_set) if own]
        if any(i not in row_of or preds[row_of[i]]["subject"] != subject for i in test):
            raise CalibrationError(f"{path}: its test samples are not {subject}'s in "
                                   f"{results_file.name}: not the same run")
        rows = [row_of[i] for i in test]
        at_choice = next((h["probs"] for h in fold_doc.get("history", [])
                          if h["epoch"] == rec["chosen"]), None)
        if at_choice is not None:
            at_choice = np.asarray(at_choice)[np.asarray(on_own_set)]
        if at_choice is None or not np.allclose(at_choice, single[rows],
                                                atol=_SAME_PROBS_ATOL, rtol=0):
            raise CalibrationError(f"{fold_path}: its probabilities at the chosen epoch "
                                   f"differ from {results_file.name}'s: not the same run")
        train = np.setdiff1d(np.flatnonzero(labels >= 0), test)
        counts = np.bincount(labels[train], minlength=n_classes)
        val_idx = np.asarray(rec["inner_val_indices"], dtype=np.int64)
        if set(val_idx.tolist()) != set(train.tolist()) or len(val_idx) != len(train):
            raise CalibrationError(f"{path}: its inner validation samples are not the fold's "
                                   "training samples, each once")
        val_probs, val_labels = np.asarray(rec["inner_val_probs"]), labels[val_idx]
        if rule == "prior":
            tau, curve = choose_tau(val_probs, val_labels, counts)
            offsets = prior_offsets(counts, tau)
            chosen[subject], curves[subject] = tau, [round(s, 6) for s in curve]
        else:
            offsets, best_uf1, plateau = choose_bias(val_probs, val_labels)
            chosen[subject] = [round(float(b), 1) for b in offsets]
            curves[subject] = {"best": round(best_uf1, 6), "plateau_points": plateau,
                               "unshifted": round(uf1_uar(val_labels, val_probs.argmax(1))[0],
                                                  6)}
        single_cal[rows] = offset_shift(single[rows], offsets)
        cv_cal[rows] = offset_shift(cv_ens[rows], offsets)

    y = np.array([p["label"] for p in preds])
    dbs = np.array([p["database"] for p in preds])
    # Rounded as written, so each listed prediction is the argmax of its listed probabilities.
    single_cal, cv_cal = np.round(single_cal, 6), np.round(cv_cal, 6)
    pred = single_cal.argmax(1)
    if rule == "prior":
        protocol = ("LOSO, nested run with class-prior calibration: per fold, tau chosen "
                    "from the inner CV's validation predictions at the chosen epoch (training "
                    "subjects only), test probabilities shifted by tau * log(training class "
                    "frequencies), pooled and scored once")
        record = {"kind": "prior", "taus": list(TAUS),
                  "rule": "best pooled inner UF1, smallest tau on ties",
                  "tau_per_subject": chosen,
                  "median_tau": float(np.median(list(chosen.values())))}
    else:
        protocol = ("LOSO, nested run with class-bias calibration: per fold, a bias per class "
                    "(the first class's 0) chosen from the inner CV's validation predictions "
                    "at the chosen epoch (training subjects only), added to the test "
                    "log-probabilities, pooled and scored once")
        record = {"kind": "bias", "biases": list(BIASES),
                  "rule": ("best pooled inner UF1 over the grid of biases (the first class's "
                           "0); of the grid points reaching it, the one nearest their centroid"),
                  "bias_per_subject": chosen,
                  "median_bias": np.median(np.array(list(chosen.values())), axis=0).tolist()}
    return {
        "protocol": protocol,
        "complete": True,
        "calibration": {
            **record,
            "run_dir": str(run_dir), "results_file": results_file.name,
            "inner_uf1_per_subject": curves,
            "uncalibrated": {"single": {"uf1": doc["uf1"], "uar": doc["uar"]},
                             "cv_ensemble": {"uf1": ensemble["uf1"], "uar": ensemble["uar"]}},
        },
        "config": doc["config"],
        "dataset": doc["dataset"],
        "class_names": doc["dataset"]["class_names"],
        # The run's epoch choice (unchanged) and its leaky figure (of the uncalibrated
        # predictions), so that an engine's manifest can quote this file like the run's.
        "nested_selection": nested,
        **({"leaky_best_epoch": doc["leaky_best_epoch"]} if "leaky_best_epoch" in doc else {}),
        **pooled_scores(y, pred, dbs),
        "nested_cv_ensemble": {
            "description": "the run's CV ensemble, each fold shifted by its tau",
            "n_models": ensemble.get("n_models"),
            **pooled_scores(y, cv_cal.argmax(1), dbs),
            "probs": cv_cal.tolist(),
        },
        "predictions": [{**{k: p[k] for k in ("index", "file", "subject", "database", "label")},
                         "pred": int(q), "probs": [float(v) for v in pr]}
                        for p, q, pr in zip(preds, pred, single_cal)],
    }
