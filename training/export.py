"""Train a model on all samples with its LOSO schedule and export it as an ONNX engine plus
manifest (``engines/<model>_3db.onnx`` + ``.onnx.json``; :func:`engine_file_name` names engines
of other maps and of both phases).

The epoch count is set the way the quoted LOSO score was estimated. ``select_epochs="fixed"``:
``cfg.epochs``, chosen a priori. ``select_epochs="nested"`` (the CLI default): the nested rule of
the LOSO evaluation applied to the whole data set (:func:`training.loso.select_epochs_full`: an
inner subject-wise CV over all subjects picks the count among the evaluation epochs), then one
model is trained on every sample for that many epochs. The selection (rule, candidates, inner
scores, choice) is written into the manifest, and a LOSO results file is only quoted if it was
made with the same schedule and the same selection rule.

With ``calibrate`` (nested only) the engine also applies a calibration of
``training/calibrate.py`` (``"prior"``: the class-prior shift; ``"bias"``: a bias per class),
chosen by the same rule on the same full-data inner CV, and the manifest must quote a
``training calibrate`` results file of that rule.

The normalisation is NOT baked into the graph: the manifest states mean/std and the runtime
applies them, so the engine's input is the plain network input and the manifest is the single
place that says how to get there from a [0, 1] map.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from realtime_mer.errors import EngineError
from realtime_mer.features import CHANNELS, MOVEMENT_CHANNELS
from realtime_mer.runtime import engine_format, sha256_file
from realtime_mer.input_kinds import input_kind
from training.data.megc3db import CLASS_NAMES, Megc3DB
from training.calibrate import (BIASES, RULES, TAUS, calibration_kind, choose_bias, choose_tau,
                                prior_offsets)
from training.metrics import uf1_uar
from training.loso import (LosoConfig, LosoResults, inner_jobs, check_model, git_commit, hflip_maps,
                           model_inputs, normalise, select_epochs_full, train_models)

log = logging.getLogger(__name__)


class ExportError(RuntimeError):
    """The ONNX export failed or disagrees with the eager model."""

__all__ = ["ProbabilityAverage", "MirrorAverage", "CalibrationShift", "calibration_of",
           "check_engine_schedule", "engine_network",
           "train_full", "fit_full", "save_weights", "load_weights", "read_weights", "WeightsFile",
           "export_onnx", "export_default", "check_export", "check_loso_results"]

INPUT_NAME = "maps"
OUTPUT_NAME = "logits"


class ProbabilityAverage(torch.nn.Module):
    """Equal-weight average of its members' class probabilities, returned as log-probabilities:
    logits whose softmax is that average, so an ensemble engine is used like any other."""

    def __init__(self, members: list[torch.nn.Module]) -> None:
        super().__init__()
        self.members = torch.nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([torch.softmax(m(x), dim=-1) for m in self.members]).mean(0)
        return torch.log(probs.clamp_min(1e-12))


class MirrorAverage(torch.nn.Module):
    """Test-time mirroring inside the engine: the class probabilities of the input and of its
    mirror image, averaged, returned as log-probabilities.

    The input is the normalised (u, v, strain) maps of the map28 kind, as the runtime feeds any
    engine. The mirror is the training one (:func:`training.loso.hflip_maps`), applied to the
    maps the normalisation came from and normalised again.
    """

    def __init__(self, model: torch.nn.Module, mean, std) -> None:
        super().__init__()
        self.model = model
        self.mean, self.std = tuple(mean), tuple(std)
        # Buffers, not tensors made in forward: torch.export would lift those out of the graph
        # as constants that a .pt2 stores pickled, which the runtime refuses to load.
        self.register_buffer("mean_map", torch.tensor(self.mean, dtype=torch.float32)
                             .view(1, -1, 1, 1))
        self.register_buffer("std_map", torch.tensor(self.std, dtype=torch.float32)
                             .view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = x * self.std_map + self.mean_map
        mirrored = normalise(hflip_maps(maps), self.mean_map, self.std_map)
        # One call on both halves: the graph holds the network (and its weights) once.
        probs = torch.softmax(self.model(torch.cat([x, mirrored], dim=0)), dim=-1)
        n = x.shape[0]
        return torch.log(((probs[:n] + probs[n:]) / 2).clamp_min(1e-12))


class CalibrationShift(torch.nn.Module):
    """A calibration inside the engine: log_softmax(output + offsets), the offsets of the
    class-prior rule (tau * log(training class frequencies)) or of the class-bias rule (a bias
    per class) of training/calibrate.py. The output of the wrapped network may be logits or
    log-probabilities: both give the same shifted softmax."""

    def __init__(self, model: torch.nn.Module, offsets) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("offsets", torch.as_tensor(offsets, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.model(x) + self.offsets, dim=-1)


CALIBRATION_RULE = ("class-prior calibration: the engine's probabilities are softmax(log p + "
                    "tau * log pi), pi the class frequencies of the training samples, tau from "
                    "{taus} with the best pooled UF1 of the nested selection's inner validation "
                    "predictions at the chosen epoch (every sample predicted once by the inner "
                    "model that did not see it; the smallest tau on ties); the LOSO score quoted "
                    "is the same rule per fold (python -m training calibrate)")

BIAS_CALIBRATION_RULE = ("class-bias calibration: the engine's probabilities are softmax(log p "
                         "+ b), b = (0, b_1, ..., b_C-1), each b_c from {biases}, the grid point "
                         "with the best pooled UF1 of the nested selection's inner validation "
                         "predictions at the chosen epoch (every sample predicted once by the "
                         "inner model that did not see it); of the grid points reaching it, the "
                         "one nearest their centroid; the LOSO score quoted is the same rule per "
                         "fold (python -m training calibrate --rule bias)")


def check_calibration_rule(calibrate: str | None) -> None:
    """Refuse a calibration rule that is neither None nor one of :data:`RULES`."""
    if calibrate is not None and calibrate not in RULES:
        raise ValueError(f"unknown calibration rule {calibrate!r}; one of {', '.join(RULES)}")


def calibration_of(data: Megc3DB, val_idx: np.ndarray, val_probs: np.ndarray,
                   rule: str = "prior") -> dict:
    """The calibration that ``rule`` chooses on the inner CV of the full model's nested
    selection (its validation samples ``val_idx`` and probabilities ``val_probs`` at the chosen
    epoch): tau for the class-prior rule, the biases for the class-bias rule, and the offsets
    they give (:class:`CalibrationShift`), as a manifest record."""
    check_calibration_rule(rule)
    val_labels = data.y[val_idx]
    if rule == "bias":
        offsets, best, plateau = choose_bias(val_probs, val_labels)
        return {"kind": "bias", "rule": BIAS_CALIBRATION_RULE.format(biases=list(BIASES)),
                "biases": list(BIASES), "inner_uf1": round(best, 6),
                "plateau_points": plateau,
                "unshifted_inner_uf1": round(uf1_uar(val_labels, val_probs.argmax(1))[0], 6),
                "offsets": [round(float(b), 8) for b in offsets]}
    counts = np.asarray(data.class_counts())  # each sample once
    tau, curve = choose_tau(val_probs, val_labels, counts)
    return {"kind": "prior", "rule": CALIBRATION_RULE.format(taus=list(TAUS)), "tau": tau,
            "inner_uf1": [round(u, 6) for u in curve], "taus": list(TAUS),
            "class_counts": counts.tolist(),
            "offsets": prior_offsets(counts, tau).round(8).tolist()}


def check_engine_schedule(cfg: LosoConfig) -> None:
    """Refuse, before any training, a schedule whose prediction an engine cannot reproduce."""
    if cfg.tta_shift:
        raise ValueError(f"--tta-shift {cfg.tta_shift} is a LOSO scoring option that engines "
                         "do not build in; export with --tta-shift 0")
    if cfg.tta != "none" and cfg.input_kind != "map28":
        raise ValueError(f"--tta {cfg.tta} is built into map28 engines only (the {cfg.input_kind} "
                         "input is rebuilt from the maps, which a graph on that input cannot "
                         "mirror exactly); export with --tta none")


def engine_network(model: torch.nn.Module, cfg: LosoConfig) -> torch.nn.Module:
    """What the engine computes: ``model``, wrapped in :class:`MirrorAverage` when the schedule
    scores with test-time mirroring (so the engine predicts as the quoted LOSO run did). The
    schedule must have passed :func:`check_engine_schedule`."""
    if cfg.tta == "none":
        return model
    return MirrorAverage(model, _per_channel(cfg.mean, cfg), _per_channel(cfg.std, cfg)).eval()


def _per_channel(values, cfg: LosoConfig) -> list[float]:
    """The schedule's (u, v, strain) normalisation for every input channel: the triple applies
    to each phase of the movement, as in training (:func:`training.loso.normalise`)."""
    return [float(v) for v in values] * cfg.phases


ENSEMBLE_RULE = ("CV ensemble: the model trained on all samples and the {k} inner models of "
                 "its nested epoch selection (each trained on the other inner groups), all for "
                 "the chosen epoch count, class probabilities averaged with equal weights; the "
                 "LOSO score quoted is the same construction per fold (nested_cv_ensemble)")


def train_full(data: Megc3DB, cfg: LosoConfig, *, device: str = "cpu",
               progress: Callable[[str], None] | None = None,
               epochs: int | None = None) -> torch.nn.Module:
    """One model trained on every sample with exactly the LOSO schedule (eval mode, CPU), for
    ``epochs`` epochs (default ``cfg.epochs``). No selection here: see :func:`fit_full`."""
    say = progress or log.info
    if epochs is not None:
        cfg = dataclasses.replace(cfg, epochs=int(epochs))
    fold_id = len(data.subject_list)  # a seed stream of its own, distinct from every LOSO fold
    t0 = time.perf_counter()

    def on_epoch(epoch: int) -> None:
        if epoch == 1 or epoch % max(1, cfg.epochs // 10) == 0:
            say(f"full training: epoch {epoch}/{cfg.epochs}  {time.perf_counter() - t0:.0f} s")

    models, _ = train_models(data.x, data.y, [data.primary_rows], cfg, [fold_id],
                             device=device, on_epoch=on_epoch, landmarks=data.landmarks,
                             other_offset=data.n_primary)
    return models[0]


def fit_full(data: Megc3DB, cfg: LosoConfig, *, device: str = "cpu", chunk_size: int = 68,
             progress: Callable[[str], None] | None = None, ensemble: bool = False,
             calibrate: str | None = None) -> tuple[torch.nn.Module, dict | None]:
    """The product's training protocol: with ``cfg.select_epochs == "nested"`` the epoch count
    is chosen by :func:`select_epochs_full` (inner CV over all subjects), then the model is
    trained on all samples for that count; with "fixed" for ``cfg.epochs``. ``ensemble``
    (nested only): return the CV ensemble (:class:`ProbabilityAverage` of the full model and
    the inner models). ``calibrate`` (nested only; "prior" or "bias"): the selection record
    gains the calibration of that rule its inner CV chooses (:func:`calibration_of`), which the
    engine applies.
    Returns the model and the selection record (None for fixed)."""
    say = progress or log.info
    if ensemble and cfg.select_epochs != "nested":
        raise ValueError("a CV ensemble is built from the nested epoch selection's inner "
                         "models: use --select-epochs nested")
    check_calibration_rule(calibrate)
    if calibrate and cfg.select_epochs != "nested":
        raise ValueError("the calibration is chosen by the nested epoch selection's inner CV: "
                         "use --select-epochs nested")
    check_model(data, cfg)  # a network or input kind that does not fit fails before training
    selection = None
    epochs = cfg.epochs
    if cfg.select_epochs == "nested":
        selection = select_epochs_full(data, cfg, chunk_size=chunk_size, device=device,
                                       progress=say)
        epochs = selection["chosen_epochs"]
        say("nested selection on all subjects: inner UF1 "
            + ", ".join(f"{e}:{u:.4f}" for e, u in zip(selection["candidate_epochs"],
                                                         selection["inner_uf1"]))
            + f"; chosen {epochs} epochs ({selection['wall_s']:.0f} s)")
        inner_val = selection.pop("inner_val")
        if calibrate:
            cal = selection["calibration"] = calibration_of(data, *inner_val, rule=calibrate)
            if calibrate == "prior":
                say(f"calibration on all subjects: tau {cal['tau']} (inner UF1 " + ", ".join(
                    f"{t}:{u:.4f}" for t, u in zip(TAUS, cal["inner_uf1"])) + ")")
            else:
                say(f"calibration on all subjects: biases {cal['offsets']} (inner UF1 "
                    f"{cal['inner_uf1']:.4f} on a plateau of {cal['plateau_points']} grid "
                    f"points; unshifted {cal['unshifted_inner_uf1']:.4f})")
    model = train_full(data, cfg, device=device, progress=say, epochs=epochs)
    if not ensemble:
        return model, selection
    # The inner models again, from their seeds, stopped at the chosen epoch count (the
    # selection kept only their validation probabilities).
    key = len(data.subject_list)
    jobs = inner_jobs(data, cfg, key, [])
    say(f"CV ensemble: training the {len(jobs)} inner models for {epochs} epochs")
    inner, _ = train_models(data.x, data.y, [j[2] for j in jobs],
                            dataclasses.replace(cfg, epochs=epochs),
                            [10_000 + key * cfg.inner_folds + g for _, g, _, _ in jobs],
                            device=device, landmarks=data.landmarks,
                            other_offset=data.n_primary)
    selection = {**selection, "ensemble": {"members": 1 + len(inner),
                                           "rule": ENSEMBLE_RULE.format(k=len(inner))}}
    return ProbabilityAverage([model, *inner]).eval(), selection


def save_weights(model: torch.nn.Module, cfg: LosoConfig, path: str | Path,
                 selection: dict | None = None) -> None:
    """State dict of tensors plus the config (and the epoch selection record, if any) as JSON
    strings (loadable with weights_only)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "config_json": json.dumps(cfg.to_dict()),
                "selection_json": json.dumps(selection)}, path)


