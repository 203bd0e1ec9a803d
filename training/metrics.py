"""Recognition metrics of the MEGC protocol.

UF1 (unweighted F1) is the macro average of per-class F1 and UAR (unweighted average recall) the
macro average of per-class recall, both computed ONCE over the predictions pooled from every LOSO
fold. Averaging per-fold scores instead is a different (and, with one-class test subjects,
meaningless) number, so no function here takes folds.

Classes with no true sample in ``y_true`` are left out of both averages (their recall is
undefined); every class of the 3DB set is present in each database, so this only matters for
small subsets. Where a present class is never predicted, its F1 is 0.
"""

from __future__ import annotations

import numpy as np

__all__ = ["confusion_matrix", "uf1_uar", "per_class", "evaluate", "per_database", "pooled_scores",
           "interval_iou", "match_intervals", "spotting_scores"]


def _check(y_true, y_pred, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(y_true).astype(np.int64).ravel()
    p = np.asarray(y_pred).astype(np.int64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.size} labels but y_pred has {p.size}")
    if t.size == 0:
        raise ValueError("no predictions to score")
    for name, a in (("y_true", t), ("y_pred", p)):
        if a.min() < 0 or a.max() >= num_classes:
            raise ValueError(f"{name} has labels outside 0..{num_classes - 1}")
    return t, p


def confusion_matrix(y_true, y_pred, num_classes: int = 3) -> np.ndarray:
    """(num_classes, num_classes) int64 counts; rows are true classes, columns predicted."""
    t, p = _check(y_true, y_pred, num_classes)
    return np.bincount(t * num_classes + p, minlength=num_classes**2).reshape(
        num_classes, num_classes
    )


def per_class(cm: np.ndarray) -> dict[str, list[float | None]]:
    """Per-class precision, recall and F1 from a confusion matrix (None where undefined)."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    out: dict[str, list[float | None]] = {"precision": [], "recall": [], "f1": [], "support": []}
    for c in range(cm.shape[0]):
        out["precision"].append(float(tp[c] / predicted[c]) if predicted[c] else None)
        out["recall"].append(float(tp[c] / support[c]) if support[c] else None)
        denom = 2 * tp[c] + (predicted[c] - tp[c]) + (support[c] - tp[c])
        out["f1"].append(float(2 * tp[c] / denom) if denom else None)
        out["support"].append(int(support[c]))
    return out


def uf1_uar(y_true, y_pred, num_classes: int = 3) -> tuple[float, float]:
    """(UF1, UAR) over the given (pooled) predictions."""
    cm = confusion_matrix(y_true, y_pred, num_classes)
    present = cm.sum(axis=1) > 0
    stats = per_class(cm)
    f1 = [stats["f1"][c] for c in range(num_classes) if present[c]]
    rec = [stats["recall"][c] for c in range(num_classes) if present[c]]
    return float(np.mean(f1)), float(np.mean(rec))


def evaluate(y_true, y_pred, num_classes: int = 3) -> dict:
    """UF1, UAR, accuracy, confusion matrix and per-class stats as plain JSON-able types."""
    cm = confusion_matrix(y_true, y_pred, num_classes)
    uf1, uar = uf1_uar(y_true, y_pred, num_classes)
    return {
        "uf1": uf1,
        "uar": uar,
        "accuracy": float(np.trace(cm) / cm.sum()),
        "n": int(cm.sum()),
        "confusion_matrix": cm.tolist(),
        "per_class": per_class(cm),
    }


def per_database(y_true, y_pred, databases, num_classes: int = 3) -> dict[str, dict]:
    """:func:`evaluate` restricted to each database (e.g. smic, casme2, samm) of the pooled set."""
    t, p = _check(y_true, y_pred, num_classes)
    dbs = np.asarray(databases).ravel()
    if dbs.shape != t.shape:
        raise ValueError(f"databases has {dbs.size} entries for {t.size} predictions")
    order = list(dict.fromkeys(str(d) for d in dbs))
    return {db: evaluate(t[dbs == db], p[dbs == db], num_classes) for db in order}


def pooled_scores(y_true, y_pred, databases, num_classes: int = 3) -> dict:
    """The score block of a pooled LOSO prediction set: UF1, UAR, accuracy, confusion matrix,
    and UF1/UAR/n per database."""
    r = evaluate(y_true, y_pred, num_classes)
    return {"uf1": r["uf1"], "uar": r["uar"], "accuracy": r["accuracy"],
            "confusion_matrix": r["confusion_matrix"],
            "per_database": {db: {"uf1": d["uf1"], "uar": d["uar"], "n": d["n"]}
                             for db, d in per_database(y_true, y_pred, databases,
                                                       num_classes).items()}}


# -- spotting (MEGC rule) -----------------------------------------------------------------------

def interval_iou(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Intersection over union of two closed intervals ``(start, end)`` on one clock (ms)."""
    inter = min(a[1], b[1]) - max(a[0], b[0])
    union = max(a[1], b[1]) - min(a[0], b[0])
    if inter <= 0 or union <= 0:
        return 0.0
    return float(inter / union)


def match_intervals(truth, detections, min_iou: float = 0.5) -> list[tuple[int, int, float]]:
    """One-to-one matches ``(truth index, detection index, IoU)`` between true intervals and
    detected ones (each ``(onset, offset)``), MEGC rule: a pair counts when its IoU is at least
    ``min_iou``; pairs are taken greedily by decreasing IoU, so each interval is matched once
    and the best overlaps win (ties by earlier truth, then earlier detection)."""
    pairs = []
    for i, t in enumerate(truth):
        for j, d in enumerate(detections):
            iou = interval_iou(t, d)
            if iou >= min_iou:
                pairs.append((-iou, i, j))
    pairs.sort()
    used_t, used_d, out = set(), set(), []
    for neg, i, j in pairs:
        if i in used_t or j in used_d:
            continue
        used_t.add(i)
        used_d.add(j)
        out.append((i, j, -neg))
    return sorted(out)


def spotting_scores(n_truth: int, n_detections: int, n_matched: int) -> dict:
    """Precision, recall and F1 from counts (None where undefined), MEGC style: F1 from the
    pooled counts of all clips, not averaged per clip."""
    if n_matched > min(n_truth, n_detections) or min(n_truth, n_detections, n_matched) < 0:
        raise ValueError(f"{n_matched} matches for {n_truth} true and {n_detections} detected "
                         "intervals")
    precision = n_matched / n_detections if n_detections else None
    recall = n_matched / n_truth if n_truth else None
    denom = n_truth + n_detections
    f1 = 2 * n_matched / denom if denom else None
    return {"truth": n_truth, "detections": n_detections, "tp": n_matched,
            "precision": precision, "recall": recall, "f1": f1}
