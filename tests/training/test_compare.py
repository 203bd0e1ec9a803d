"""Paired comparison of LOSO runs (training/compare.py): both runs scored on the variant's
samples, a subject bootstrap of the difference, runs over other data refused."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from training.__main__ import main
from training.compare import (CompareError, load_results, paired_comparison,
                              paired_seeds_comparison)
from training.metrics import uf1_uar

RESULTS = Path(__file__).resolve().parents[2] / "experiments" / "results"
FULL = RESULTS / "mjfn112_loso_fixed40.json"
VARIANT = RESULTS / "ablations" / "mjfn112_average_loso_fixed40.json"


def test_full_runs_differ_by_their_recorded_scores():
    ref, var = load_results(FULL), load_results(VARIANT)
    r = paired_comparison(ref, var, n_boot=200)
    assert r["n"] == len(ref["predictions"]) == 442
    assert r["reference"]["uf1"] == pytest.approx(ref["uf1"], abs=1e-12)
    assert r["variant"]["uar"] == pytest.approx(var["uar"], abs=1e-12)
    assert r["delta_uf1"] == pytest.approx(var["uf1"] - ref["uf1"], abs=1e-12)
    lo, hi = r["ci95_delta_uf1"]
    # The predictions differ, so resampling subjects moves the difference: a real interval
    # around the observed one, and the same draws (same seed) give the same interval.
    assert lo < hi and lo <= r["delta_uf1"] <= hi
    assert list(paired_comparison(ref, var, n_boot=200)["ci95_delta_uf1"]) == [lo, hi]
    differ = sum(a["pred"] != b["pred"] for a, b in zip(
        sorted(ref["predictions"], key=lambda p: p["index"]),
        sorted(var["predictions"], key=lambda p: p["index"])))
    assert r["predictions_differ"] == differ > 0


def _subset(doc, subjects):
    sub = copy.deepcopy(doc)
    sub["predictions"] = [p for p in sub["predictions"] if p["subject"] in subjects]
    sub["complete"] = False
    return sub


def test_a_fold_subset_is_scored_against_the_same_samples_of_the_reference():
    ref = load_results(FULL)
    subjects = {"casme2/sub17", "casme2/sub12", "samm/006"}
    part = _subset(ref, subjects)
    r = paired_comparison(ref, part, n_boot=100)
    y = [p["label"] for p in part["predictions"]]
    pred = [p["pred"] for p in part["predictions"]]
    assert r["n"] == len(y) and set(r["subjects"]) == subjects
    assert r["reference"]["uf1"] == pytest.approx(uf1_uar(y, pred)[0], abs=1e-12)
    # The same predictions: no difference in any bootstrap draw.
    assert r["delta_uf1"] == 0 and r["ci95_delta_uf1"] == [0.0, 0.0]
    assert r["p_variant_lower"] == 0 and r["predictions_differ"] == 0


def test_a_variant_right_on_every_sample_is_never_lower_in_the_bootstrap():
    ref = load_results(FULL)
    perfect = copy.deepcopy(ref)
    for p in perfect["predictions"]:
        p["pred"] = p["label"]
    r = paired_comparison(ref, perfect, n_boot=300, seed=3)
    assert r["variant"]["uf1"] == 1.0
    assert r["delta_uf1"] == pytest.approx(1.0 - ref["uf1"], abs=1e-12)
    assert r["ci95_delta_uf1"][0] > 0 and r["p_variant_lower"] == 0


def test_runs_over_other_samples_or_labels_are_refused():
    ref = load_results(FULL)
    other = copy.deepcopy(ref)
    other["predictions"][5]["label"] = (other["predictions"][5]["label"] + 1) % 3
    with pytest.raises(CompareError, match="label"):
        paired_comparison(ref, other, n_boot=10)
    extra = copy.deepcopy(ref)
    extra["predictions"].append({**extra["predictions"][0], "index": 10_000})
    with pytest.raises(CompareError, match="not in the reference"):
        paired_comparison(ref, extra, n_boot=10)
    with pytest.raises(CompareError, match="bootstrap draws"):
        paired_comparison(ref, ref, n_boot=-1)


def test_cli_writes_the_comparison_and_refuses_a_non_results_file(tmp_path, capsys):
    out = tmp_path / "cmp.json"
    assert main(["compare", str(FULL), str(VARIANT), "--bootstrap", "50", "--out",
                 str(out)]) == 0
    doc = json.loads(out.read_text())
    expect = load_results(VARIANT)["uf1"] - load_results(FULL)["uf1"]
    assert doc["comparisons"][0]["delta_uf1"] == pytest.approx(expect, abs=1e-12)
    assert VARIANT.name in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"uf1": 0.5}))
    assert main(["compare", str(FULL), str(bad)]) == 2
    assert "not a LOSO results file" in capsys.readouterr().err
    bad.write_text(json.dumps({"predictions": [{"index": 0, "label": 1}]}))
    assert main(["compare", str(FULL), str(bad)]) == 2
    assert "predictions lack some of index, pred" in capsys.readouterr().err
    assert main(["compare", str(FULL), str(VARIANT), "--bootstrap", "-1"]) == 2
    assert np.isfinite(doc["comparisons"][0]["ci95_delta_uf1"]).all()


def test_one_database_is_scored_like_the_runs_own_per_database_figures(capsys):
    """--database casme2 (MCNet's ablation table is CASME II only): both runs are scored on the
    145 CASME II samples, as each run's own per-database figure, and only CASME II subjects
    are resampled."""
    ref, var = load_results(FULL), load_results(VARIANT)
    r = paired_comparison(ref, var, n_boot=100, database="casme2")
    assert r["n"] == ref["per_database"]["casme2"]["n"] == 145
    assert r["reference"]["uf1"] == pytest.approx(ref["per_database"]["casme2"]["uf1"], abs=1e-12)
    assert r["variant"]["uar"] == pytest.approx(var["per_database"]["casme2"]["uar"], abs=1e-12)
    assert r["database"] == "casme2" and all(s.startswith("casme2/") for s in r["subjects"])
    with pytest.raises(CompareError, match="no sample of database 'casme3'"):
        paired_comparison(ref, var, n_boot=0, database="casme3")
    assert main(["compare", str(FULL), str(VARIANT), "--database", "casme2",
                 "--bootstrap", "10"]) == 0
    assert "(database casme2 only)" in capsys.readouterr().out


NESTED = RESULTS / "ststnet_loso_nested_cpu.json"
NESTED_SEED1 = RESULTS / "seeds" / "ststnet_loso_nested_cpu_seed1.json"


def test_cv_ensemble_source_and_ensemble_files_compare_by_their_recorded_scores(tmp_path):
    """``RESULTS:cv_ensemble`` is the run's CV ensemble, and the output of
    ``python -m training ensemble`` pairs with a run like any results file."""
    single = load_results(NESTED)
    cv0 = load_results(f"{NESTED}:cv_ensemble")
    cv1 = load_results(f"{NESTED_SEED1}:cv_ensemble")
    assert (cv0["uf1"], cv0["uar"]) == (single["nested_cv_ensemble"]["uf1"],
                                        single["nested_cv_ensemble"]["uar"])
    r = paired_comparison(single, cv0, n_boot=0)
    assert r["reference"]["uf1"] == pytest.approx(single["uf1"], abs=1e-12)
    assert r["variant"]["uf1"] == pytest.approx(single["nested_cv_ensemble"]["uf1"], abs=1e-12)
    assert r["predictions_differ"] > 0
    both = tmp_path / "seeds01.json"
    assert main(["ensemble", f"{NESTED}:cv_ensemble", f"{NESTED_SEED1}:cv_ensemble",
                 "--out", str(both)]) == 0
    ens = load_results(both)
    assert {p["subject"] for p in ens["predictions"]} == {p["subject"] for p in
                                                          single["predictions"]}
    seed1 = json.loads(NESTED_SEED1.read_text())["nested_cv_ensemble"]["uf1"]
    for variant, recorded in ((cv1, seed1), (ens, ens["uf1"])):
        r = paired_comparison(cv0, variant, n_boot=100)
        assert r["variant"]["uf1"] == pytest.approx(recorded, abs=1e-12)
        assert r["delta_uf1"] == pytest.approx(recorded - cv0["uf1"], abs=1e-12)


def test_cv_ensemble_source_of_a_run_without_one_is_refused():
    with pytest.raises(CompareError, match="no nested_cv_ensemble"):
        load_results(f"{FULL}:cv_ensemble")


def test_seeds_are_paired_by_seed_and_their_differences_averaged_under_one_bootstrap(
        tmp_path, capsys):
    """One pair is exactly `compare` (the same draws, so the same interval); two pairs average
    their differences; pairs over other samples, and references without their variants, are
    refused."""
    ref, var = load_results(FULL), load_results(VARIANT)
    one = paired_comparison(ref, var, n_boot=300)
    alone = paired_seeds_comparison([(ref, var)], n_boot=300)
    assert alone["mean_delta_uf1"] == pytest.approx(one["delta_uf1"], abs=1e-12)
    assert alone["ci95_mean_delta_uf1"] == one["ci95_delta_uf1"]
    swapped = paired_comparison(var, ref, n_boot=300)
    two = paired_seeds_comparison([(ref, var), (var, ref)], n_boot=300)
    assert two["seeds"] == 2 and [r["delta_uf1"] for r in two["per_seed"]] == \
        pytest.approx([one["delta_uf1"], swapped["delta_uf1"]], abs=1e-12)
    assert two["mean_delta_uf1"] == pytest.approx(0.0, abs=1e-12)
    lo, hi = two["ci95_mean_delta_uf1"]  # a variant and its mirror: the mean cannot move
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(0.0, abs=1e-12)
    part = _subset(var, {"casme2/sub01", "samm/006"})
    with pytest.raises(CompareError, match="other samples"):
        paired_seeds_comparison([(ref, var), (ref, part)], n_boot=10)
    out = tmp_path / "seeds.json"
    assert main(["compare-seeds", "--reference", str(FULL), str(VARIANT), "--variant",
                 str(VARIANT), str(FULL), "--bootstrap", "50", "--out", str(out)]) == 0
    assert "mean of 2 seeds" in capsys.readouterr().out
    assert json.loads(out.read_text())["mean_delta_uf1"] == pytest.approx(0.0, abs=1e-12)
    assert main(["compare-seeds", "--reference", str(FULL), str(VARIANT), "--variant",
                 str(VARIANT)]) == 2
    assert "one of each per seed" in capsys.readouterr().err


def _published_results():
    return sorted(p for p in RESULTS.rglob("*.json")
                  if isinstance((d := json.loads(p.read_text())), dict)
                  and "uf1" in d and isinstance(d.get("predictions"), list))


@pytest.fixture(scope="module")
def megc(megc_dir):
    from training.data import load_megc3db

    return load_megc3db(megc_dir)


@pytest.mark.parametrize("path", _published_results(), ids=lambda p: str(p.relative_to(RESULTS)))
def test_published_scores_are_those_of_the_predictions_they_list(path, megc):
    """Every LOSO or ensemble results file in experiments/results: its labels are the dataset's, each
    prediction is the argmax of its probabilities, and UF1/UAR (and the CV ensemble's) are
    recomputed from the listed predictions."""
    doc = json.loads(path.read_text())
    data = megc
    preds = doc["predictions"]
    idx = np.array([p["index"] for p in preds])
    y = np.array([p["label"] for p in preds])
    assert y.tolist() == data.y[idx].tolist()
    assert [p["file"] for p in preds] == [Path(str(f)).name for f in data.files[idx]]
    pred = np.array([p["pred"] for p in preds])
    probs = np.array([p["probs"] for p in preds])
    assert probs.argmax(1).tolist() == pred.tolist()
    assert (doc["uf1"], doc["uar"]) == pytest.approx(uf1_uar(y, pred), abs=1e-12)
    if "nested_cv_ensemble" in doc:
        ens = doc["nested_cv_ensemble"]
        assert (ens["uf1"], ens["uar"]) == pytest.approx(
            uf1_uar(y, np.array(ens["probs"]).argmax(1)), abs=1e-12)
    if "other_maps" in doc:  # the same samples, scored on the other preprocessing
        other = doc["other_maps"]
        assert [p["index"] for p in other["predictions"]] == idx.tolist()
        assert [p["label"] for p in other["predictions"]] == y.tolist()
        other_pred = np.array([p["pred"] for p in other["predictions"]])
        assert (other["uf1"], other["uar"]) == pytest.approx(uf1_uar(y, other_pred), abs=1e-12)
        if "nested_cv_ensemble" in other:  # runs with a fixed schedule have none
            ens = other["nested_cv_ensemble"]
            assert (ens["uf1"], ens["uar"]) == pytest.approx(
                uf1_uar(y, np.array(ens["probs"]).argmax(1)), abs=1e-12)


def test_every_results_file_loads_typed_and_a_newer_format_is_refused(tmp_path):
    """Each LOSO results file of the experiments loads as LosoResults, whose fields say what the
    file says; a file of a newer format is refused with one line, not misread."""
    from training.loso.results import LosoResults, ResultsError

    loaded = 0
    for path in sorted(RESULTS.rglob("*.json")):
        doc = json.loads(path.read_text())
        if not (isinstance(doc, dict) and "predictions" in doc and "config" in doc):
            continue
        results = LosoResults.load(path)
        assert (results.uf1, results.complete, results.config_dict) == \
            (doc.get("uf1"), bool(doc.get("complete")), doc["config"])
        predictions = results.predictions
        assert [p.index for p in predictions] == [p["index"] for p in doc["predictions"]]
        assert [p.pred for p in predictions] == [p["pred"] for p in doc["predictions"]]
        loaded += 1
    assert loaded >= 50
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps({**doc, "format": 99}))
    with pytest.raises(ResultsError, match="newer"):
        LosoResults.load(newer)
    copy = tmp_path / "copy.json"
    LosoResults.load(path).save(copy)
    assert json.loads(copy.read_text()) == {**doc, "format": doc.get("format", 1)}
