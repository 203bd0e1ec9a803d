"""Train the default model on all 3DB samples with the fixed LOSO schedule and export it as an
ONNX engine plus manifest (``engines/ststnet_3db.onnx`` + ``.onnx.json``).

The normalisation is NOT baked into the graph: the manifest states mean/std and the runtime
applies them, so the engine's input is the plain network input and the manifest is the single
place that says how to get there from a [0, 1] map.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from training.data.megc3db import CLASS_NAMES, Megc3DB
from training.loso import LosoConfig, git_commit, normalise, train_models

log = logging.getLogger(__name__)

__all__ = ["train_full", "save_weights", "load_weights", "export_onnx", "export_default",
           "check_export", "sha256_file"]

INPUT_NAME = "maps"
OUTPUT_NAME = "logits"


def train_full(data: Megc3DB, cfg: LosoConfig, *, device: str = "cpu",
               progress: Callable[[str], None] | None = None) -> torch.nn.Module:
    """One model trained on every sample with exactly the LOSO schedule (eval mode, CPU)."""
    say = progress or log.info
    fold_id = len(data.subject_list)  # a seed stream of its own, distinct from every LOSO fold
    t0 = time.perf_counter()

    def on_epoch(epoch: int) -> None:
        if epoch == 1 or epoch % max(1, cfg.epochs // 10) == 0:
            say(f"full training: epoch {epoch}/{cfg.epochs}  {time.perf_counter() - t0:.0f} s")

    models, _ = train_models(data.x, data.y, [np.arange(len(data))], cfg, [fold_id],
                             device=device, on_epoch=on_epoch)
    return models[0]


def save_weights(model: torch.nn.Module, cfg: LosoConfig, path: str | Path) -> None:
    """State dict of tensors plus the config as a JSON string (loadable with weights_only)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "config_json": json.dumps(cfg.to_dict())},
               path)


def load_weights(path: str | Path) -> tuple[torch.nn.Module, LosoConfig]:
    from training.models import create_model

    doc = torch.load(path, map_location="cpu", weights_only=True)
    cfg = LosoConfig.from_dict(json.loads(doc["config_json"]))
    model = create_model(cfg.model, **cfg.model_kwargs)
    model.load_state_dict(doc["state_dict"])
    return model.eval(), cfg


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def export_onnx(model: torch.nn.Module, path: str | Path,
                example: torch.Tensor | None = None) -> None:
    """torch.onnx.export with a dynamic batch axis; weights stored inside the one file.
    ``example``: a batch (N >= 2) of the model's input (default (2, 3, 28, 28))."""
    model = model.eval().cpu()
    if example is None:
        example = torch.rand(2, 3, 28, 28)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=4096)
    onnx_program = torch.onnx.export(
        model, (example,), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
        dynamic_shapes=({0: batch},), optimize=True, external_data=False,
    )
    onnx_program.save(str(path), external_data=False)


def check_export(model: torch.nn.Module, onnx_path: str | Path, x: np.ndarray) -> dict:
    """Eager vs ONNX Runtime on ``x`` (already normalised, (N, C, H, W)): min per-row cosine of
    the logits and whether every argmax agrees."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = model.eval()(torch.as_tensor(x)).numpy()
    got = sess.run(None, {sess.get_inputs()[0].name: x.astype(np.float32)})[0]
    cos = (ref * got).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1) + 1e-12)
    return {"min_cosine": float(cos.min()),
            "argmax_equal": bool((ref.argmax(1) == got.argmax(1)).all()),
            "max_abs_diff": float(np.abs(ref - got).max())}


def export_default(data: Megc3DB, cfg: LosoConfig, out: str | Path, *,
                   loso_results: str | Path | None = None, weights: str | Path | None = None,
                   device: str = "cpu",
                   progress: Callable[[str], None] | None = None) -> dict:
    """Train on all of ``data`` (or load ``weights``), export ONNX to ``out``, write
    ``<out>.json``, verify the export on the real maps; returns the manifest dict."""
    import onnx

    import realtime_mer
    from realtime_mer.runtime.manifest import Manifest

    say = progress or log.info
    if weights:
        model, cfg = load_weights(weights)
    else:
        t0 = time.perf_counter()
        model = train_full(data, cfg, device=device, progress=say)
        say(f"trained on {len(data)} samples in {time.perf_counter() - t0:.0f} s")
    out = Path(out)
    export_onnx(model, out)
    x = normalise(torch.as_tensor(data.x), cfg.mean, cfg.std).numpy()
    check = check_export(model, out, x)
    if check["min_cosine"] < 0.99 or not check["argmax_equal"]:
        raise RuntimeError(f"exported engine disagrees with the eager model: {check}")
    with torch.no_grad():
        train_acc = float((model(torch.as_tensor(x)).argmax(1).numpy() == data.y).mean())

    loso = None
    if loso_results and Path(loso_results).is_file():
        r = json.loads(Path(loso_results).read_text())
        ignore = ("eval_every", "select_epochs", "inner_folds")
        theirs = {k: v for k, v in r.get("config", {}).items() if k not in ignore}
        ours = {k: v for k, v in cfg.to_dict().items() if k not in ignore}
        if theirs != ours:
            # A manifest must not claim scores measured with another model or schedule.
            raise ValueError(
                f"{loso_results} was run with another configuration than this export "
                f"({ {k: (theirs.get(k), ours.get(k)) for k in ours if theirs.get(k) != ours[k]} }); "
                "pass the matching --loso-results"
            )
        loso = {"protocol": "LOSO, 68 subjects, pooled, fixed schedule (honest)",
                "uf1": r["uf1"], "uar": r["uar"], "complete": r.get("complete"),
                "results_file": Path(loso_results).name,
                "leaky_best_epoch_uf1": r["leaky_best_epoch"]["uf1"],
                "leaky_best_epoch_uar": r["leaky_best_epoch"]["uar"]}
    manifest = Manifest(
        model=cfg.model,
        model_kwargs=dict(cfg.model_kwargs),
        format="onnx",
        input={"name": INPUT_NAME, "shape": ["N", 3, 28, 28], "dtype": "float32",
               "layout": "NCHW", "channels": ["u", "v", "strain"], "value_range": [0.0, 1.0]},
        output={"name": OUTPUT_NAME, "kind": "logits", "shape": ["N", len(CLASS_NAMES)]},
        normalization={"mean": list(cfg.mean), "std": list(cfg.std), "applied_by": "runtime",
                       "formula": "(x - mean[c]) / std[c] per channel, then the engine"},
        class_names=list(CLASS_NAMES),
        training={"data": "MEGC2019 3DB composite (SMIC, CASME II, SAMM), published 28x28 "
                          "(u, v, strain) maps", "n_samples": len(data),
                  "n_subjects": len(data.subject_list),
                  "class_counts": list(data.class_counts()), "schedule": cfg.to_dict(),
                  "train_accuracy": train_acc, "git_commit": git_commit()},
        loso=loso,
        sha256=sha256_file(out),
        versions={"torch": torch.__version__, "onnx": onnx.__version__,
                  "realtime_mer": realtime_mer.__version__},
        export_check=check,
    )
    manifest.save(Path(str(out) + ".json"))
    say(f"engine {out} ({out.stat().st_size} bytes), manifest {out}.json; export check {check}")
    return manifest.to_dict()
