"""The manifest that travels beside every engine file as ``<engine>.json``."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from realtime_mer.errors import EngineError
from realtime_mer.features import MOVEMENT_CHANNELS
from realtime_mer.input_kinds import INPUT_KINDS, InputKind, check_input_options, input_kind

__all__ = ["Manifest", "manifest_path"]

_REQUIRED = ("model", "format", "input", "normalization", "class_names", "sha256")
_INPUT_KEYS = ("name", "shape", "dtype", "layout", "channels")


def manifest_path(engine_path: str | Path) -> Path:
    return Path(str(engine_path) + ".json")


@dataclass(frozen=True)
class Manifest:
    """What an engine is and how to feed it.

    input: {name, shape ["N", 3, 28, 28], dtype "float32", layout "NCHW", channels [u, v,
    strain], value_range [0, 1], kind "map28" | "regions5" | "colour" | "mcnet" (how the input
    is built from the maps, ``input_kinds.network_inputs``; absent = "map28"), options (the
    kind's switches)}; a "map28" engine may take both phases of a movement: shape ["N", 6, 28,
    28], channels ``features.MOVEMENT_CHANNELS`` (onset→apex, then apex→offset);
    normalization: {mean, std, applied_by "runtime"}; output:
    {name, kind "logits" | "probabilities", shape}; loso: honest LOSO UF1/UAR; sha256 of the
    engine file; versions of the exporting tools.
    """

    model: str
    format: str
    input: dict
    normalization: dict
    class_names: list
    sha256: str
    model_kwargs: dict = field(default_factory=dict)
    output: dict = field(default_factory=lambda: {"kind": "logits"})
    training: dict = field(default_factory=dict)
    loso: dict | None = None
    versions: dict = field(default_factory=dict)
    export_check: dict = field(default_factory=dict)

    @property
    def input_kind(self) -> InputKind:
        """How the engine's input is built from the maps ("kind", absent in older manifests:
        the maps themselves); checked when the manifest is read."""
        return input_kind(self.input.get("kind", "map28"))

    @property
    def phases(self) -> int:
        """Phases of the movement the engine is fed: 2 when it takes the apex→offset map beside
        the onset→apex one (six channels), else 1."""
        return int(self.input["shape"][1]) // 3 if self.input_kind.is_identity else 1

    @property
    def networks(self) -> int:
        """How many networks the engine runs per prediction: a CV ensemble engine averages the
        ``training.ensemble.members`` it was exported with; any other engine is one network."""
        return int((self.training.get("ensemble") or {}).get("members", 1))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def from_dict(cls, d: dict, source: str = "manifest") -> "Manifest":
        if not isinstance(d, dict):
            raise EngineError(f"{source}: not a JSON object")
        missing = [k for k in _REQUIRED if k not in d]
        if missing:
            raise EngineError(f"{source}: missing field(s) {missing}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise EngineError(f"{source}: unknown field(s) {unknown}")
        inp = d["input"]
        if not isinstance(inp, dict) or any(k not in inp for k in _INPUT_KEYS):
            raise EngineError(f"{source}: input spec needs {list(_INPUT_KEYS)}, got {inp!r}")
        if inp["layout"] != "NCHW" or inp["dtype"] != "float32" or len(inp["shape"]) != 4:
            raise EngineError(f"{source}: only float32 NCHW 4-D inputs are supported, got {inp}")
        kind = inp.get("kind", "map28")
        if kind not in INPUT_KINDS:
            raise EngineError(f"{source}: unknown input kind {kind!r} (known: "
                              f"{', '.join(INPUT_KINDS)}); this engine needs a newer "
                              "realtime_mer")
        unknown = sorted(set(inp.get("options") or {}) - set(INPUT_KINDS[kind].options))
        if unknown:
            raise EngineError(f"{source}: input kind {kind!r} has no option(s) {unknown}; this "
                              "engine needs a newer realtime_mer")
        try:
            check_input_options(kind, inp.get("options"))
        except ValueError as exc:  # a value of the wrong type
            raise EngineError(f"{source}: {exc}") from None
        if len(inp["channels"]) != inp["shape"][1]:
            raise EngineError(f"{source}: {len(inp['channels'])} channel names for "
                              f"{inp['shape'][1]} channels")
        if inp["shape"][1] != 3 and not (INPUT_KINDS[kind].is_identity
                                         and tuple(inp["channels"]) == MOVEMENT_CHANNELS):
            raise EngineError(f"{source}: an engine takes 3 channels, or both phases of a "
                              f"movement ({', '.join(MOVEMENT_CHANNELS)}) as maps; got "
                              f"{inp['shape'][1]} channels {inp['channels']} of kind {kind!r}")
        norm = d["normalization"]
        c = inp["shape"][1]
        if (not isinstance(norm, dict) or len(norm.get("mean", [])) != c
                or len(norm.get("std", [])) != c or any(s == 0 for s in norm["std"])):
            raise EngineError(f"{source}: normalization needs {c} means and {c} non-zero stds")
        if not d["class_names"]:
            raise EngineError(f"{source}: no class names")
        return cls(**d)

    @classmethod
    def from_json(cls, text: str, source: str = "manifest") -> "Manifest":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise EngineError(f"{source}: not valid JSON ({exc})") from exc
        return cls.from_dict(d, source)

    @classmethod
    def load(cls, path: str | Path) -> "Manifest":
        path = Path(path)
        if not path.is_file():
            raise EngineError(f"manifest {path} is missing (every engine needs <engine>.json)")
        return cls.from_json(path.read_text(encoding="utf-8"), str(path))
