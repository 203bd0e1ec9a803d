"""Checkpoint window: the LOSO score of averaging each fold's evaluation checkpoints around its
nested epoch choice.

A nested run chooses one evaluation epoch per fold from an inner UF1 curve that is flat near its
maximum, while the test subject's predictions move from one evaluation checkpoint to the next.
The mean of the outer model's probabilities at the evaluation epochs within ``width`` epochs of
the chosen one smooths that noise. It uses nothing of the test subject but the checkpoints'
predictions themselves (equal weights, no choice among them), so it is as honest as the nested
choice it is centred on. The run directory already keeps every fold's test probabilities at
every evaluation epoch (for the leaky figure), so the window needs no training.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from training.loso.results import LosoResults, ResultsError
from training.metrics import pooled_scores

__all__ = ["WindowError", "window_epochs", "checkpoint_window"]

# Probabilities in the run directory and in the results file are both rounded to 6 decimals
# (the results file from float32); the same checkpoint agrees to this.
_SAME_PROBS_ATOL = 2e-6


class WindowError(ValueError):
    """The run directory and results file do not form a complete nested run."""


def window_epochs(chosen: int, candidates: list[int], width: int) -> list[int]:
    """The candidate (evaluation) epochs within ``width`` epochs of ``chosen``."""
    if width < 0:
        raise WindowError(f"the window width must be >= 0 epochs, not {width}")
    if chosen not in candidates:
        raise WindowError(f"chosen epoch {chosen} is not an evaluation epoch")
    return [e for e in candidates if abs(e - chosen) <= width]


def checkpoint_window(run_dir: str | Path, results_file: str | Path, width: int) -> dict:
    """Score the checkpoint window of the nested LOSO run whose fold files are in ``run_dir``
    and whose results file is ``results_file``.

    Checks that both describe the same run (every fold present; the fold files' probabilities
    at each chosen epoch equal the results file's predictions). Returns a results-like dict
    (the run's config and dataset, uf1, uar, confusion matrix, per database, the checkpoints
    used per subject, and predictions with subject and file) that ``training compare`` and
    ``training ensemble`` read like a LOSO results file."""
    run_dir, results_file = Path(run_dir), Path(results_file)
    try:
        doc = LosoResults.load(results_file).doc
    except ResultsError as exc:
        raise WindowError(str(exc)) from None
    if not doc.get("complete") or "predictions" not in doc or "config" not in doc:
        raise WindowError(f"{results_file}: not a complete results file of `python -m "
                          "training loso`")
    nested = doc.get("nested_selection")
    if not isinstance(nested, dict):
        raise WindowError(f"{results_file}: not a nested run (--select-epochs nested); the "
                          "window is centred on each fold's nested choice")
    candidates = [int(e) for e in nested["candidate_epochs"]]
    chosen_of = {s: int(e) for s, e in nested["chosen_epochs"].items()}
    by_index = {int(p["index"]): p for p in doc["predictions"]}
    n_samples = int(doc["dataset"]["n_samples"])

    idx_all, probs_all, used = [], [], {}
    fold_files = sorted(run_dir.glob("fold_*.json"))
    if len(fold_files) != len(chosen_of):
        raise WindowError(f"{run_dir}: {len(fold_files)} fold files for the "
                          f"{len(chosen_of)} folds of {results_file.name}")
    for path in fold_files:
        fold = json.loads(path.read_text())
        subject = fold["subject"]
        if subject not in chosen_of:
            raise WindowError(f"{path}: subject {subject} is not in {results_file.name}")
        # A run given two map sets also scored the other set's copies (indices from
        # n_samples on): the window is of the set it trained on.
        own = np.asarray([int(i) < n_samples for i in fold["indices"]])
        history = {int(h["epoch"]): np.asarray(h["probs"], dtype=np.float64)[own]
                   for h in fold["history"]}
        epochs = window_epochs(chosen_of[subject], candidates, width)
        if any(e not in history for e in epochs):
            stopped = (" (its outer models stopped at their chosen epochs: --outer-epochs "
                       "chosen; the window needs a run to the schedule's end)"
                       if "outer_epochs" in doc else "")
            raise WindowError(f"{path}: lacks the evaluation epochs {epochs}{stopped}")
        indices = [int(i) for i in fold["indices"] if int(i) < n_samples]
        stored = np.array([by_index[i]["probs"] for i in indices], dtype=np.float64)
        if not np.allclose(history[chosen_of[subject]], stored, atol=_SAME_PROBS_ATOL, rtol=0):
            raise WindowError(f"{path}: its probabilities at the chosen epoch differ from "
                              f"{results_file.name}'s: not the same run")
        idx_all += indices
        probs_all.append(np.mean([history[e] for e in epochs], axis=0))
        used[subject] = epochs

    probs = np.concatenate(probs_all)
    order = np.argsort(idx_all, kind="stable")
    idx = np.asarray(idx_all)[order]
    probs = probs[order]
    rows = [by_index[int(i)] for i in idx]
    y = np.array([r["label"] for r in rows])
    pred = probs.argmax(1)
    return {
        "protocol": (f"LOSO, nested run; per fold, the mean probability of the outer model at "
                     f"the evaluation epochs within {width} epochs of its nested choice (equal "
                     "weights), predictions pooled and scored once"),
        "complete": True,
        "window": {"width_epochs": width, "run_dir": str(run_dir),
                   "results_file": results_file.name, "epochs_per_subject": used},
        "config": doc["config"],
        "dataset": doc["dataset"],
        "class_names": doc["dataset"].get("class_names"),
        "single_model": {"uf1": doc["uf1"], "uar": doc["uar"]},
        **pooled_scores(y, pred, np.array([q["database"] for q in rows])),
        "predictions": [{"index": int(i), "file": q["file"], "subject": q["subject"],
                         "database": q["database"], "label": int(q["label"]), "pred": int(p),
                         "probs": [round(float(v), 6) for v in pr]}
                        for i, q, p, pr in zip(idx, rows, pred, probs)],
    }
