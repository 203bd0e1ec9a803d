"""Ensemble engines: several engines whose probabilities are averaged, as one engine.

The networks of the four papers take different inputs (the maps, their five-region
recombination, colour images) built at run time from the same (u, v, strain) map, so an
ensemble cannot be one ONNX graph. It is a small JSON file (``NAME.ens``) that lists its member
engine files with their sha256, plus the usual manifest (``NAME.ens.json``) that carries the
ensemble's own LOSO score. Loading checks the list against the manifest's hash and every member
against its own manifest and against the hash the list recorded, so a score is never quoted for
members other than the ones it was measured with.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from realtime_mer.errors import EngineError
from realtime_mer.runtime.manifest import Manifest

__all__ = ["ENSEMBLE_SUFFIX", "EnsembleBackend", "read_members", "ensemble_manifest"]

ENSEMBLE_SUFFIX = ".ens"
COMBINE_RULE = "mean_probability"


def read_members(path: Path) -> list[dict]:
    """The member list of a ``.ens`` file: [{"file": path relative to it, "sha256": hex}]."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EngineError(f"{path}: not a readable ensemble file ({exc})") from exc
    members = doc.get("members") if isinstance(doc, dict) else None
    if not isinstance(members, list) or len(members) < 2 or not all(
            isinstance(m, dict) and isinstance(m.get("file"), str)
            and isinstance(m.get("sha256"), str) for m in members):
        raise EngineError(f"{path}: an ensemble file lists at least two members, each with "
                          "'file' and 'sha256'")
    if doc.get("combine") != COMBINE_RULE:
        raise EngineError(f"{path}: unknown combination rule {doc.get('combine')!r} (known: "
                          f"{COMBINE_RULE})")
    return members


def ensemble_manifest(members: list[Manifest], sha256: str, class_names: list[str],
                      loso: dict | None = None, training: dict | None = None,
                      versions: dict | None = None) -> Manifest:
    """The manifest of an ensemble file: it takes the (u, v, strain) maps (each member builds
    and normalises its own input from them) and gives averaged probabilities."""
    return Manifest(
        model="ensemble",
        format="ensemble",
        input={"name": "maps", "shape": ["N", 3, 28, 28], "dtype": "float32", "layout": "NCHW",
               "channels": ["u", "v", "strain"], "value_range": [0.0, 1.0], "kind": "map28"},
        normalization={"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0],
                       "applied_by": "each member, from its own manifest"},
        class_names=list(class_names),
        sha256=sha256,
        model_kwargs={"members": [m.model for m in members], "combine": COMBINE_RULE},
        output={"name": "probabilities", "kind": "probabilities", "shape": ["N", len(class_names)]},
        training=training or {},
        loso=loso,
        versions=versions or {},
    )


class EnsembleBackend:
    """Loaded members behind the ``Backend`` interface: ``predict(maps, landmarks=None)`` is
    the mean of the members' probabilities."""

    name = "ensemble"

    def __init__(self, path: Path, manifest: Manifest, members: list) -> None:
        self.path = path
        self.manifest = manifest
        self.members = members
        devices = sorted({str(m.device) for m in members})
        self.device = devices[0] if len(devices) == 1 else "+".join(devices)
        for m in members:
            if list(m.class_names) != list(manifest.class_names):
                raise EngineError(f"{path}: member {m.path.name} has classes {m.class_names}, "
                                  f"the ensemble {manifest.class_names}")
            if m.manifest.phases != 1:
                # The ensemble is fed one (N, 3, H, W) batch of onset→apex maps for every member.
                raise EngineError(f"{path}: member {m.path.name} takes both phases of a "
                                  "movement; an ensemble's members take the onset→apex maps")

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest.class_names)

    @property
    def uses_landmarks(self) -> bool:
        return any(getattr(m, "uses_landmarks", False) for m in self.members)

    def predict(self, maps: np.ndarray, landmarks: np.ndarray | None = None) -> np.ndarray:
        probs = [m.predict(maps, landmarks) for m in self.members]
        return np.mean(probs, axis=0).astype(np.float32)

    def __repr__(self) -> str:
        names = ", ".join(m.path.name for m in self.members)
        return f"EnsembleBackend({self.path.name}: {names}; device={self.device!r})"
