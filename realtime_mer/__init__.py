"""realtime-mer: real-time micro-expression recognition.

Stages (one module each, options dataclass + result dataclass + an object with
``process``/``push`` and ``reset``): capture → face → buffer → spotting → features → runtime,
wired by ``pipeline``, run over a video or camera by ``analysis`` and written by ``writers``. The names below are the public API; they are
imported on first use, so ``import realtime_mer`` stays cheap (no MediaPipe, torch or ONNX
Runtime until a stage is used).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "Frame": "capture", "CaptureOptions": "capture", "VideoInfo": "capture",
    "open_video": "capture", "probe_video": "capture", "WebcamSource": "camera",
    "FaceOptions": "face", "FaceResult": "face", "FaceAligner": "face",
    "RingBuffer": "buffer",
    "TVL1Options": "flow", "create_flow": "flow", "optical_strain": "flow",
    "FeatureOptions": "features", "FeatureExtractor": "features",
    "flow_strain_map": "features", "movement_map": "features", "load_3db_map": "features",
    "SpotterOptions": "spotting", "SpotEvent": "spotting", "Spotter": "spotting",
    "spot_offline": "spotting",
    "Manifest": "runtime", "load_engine": "runtime", "default_engine_path": "runtime",
    "PipelineOptions": "pipeline", "Pipeline": "pipeline", "FrameResult": "pipeline",
    "EventRecord": "events",
    "analyze": "analysis", "VideoFacts": "analysis", "analyze_video": "analysis",
    "analyze_camera": "analysis", "AnalysisResult": "analysis",
    "RunWriter": "writers", "report_writers": "writers", "BatchIndex": "writers",
    "MerError": "errors", "InputError": "errors", "EngineError": "errors",
    "DatasetError": "errors", "BackendUnavailable": "errors",
}

__all__ = sorted(_PUBLIC) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'realtime_mer' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"realtime_mer.{module}"), name)
    globals()[name] = value
    return value
