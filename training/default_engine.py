"""Which engine ships as the default: the registered rule, applied to the LOSO results files.

The rule: among the complete 68-fold results whose network's float32 engine fits the
repository's budget for engine files (``ENGINE_BUDGET_BYTES``; a nested run also offers its CV
ensemble, an engine of that many networks), the highest honest LOSO UF1 picks the protocol
(the schedule without its seed). Where that protocol has been replicated over seeds (the
``seeds`` folder), its calibration (none, class-prior or class-bias) is the one whose score
has the highest mean over the seeds all of them share; with one seed, the best run's own. The
engine is that protocol with that calibration, exported from one of its seeds; its manifest
quotes that calibration's run of the engine's seed.

``python -m training default-engine`` prints the choice; a test holds the shipped engine to it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["ENGINE_BUDGET_BYTES", "DefaultChoice", "choose_default_engine", "protocol_of"]

#: Engine files committed to the repository stay under this size.
ENGINE_BUDGET_BYTES = 5 * 10**6

#: The folders of results files the rule reads, under the results folder: the runs
#: themselves, the calibrations of both rules, the seed replicates, and the runs on the two
#: preprocessings (of which only those scored on the 3DB maps count).
_FOLDERS = ("", "calibration", "calibration_bias", "seeds", "map_sets")


@dataclass(frozen=True)
class DefaultChoice:
    """The rule's outcome. ``best_file``: the results file with the best honest UF1 among the
    engines that fit; ``model``, ``networks``: its network and how many the engine averages;
    ``calibration``: None, "prior" or "bias"; ``seed_means``: each calibration's mean UF1 over
    the seeds all calibrations share (empty with one seed); ``files``: per seed, the results
    files of the chosen protocol and calibration (what the engine's manifest may quote);
    ``scores``: per seed, their UF1; ``too_big``: the runs over the budget."""

    best_file: str
    best_uf1: float
    model: str
    networks: int
    protocol: str
    calibration: str | None
    seed_means: dict[str, float] = field(default_factory=dict)
    files: dict[int, list[str]] = field(default_factory=dict)
    scores: dict[int, float] = field(default_factory=dict)
    too_big: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"best_file": self.best_file, "best_uf1": self.best_uf1, "model": self.model,
                "networks": self.networks, "protocol": json.loads(self.protocol),
                "calibration": self.calibration, "seed_means": self.seed_means,
                "files": {str(k): v for k, v in sorted(self.files.items())},
                "scores": {str(k): v for k, v in sorted(self.scores.items())},
                "too_big": self.too_big}


def protocol_of(config: dict) -> str:
    """A LOSO schedule without its seed: the runs of one protocol under different seeds."""
    return json.dumps({k: v for k, v in config.items() if k != "seed"}, sort_keys=True)


def _scored_on_live_maps(config: dict) -> bool:
    """Whether a run's scores are on the maps the live pipeline makes: the 3DB maps, one phase
    (runs trained on both preprocessings count; those trained on CausalNet's maps are scored on
    theirs, and two-phase runs on CausalNet's maps of both phases, not on the live path's). Runs
    on the live maps of a user's raw databases are scored on other samples than the 442, so
    their figures are not comparable with the rest; they are left out too."""
    return config.get("maps", "3db") == "3db" and config.get("phases", 1) == 1


def _complete_results(results_dir: Path) -> dict[str, dict]:
    from training.loso.results import LosoResults

    docs = {}
    for folder in _FOLDERS:
        for path in sorted((results_dir / folder).glob("*.json")):
            results = LosoResults.load(path)
            if results.uf1 is not None and results.config_dict is not None and \
                    results.complete and results.folds == 68 and \
                    _scored_on_live_maps(results.config_dict):
                docs[path.relative_to(results_dir).as_posix()] = results.doc
    return docs


def choose_default_engine(results_dir: str | Path) -> DefaultChoice:
    """Apply the rule to the results files under ``results_dir``."""
    from training.calibrate import calibration_kind
    from training.models import create_model

    docs = _complete_results(Path(results_dir))
    runs, too_big = [], []
    weight_bytes: dict[str, int] = {}
    for name, doc in docs.items():
        if name.startswith("seeds/"):
            continue  # replicates: they choose a calibration below, never a run
        cfg = doc["config"]
        key = json.dumps([cfg["model"], cfg["model_kwargs"]], sort_keys=True)
        if key not in weight_bytes:
            model = create_model(cfg["model"], **cfg["model_kwargs"])
            weight_bytes[key] = 4 * sum(p.numel() for p in model.parameters())
        candidates = [(doc["uf1"], 1)]
        if "nested_cv_ensemble" in doc:
            candidates.append((doc["nested_cv_ensemble"]["uf1"],
                               doc["nested_cv_ensemble"]["n_models"]))
        for uf1, members in candidates:
            fits = members * weight_bytes[key] <= ENGINE_BUDGET_BYTES
            (runs if fits else too_big).append((uf1, cfg["model"], members, name))
    if not runs:
        raise ValueError(f"{results_dir}: no complete 68-fold LOSO results of an engine that "
                         "fits the budget")
    best_uf1, model, members, best_name = max(runs)
    protocol = protocol_of(docs[best_name]["config"])

    # The best protocol's score per calibration and seed (reruns of one seed must agree).
    scores: dict[str | None, dict[int, float]] = {}
    files: dict[tuple[str | None, int], list[str]] = {}
    for name, doc in docs.items():
        if protocol_of(doc["config"]) != protocol:
            continue
        kind, seed = calibration_kind(doc), doc["config"]["seed"]
        uf1 = doc["nested_cv_ensemble"]["uf1"] if members > 1 else doc["uf1"]
        known = scores.setdefault(kind, {}).setdefault(seed, uf1)
        if abs(known - uf1) > 1e-9:
            raise ValueError(f"{name}: seed {seed} scores {uf1} where another run of the same "
                             f"protocol and calibration scored {known}")
        files.setdefault((kind, seed), []).append(name)
    replicated = {k: v for k, v in scores.items() if len(v) >= 2}
    shared = set.intersection(*(set(v) for v in replicated.values())) if replicated else set()
    seed_means: dict[str, float] = {}
    if len(shared) >= 2:
        means = {k: float(np.mean([replicated[k][s] for s in shared])) for k in replicated}
        chosen = max(means, key=means.get)
        seed_means = {str(k): v for k, v in means.items()}
    else:  # one seed: the best run's own calibration
        chosen = calibration_kind(docs[best_name])
    return DefaultChoice(
        best_file=best_name, best_uf1=float(best_uf1), model=model, networks=members,
        protocol=protocol, calibration=chosen, seed_means=seed_means,
        files={seed: names for (kind, seed), names in files.items() if kind == chosen},
        scores=dict(scores[chosen]), too_big=sorted({name for *_, name in too_big}))


def describe(choice: DefaultChoice) -> str:
    """The choice in a few lines, for the command's output."""
    lines = [f"best honest LOSO among engines under {ENGINE_BUDGET_BYTES / 1e6:g} MB: "
             f"{choice.best_file} (UF1 {choice.best_uf1:.4f}; {choice.model}, "
             f"{choice.networks} network{'s' if choice.networks > 1 else ''})"]
    if choice.seed_means:
        lines.append("calibration by the mean over the shared seeds: " + ", ".join(
            f"{kind if kind != 'None' else 'none'} {mean:.4f}"
            for kind, mean in sorted(choice.seed_means.items(), key=lambda kv: -kv[1])))
    lines.append(f"default engine: {choice.model} x{choice.networks}, calibration "
                 f"{choice.calibration or 'none'}; seeds "
                 + ", ".join(f"{seed} ({choice.scores[seed]:.4f})"
                             for seed in sorted(choice.scores)))
    return "\n".join(lines)
