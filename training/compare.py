"""Paired comparison of two LOSO runs on the folds they share (ablations).

An ablation run on a subset of folds (``loso --folds``) is compared with the full model's run
on exactly the same test samples: fold seeds depend on the fold index only
(``training/loso/``), so both models of a fold saw the same initialisation stream, batches
and flips, and the difference is the ablated part. With few folds that difference is noisy;
the subject bootstrap below says how noisy: subjects (the LOSO unit) are drawn with
replacement, both runs' pooled predictions of the drawn subjects are scored once each, and
the 2.5/97.5 percentiles of the UF1 difference form the interval. Nothing is fitted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from training.metrics import uf1_uar

__all__ = ["CompareError", "paired_comparison", "paired_seeds_comparison", "load_results"]


class CompareError(ValueError):
    """The runs cannot be compared (not results files, different samples or labels)."""


def load_results(path: str | Path) -> dict:
    """A LOSO results JSON (complete or a ``--folds`` subset) with its predictions, or an
    ensemble's (``python -m training ensemble --out``). ``PATH:cv_ensemble`` takes a nested
    run's CV-ensemble predictions in place of its single-model ones; ``PATH:other_maps`` and
    ``PATH:other_maps_cv_ensemble`` its predictions of the same samples made by the other
    preprocessing (a run given both map sets)."""
    text = str(path)
    base, _, source = text.rpartition(":")
    if source == "cv_ensemble" and base and not Path(text).exists():
        return _cv_ensemble_results(load_results(base), base)
    if source in ("other_maps", "other_maps_cv_ensemble") and base and not Path(text).exists():
        other = _other_maps_results(load_results(base), base)
        return other if source == "other_maps" else _cv_ensemble_results(other, text)
    from training.loso.results import LosoResults, ResultsError

    try:
        results = LosoResults.load(path)
        results.predictions  # checked: every reader below needs them whole
    except ResultsError as exc:
        raise CompareError(str(exc)) from None
    return results.doc


#: The pooled scores of a results document, replaced whole when another set of its
#: predictions (the CV ensemble's, the other map set's) stands in for its own.
_SCORE_KEYS = ("uf1", "uar", "accuracy", "confusion_matrix", "per_database")


def _cv_ensemble_results(doc: dict, name: str) -> dict:
    """``doc`` with each prediction replaced by its nested CV ensemble's (same sample order)."""
    ens = doc.get("nested_cv_ensemble")
    if not isinstance(ens, dict) or len(ens.get("probs", [])) != len(doc["predictions"]):
        raise CompareError(f"{name}: has no nested_cv_ensemble probabilities for its "
                           "predictions (a nested run of `python -m training loso`)")
    # The ensemble's own scores replace the single model's, so the document agrees with itself.
    out = {k: v for k, v in doc.items() if k not in (*_SCORE_KEYS, "per_class",
                                                   "leaky_best_epoch", "nested_cv_ensemble")}
    out.update({k: ens[k] for k in _SCORE_KEYS if k in ens})
    out["predictions"] = [dict(p, pred=int(np.argmax(pr)), probs=pr)
                          for p, pr in zip(doc["predictions"], ens["probs"])]
    return out


def _other_maps_results(doc: dict, name: str) -> dict:
    """``doc`` as scored on the other preprocessing of its samples (a run given both map sets:
    its ``other_maps`` block), paired with other runs by sample."""
    other = doc.get("other_maps")
    if not isinstance(other, dict) or "predictions" not in other:
        raise CompareError(f"{name}: was not scored on another map set (a LOSO run with "
                           "--score-other-maps, --other-maps-share or --maps causalnet)")
    out = {k: v for k, v in doc.items() if k not in (*_SCORE_KEYS, "per_class",
                                                   "leaky_best_epoch", "nested_cv_ensemble",
                                                   "other_maps")}
    out.update({k: other[k] for k in (*_SCORE_KEYS, "predictions", "nested_cv_ensemble")
                if k in other})
    return out


def _by_index(doc: dict) -> dict[int, dict]:
    return {int(p["index"]): p for p in doc["predictions"]}


