"""LOSO score of an ensemble of networks, from the pooled predictions of their LOSO runs.

Every member was evaluated leave-one-subject-out on the same samples, so a subject's
probabilities from each member come from a model that never saw that subject; their average is
the prediction of an ensemble trained fold by fold, and scoring it once over the pooled
predictions is the same protocol as one network's. No weight or member is fitted here: the
members and the rule (unweighted mean of probabilities) are given, so the score is honest only
if they were fixed before looking at it (``docs/RESULTS.md`` says when that was so).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from training.metrics import evaluate, per_database

__all__ = ["EnsembleError", "member_probabilities", "loso_ensemble"]

# Which probabilities of a results file a member contributes.
SOURCES = ("final", "cv_ensemble")


class EnsembleError(ValueError):
    """The members cannot be combined (incomplete runs, different samples, a missing source)."""


def member_probabilities(doc: dict, source: str = "final", name: str = "results"
                         ) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """(indices, (N, C) probabilities, files, databases) of one complete LOSO results file, in
    sample-index order. ``source="final"``: the honest predictions of the run (the fixed
    schedule's last epoch, or each fold's nested choice); ``"cv_ensemble"``: its
    ``nested_cv_ensemble`` probabilities."""
    if source not in SOURCES:
        raise EnsembleError(f"{name}: source {source!r} is not one of {', '.join(SOURCES)}")
    if not doc.get("complete") or "predictions" not in doc:
        raise EnsembleError(f"{name}: not a complete LOSO results file (every fold, with "
                            "predictions)")
    preds = doc["predictions"]
    idx = np.array([p["index"] for p in preds])
    if source == "final":
        probs = np.array([p["probs"] for p in preds], dtype=np.float64)
    else:
        if "nested_cv_ensemble" not in doc:
            raise EnsembleError(f"{name}: has no nested_cv_ensemble probabilities")
        probs = np.array(doc["nested_cv_ensemble"]["probs"], dtype=np.float64)
    if probs.shape[0] != len(idx):
        raise EnsembleError(f"{name}: {probs.shape[0]} probability rows for {len(idx)} samples")
    order = np.argsort(idx, kind="stable")
    return (idx[order], probs[order], [preds[i]["file"] for i in order],
            [preds[i]["database"] for i in order])


def loso_ensemble(members: list[tuple[str | Path, str]], class_names: list[str] | None = None
                  ) -> dict:
    """Score the unweighted mean of the members' LOSO probabilities.

    members: [(results file, source)] with source in :data:`SOURCES`. All must be complete runs
    over the same samples (index, file, label). Returns a results-like dict: uf1, uar,
    accuracy, confusion matrix, per database, each member's own score, and the predictions.
    """
    if len(members) < 2:
        raise EnsembleError("an ensemble needs at least two members")
    ref = None
    probs, listed = [], []
    for path, source in members:
        path = Path(path)
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise EnsembleError(f"{path}: cannot be read as JSON ({exc})") from exc
        idx, p, files, dbs = member_probabilities(doc, source, str(path))
        labels = {q["index"]: q["label"] for q in doc["predictions"]}
        y = np.array([labels[i] for i in idx])
        if ref is None:
            ref = (idx, files, y, dbs, doc["dataset"].get("class_names"))
        elif not (np.array_equal(idx, ref[0]) and files == ref[1] and np.array_equal(y, ref[2])):
            raise EnsembleError(f"{path}: its samples or labels differ from {members[0][0]}")
        probs.append(p)
        own = evaluate(y, p.argmax(1))
        listed.append({"results": str(path), "source": source, "model": doc["config"]["model"],
                       "config": doc["config"], "uf1": own["uf1"], "uar": own["uar"]})
    idx, files, y, dbs, names = ref
    mean = np.mean(probs, axis=0)
    pred = mean.argmax(1)
    r = evaluate(y, pred)
    return {
        "protocol": ("LOSO ensemble: per sample, the unweighted mean of the members' pooled "
                     "LOSO probabilities (each from a model that never saw the sample's "
                     "subject), scored once"),
        "complete": True,
        "members": listed,
        "class_names": class_names or names,
        "uf1": r["uf1"], "uar": r["uar"], "accuracy": r["accuracy"],
        "confusion_matrix": r["confusion_matrix"],
        "per_database": {db: {"uf1": d["uf1"], "uar": d["uar"], "n": d["n"]}
                         for db, d in per_database(y, pred, np.array(dbs)).items()},
        "predictions": [{"index": int(i), "file": f, "label": int(t), "pred": int(q),
                         "probs": [round(float(v), 6) for v in pr]}
                        for i, f, t, q, pr in zip(idx, files, y, pred, mean)],
    }
