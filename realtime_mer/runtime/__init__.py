"""Engines behind one interface: load an exported network with its manifest and predict class
probabilities from (u, v, strain) maps. Never imports ``training``."""

from realtime_mer.runtime.backends import (
    BACKENDS,
    Backend,
    OnnxRuntimeBackend,
    TensorRTBackend,
    TorchBackend,
    default_engine_path,
    engine_format,
    load_engine,
    sha256_file,
)
from realtime_mer.runtime.ensemble import EnsembleBackend, ensemble_manifest
from realtime_mer.runtime.manifest import Manifest, manifest_path

__all__ = [
    "BACKENDS", "Backend", "EnsembleBackend", "Manifest", "ensemble_manifest", "OnnxRuntimeBackend", "TensorRTBackend", "TorchBackend",
    "default_engine_path", "engine_format", "load_engine", "manifest_path", "sha256_file",
]