def _paired(reference: dict, variant: dict, database: str | None = None
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Labels, the reference's and the variant's predicted classes and the subjects of the
    variant's samples (only those of ``database`` when given), in index order; CompareError
    unless every one is in the reference with the same file, subject and label."""
    ref = _by_index(reference)
    var = _by_index(variant)
    if database is not None:  # e.g. the paper's own table: CASME II subjects only
        var = {i: p for i, p in var.items() if p.get("database") == database}
        if not var:
            raise CompareError(f"the variant has no sample of database {database!r}")
    missing = sorted(set(var) - set(ref))
    if missing:
        raise CompareError(f"{len(missing)} sample(s) of the variant are not in the reference "
                           f"(first index {missing[0]}): not runs over the same data")
    idx = sorted(var)
    for i in idx:
        a, b = ref[i], var[i]
        for key in ("file", "subject", "label"):
            if a.get(key) != b.get(key):
                raise CompareError(f"sample {i}: {key} {b.get(key)!r} in the variant but "
                                   f"{a.get(key)!r} in the reference")
    return (np.array([var[i]["label"] for i in idx]), np.array([ref[i]["pred"] for i in idx]),
            np.array([var[i]["pred"] for i in idx]), np.array([var[i]["subject"] for i in idx]))


def paired_comparison(reference: dict, variant: dict, *, n_boot: int = 2000, seed: int = 0,
                      database: str | None = None) -> dict:
    """Score ``variant`` and ``reference`` on the variant's samples and bootstrap the
    difference over subjects (only those of ``database`` when given).

    Every sample of the variant must be in the reference with the same file, subject and
    label. Returns n, subjects, both runs' UF1/UAR on those samples, ``delta_uf1`` /
    ``delta_uar`` (variant - reference), ``ci95_delta_uf1`` (subject bootstrap), the share of
    bootstrap draws where the variant's UF1 is lower, and how many predictions differ.
    """
    if n_boot < 0:
        raise CompareError(f"bootstrap draws must be >= 0, not {n_boot}")
    y, p_ref, p_var, subj = _paired(reference, variant, database)
    names = list(dict.fromkeys(subj.tolist()))
    members = [np.flatnonzero(subj == s) for s in names]

    ref_uf1, ref_uar = uf1_uar(y, p_ref)
    var_uf1, var_uar = uf1_uar(y, p_var)
    rng = np.random.default_rng(seed)
    deltas = np.empty(n_boot)
    for b in range(n_boot):
        pick = np.concatenate([members[k] for k in rng.integers(0, len(members), len(members))])
        deltas[b] = uf1_uar(y[pick], p_var[pick])[0] - uf1_uar(y[pick], p_ref[pick])[0]
    lo, hi = (np.percentile(deltas, [2.5, 97.5]) if n_boot else (float("nan"),) * 2)
    return {
        "n": len(y),
        "database": database or "all",
        "subjects": names,
        "reference": {"uf1": ref_uf1, "uar": ref_uar},
        "variant": {"uf1": var_uf1, "uar": var_uar},
        "delta_uf1": var_uf1 - ref_uf1,
        "delta_uar": var_uar - ref_uar,
        "ci95_delta_uf1": [float(lo), float(hi)],
        "p_variant_lower": float(np.mean(deltas < 0)) if n_boot else float("nan"),
        "bootstrap": {"draws": n_boot, "seed": seed, "unit": "subject"},
        "predictions_differ": int(np.sum(p_ref != p_var)),
    }


def paired_seeds_comparison(pairs: list[tuple[dict, dict]], *, n_boot: int = 2000,
                            seed: int = 0) -> dict:
    """The mean over seeds of a variant's UF1 difference from its reference, each
    (reference, variant) pair one seed of both, with one subject bootstrap for all seeds: each
    draw picks subjects with replacement once, scores every pair's predictions of them and
    averages the seeds' differences (the seeds themselves are not resampled: they are the runs
    there are). Every pair must cover the same samples (a complete run each)."""
    if not pairs:
        raise CompareError("no (reference, variant) pair to compare")
    if n_boot < 0:
        raise CompareError(f"bootstrap draws must be >= 0, not {n_boot}")
    arrays = [_paired(reference, variant) for reference, variant in pairs]
    y, _, _, subj = arrays[0]
    for k, (y_k, _, _, subj_k) in enumerate(arrays[1:], 1):
        if not (np.array_equal(y_k, y) and np.array_equal(subj_k, subj)):
            raise CompareError(f"pair {k + 1} covers other samples than pair 1: compare "
                               "complete runs over the same data")
    names = list(dict.fromkeys(subj.tolist()))
    members = [np.flatnonzero(subj == s) for s in names]
    per_seed = [{"reference": uf1_uar(y, p_ref)[0], "variant": uf1_uar(y, p_var)[0]}
                for _, p_ref, p_var, _ in arrays]
    for row in per_seed:
        row["delta_uf1"] = row["variant"] - row["reference"]
    rng = np.random.default_rng(seed)
    deltas = np.empty(n_boot)
    for b in range(n_boot):
        pick = np.concatenate([members[k] for k in rng.integers(0, len(members), len(members))])
        deltas[b] = np.mean([uf1_uar(y[pick], p_var[pick])[0] - uf1_uar(y[pick], p_ref[pick])[0]
                             for _, p_ref, p_var, _ in arrays])
    lo, hi = (np.percentile(deltas, [2.5, 97.5]) if n_boot else (float("nan"),) * 2)
    return {
        "n": int(len(y)),
        "seeds": len(pairs),
        "per_seed": per_seed,
        "reference_mean_uf1": float(np.mean([r["reference"] for r in per_seed])),
        "variant_mean_uf1": float(np.mean([r["variant"] for r in per_seed])),
        "mean_delta_uf1": float(np.mean([r["delta_uf1"] for r in per_seed])),
        # the seeds' own spread, which the subject bootstrap does not hold
        "sd_delta_uf1": (float(np.std([r["delta_uf1"] for r in per_seed], ddof=1))
                         if len(per_seed) > 1 else float("nan")),
        "ci95_mean_delta_uf1": [float(lo), float(hi)],
        "p_variant_lower": float(np.mean(deltas < 0)) if n_boot else float("nan"),
        "bootstrap": {"draws": n_boot, "seed": seed, "unit": "subject, one draw for all seeds"},
    }
