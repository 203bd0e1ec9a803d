"""The default-engine rule reads only results scored on the maps the live pipeline makes."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parents[2] / "experiments" / "results"


def test_runs_on_the_other_preprocessing_are_not_candidates():
    from training.default_engine import _complete_results

    docs = _complete_results(RESULTS)
    map_sets = {name for name in docs if name.startswith("map_sets/")}
    # trained on both preprocessings, scored on the 3DB maps: a candidate
    assert "map_sets/ststnet_shift2_both_seed0.json" in map_sets
    # trained and scored on CausalNet's maps: its UF1 is not on the live maps
    assert "map_sets/ststnet_shift2_theirs_seed0.json" not in map_sets
    assert all(docs[name]["config"].get("maps", "3db") == "3db" for name in docs)
