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
    # The ensemble's own output is not a LOSO run: refused with a message, not a traceback.
    assert main(["ensemble", str(a), str(out)]) == 2
    assert "not a results file of `python -m training loso`" in capsys.readouterr().err


def _tiny_data():
    from training.data.megc3db import Megc3DB

    rng = np.random.default_rng(3)
    n_subjects, per = 3, 6
    n = n_subjects * per
    y = np.tile(np.arange(3), n // 3)
    x = rng.random((n, 3, 28, 28), dtype=np.float32) * 0.5
    for i, c in enumerate(y):
        x[i, c] += 0.3
    return Megc3DB(x=x, y=y, subjects=np.repeat([f"casme2/s{i}" for i in range(n_subjects)], per),
                   databases=np.array(["casme2"] * n), videos=np.array([str(i) for i in range(n)]),
                   files=np.array([f"f{i}.png" for i in range(n)]), root="synthetic",
                   landmarks=np.full((n, 5, 2), np.nan))


def test_ensemble_engine_averages_the_members_it_was_scored_with(tmp_path):
    """Two networks with different input kinds: LOSO each, export each quoting its run, write
    the ensemble engine; the runtime loads it, predicts the members' mean, and refuses a member
    that is not the one the ensemble was scored with."""
    import dataclasses
    import shutil

    from realtime_mer.errors import EngineError
    from realtime_mer.runtime import load_engine
    from training.ensemble import write_ensemble_engine
    from training.export import export_default
    from training.loso import LosoConfig, run_loso

    data = _tiny_data()
    cfgs = [LosoConfig(epochs=2, batch_size=6, select_epochs="fixed"),
            LosoConfig(epochs=2, batch_size=6, select_epochs="fixed", input_kind="regions5")]
    results, engines = [], []
    for i, cfg in enumerate(cfgs):
        res = tmp_path / f"loso{i}.json"
        run_loso(data, cfg, tmp_path / f"run{i}", results_path=res)
        engines.append(tmp_path / "engines" / f"m{i}.onnx")
        export_default(data, cfg, engines[-1], loso_results=res)
        results.append(res)
    ens = loso_ensemble([(r, "final") for r in results])
    out = tmp_path / "engines" / "both.ens"
    m = write_ensemble_engine(ens, engines, out, tmp_path / "ens.json")
    assert m["format"] == "ensemble" and m["loso"]["uf1"] == pytest.approx(ens["uf1"])
    engine = load_engine(out)
    members = [load_engine(e) for e in engines]
    assert engine.uses_landmarks and [e.manifest.model for e in engine.members] == ["ststnet"] * 2
    want = np.mean([e.predict(data.x) for e in members], axis=0)
    np.testing.assert_allclose(engine.predict(data.x), want, atol=1e-6)
    # The order of the members matters for the check: engines must follow the results.
    with pytest.raises(EnsembleError, match="quotes LOSO results"):
        write_ensemble_engine(ens, engines[::-1], tmp_path / "x.ens")
    # A member re-exported (other weights) is not the one the ensemble was scored with.
    export_default(data, dataclasses.replace(cfgs[0], seed=5), tmp_path / "other.onnx",
                   loso_results=None)
    shutil.copy(tmp_path / "other.onnx", engines[0])
    shutil.copy(tmp_path / "other.onnx.json", str(engines[0]) + ".json")
    with pytest.raises(EngineError, match="not the engine the ensemble was built with"):
        load_engine(out)
    engines[0].unlink()
    with pytest.raises(EngineError, match="member m0.onnx.*missing"):
        load_engine(out)