@dataclasses.dataclass(frozen=True)
class WeightsFile:
    """A weights file of :func:`save_weights`, read once: its schedule, its epoch selection
    record and the network it holds."""

    path: Path
    doc: dict

    @property
    def config(self) -> LosoConfig:
        return LosoConfig.from_dict(json.loads(self.doc["config_json"]))

    @property
    def selection(self) -> dict | None:
        """The epoch selection record (None: fixed schedule, or none recorded)."""
        return json.loads(self.doc.get("selection_json", "null"))

    def model(self) -> torch.nn.Module:
        from training.models import create_model

        cfg = self.config
        model = create_model(cfg.model, **cfg.model_kwargs)
        try:
            model.load_state_dict(self.doc["state_dict"])
        except RuntimeError as exc:
            raise ValueError(f"{self.path}: its weights do not fit network {cfg.model!r} "
                             f"{cfg.model_kwargs}: {str(exc)[:300]}") from None
        return model.eval()


def read_weights(path: str | Path) -> WeightsFile:
    """The document :func:`save_weights` wrote; ValueError for a missing or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such weights file (write one with `python -m training "
                         "train --out FILE`)")
    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)
        json.loads(doc["config_json"])
        doc["state_dict"].keys()
    except Exception as exc:  # torch raises several types for a file that is not ours
        raise ValueError(f"{path}: not a weights file written by `python -m training train` "
                         f"({type(exc).__name__}: {str(exc)[:200]})") from None
    return WeightsFile(path, doc)


def load_weights(path: str | Path) -> tuple[torch.nn.Module, LosoConfig]:
    weights = read_weights(path)
    return weights.model(), weights.config


def _export_setup(model: torch.nn.Module, path: str | Path, example: torch.Tensor | None):
    """Eval-mode CPU model, example batch (default (2, 3, 28, 28)), created parent folder and
    the dynamic batch dimension shared by both engine formats."""
    if example is None:
        example = torch.rand(2, 3, 28, 28)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return model.eval().cpu(), example, path, torch.export.Dim("batch", min=1, max=4096)


def export_onnx(model: torch.nn.Module, path: str | Path,
                example: torch.Tensor | None = None) -> None:
    """torch.onnx.export with a dynamic batch axis; weights stored inside the one file.
    ``example``: a batch (N >= 2) of the model's input (default (2, 3, 28, 28))."""
    model, example, path, batch = _export_setup(model, path, example)
    onnx_program = torch.onnx.export(
        model, (example,), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
        dynamic_shapes=({0: batch},), optimize=True, external_data=False,
    )
    onnx_program.save(str(path), external_data=False)


