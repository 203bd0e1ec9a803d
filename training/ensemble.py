"""LOSO score of an ensemble of networks, from the pooled predictions of their LOSO runs.

Every member was evaluated leave-one-subject-out on the same samples, so a subject's
probabilities from each member come from a model that never saw that subject; their average is
the prediction of an ensemble trained fold by fold, and scoring it once over the pooled
predictions is the same protocol as one network's. No weight or member is fitted here: the
members and the rule (unweighted mean of probabilities) are given, so the score is honest only
if they were fixed before looking at it (``experiments/LOG.md`` says when that was so).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from training.loso.results import LosoResults, ResultsError
from training.metrics import evaluate, pooled_scores

__all__ = ["EnsembleError", "member_probabilities", "loso_ensemble", "write_ensemble_engine"]

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
    need = ("index", "probs", "label", "file", "database")
    if (not isinstance(doc.get("config"), dict) or "model" not in doc["config"]
            or not isinstance(doc.get("dataset"), dict)
            or any(not isinstance(p, dict) or any(k not in p for k in need) for p in preds)):
        raise EnsembleError(f"{name}: not a results file of `python -m training loso` (it needs "
                            f"config.model, dataset and predictions with {', '.join(need)})")
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
            doc = LosoResults.load(path).doc
        except ResultsError as exc:
            raise EnsembleError(str(exc)) from None
        idx, p, files, dbs = member_probabilities(doc, source, str(path))
        labels = {q["index"]: q["label"] for q in doc["predictions"]}
        y = np.array([labels[i] for i in idx])
        if ref is None:
            subject_of = {q["index"]: q.get("subject") for q in doc["predictions"]}
            ref = (idx, files, y, dbs, doc["dataset"].get("class_names"),
                   [subject_of[i] for i in idx])
        elif not (np.array_equal(idx, ref[0]) and files == ref[1] and np.array_equal(y, ref[2])):
            raise EnsembleError(f"{path}: its samples or labels differ from {members[0][0]}")
        probs.append(p)
        own = evaluate(y, p.argmax(1))
        listed.append({"results": str(path), "source": source, "model": doc["config"]["model"],
                       "config": doc["config"], "uf1": own["uf1"], "uar": own["uar"]})
    idx, files, y, dbs, names, subjects = ref
    mean = np.mean(probs, axis=0)
    pred = mean.argmax(1)
    return {
        "protocol": ("LOSO ensemble: per sample, the unweighted mean of the members' pooled "
                     "LOSO probabilities (each from a model that never saw the sample's "
                     "subject), scored once"),
        "complete": True,
        "members": listed,
        "class_names": class_names or names,
        **pooled_scores(y, pred, np.array(dbs)),
        # Subject and database too, so that `compare` can pair an ensemble with a run (a
        # member file without subjects gives none, and compare says what is missing).
        "predictions": [{"index": int(i), "file": f,
                         **({} if s is None else {"subject": s}), "database": db,
                         "label": int(t), "pred": int(q),
                         "probs": [round(float(v), 6) for v in pr]}
                        for i, f, s, db, t, q, pr in zip(idx, files, subjects, dbs, y, pred,
                                                         mean)],
    }


def write_ensemble_engine(result: dict, engines: list[str | Path], out: str | Path,
                          results_path: str | Path | None = None) -> dict:
    """Write the ensemble engine ``out`` (``NAME.ens``) and its manifest for the LOSO
    ensemble ``result`` of :func:`loso_ensemble`, from one exported engine per member, in the
    members' order. Each engine's manifest must quote the LOSO run of its member (the same
    results file and score), so the ensemble's score applies to these very engines. Returns the
    manifest as a dict."""
    from realtime_mer import __version__
    from realtime_mer.runtime import Manifest, ensemble_manifest, manifest_path, sha256_file
    from realtime_mer.runtime.ensemble import COMBINE_RULE, ENSEMBLE_SUFFIX

    out = Path(out)
    if out.suffix != ENSEMBLE_SUFFIX:
        raise EnsembleError(f"{out}: an ensemble engine file ends in {ENSEMBLE_SUFFIX}")
    members = result["members"]
    if len(engines) != len(members):
        raise EnsembleError(f"{len(engines)} engine(s) for {len(members)} members; give one "
                            "engine per results file, in the same order")
    manifests, listed = [], []
    for engine, member in zip(engines, members):
        engine = Path(engine)
        if not engine.is_file():
            raise EnsembleError(f"engine {engine} is missing (export it first: python -m "
                                "training export ...)")
        m = Manifest.load(manifest_path(engine))
        if sha256_file(engine) != m.sha256:
            raise EnsembleError(f"{engine}: sha256 does not match its manifest")
        if m.phases != 1:
            raise EnsembleError(f"{engine} takes both phases of a movement; an ensemble's "
                                "members take the onset→apex maps")
        quoted = m.loso or {}
        if (Path(str(quoted.get("results_file", ""))).name != Path(member["results"]).name
                or quoted.get("uf1") is None or abs(quoted["uf1"] - member["uf1"]) > 1e-9):
            raise EnsembleError(
                f"{engine}: its manifest quotes LOSO results {quoted.get('results_file')!r} "
                f"(UF1 {quoted.get('uf1')}), not the member {member['results']} (UF1 "
                f"{member['uf1']:.4f}); export the engine with that run's schedule")
        if list(m.class_names) != list(result["class_names"]):
            raise EnsembleError(f"{engine}: classes {m.class_names} differ from the LOSO "
                                f"runs' {result['class_names']}")
        manifests.append(m)
        listed.append({"file": os.path.relpath(engine.resolve(), out.resolve().parent),
                       "sha256": m.sha256})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"members": listed, "combine": COMBINE_RULE}, indent=1) + "\n")
    loso = {"protocol": result["protocol"], "uf1": result["uf1"], "uar": result["uar"],
            "accuracy": result["accuracy"], "complete": True,
            "per_database": result["per_database"],
            "results_file": None if results_path is None else Path(results_path).name,
            "members": [{"model": mb["model"], "source": mb["source"],
                         "results_file": Path(mb["results"]).name, "uf1": mb["uf1"],
                         "uar": mb["uar"]} for mb in members]}
    manifest = ensemble_manifest(manifests, sha256_file(out), list(result["class_names"]),
                                 loso=loso, training={"members": [mb["config"] for mb in members]},
                                 versions={"realtime_mer": __version__})
    manifest.save(manifest_path(out))
    return manifest.to_dict()
