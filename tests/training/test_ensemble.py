"""LOSO ensembles of several networks' runs (training/ensemble.py): the mean of the members'
pooled probabilities, scored once; members that do not fit are refused."""

from __future__ import annotations

import json

import numpy as np
import pytest

from training.__main__ import main
from training.ensemble import EnsembleError, loso_ensemble
from training.metrics import uf1_uar


def _results(path, probs, labels, model="m", order=None, cv=None, complete=True):
    n = len(labels)
    order = list(range(n)) if order is None else order
    doc = {"complete": complete, "config": {"model": model},
           "dataset": {"class_names": ["negative", "positive", "surprise"]},
           "predictions": [{"index": int(i), "file": f"f{i}.png", "database": "casme2" if i % 2
                            else "samm", "label": int(labels[i]),
                            "probs": [float(v) for v in probs[i]]} for i in order]}
    if cv is not None:
        doc["nested_cv_ensemble"] = {"probs": [[float(v) for v in cv[i]] for i in order]}
    path.write_text(json.dumps(doc))
    return path


def _probs(rng, n):
    p = rng.random((n, 3))
    return p / p.sum(1, keepdims=True)


def test_ensemble_is_the_mean_probability_scored_once(tmp_path):
    rng = np.random.default_rng(0)
    n = 30
    y = np.arange(n) % 3
    a, b, c = _probs(rng, n), _probs(rng, n), _probs(rng, n)
    # Members may list their samples in another (fold) order; rows are matched by index.
    fa = _results(tmp_path / "a.json", a, y, "ststnet", cv=c)
    fb = _results(tmp_path / "b.json", b, y, "ahmsa", order=list(rng.permutation(n)))
    res = loso_ensemble([(fa, "cv_ensemble"), (fb, "final")])
    mean = (c + b) / 2
    assert (res["uf1"], res["uar"]) == pytest.approx(uf1_uar(y, mean.argmax(1)))
    got = np.array([p["probs"] for p in res["predictions"]])
    np.testing.assert_allclose(got, mean, atol=1e-6)
    assert [m["uf1"] for m in res["members"]] == pytest.approx(
        [uf1_uar(y, c.argmax(1))[0], uf1_uar(y, b.argmax(1))[0]])
    assert sum(d["n"] for d in res["per_database"].values()) == n
    # A member twice is that member.
    twice = loso_ensemble([(fb, "final"), (fb, "final")])
    assert twice["uf1"] == pytest.approx(uf1_uar(y, b.argmax(1))[0])


def test_members_that_do_not_fit_are_refused(tmp_path):
    rng = np.random.default_rng(1)
    y = np.arange(12) % 3
    ok = _results(tmp_path / "ok.json", _probs(rng, 12), y)
    other_labels = _results(tmp_path / "y.json", _probs(rng, 12), np.roll(y, 1))
    partial = _results(tmp_path / "p.json", _probs(rng, 12), y, complete=False)
    with pytest.raises(EnsembleError, match="differ"):
        loso_ensemble([(ok, "final"), (other_labels, "final")])
    with pytest.raises(EnsembleError, match="not a complete"):
        loso_ensemble([(ok, "final"), (partial, "final")])
    with pytest.raises(EnsembleError, match="nested_cv_ensemble"):
        loso_ensemble([(ok, "final"), (ok, "cv_ensemble")])
    with pytest.raises(EnsembleError, match="at least two"):
        loso_ensemble([(ok, "final")])
    with pytest.raises(EnsembleError, match="JSON"):
        loso_ensemble([(ok, "final"), (tmp_path / "missing.json", "final")])


def test_cli_writes_the_ensemble_and_exits_2_on_bad_members(tmp_path, capsys):
    rng = np.random.default_rng(2)
    y = np.arange(12) % 3
    a = _results(tmp_path / "a.json", _probs(rng, 12), y)
    b = _results(tmp_path / "b.json", _probs(rng, 12), y)
    out = tmp_path / "ens.json"
    assert main(["ensemble", str(a), f"{b}:final", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["uf1"] == pytest.approx(
        loso_ensemble([(a, "final"), (b, "final")])["uf1"])
    assert main(["ensemble", str(a), f"{b}:leaky"]) == 2
    assert "leaky" in capsys.readouterr().err