def export_program(model: torch.nn.Module, path: str | Path,
                   example: torch.Tensor | None = None) -> None:
    """torch.export with a dynamic batch axis, saved as one ``.pt2`` file: the engine format of
    the torch and TensorRT backends (TensorRT compiles it on the GPU it will run on)."""
    model, example, path, batch = _export_setup(model, path, example)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))


def check_export(model: torch.nn.Module, engine_path: str | Path, x: np.ndarray) -> dict:
    """Eager vs the exported engine (ONNX Runtime for ``.onnx``, the loaded torch.export
    program for ``.pt2``) on ``x`` (already normalised, (N, C, H, W)): min per-row cosine of
    the logits and whether every argmax agrees."""
    with torch.no_grad():
        ref = model.eval()(torch.as_tensor(x)).numpy()
    if engine_format(Path(engine_path)) == "torch_export":
        program = torch.export.load(str(engine_path)).module()
        with torch.no_grad():
            got = program(torch.as_tensor(x, dtype=torch.float32)).numpy()
    else:
        import onnxruntime as ort

        sess = ort.InferenceSession(str(engine_path), providers=["CPUExecutionProvider"])
        got = sess.run(None, {sess.get_inputs()[0].name: x.astype(np.float32)})[0]
    cos = (ref * got).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1) + 1e-12)
    return {"min_cosine": float(cos.min()),
            "argmax_equal": bool((ref.argmax(1) == got.argmax(1)).all()),
            "max_abs_diff": float(np.abs(ref - got).max())}


