"""The run's results: pooled predictions, honest and leaky scores, the CV ensemble, per database."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from training.data.megc3db import CLASS_NAMES, Megc3DB
from training.metrics import evaluate, per_database, pooled_scores
from training.loso.config import LosoConfig, RESULTS_FORMAT
from training.loso.provenance import _atomic_write_json, _elapsed, git_commit, host_cpu


def _dataset_name(cfg: LosoConfig, data: Megc3DB) -> str:
    if cfg.maps == "live":
        return ("the live pipeline's maps of the raw databases' samples ("
                + ", ".join(sorted(set(map(str, data.databases)))) + ")")
    return "MEGC2019 3DB composite"


def _ensemble_block(probs: np.ndarray, y_true: list, dbs: np.ndarray, k: int) -> dict:
    return {
        "description": (f"honest: per fold, the mean probability of the outer model and the "
                        f"{k} inner models of its nested selection, all at the chosen epoch "
                        "(no test label used)"),
        "n_models": k + 1,
        **pooled_scores(y_true, probs.argmax(-1), dbs),
        "probs": np.round(probs, 6).tolist(),
    }


def _prediction_rows(data: Megc3DB, idx, preds, probs, index_offset: int = 0) -> list[dict]:
    """The listed predictions: per test row, the sample (its row of labels.csv: the data row
    less ``index_offset``), its file, subject, database and label, the predicted class and the
    probabilities (6 decimals)."""
    return [{"index": int(i) - int(index_offset), "file": os.path.basename(str(data.files[i])),
             "subject": str(data.subjects[i]), "database": str(data.databases[i]),
             "label": int(data.y[i]), "pred": int(p), "probs": [round(float(v), 6) for v in pr]}
            for i, p, pr in zip(idx, preds, probs)]


def _other_maps_block(data: Megc3DB, idx: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray,
                      probs: np.ndarray, ensemble: np.ndarray | None, nested: dict | None
                      ) -> dict:
    """The held-out subjects scored on the other preprocessing of their samples, by the same
    models at the same epochs (and the same CV ensemble): how far the networks carry over to
    maps made another way."""
    dbs = data.databases[idx]
    block = {
        "maps": str(data.maps[idx[0]]) if len(idx) else None,
        "description": "the same models, epochs and ensemble, fed the other preprocessing of "
                       "the held-out samples",
        **pooled_scores(y_true.tolist(), y_pred.tolist(), dbs),
        # "index" is the sample's (its row of labels.csv), as in the run's own predictions,
        # so the two sets' predictions of a sample pair up (training compare PATH:other_maps)
        "predictions": _prediction_rows(data, idx, y_pred, probs, index_offset=data.n_primary),
    }
    if ensemble is not None and nested is not None:
        block["nested_cv_ensemble"] = _ensemble_block(ensemble, y_true.tolist(), dbs,
                                                      nested["inner_folds"])
    return block


def _collect(data: Megc3DB, cfg: LosoConfig, run_dir: Path, folds: list[int],
             results_path, info: dict, nested: dict | None = None,
             outer_epochs: str = "all") -> dict:
    # Outer models stopped at their chosen epochs have no later epochs: no fixed-schedule or
    # LEAKY best-epoch figure (the LEAKY one would be a maximum over fewer epochs).
    whole_schedule = outer_epochs == "all"
    subjects = data.subject_list
    y_true, y_pred, idx_all, probs_all = [], [], [], []
    leaky_pred, leaky_epochs, wall = [], {}, {}
    final_pred, ensemble_probs = [], []
    for f in folds:
        doc = json.loads((run_dir / f"fold_{f:02d}.json").read_text())
        idx = doc["indices"]
        idx_all += idx
        final_pred += doc["pred"]
        if nested is not None:
            entry = next(h for h in doc["history"] if h["epoch"] == nested["chosen"][str(f)])
            y_pred += entry["pred"]
            probs_all += entry["probs"]
            if nested.get("inner_test_probs_mean") is not None:
                # CV ensemble: the outer model and the k inner models, equal weights.
                k = nested["inner_folds"]
                ens = (np.asarray(entry["probs"])
                       + k * np.asarray(nested["inner_test_probs_mean"][str(f)])) / (k + 1)
                ensemble_probs.append(ens)
        else:
            y_pred += doc["pred"]
            probs_all += doc["probs"]
        y_true += data.y[idx].tolist()
        # Leaky: the evaluation epoch with the most correct test predictions (earliest on ties).
        best = max(doc["history"], key=lambda h: (h["correct"], -h["epoch"]))
        leaky_pred += best["pred"]
        leaky_epochs[subjects[f]] = best["epoch"]
        wall[tuple(doc["chunk"])] = doc["chunk_wall_s"]
    complete_ensemble = len(ensemble_probs) == len(folds) and bool(folds)
    ens = np.concatenate(ensemble_probs) if complete_ensemble else None
    keep = data.is_primary[np.asarray(idx_all, dtype=np.int64)]
    other_maps = None
    if not keep.all():
        # Two preprocessings: the figures below are on the map set trained on; the other
        # set's predictions of the same held-out subjects are scored apart.
        other_maps = _other_maps_block(data, np.asarray(idx_all)[~keep],
                                       np.asarray(y_true)[~keep], np.asarray(y_pred)[~keep],
                                       np.asarray(probs_all)[~keep],
                                       None if ens is None else ens[~keep], nested)

        def kept(values):
            return [v for v, k in zip(values, keep) if k]

        idx_all, y_true, y_pred, probs_all = (kept(idx_all), kept(y_true), kept(y_pred),
                                              kept(probs_all))
        leaky_pred, final_pred = kept(leaky_pred), kept(final_pred)
        ens = None if ens is None else ens[keep]
    dbs = data.databases[idx_all]
    honest = evaluate(y_true, y_pred)
    leaky = evaluate(y_true, leaky_pred) if whole_schedule else None
    results = {
        "format": RESULTS_FORMAT,
        "protocol": ("LOSO, predictions of all folds pooled, scored once; epochs: "
                     + ("fixed" if nested is None else
                        "per fold by nested subject-wise CV on its training subjects only")),
        "complete": len(folds) == len(subjects),
        "folds_run": len(folds),
        "config": cfg.to_dict(),
        "dataset": {"name": _dataset_name(cfg, data), "root": data.root,
                    "n_samples": len(data.primary_rows),
                    **({"sha256": data.fingerprint()} if cfg.maps == "live" else {}),
                    **({} if data.maps is None else {"maps": str(data.maps[0])}),
                    "n_subjects": len(subjects), "class_counts": list(data.class_counts()),
                    "class_names": list(CLASS_NAMES)},
        "environment": {"torch": torch.__version__, "numpy": np.__version__,
                        "git_commit": git_commit(), "threads": torch.get_num_threads(),
                        "cpu": host_cpu(),
                        **info},
        "wall_time_s": float(sum(wall.values())),
        # Wall clock of the whole run (outer folds, nested selection, worker processes
        # running side by side), summed over the sessions of a resumed run.
        "total_wall_time_s": _elapsed(run_dir),
        "uf1": honest["uf1"],
        "uar": honest["uar"],
        "accuracy": honest["accuracy"],
        "confusion_matrix": honest["confusion_matrix"],
        "per_class": honest["per_class"],
        "per_database": {db: {k: v for k, v in r.items() if k != "per_class"}
                         for db, r in per_database(y_true, y_pred, dbs).items()},
        **({} if nested is None else {"nested_selection": {
            "chosen_epochs": {subjects[int(f)]: e for f, e in nested["chosen"].items()},
            "median_epochs": float(np.median(list(nested["chosen"].values()))),
            "inner_folds": nested["inner_folds"], "wall_s": nested["wall_s"],
            "inner_uf1_curves": {subjects[int(f)]: c
                                 for f, c in nested["inner_uf1_curves"].items()},
            "candidate_epochs": nested["epochs"],
            **({"fixed_final_epoch_same_run": {
                k: evaluate(y_true, final_pred)[k] for k in ("uf1", "uar", "accuracy")}}
               if whole_schedule else {}),
        }}),
        **({} if ens is None else {
            "nested_cv_ensemble": _ensemble_block(ens, y_true, dbs, nested["inner_folds"])}),
        **({} if other_maps is None else {"other_maps": other_maps}),
        **({"leaky_best_epoch": {
            "WARNING": "LEAKY, paper-comparable only: each test subject's epoch was chosen by "
                       "looking at that subject's labels. Not an estimate of performance.",
            "eval_every": cfg.eval_every,
            "uf1": leaky["uf1"], "uar": leaky["uar"], "accuracy": leaky["accuracy"],
            "confusion_matrix": leaky["confusion_matrix"],
            "per_database": {db: {"uf1": r["uf1"], "uar": r["uar"]}
                             for db, r in per_database(y_true, leaky_pred, dbs).items()},
            "best_epoch_per_subject": leaky_epochs,
        }} if whole_schedule else {"outer_epochs": {
            "rule": "chosen: each outer model trained only to its fold's chosen epoch",
            "not_measured": "the LEAKY best-epoch and the fixed-schedule figures (they need "
                            "the epochs after the chosen one); the honest scores are those of "
                            "a run to the schedule's end",
        }}),
        "predictions": _prediction_rows(data, idx_all, y_pred, probs_all),
    }
    _atomic_write_json(run_dir / "results.json", results)
    if results_path is not None:
        Path(results_path).parent.mkdir(parents=True, exist_ok=True)
        _atomic_write_json(Path(results_path), results)
    return results


class ResultsError(ValueError):
    """A file that is not a readable LOSO results file of a format this code knows."""


@dataclass(frozen=True)
class Prediction:
    """One sample's pooled prediction: its index in the dataset, file, subject and database,
    its label, the predicted class and the class probabilities."""

    index: int
    file: str
    subject: str
    database: str
    label: int
    pred: int
    probs: tuple[float, ...]


@dataclass(frozen=True)
class LosoResults:
    """A results file of `python -m training loso` (and of calibrate, window and ensemble, which
    write the same shape), typed and versioned: ``load`` refuses what is not a JSON object or is
    of a newer ``format`` than :data:`RESULTS_FORMAT`; the fields every reader needs are
    properties; ``doc`` is the whole document as written, for the rest."""

    doc: dict
    source: str = ""

    @classmethod
    def load(cls, path: str | Path) -> "LosoResults":
        try:
            doc = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ResultsError(f"{path}: cannot be read as JSON ({exc})") from None
        return cls.from_dict(doc, str(path))

    @classmethod
    def from_dict(cls, doc: dict, source: str = "") -> "LosoResults":
        if not isinstance(doc, dict):
            raise ResultsError(f"{source}: not a LOSO results file (not a JSON object)")
        version = doc.get("format", RESULTS_FORMAT)
        if not isinstance(version, int) or version > RESULTS_FORMAT:
            raise ResultsError(f"{source}: results format {version!r}, newer than the "
                               f"{RESULTS_FORMAT} this code reads")
        return cls(doc, source)

    def save(self, path: str | Path) -> None:
        _atomic_write_json(Path(path), {**self.doc, "format": self.format})

    @property
    def format(self) -> int:
        return int(self.doc.get("format", RESULTS_FORMAT))

    @property
    def complete(self) -> bool:
        return bool(self.doc.get("complete"))

    @property
    def uf1(self) -> float | None:
        return self.doc.get("uf1")

    @property
    def uar(self) -> float | None:
        return self.doc.get("uar")

    @property
    def folds(self) -> int | None:
        """Folds the run covers (a calibrated file covers its run's subjects)."""
        return self.doc.get("folds_run", self.doc.get("dataset", {}).get("n_subjects"))

    @property
    def config_dict(self) -> dict | None:
        return self.doc.get("config")

    @property
    def config(self) -> LosoConfig:
        if not isinstance(self.config_dict, dict):
            raise ResultsError(f"{self.source}: holds no LOSO configuration")
        return LosoConfig.from_dict(self.config_dict)

    @property
    def cv_ensemble(self) -> dict | None:
        """The nested run's CV-ensemble scores and probabilities (None: not a nested run)."""
        return self.doc.get("nested_cv_ensemble")

    @property
    def predictions(self) -> list[Prediction]:
        rows = self.doc.get("predictions")
        if not isinstance(rows, list) or not rows:
            raise ResultsError(f"{self.source}: not a LOSO results file with predictions")
        need = ("index", "pred", "label", "subject", "file")
        if any(not isinstance(p, dict) or any(k not in p for k in need) for p in rows):
            raise ResultsError(f"{self.source}: its predictions lack some of {', '.join(need)}: "
                               "not a results file of `python -m training loso`")
        return [Prediction(int(p["index"]), str(p["file"]), str(p["subject"]),
                           str(p.get("database", "")), int(p["label"]), int(p["pred"]),
                           tuple(p.get("probs", ()))) for p in rows]
