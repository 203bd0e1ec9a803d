"""UF1/UAR against hand-computed values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training.metrics import confusion_matrix, evaluate, per_database, uf1_uar

REPO = Path(__file__).resolve().parents[2]


def test_hand_computed():
    # true: 0 0 0 0 1 1 2 2 ; pred: 0 0 1 2 1 0 2 2
    t = [0, 0, 0, 0, 1, 1, 2, 2]
    p = [0, 0, 1, 2, 1, 0, 2, 2]
    cm = confusion_matrix(t, p)
    assert cm.tolist() == [[2, 1, 1], [1, 1, 0], [0, 0, 2]]
    # F1: c0 2*2/(4+1+2)=4/7 ; c1 2/(2+1+1)=1/2 ; c2 4/(4+1+0)=4/5
    # recall: c0 2/4, c1 1/2, c2 2/2
    uf1, uar = uf1_uar(t, p)
    assert uf1 == pytest.approx((4 / 7 + 1 / 2 + 4 / 5) / 3)
    assert uar == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    assert evaluate(t, p)["accuracy"] == pytest.approx(5 / 8)


def test_pooled_not_fold_average():
    # Two "folds": fold A all class 0 right, fold B one class-1 sample wrong.
    t = [0, 0, 1]
    p = [0, 0, 0]
    uf1, uar = uf1_uar(t, p)
    # class 0: F1 = 4/5, class 1: F1 = 0 -> UF1 0.4; UAR (1 + 0)/2
    assert uf1 == pytest.approx(0.4) and uar == pytest.approx(0.5)


def test_absent_class_left_out_and_never_predicted_zero():
    uf1, uar = uf1_uar([0, 0, 1], [0, 0, 1])
    assert uf1 == 1.0 and uar == 1.0  # class 2 absent from truth: not averaged in
    uf1, _ = uf1_uar([0, 1], [0, 0])
    assert uf1 == pytest.approx((2 / 3 + 0) / 2)


def test_per_database():
    r = per_database([0, 1, 2, 0], [0, 1, 0, 0], ["smic", "smic", "samm", "samm"])
    assert list(r) == ["smic", "samm"]
    assert r["smic"]["uf1"] == 1.0
    assert r["samm"]["confusion_matrix"] == [[1, 0, 0], [0, 0, 0], [1, 0, 0]]


def test_errors():
    with pytest.raises(ValueError):
        uf1_uar([0, 1], [0])
    with pytest.raises(ValueError):
        uf1_uar([0, 3], [0, 1])
    with pytest.raises(ValueError):
        uf1_uar([], [])
    assert isinstance(confusion_matrix(np.array([1]), np.array([1])), np.ndarray)


# -- spotting (MEGC rule) -----------------------------------------------------------------------

def test_interval_iou_by_hand():
    from training.metrics import interval_iou

    assert interval_iou((0, 100), (50, 150)) == pytest.approx(50 / 150)
    assert interval_iou((0, 100), (0, 100)) == 1.0
    assert interval_iou((0, 100), (100, 200)) == 0.0   # touching is not overlapping
    assert interval_iou((0, 100), (200, 300)) == 0.0
    assert interval_iou((0, 100), (25, 75)) == pytest.approx(0.5)   # nested
    assert interval_iou((10, 10), (0, 20)) == 0.0      # an empty interval


def test_matching_is_one_to_one_at_iou_half():
    from training.metrics import match_intervals, spotting_scores

    truth = [(1000, 1300), (2000, 2400), (5000, 5200)]
    detections = [
        (1010, 1290),   # truth 0: IoU 0.93
        (1050, 1350),   # also truth 0 (IoU 0.71), but it is taken by the better one: a FP
        (2150, 2400),   # truth 1: IoU 250/400 = 0.625
        (4900, 5050),   # truth 2: IoU 50/300 < 0.5: a miss and a FP
        (7000, 7300),   # nothing there: a FP
    ]
    matches = match_intervals(truth, detections)
    assert [(i, j) for i, j, _ in matches] == [(0, 0), (1, 2)]
    assert matches[1][2] == pytest.approx(0.625)
    scores = spotting_scores(len(truth), len(detections), len(matches))
    assert scores["tp"] == 2 and scores["precision"] == pytest.approx(2 / 5)
    assert scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(2 * 2 / (3 + 5))
    # Exactly 0.5 counts (the MEGC rule is IoU >= 0.5).
    assert match_intervals([(0, 100)], [(0, 50)]) == [(0, 0, 0.5)]
    assert match_intervals([(0, 100)], [(0, 49)]) == []
    # Two detections and two truths overlapping crosswise: each truth gets its own best.
    crossed = match_intervals([(0, 100), (80, 180)], [(75, 175), (5, 100)])
    assert [(i, j) for i, j, _ in crossed] == [(0, 1), (1, 0)]


def test_spotting_scores_edge_cases():
    from training.metrics import spotting_scores

    assert spotting_scores(0, 0, 0) == {"truth": 0, "detections": 0, "tp": 0,
                                         "precision": None, "recall": None, "f1": None}
    assert spotting_scores(4, 0, 0)["recall"] == 0.0
    with pytest.raises(ValueError):
        spotting_scores(1, 1, 2)


def test_the_benchmark_tells_the_persons_own_movements_from_false_detections(tmp_path):
    """benchmarks/spotting.py: an unmatched detection that the spotter also makes on the
    untouched original (IoU >= 0.5) is marked so; one it does not make there is plainly false;
    the two F1s count them accordingly."""
    import sys

    sys.path.insert(0, str(REPO))
    try:
        from benchmarks import spotting as bench
    finally:
        sys.path.remove(str(REPO))
    from training.injection import Injection, write_truth

    clip = bench.Clip("calm", "talking/d0.mp4", "calm", "held-out")
    truth = [Injection(1000, 1100, 1300, 2.0, "AU12", "lip corners", "positive"),
             Injection(4000, 4100, 4300, 3.0, "AU4", "brows", "negative")]
    for seed in bench.SEEDS:
        write_truth(tmp_path / f"calm.s{seed}.json", "calm", truth)

    def run(*intervals):
        events = [{"onset_ms": a, "offset_ms": b, "kind": "macro"} for a, b in intervals]
        return bench.ClipRun("x", events, np.zeros(1), np.full((1, 4), 0.5), np.zeros(1, bool),
                             1, 10.0, 0.0)

    # the first movement found; a smile the original has too (IoU 0.8); a false one
    injected = run((1000, 1300), (6000, 6500), (8000, 8200))
    runs = {f"calm.s{seed}": injected for seed in bench.SEEDS}
    original = {"calm": run((6000, 6400))}
    rows = bench.score_injected(runs, tmp_path, [clip], original)
    unmatched = [r for r in rows if r["truth"] is None]
    assert [(r["detection"]["onset_ms"], r["in_original"]) for r in unmatched] == [
        (6000, True), (8000, False)] * 2
    summary = bench.summarise(rows, {}, {}, tmp_path, [clip])["splits"]["held-out"]
    calm = summary["not_speaking"]
    assert calm["false_detections"] == 4 and calm["false_detections_in_original"] == 2
    assert calm["f1_2_3pct"] == pytest.approx(2 * 2 / (2 * 2 + 2 + 4))   # tp 2, fn 2, fp 4
    assert calm["f1_2_3pct_own_movements_not_counted"] == pytest.approx(2 * 2 / (2 * 2 + 2 + 2))