def engine_file_name(cfg: LosoConfig, ensemble: bool = False,
                     calibrate: str | None = None) -> str:
    """The file name ``training export`` gives an engine of this schedule under engines/: the
    network, then what changes its predictions (CV ensemble, mirrored prediction, shifted
    training, calibration: ``_cal`` for the class-prior rule, ``_calbias`` for the class-bias
    rule, both phases), then the maps it learned (``_3db``; ``_mixed`` where it drew the other
    set too), so that engines of different schedules never overwrite one another."""
    check_calibration_rule(calibrate)
    name = f"{cfg.model}_cv{cfg.inner_folds + 1}" if ensemble else cfg.model
    name += "_mirror" if cfg.tta == "hflip" else ""
    name += f"_shift{cfg.shift_pixels}" if cfg.shift_pixels else ""
    name += {None: "", "prior": "_cal", "bias": "_calbias"}[calibrate]
    name += "_2phases" if cfg.phases == 2 else ""
    maps = cfg.maps + ("_mixed" if cfg.other_maps_share else "")
    return f"{name}_{maps}.onnx"


def export_default(data: Megc3DB, cfg: LosoConfig, out: str | Path, *,
                   loso_results: str | Path | None = None,
                   weights: str | Path | WeightsFile | None = None,
                   device: str = "cpu", ensemble: bool = False, calibrate: str | None = None,
                   progress: Callable[[str], None] | None = None) -> dict:
    """Train on all of ``data`` (or load ``weights``), export to ``out`` (ONNX for ``.onnx``, a
    torch.export program for ``.pt2``), write ``<out>.json``, verify the export on the real
    maps; returns the manifest dict. ``calibrate``: None, "prior" or "bias" (the rule of
    training/calibrate.py the engine applies)."""
    import onnx

    import realtime_mer
    from realtime_mer.runtime.manifest import Manifest

    say = progress or log.info
    check_calibration_rule(calibrate)
    try:  # the file name sets the format, read as the runtime reads it
        fmt = engine_format(Path(out))
    except EngineError:
        fmt = None
    if fmt not in ("onnx", "torch_export"):
        raise ValueError(f"engine file {out}: export writes .onnx or .pt2 (an .ens ensemble is "
                         "written by `python -m training ensemble`)")
    if weights and ensemble:
        raise ValueError("--ensemble trains its members here; it cannot start from --weights")
    if weights and calibrate:
        raise ValueError("--calibrate is chosen by the nested selection run here; it cannot "
                         "start from --weights")
    if ensemble and cfg.select_epochs != "nested":
        raise ValueError("a CV ensemble is built from the nested epoch selection's inner "
                         "models: use --select-epochs nested")
    selection = None
    if weights:
        if not isinstance(weights, WeightsFile):
            weights = read_weights(weights)
        model, cfg, selection = weights.model(), weights.config, weights.selection
        if cfg.select_epochs == "nested" and selection is None:
            raise ValueError(f"{weights.path} holds no epoch selection record although its "
                             "schedule says select_epochs=nested; train it again with `train`")
    check_engine_schedule(cfg)
    # Refuse a mismatching LOSO results file before spending minutes on training.
    loso_doc = None
    if loso_results and not Path(loso_results).is_file():
        raise ValueError(f"--loso-results {loso_results}: no such file")
    if loso_results:
        loso_doc = LosoResults.load(loso_results).doc
        check_loso_results(loso_doc, cfg, str(loso_results), data)
        if ensemble and "nested_cv_ensemble" not in loso_doc:
            raise ValueError(f"{loso_results} holds no nested_cv_ensemble score to quote for "
                             "an ensemble engine (it predates the CV ensemble; rerun the LOSO)")
        kind = calibration_kind(loso_doc)
        if kind != calibrate:
            def said(rule):
                return f"calibrated by the {rule} rule" if rule else "not calibrated"
            raise ValueError(f"{loso_results} is {said(kind)} (python -m training calibrate) and "
                             f"the engine is {said(calibrate)}: quote the results of the same "
                             "rule")
    if not weights:
        t0 = time.perf_counter()
        model, selection = fit_full(data, cfg, device=device, progress=say, ensemble=ensemble,
                                    calibrate=calibrate)
        say(f"trained on {len(data.primary_rows)} samples in {time.perf_counter() - t0:.0f} s")
    epochs_trained = selection["chosen_epochs"] if selection is not None else cfg.epochs
    out = Path(out)
    lm = data.landmarks
    # Checked on the map set it was trained on (with two sets, the first n_primary rows).
    own = data.primary_rows
    x = model_inputs(data.x[own], cfg, None if lm is None else lm[own]).numpy()
    try:
        engine_model = engine_network(model, cfg)
        if selection is not None and "calibration" in selection:
            # Outermost: the LOSO rule shifts the final (mirrored, averaged) probabilities.
            engine_model = CalibrationShift(engine_model,
                                            selection["calibration"]["offsets"]).eval()
        write = export_onnx if fmt == "onnx" else export_program
        write(engine_model, out,
              example=model_inputs(data.x[:2], cfg, None if lm is None else lm[:2]))
        check = check_export(engine_model, out, x)
        if check["min_cosine"] < 0.99 or not check["argmax_equal"]:
            raise ExportError(f"exported engine disagrees with the eager model: {check}")
    except Exception as exc:
        out.unlink(missing_ok=True)  # no engine file without its verified manifest
        if weights or ensemble:
            raise ExportError(f"export to {out} failed: {type(exc).__name__}: {exc}") from exc
        # Minutes of training are not thrown away with a failed export.
        kept = out.with_suffix(".weights.pt")
        save_weights(model, cfg, kept, selection)
        raise ExportError(f"export to {out} failed ({type(exc).__name__}: {exc}); the trained "
                          f"weights are kept in {kept}: export them again with --weights "
                          f"{kept}") from exc
    with torch.no_grad():
        train_acc = float((engine_model(torch.as_tensor(x)).argmax(1).numpy()
                           == data.y[own]).mean())

    loso = None
    if loso_doc is not None:
        loso = _loso_block(loso_doc, cfg, loso_results, ensemble=ensemble)
    if selection is not None:
        # The ensemble and calibration records have their own place in the manifest (below).
        epoch_selection = {"mode": "nested", **{k: v for k, v in selection.items()
                                                 if k not in ("ensemble", "calibration")}}
    else:
        epoch_selection = {"mode": "fixed",
                           "rule": f"fixed: {cfg.epochs} epochs, chosen before any run"}
    manifest = Manifest(
        model=cfg.model,
        model_kwargs=dict(cfg.model_kwargs),
        format=fmt,
        input=_input_spec(cfg, x.shape[-1]),
        output={"name": OUTPUT_NAME, "kind": "logits", "shape": ["N", len(CLASS_NAMES)]},
        normalization={"mean": _per_channel(cfg.mean, cfg), "std": _per_channel(cfg.std, cfg),
                       "applied_by": "runtime",
                       "formula": "(x - mean[c]) / std[c] per channel, then the engine"},
        class_names=list(CLASS_NAMES),
        training={"data": _training_data(data, cfg),
                  "n_samples": len(own),
                  "n_subjects": len(data.subject_list),
                  "class_counts": list(data.class_counts()),
                  # "epochs" of the config is the longest candidate when select_epochs is
                  # nested; the model was trained for "epochs_trained".
                  "schedule": {**cfg.to_dict(), "epochs_trained": epochs_trained,
                               "epoch_selection": epoch_selection},
                  "train_accuracy": train_acc, "git_commit": git_commit(),
                  **{k: selection[k] for k in ("ensemble", "calibration")
                     if selection is not None and k in selection}},
        loso=loso,
        sha256=sha256_file(out),
        versions={"torch": torch.__version__,
                  **({"onnx": onnx.__version__} if fmt == "onnx" else {}),
                  "realtime_mer": realtime_mer.__version__},
        export_check=check,
    )
    manifest.save(Path(str(out) + ".json"))
    say(f"engine {out} ({out.stat().st_size} bytes), manifest {out}.json; export check {check}")
    return manifest.to_dict()


