"""UF1/UAR against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from training.metrics import confusion_matrix, evaluate, per_database, uf1_uar


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
