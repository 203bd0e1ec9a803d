"""Engines that are not shipped, rebuilt from their recipes.

``engines/`` ships the engines a user would choose (the default, and one single network for
the slowest machines). Every other engine that was exported once keeps its manifest in
``engines/recipes/``: the manifest records the whole schedule (model, epochs, augmentation,
seed, epoch selection), whether it is a CV ensemble and how it is calibrated, which is all
``export`` needs to train and export it again. ``python -m training rebuild-engine NAME``
does that and says whether the rebuilt file is the recorded one byte for byte, and else how
close it is: its accuracy on the 442 training maps beside the recorded one. (Training is seeded,
but another torch, CPU or thread count rounds differently: rebuilding ``ststnet_3db`` here chose
the same epochs with the same inner scores and gave the same training accuracy, 0.8439, with
probabilities within 0.006 of the recorded engine's and every argmax equal.)
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from training import REPO_ROOT

__all__ = ["RECIPES_DIR", "Recipe", "Rebuilt", "recipes", "recipe", "rebuild"]

RECIPES_DIR = REPO_ROOT / "engines" / "recipes"


@dataclass(frozen=True)
class Recipe:
    """An engine's recorded manifest, read as what ``export`` needs to make it again."""

    name: str  # the engine's file name, e.g. ststnet_cv6_3db.onnx
    manifest_path: Path
    manifest: dict

    @property
    def config(self):
        from training.loso import LosoConfig

        fields = {f.name for f in dataclasses.fields(LosoConfig)}
        schedule = self.manifest["training"]["schedule"]
        return LosoConfig.from_dict({k: v for k, v in schedule.items() if k in fields})

    @property
    def ensemble(self) -> bool:
        return "ensemble" in self.manifest["training"]

    @property
    def calibration(self) -> str | None:
        from training.calibrate import calibration_kind

        training = self.manifest["training"]
        return calibration_kind(training) if "calibration" in training else None

    @property
    def sha256(self) -> str:
        return self.manifest["sha256"]


def recipes(folder: Path = RECIPES_DIR) -> list[Recipe]:
    """Every recipe, by name."""
    return [_read(path) for path in sorted(folder.glob("*.json"))]


def recipe(name: str, folder: Path = RECIPES_DIR) -> Recipe:
    """The recipe of engine ``name`` (with or without ``.onnx``); ValueError naming the
    recipes there are when there is none."""
    file_name = name if name.endswith(".onnx") else f"{name}.onnx"
    path = folder / f"{file_name}.json"
    if not path.is_file():
        known = ", ".join(r.name for r in recipes(folder)) or "none"
        raise ValueError(f"no recipe for {file_name} in {folder} (recipes: {known})")
    return _read(path)


def _read(path: Path) -> Recipe:
    return Recipe(path.name.removesuffix(".json"), path,
                  json.loads(path.read_text(encoding="utf-8")))


@dataclass(frozen=True)
class Rebuilt:
    manifest: dict  # the rebuilt engine's
    identical: bool  # byte for byte the recorded engine
    train_accuracy: float  # on the maps it was trained on
    recorded_train_accuracy: float | None


def rebuild(item: Recipe, out: Path, data_dir: Path, *, device: str = "cpu",
            progress: Callable[[str], None] | None = None,
            causalnet_dir: Path | None = None) -> Rebuilt:
    """Train and export ``item`` to ``out`` exactly as ``python -m training export`` with its
    schedule would (quoting the same LOSO results file)."""
    from training.__main__ import default_loso_results
    from training.data.megc3db import load_for_schedule
    from training.export import export_default

    cfg = item.config
    loso_results = default_loso_results(cfg, ensemble=item.ensemble, calibrated=item.calibration)
    causalnet_dir = causalnet_dir or Path(data_dir).parent / "megc2019_3db_causalnet"
    data = load_for_schedule(data_dir, causalnet_dir, cfg.maps, cfg.other_maps_share,
                             cfg.input_kind, phases=cfg.phases)
    manifest = export_default(data, cfg, out, loso_results=loso_results,
                              device=device, ensemble=item.ensemble,
                              calibrate=item.calibration, progress=progress)
    return Rebuilt(manifest, manifest["sha256"] == item.sha256,
                   manifest["training"]["train_accuracy"],
                   item.manifest["training"].get("train_accuracy"))