def _training_data(data: Megc3DB, cfg: LosoConfig) -> str:
    """What the manifest says the engine was trained on."""
    both = "both phases of each movement (onset->apex, apex->offset)"
    if cfg.maps == "live":
        databases = ", ".join(sorted(set(map(str, data.databases))))
        return (f"the live pipeline's own 28x28 (u, v, strain) maps of the raw databases' "
                f"samples ({databases}), computed from their frames by `python -m training "
                f"preprocess`" + ("" if cfg.phases == 1 else f"; {both}"))
    published = ("MEGC2019 3DB composite (SMIC, CASME II, SAMM), published 28x28 (u, v, strain) "
                 "maps")
    if cfg.phases == 2:
        return f"{published}: CausalNet's, {both}; the live pipeline makes its own of each"
    return published + ("" if data.maps is None else
                        f"; trained on the {data.maps[0]} preprocessing of the samples")


def _input_spec(cfg: LosoConfig, side: int) -> dict:
    if cfg.input_kind == "map28":
        return {"name": INPUT_NAME, "shape": ["N", 3 * cfg.phases, side, side],
                "dtype": "float32", "layout": "NCHW",
                "channels": list(CHANNELS if cfg.phases == 1 else MOVEMENT_CHANNELS),
                "value_range": [0.0, 1.0], "kind": "map28"}
    channels = (["u", "v", "strain"] if cfg.input_kind == "regions5"
                else ["red", "green", "blue"])
    spec = {"name": INPUT_NAME, "shape": ["N", 3, side, side], "dtype": "float32",
            "layout": "NCHW", "channels": channels, "value_range": [0.0, 1.0],
            "kind": cfg.input_kind,
            "built_from": "(N, 3, H, W) (u, v, strain) maps in [0, 1] by "
                          "realtime_mer.input_kinds.network_inputs (the runtime does this)"}
    kind = input_kind(cfg.input_kind)
    if kind.options:
        # Every switch, defaults included, so the engine is fed the same if defaults change.
        spec["options"] = {**kind.options, **cfg.input_options}
    if kind.uses_landmarks:
        spec["landmarks"] = ("five points per map (eyes, nose tip, mouth corners) in the maps' "
                             "frame; the apex frame's, or the aligned-face template")
    return spec


def _schedule_key(cfg_dict: dict) -> dict:
    """What must agree between a LOSO results file and an export: the whole schedule and the
    epoch selection rule. eval_every and inner_folds only matter to the nested rule (its
    candidates and inner groups), so they are compared only then."""
    d = LosoConfig.from_dict(cfg_dict).to_dict()  # old files: select_epochs "fixed"
    if d["select_epochs"] == "fixed":
        d.pop("eval_every")
        d.pop("inner_folds")
    return d


def check_loso_results(r: dict, cfg: LosoConfig, name: str = "LOSO results",
                       data: Megc3DB | None = None) -> None:
    """Refuse results measured with another model, schedule or epoch selection rule, or (for
    the live maps of a cache, given ``data``) on other data: a manifest must not claim scores
    estimated for a different training procedure or other samples."""
    if "config" not in r:
        raise ValueError(f"{name} has no config; it cannot be matched to this export")
    if data is not None and cfg.maps == "live" \
            and r.get("dataset", {}).get("sha256") != data.fingerprint():
        raise ValueError(f"{name} was measured on other live maps than this export's (another "
                         "cache, other options or other --databases): pass the results of a "
                         "LOSO run on the same data")
    theirs, ours = _schedule_key(r["config"]), _schedule_key(cfg.to_dict())
    if theirs != ours:
        diff = {k: (theirs.get(k), ours.get(k)) for k in sorted(set(theirs) | set(ours))
                if theirs.get(k) != ours.get(k)}
        raise ValueError(
            f"{name} was run with another configuration or epoch selection than this export "
            f"(results file, export: {diff}); pass the --loso-results file of the same "
            f"schedule (experiments/LOG.md lists each run's command)"
        )
    if ours["select_epochs"] == "nested" and "nested_selection" not in r:
        raise ValueError(f"{name} says select_epochs=nested but holds no nested_selection")


def _cite(path) -> str:
    """The results file as a repository-relative path when it lies in the repository."""
    from training import REPO_ROOT

    p = Path(path).resolve()
    try:
        return p.relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return p.name


def _loso_block(r: dict, cfg: LosoConfig, path, ensemble: bool = False) -> dict:
    n = r.get("dataset", {}).get("n_subjects", "all")
    calibrated = {}
    if "calibration" in r:
        cal = r["calibration"]
        if calibration_kind(r) == "bias":
            what = {"calibration": "each fold's probabilities shifted by the class biases its "
                                   "inner CV chose (python -m training calibrate --rule bias), "
                                   "like this engine",
                    "median_bias": cal["median_bias"]}
        else:
            what = {"calibration": "each fold's probabilities shifted by the tau its inner CV "
                                   "chose (python -m training calibrate), like this engine",
                    "median_tau": cal["median_tau"]}
        calibrated = {**what,
                      "uncalibrated_uf1": cal["uncalibrated"]["cv_ensemble" if ensemble
                                                              else "single"]["uf1"]}
    if ensemble:
        ens = r["nested_cv_ensemble"]
        single = {"single_model_uf1": r["uf1"], "single_model_uar": r["uar"]}
        r = {**r, "uf1": ens["uf1"], "uar": ens["uar"], "accuracy": ens["accuracy"]}
    # A run whose outer models stopped at their chosen epochs measured no LEAKY figure.
    leaky = ({"leaky_best_epoch_uf1": r["leaky_best_epoch"]["uf1"],
              "leaky_best_epoch_uar": r["leaky_best_epoch"]["uar"],
              "leaky_warning": "LEAKY, paper-comparable only: each test subject's epoch chosen "
                               "on that subject's labels; not an estimate of performance"}
             if "leaky_best_epoch" in r else {})
    if cfg.select_epochs == "nested":
        ns = r["nested_selection"]
        # A run whose outer models stopped at their chosen epochs has no fixed-schedule figure.
        fixed = ns.get("fixed_final_epoch_same_run")
        fixed_block = {} if fixed is None else {
            "fixed_schedule_uf1": fixed.get("uf1"), "fixed_schedule_uar": fixed.get("uar"),
            "fixed_schedule_protocol": f"same run, every fold scored after {cfg.epochs} epochs "
                                       "chosen a priori (honest; the pre-registered estimator)"}
        return {
            "protocol": f"LOSO, {n} subjects, pooled; each fold's epoch count chosen by nested "
                        "subject-wise CV on its training subjects only (honest) -- the rule "
                        "that chose this engine's epoch count"
                        + ("; scored as the CV ensemble of the outer and inner models, like "
                           "this engine" if ensemble else ""),
            **(single if ensemble else {}), **calibrated,
            "uf1": r["uf1"], "uar": r["uar"], "accuracy": r.get("accuracy"),
            "complete": r.get("complete"), "results_file": _cite(path),
            "median_chosen_epochs": ns.get("median_epochs"),
            **fixed_block,
            "note": "the nested protocol was adopted after the fixed-schedule result had been "
                    "seen; it is a second honest estimator, not a pre-registered one",
            **leaky,
        }
    return {"protocol": f"LOSO, {n} subjects, pooled, fixed schedule (honest)",
            "uf1": r["uf1"], "uar": r["uar"], "accuracy": r.get("accuracy"),
            "complete": r.get("complete"), "results_file": _cite(path), **leaky}
