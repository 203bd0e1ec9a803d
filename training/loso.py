"""Leave-one-subject-out (LOSO) evaluation with a fixed schedule, pooled predictions and resume.

Every fold is trained with the same schedule and scored once: at the end of a fixed number of
epochs (``select_epochs="fixed"``), or at the epoch count that an inner subject-wise CV on the
fold's training subjects chose (``"nested"``); nothing is chosen by looking at the held-out
subject. The "best epoch per test subject" number that much
published code reports is computed beside it from periodic evaluations, and kept apart under the
key ``leaky_best_epoch`` so it can be compared with papers but never mistaken for the honest one.

Speed: the networks are tiny, so one fold at a time leaves a CPU idle between kernel launches.
Folds are therefore trained together, several at once, as one vectorised ensemble
(``torch.func.stack_module_state`` + ``vmap``): each fold keeps its own weights, BatchNorm
statistics, optimiser state, mini-batches and augmentation draws, all seeded by the fold's index,
so a fold's result does not depend on which folds share its chunk. Adam (and its weight decay)
acts element-wise, so one optimiser over the stacked parameters is exactly one optimiser per
fold.

On a CPU with few cores, vectorising pays only for the larger networks; small ones train
faster as separate worker processes (``workers``), each running its share of the folds with
its own threads. The folds are the same either way: a fold's seeds depend on its index only.

Resume: the run directory holds ``config.json``, one ``fold_XX.json`` per finished fold and a
checkpoint of the chunk in progress (saved every ``checkpoint_every`` epochs, read back with
``torch.load(weights_only=True)``). Rerunning the same command skips finished folds and
continues the chunk from its checkpoint. The nested selection keeps each inner model's
predictions (``inner_KK_G.json``) until its fold's choice is written (``nested_XX.json``).

Outer models trained only to their chosen epoch (``outer_epochs="chosen"``): the nested
selection runs first, then each outer model trains up to the epoch its fold's inner CV chose
and stops. The learning rate is constant and evaluations leave the weights alone, so the model
at that epoch is the same as in a run that goes on to the end (tested): the honest scores and
the CV ensemble are unchanged, for a fraction of the outer training. What is lost is what needs
the later epochs: the LEAKY best-epoch figure and the fixed-schedule figure of the same run.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap

from realtime_mer.errors import DatasetError
from realtime_mer.input_kinds import (LANDMARK_KINDS, NETWORK_INPUT_KINDS, check_input_options,
                                      hflip_landmarks, network_inputs)
from training.data.megc3db import CLASS_NAMES, Megc3DB
from training.allocator import keep_freed_memory
from training.metrics import evaluate, per_database, pooled_scores
from training.models import create_model

log = logging.getLogger(__name__)

__all__ = ["LosoConfig", "LosoWorkerError", "run_loso", "hflip_maps", "shift_images", "normalise",
           "train_models", "git_commit", "select_epochs_nested", "select_epochs_full",
           "NESTED_RULE", "model_inputs", "predict_probs", "translations",
           "average_over_test_views", "trains_channels_last",
           "class_weighted_loss"]

RESULTS_FORMAT = 1

# How far the outer models train: "all" (to the schedule's end: the LEAKY best-epoch and
# fixed-schedule figures come with the honest one) or "chosen" (nested runs only: each outer
# model stops at its fold's chosen epoch; the same honest scores, faster).
OUTER_EPOCHS = ("all", "chosen")


class LosoWorkerError(RuntimeError):
    """A worker process of a parallel LOSO run failed (its own error was printed)."""


@dataclass(frozen=True)
class LosoConfig:
    """The whole training schedule. It is written to the run directory and the results file;
    a resumed run must have the same one."""

    model: str = "ststnet"
    model_kwargs: dict = field(default_factory=dict)
    epochs: int = 300
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 5e-4
    weight_decay: float = 1e-4
    class_balanced: bool = True
    augment: str = "hflip"  # "none" or "hflip" (mirror and u -> 1 - u, probability 0.5)
    # Mixup (Zhang et al., ICLR 2018): 0 is off; alpha > 0 trains on convex mixtures
    # lam * a + (1 - lam) * b of each batch sample a with its neighbour b in the (shuffled)
    # batch, lam ~ Beta(alpha, alpha) per sample, and on the same mixture of their (class
    # weighted) losses. Applied to the network's input after the flip.
    mixup_alpha: float = 0.0
    # Label smoothing (Szegedy et al., CVPR 2016): 0 is off; eps > 0 trains each sample
    # against (1 - eps) * its one-hot label + eps / C on every class (PyTorch's convention),
    # before its class weight, so the network is not pushed to ever more confident logits.
    label_smoothing: float = 0.0
    # Random translation: 0 is off; k > 0 shifts each training sample's network input by
    # integers drawn uniformly from [-k, k] along each axis (per sample, from the fold's own
    # generator), the edge rows and columns repeated into the vacated border. Applied after
    # the flip and before mixup. Faces in the maps are aligned by their eyes, but not to the
    # pixel across subjects; the shift asks the network not to depend on that alignment.
    shift_pixels: int = 0
    # Test-time augmentation: "hflip" averages the class probabilities of the maps and of their
    # mirror image at every prediction (evaluation epochs, nested selection, the final
    # scores), as the exported engine does; "none" predicts from the maps alone.
    tta: str = "none"
    # Test-time translation: 0 is off; k > 0 also averages the class probabilities over every
    # integer offset (dy, dx) in [-k, k] x [-k, k] (the training shift's range, edges repeated
    # as there), of the maps and, with tta "hflip", of their mirror image, in the predictions
    # of held-out test subjects (the scores, the CV ensemble's members, the leaky history).
    # The inner validation predictions that the epoch count and the calibration are chosen on
    # keep tta alone ((2k + 1)^2 times fewer forward passes; the evaluations would otherwise
    # cost as much as the training), so every choice and every network is the same as in the
    # run without it.
    tta_shift: int = 0
    # Fixed per-channel normalisation (u, v, strain), applied after augmentation. Chosen a
    # priori (maps are in [0, 1]), so it carries no statistic of any held-out subject.
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    seed: int = 0
    eval_every: int = 10  # epochs between evaluations (leaky number; nested candidates)
    # "fixed": every fold is scored after ``epochs``. "nested": each fold's epoch count is
    # chosen among the evaluation epochs by an inner subject-wise CV on that fold's training
    # subjects only (``inner_folds`` groups); the test subject is never looked at.
    select_epochs: str = "fixed"
    inner_folds: int = 5
    # What the network is fed, built from the maps by realtime_mer.input_kinds.network_inputs
    # (the runtime applies the same function): "map28" (the maps), "regions5" (AHMSA-Net's
    # five-region recombination), "colour" (the colour-coded flow image at input_size x
    # input_size; MJFN) or "mcnet" (MCNet's magnified, AU-weighted colour image);
    # input_options are the kind's switches (mcnet: use_omam, use_oaum, alpha).
    input_kind: str = "map28"
    input_size: int | None = None
    input_options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs, batch_size and lr must be positive")
        if self.optimizer not in ("adam", "adamw", "sgd"):
            raise ValueError(f"optimizer {self.optimizer!r} is not one of adam, adamw, sgd")
        if self.augment not in ("none", "hflip"):
            raise ValueError(f"augment {self.augment!r} is not one of none, hflip")
        if self.tta not in ("none", "hflip"):
            raise ValueError(f"tta {self.tta!r} is not one of none, hflip")
        if not isinstance(self.tta_shift, int) or self.tta_shift < 0:
            raise ValueError(f"tta_shift must be an integer >= 0, got {self.tta_shift!r}")
        if self.eval_every < 1:
            raise ValueError("eval_every must be >= 1")
        if not self.mixup_alpha >= 0 or not math.isfinite(self.mixup_alpha):
            raise ValueError(f"mixup_alpha must be a finite number >= 0, got {self.mixup_alpha}")
        if not 0.0 <= self.label_smoothing < 1.0:  # also rejects NaN
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not isinstance(self.shift_pixels, int) or self.shift_pixels < 0:
            raise ValueError(f"shift_pixels must be an integer >= 0, got {self.shift_pixels!r}")
        if self.select_epochs not in ("fixed", "nested"):
            raise ValueError(f"select_epochs {self.select_epochs!r} is not fixed or nested")
        if self.inner_folds < 2:
            raise ValueError("inner_folds must be >= 2")
        if self.input_kind not in NETWORK_INPUT_KINDS:
            raise ValueError(f"input_kind {self.input_kind!r} is not one of "
                             f"{', '.join(NETWORK_INPUT_KINDS)}")
        check_input_options(self.input_kind, self.input_options)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LosoConfig":
        # Fields added after a file was written take the value that file's run used.
        d = {"select_epochs": "fixed", "inner_folds": 5, "input_kind": "map28",
             "input_size": None, "input_options": {}, "tta": "none", "mixup_alpha": 0.0,
             "label_smoothing": 0.0, "shift_pixels": 0, "tta_shift": 0, **d}
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return cls(**d)


def hflip_maps(x: torch.Tensor) -> torch.Tensor:
    """Mirror (N, 3, H, W) (u, v, strain) maps in [0, 1] left-right.

    Mirroring the face also reverses horizontal motion, so u must be negated. The published u is
    min-max normalised per map, u' = (u - min)/(max - min); for -u that is (max - u)/(max - min)
    = 1 - u'. v and strain only move with the pixels.
    """
    out = torch.flip(x, dims=(-1,)).clone()
    out[:, 0] = 1.0 - out[:, 0]
    return out


def normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def model_inputs(maps: np.ndarray | torch.Tensor, cfg: LosoConfig,
                 landmarks: np.ndarray | None = None) -> torch.Tensor:
    """(N, 3, 28, 28) maps in [0, 1] (and, for the kinds that locate facial regions, their
    (N, 5, 2) landmarks) → the normalised tensor the network of ``cfg`` is fed (input kind,
    then the fixed normalisation), exactly as the runtime prepares it."""
    x = network_inputs(np.asarray(maps, dtype=np.float32), cfg.input_kind, cfg.input_size,
                       landmarks=landmarks, options=cfg.input_options)
    return normalise(torch.as_tensor(x), cfg.mean, cfg.std)


def predict_probs(model: torch.nn.Module, maps: np.ndarray, cfg: LosoConfig,
                  landmarks: np.ndarray | None = None) -> np.ndarray:
    """(N, C) class probabilities of an eval-mode ``model`` for (N, 3, H, W) maps in [0, 1],
    with the test-time augmentation of ``cfg`` (the probabilities of the mirror image and of
    the translations averaged in)."""
    maps = np.asarray(maps, dtype=np.float32)
    with torch.no_grad():
        views = [model_inputs(maps, cfg, landmarks)]
        if cfg.tta == "hflip":
            flipped = (None if landmarks is None
                       else hflip_landmarks(landmarks, float(maps.shape[-1])))
            views.append(model_inputs(hflip_maps(torch.as_tensor(maps)), cfg, flipped))
        p = average_over_test_views(lambda x: torch.softmax(model(x), -1), views,
                                    cfg.tta_shift)
    return p.numpy()


def translations(x: torch.Tensor, max_shift: int) -> list[torch.Tensor]:
    """Every translation of the images ``x`` (..., C, H, W) by integer offsets (dy, dx),
    |dy|, |dx| <= ``max_shift``, in row-major (dy, dx) order: the same values as
    :func:`shift_images` gives for each offset (out[i, j] = x[i - dy, j - dx], edges
    repeated), taken as windows of one edge-padded copy."""
    k = max_shift
    if not k:
        return [x]
    h, w = x.shape[-2:]
    lead = x.shape[:-3]
    padded = F.pad(x.reshape(-1, *x.shape[-3:]), (k,) * 4, mode="replicate")
    padded = padded.reshape(*lead, *padded.shape[1:])
    return [padded[..., k - dy:k - dy + h, k - dx:k - dx + w]
            for dy in range(-k, k + 1) for dx in range(-k, k + 1)]


def average_over_test_views(probs_of: Callable[[torch.Tensor], torch.Tensor],
                            views: list[torch.Tensor], max_shift: int) -> torch.Tensor:
    """The mean of ``probs_of`` over each view (the input; its mirror image) translated by every
    offset of the test-time shift: the one definition of a test-time-augmented prediction, used
    by evaluation during training and by :func:`predict_probs` alike. The sum runs in a fixed
    order, so both give the same floats."""
    if max_shift and views[0].ndim < 4:
        raise ValueError("a test-time shift needs image inputs (..., C, H, W)")
    total, count = None, 0
    for view in views:
        for shifted in translations(view, max_shift):
            p = probs_of(shifted.contiguous())
            total = p if total is None else total + p
            count += 1
    return total / count


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
            capture_output=True, text=True, timeout=10,
        )
        sha = out.stdout.strip()
        return sha if len(sha) == 40 and all(c in "0123456789abcdef" for c in sha) else None
    except Exception:
        return None


def host_cpu() -> dict:
    """The CPU the numbers came from: its identity, the vector ISA torch dispatches to and the
    oneDNN version. CPU training is deterministic on one host but a rerun on another host with
    other kernels need not be bit-identical (seed 0 of the SGD runs moved by 0.003), so a
    result file says which host produced it."""
    cpu: dict = {"capability": torch.backends.cpu.get_cpu_capability()}
    onednn = re.search(r"MKL-DNN v([\d.]+)", torch.__config__.show())
    cpu["onednn"] = onednn.group(1) if onednn else None
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:  # not Linux: the ISA and oneDNN version are still recorded
        return cpu
    wanted = {"model name": "model_name", "cpu family": "family", "model": "model",
              "stepping": "stepping"}
    for line in lines:
        if not line.strip():
            break  # the first processor's block is enough: the cores of a host are alike
        key, _, value = line.partition(":")
        if key.strip() in wanted:
            cpu[wanted[key.strip()]] = value.strip()
    return cpu


def _declares_on_cpu(model: torch.nn.Module, device: str, flag: str) -> bool:
    """Whether ``model``'s class declares the CPU training setting ``flag`` and ``device`` is a
    CPU (each setting is measured per network; a class without the flag does not use it)."""
    return torch.device(device).type == "cpu" and bool(getattr(type(model), flag, False))


def trains_channels_last(model: torch.nn.Module, device: str) -> bool:
    """Whether one-model training feeds ``model`` channels-last images by default: on a CPU,
    for the networks whose class declares ``channels_last_on_cpu`` (measured faster there)."""
    return _declares_on_cpu(model, device, "channels_last_on_cpu")


def keeps_freed_memory(model: torch.nn.Module, device: str) -> bool:
    """Whether training ``model`` sets the process to keep freed heap memory
    (:func:`training.allocator.keep_freed_memory`): on a CPU, for the networks whose class
    declares ``keep_freed_memory_on_cpu``. Measured per network (``benchmarks/loso.py``):
    STSTNet-sized 1.28-1.38x faster, MJFN unchanged (1.01x), AHMSA-Net slower (0.85x), so only
    the first declares it. The setting is process-wide and stays once made."""
    return _declares_on_cpu(model, device, "keep_freed_memory_on_cpu")


def _make_optimizer(cfg: LosoConfig, params):
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # SGD with momentum is element-wise too, so stacking stays exact.
    return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)


class _Stream:
    """An endless stream of a fold's training indices: reshuffled permutations back to back."""

    def __init__(self, indices: np.ndarray, gen: torch.Generator) -> None:
        self.indices = torch.as_tensor(indices, dtype=torch.long)
        self.gen = gen
        self.buf = torch.empty(0, dtype=torch.long)

    def take(self, n: int) -> torch.Tensor:
        while self.buf.numel() < n:
            perm = torch.randperm(self.indices.numel(), generator=self.gen)
            self.buf = torch.cat([self.buf, self.indices[perm]])
        out, self.buf = self.buf[:n], self.buf[n:]
        return out


def train_models(
    x: np.ndarray,
    y: np.ndarray,
    train_sets: list[np.ndarray],
    cfg: LosoConfig,
    fold_ids: list[int],
    *,
    device: str = "cpu",
    eval_hook: Callable[[int, Callable[[np.ndarray], torch.Tensor]], None] | None = None,
    state: dict | None = None,
    checkpoint: Callable[[dict], None] | None = None,
    checkpoint_every: int = 0,
    on_epoch: Callable[[int], None] | None = None,
    landmarks: np.ndarray | None = None,
    channels_last: bool | None = None,
) -> tuple[list[torch.nn.Module], dict]:
    """Train one model per entry of ``train_sets`` (indices into ``x``), all at once.

    x: (N, 3, H, W) float32 maps in [0, 1]; y: (N,) int; landmarks: (N, 5, 2) or None, for the
    input kinds that locate facial regions (mirrored with the maps by the flip). ``fold_ids``
    seed each model (init, batches, flips, shifts) so a model's run does not depend on the
    others. ``eval_hook(epoch, predict)`` is called every ``cfg.eval_every`` epochs and at the
    end; ``predict(index, tta_shift=0)`` maps an (M, T) index array into ``x`` (row m for model
    m) to (M, T, C) probabilities in eval mode, with the test-time mirror of ``cfg.tta`` and the
    translations of ``tta_shift`` (the callers pass ``cfg.tta_shift`` for test subjects only).
    ``state``/``checkpoint`` resume and save training.
    ``channels_last``: feed a one-model chunk its images in channels-last layout; None
    (default) does so on a CPU for the networks that declare ``channels_last_on_cpu``
    (:func:`trains_channels_last`; the result differs from the default layout by
    floating-point order only). Returns the trained models (eval mode, CPU) and the final state.
    """
    n_models = len(train_sets)
    num_classes = len(CLASS_NAMES)
    for tr, fid in zip(train_sets, fold_ids):
        counts = np.bincount(y[tr], minlength=num_classes)
        if (counts == 0).any():
            missing = [CLASS_NAMES[c] for c in np.flatnonzero(counts == 0)]
            raise DatasetError(
                f"fold {fid}: the training set has no sample of class(es) {missing}; "
                "a model cannot learn a class it never sees"
            )

    models = []
    for fid in fold_ids:
        torch.manual_seed(cfg.seed * 100_003 + fid)
        models.append(create_model(cfg.model, **cfg.model_kwargs))
    if KEEP_FREED_MEMORY and keeps_freed_memory(models[0], device):
        keep_freed_memory()
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    params = {k: v.detach().to(device).requires_grad_() for k, v in params.items()}
    buffers = {k: v.detach().to(device) for k, v in buffers.items()}
    opt = _make_optimizer(cfg, list(params.values()))

    gens = [torch.Generator().manual_seed(cfg.seed * 1_000_003 + 7919 * fid) for fid in fold_ids]
    streams = [_Stream(tr, g) for tr, g in zip(train_sets, gens)]
    # One definition of "an epoch" for all folds: as many batches as cover the average
    # training set once (training sets differ by one subject only).
    steps = max(1, math.ceil(float(np.mean([len(t) for t in train_sets])) / cfg.batch_size))

    xs = torch.as_tensor(x, dtype=torch.float32)
    # The flip acts on the maps (where mirroring the motion is exact), before the input kind.
    x_dev = model_inputs(xs, cfg, landmarks).to(device)
    flipped_landmarks = (None if landmarks is None
                         else hflip_landmarks(landmarks, float(xs.shape[-1])))
    x_flip = (model_inputs(hflip_maps(xs), cfg, flipped_landmarks).to(device)
              if "hflip" in (cfg.augment, cfg.tta) else None)
    y_dev = torch.as_tensor(y, dtype=torch.long).to(device)
    class_w = []
    for tr in train_sets:
        counts = np.bincount(y[tr], minlength=num_classes).astype(np.float64)
        w = counts.sum() / (num_classes * counts) if cfg.class_balanced else np.ones(num_classes)
        class_w.append(w)
    class_w = torch.as_tensor(np.stack(class_w), dtype=torch.float32, device=device)  # (M, C)

    start_epoch = 0
    history: dict = {}
    if state is not None:
        if state["fold_ids"] != list(fold_ids):
            raise ValueError("checkpoint belongs to other folds")
        for k in params:
            params[k].data.copy_(state["params"][k].to(device))
        for k in buffers:
            buffers[k].copy_(state["buffers"][k].to(device))
        opt.load_state_dict(state["optimizer"])
        for g, s in zip(gens, state["generators"]):
            g.set_state(s)
        for st, buf in zip(streams, state["stream_bufs"]):
            st.buf = buf.clone()
        start_epoch = int(state["epoch"])

    def fwd(p, b, xb):
        return functional_call(base, (p, b), (xb,))

    # Dropout (MJFN, MCNet) draws from the global generator: seeded here, so a run is
    # reproducible for a given chunk, but unlike init, batches and flips these draws are not
    # per fold (a fold's dropout masks depend on which folds share its chunk).
    torch.manual_seed(cfg.seed * 1_000_033 + int(fold_ids[0]))
    if state is not None and "dropout_rng" in state:
        # Resume the dropout draws where the checkpoint left them, so that an interrupted run
        # gives the same predictions as an uninterrupted one (checkpoints written before this
        # was recorded restart the draws from the seed).
        torch.set_rng_state(state["dropout_rng"])
        if "dropout_rng_cuda" in state and str(device).startswith("cuda"):
            torch.cuda.set_rng_state(state["dropout_rng_cuda"], device)
    if channels_last is None:
        channels_last = trains_channels_last(models[0], device)
    bank = _InputBank.build(x_dev, x_flip if cfg.augment == "hflip" else None,
                            cfg.shift_pixels, channels_last and n_models == 1)
    if n_models == 1:
        # One model: call it directly on views of the stacked tensors (gradients and
        # BatchNorm statistic updates reach the stacked state); vmap's per-call overhead
        # would dominate a small network's step on a CPU.
        def train_fwd(p, b, xb):
            x0 = xb[0]
            if channels_last and x0.ndim == 4:
                # oneDNN's convolutions and PyTorch's max pooling have vectorised kernels
                # for this layout; the copy of one batch costs far less than they save.
                x0 = x0.contiguous(memory_format=torch.channels_last)
            return fwd({k: v[0] for k, v in p.items()}, {k: v[0] for k, v in b.items()},
                       x0).unsqueeze(0)
    else:
        train_fwd = vmap(fwd, in_dims=(0, 0, 0), randomness="different")

    def predict(index: np.ndarray, tta_shift: int = 0) -> torch.Tensor:
        base.eval()
        with torch.no_grad():
            rows = torch.as_tensor(index, dtype=torch.long, device=device)
            views = [x_dev[rows]] + ([x_flip[rows]] if cfg.tta == "hflip" else [])
            out = average_over_test_views(
                lambda xb: torch.softmax(train_fwd(params, buffers, xb), dim=-1), views,
                tta_shift).cpu()
        base.train()
        return out

    def snapshot(epoch: int) -> dict:
        return {
            "fold_ids": list(fold_ids),
            "epoch": epoch,
            "params": {k: v.detach().cpu().clone() for k, v in params.items()},
            "buffers": {k: v.detach().cpu().clone() for k, v in buffers.items()},
            "optimizer": opt.state_dict(),
            "generators": [g.get_state() for g in gens],
            "stream_bufs": [s.buf.clone() for s in streams],
            "dropout_rng": torch.get_rng_state(),
            **({"dropout_rng_cuda": torch.cuda.get_rng_state(device)}
               if str(device).startswith("cuda") else {}),
        }

    base.train()
    # Mixing weights come from the global generator, like dropout: seeded above and saved in
    # checkpoints, so a run and its resumption draw the same.
    mix = (torch.distributions.Beta(torch.tensor(float(cfg.mixup_alpha)),
                                    torch.tensor(float(cfg.mixup_alpha)))
           if cfg.mixup_alpha > 0 else None)
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        for _ in range(steps):
            idx = torch.stack([s.take(cfg.batch_size) for s in streams])  # (M, B)
            if cfg.augment == "hflip":
                flip = torch.stack([torch.rand(cfg.batch_size, generator=g) < 0.5 for g in gens])
                flip = flip.to(device)
            idx = idx.to(device)
            offsets = None
            if cfg.shift_pixels:
                offsets = torch.stack([
                    torch.randint(-cfg.shift_pixels, cfg.shift_pixels + 1,
                                  (cfg.batch_size, 2), generator=g) for g in gens]).to(device)
            if bank is not None:
                xb = bank.batch(idx, flip if cfg.augment == "hflip" else None, offsets)
            else:
                xb = x_dev[idx]
                if cfg.augment == "hflip":
                    xb = torch.where(flip[:, :, None, None, None], x_flip[idx], xb)
                if offsets is not None:
                    xb = shift_images(xb, offsets, cfg.shift_pixels)
            yb = y_dev[idx]
            mixing = None
            if mix is not None:
                # The batch is a random draw, so its neighbour (a roll by one) is a random
                # partner, with no further draw to make.
                lam = mix.sample(yb.shape).to(device)  # (M, B)
                x_mix = lam.view(*lam.shape, *[1] * (xb.ndim - 2))
                xb = x_mix * xb + (1 - x_mix) * xb.roll(1, dims=1)
                mixing = (lam, yb.roll(1, dims=1))
            loss = class_weighted_loss(train_fwd(params, buffers, xb), yb, class_w, mixing,
                                       cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if on_epoch is not None:
            on_epoch(epoch)
        if eval_hook is not None and (epoch % cfg.eval_every == 0 or epoch == cfg.epochs):
            eval_hook(epoch, predict)
        if checkpoint is not None and checkpoint_every and epoch % checkpoint_every == 0 \
                and epoch < cfg.epochs:
            checkpoint(snapshot(epoch))

    trained = []
    for i in range(n_models):
        m = copy.deepcopy(models[i])
        m.load_state_dict({**{k: v[i].detach().cpu() for k, v in params.items()},
                           **{k: v[i].detach().cpu() for k, v in buffers.items()}})
        trained.append(m.eval())
    return trained, snapshot(cfg.epochs)


# CPU training of the networks that declare it keeps freed heap memory in the process
# (training.allocator: the same results, without a page fault per activation page per step;
# keeps_freed_memory); the speed benchmark turns it off to measure what it gains.
KEEP_FREED_MEMORY = True

# The largest input bank (below) built for a training run; larger ones (big images with random
# shifts: 2 x 25 copies of the data set) fall back to augmenting each batch as it is drawn.
INPUT_BANK_MAX_BYTES = 512 * 2**20


class _InputBank:
    """Every training input the augmentation can produce, built once: the network inputs of
    the maps and of their mirror image, each translated by every offset of the random shift,
    as rows of one tensor, built once per ``train_models`` call. A batch is then one
    ``index_select`` of whole rows instead of a gather, a select and a padded gather per step.
    The rows are the same copies of the same values, so training is bitwise unchanged (tested
    against the per-batch path)."""

    def __init__(self, rows: torch.Tensor, n_samples: int, max_shift: int) -> None:
        self.rows = rows
        self.n_samples = n_samples
        self.max_shift = max_shift

    @classmethod
    def build(cls, x: torch.Tensor, x_flip: torch.Tensor | None, max_shift: int,
              channels_last: bool) -> "_InputBank | None":
        """None when the bank would exceed ``INPUT_BANK_MAX_BYTES`` or the inputs are not
        (N, C, H, W) images."""
        if x.ndim != 4:
            return None
        views = [x] if x_flip is None else [x, x_flip]
        n_offsets = (2 * max_shift + 1) ** 2
        if len(views) * n_offsets * x.numel() * x.element_size() > INPUT_BANK_MAX_BYTES:
            return None
        parts = []
        for view in views:  # row order: (flip, dy, dx, sample)
            parts.extend(translations(view, max_shift))
        rows = torch.cat(parts)
        if channels_last:
            rows = rows.contiguous(memory_format=torch.channels_last)
        return cls(rows, x.shape[0], max_shift)

    def batch(self, idx: torch.Tensor, flip: torch.Tensor | None,
              offsets: torch.Tensor | None) -> torch.Tensor:
        """The inputs of samples ``idx`` (M, B), mirrored where ``flip`` (M, B) and translated
        by ``offsets`` (M, B, 2) (either None: not drawn), as (M, B, C, H, W)."""
        k = self.max_shift
        rows = idx
        if offsets is not None:
            offset_row = (offsets[..., 0] + k) * (2 * k + 1) + (offsets[..., 1] + k)
            rows = rows + offset_row * self.n_samples
        if flip is not None:
            rows = rows + flip.long() * ((2 * k + 1) ** 2 * self.n_samples)
        out = self.rows.index_select(0, rows.flatten())
        return out.view(*idx.shape, *self.rows.shape[1:])


def shift_images(x: torch.Tensor, offsets: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Translate each image of ``x`` (..., C, H, W) by its own integer (dy, dx) of ``offsets``
    (..., 2), |dy|, |dx| <= max_shift: out[..., i, j] = x[..., i - dy, j - dx], where indices
    outside the image are clamped to its edge (the edge row or column repeated)."""
    c, h, w = x.shape[-3:]
    flat = x.reshape(-1, c, h, w)
    off = offsets.reshape(-1, 2).to(torch.long)
    if off.shape[0] != flat.shape[0]:
        raise ValueError(f"{off.shape[0]} offsets for {flat.shape[0]} images")
    if off.numel() and int(off.abs().max()) > max_shift:
        raise ValueError(f"an offset exceeds max_shift={max_shift}")
    padded = F.pad(flat, (max_shift,) * 4, mode="replicate")
    n = torch.arange(flat.shape[0], device=x.device)
    rows = max_shift - off[:, 0:1] + torch.arange(h, device=x.device)  # (N, H)
    cols = max_shift - off[:, 1:2] + torch.arange(w, device=x.device)  # (N, W)
    # Advanced indices around the channel slice put their dimensions first: (N, H, W, C).
    out = padded[n[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).reshape(x.shape)


def class_weighted_loss(logits: torch.Tensor, y: torch.Tensor, class_w: torch.Tensor,
                        mixing: tuple[torch.Tensor, torch.Tensor] | None = None,
                        label_smoothing: float = 0.0) -> torch.Tensor:
    """The training loss, summed over models so each model's gradient is its own loss's: per
    model, the class-weighted mean of the cross-entropy over its batch (PyTorch's weighted-CE
    convention). With ``mixing = (lam, y_partner)`` (mixup) each sample's loss is
    lam * CE(y) + (1 - lam) * CE(y_partner), each part weighted by its class's weight, and
    normalised by the sum of those weights. With ``label_smoothing`` eps each CE is taken
    against the smoothed target (1 - eps) * one-hot + eps / C; the weights stay those of the
    labels. logits (M, B, C); y, y_partner (M, B) int; lam (M, B); class_w (M, C)."""
    rows = torch.arange(logits.shape[0], device=logits.device).unsqueeze(1)
    flat = logits.flatten(0, 1)
    w = class_w[rows, y]  # (M, B)
    ce = F.cross_entropy(flat, y.flatten(), reduction="none",
                         label_smoothing=label_smoothing).view_as(w)
    if mixing is None:
        return ((ce * w).sum(1) / w.sum(1)).sum()
    lam, y_partner = mixing
    ce_b = F.cross_entropy(flat, y_partner.flatten(), reduction="none",
                           label_smoothing=label_smoothing).view_as(w)
    w_a, w_b = lam * w, (1 - lam) * class_w[rows, y_partner]
    return ((w_a * ce + w_b * ce_b).sum(1) / (w_a + w_b).sum(1)).sum()


def _rows(landmarks: np.ndarray | None, index) -> np.ndarray | None:
    """The landmarks of some samples (None stays None)."""
    return None if landmarks is None else landmarks[index]


def _atomic_write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def run_loso(
    data: Megc3DB,
    cfg: LosoConfig,
    run_dir: str | Path,
    *,
    folds: list[int] | None = None,
    chunk_size: int = 68,
    device: str = "cpu",
    checkpoint_every: int = 25,
    results_path: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
    invocation: dict | None = None,
    workers: int = 1,
    outer_epochs: str = "all",
) -> dict:
    """Run (or resume) LOSO over ``data``'s subjects and return the results dict.

    folds: indices into ``data.subject_list`` to run (default: all; a subset gives a partial,
    clearly marked result). chunk_size: folds trained together. workers: CPU worker processes
    that share the folds (and their nested epoch selection), each with
    ``torch.get_num_threads() // workers`` threads; they print their own progress. The results
    are also written to ``run_dir/results.json`` and, if given, ``results_path``.
    outer_epochs: "all" (the outer models train the whole schedule) or "chosen" (a nested run's
    outer models stop at their fold's chosen epoch; the module docstring says what is lost).
    """
    say = progress or (lambda msg: log.info(msg))
    run_dir = Path(run_dir)
    subjects = data.subject_list
    all_folds = list(range(len(subjects)))
    folds = all_folds if folds is None else sorted(set(int(f) for f in folds))
    bad = [f for f in folds if f < 0 or f >= len(subjects)]
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (f", ... ({len(bad)} in all)" if len(bad) > 5 else "")
        raise ValueError(f"fold index(es) {shown} outside 0..{len(subjects) - 1}: the dataset has "
                         f"{len(subjects)} folds, one per subject")
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    if workers < 1:
        raise ValueError("workers must be >= 1")
    if outer_epochs not in OUTER_EPOCHS:
        raise ValueError(f"outer_epochs {outer_epochs!r} is not one of {', '.join(OUTER_EPOCHS)}")
    if outer_epochs == "chosen" and cfg.select_epochs != "nested":
        raise ValueError("outer models can stop at their chosen epoch only when the epochs are "
                         "chosen (select_epochs nested)")
    if workers > 1 and not str(device).startswith("cpu"):
        raise ValueError("worker processes are for CPU runs; on a GPU the folds of a chunk "
                         "already train at once (use --chunk-size)")

    # Checked before the run directory records the configuration, so a fixed command reruns.
    _check_training_sets(data, folds)
    check_model(data, cfg)
    config_doc = {"config": cfg.to_dict(), "n_samples": len(data), "subjects": subjects,
                  "format": RESULTS_FORMAT,
                  # recorded only when not the default, so older run directories still resume;
                  # folds trained to their chosen epoch cannot serve a run that needs them all
                  **({"outer_epochs": outer_epochs} if outer_epochs != "all" else {})}
    run_dir.mkdir(parents=True, exist_ok=True)  # only now: bad input leaves no directory behind
    cfg_path = run_dir / "config.json"
    if cfg_path.exists():
        old = json.loads(cfg_path.read_text())
        if isinstance(old.get("config"), dict):
            # A run directory written before a schedule field existed holds that field's
            # default implicitly: it resumes under the code that added it.
            try:
                old["config"] = LosoConfig.from_dict(old["config"]).to_dict()
            except (TypeError, ValueError):
                pass  # unreadable: reported as a different configuration below
        if old != config_doc:
            raise ValueError(
                f"{run_dir} holds a run with a different configuration or data "
                f"({cfg_path}); use a new --run-dir or delete it"
            )
    else:
        _atomic_write_json(cfg_path, config_doc)

    pending = [f for f in folds if not (run_dir / f"fold_{f:02d}.json").exists()]
    _remove_finished_checkpoints(run_dir, say)
    if len(pending) < len(folds):
        say(f"resuming: {len(folds) - len(pending)} of {len(folds)} folds already done")
    t0 = time.perf_counter()
    try:
        nested = None
        if workers > 1:
            _run_workers(data, cfg, run_dir, folds, pending, workers=workers,
                         chunk_size=chunk_size, device=device,
                         checkpoint_every=checkpoint_every, say=say, outer_epochs=outer_epochs)
        else:
            if outer_epochs == "chosen":  # the outer models need their folds' choices
                nested = select_epochs_nested(data, cfg, run_dir, folds, chunk_size=chunk_size,
                                              device=device, progress=say)
            _train_outer_folds(data, cfg, run_dir, pending, chunk_size=chunk_size,
                               device=device, checkpoint_every=checkpoint_every, say=say,
                               stop_at=None if nested is None else nested["chosen"])
        if cfg.select_epochs == "nested" and nested is None:
            nested = select_epochs_nested(data, cfg, run_dir, folds, chunk_size=chunk_size,
                                          device=device, progress=say)
    finally:
        # Wall-clock time of all training sessions of this run directory (an interrupted
        # session counts too: its time was spent).
        _add_elapsed(run_dir, time.perf_counter() - t0)
    info = {"device": str(device), "chunk_size": chunk_size, "workers": workers,
            **(invocation or {})}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name()
    return _collect(data, cfg, run_dir, folds, results_path, info, nested, outer_epochs)


def _remove_finished_checkpoints(run_dir: Path, say: Callable[[str], None]) -> None:
    """Delete checkpoints whose folds all have their fold files: a run interrupted between
    writing a chunk's fold files and deleting its checkpoint strands it (nothing would ever
    read it again, and a large network's checkpoint is tens of MB)."""
    for ckpt in sorted(run_dir.glob("chunk_*.pt")):
        try:
            fold_ids = torch.load(ckpt, map_location="cpu", weights_only=True)["fold_ids"]
        except Exception:  # unreadable: its chunk, if still pending, says so and restarts
            continue
        if all((run_dir / f"fold_{int(f):02d}.json").exists() for f in fold_ids):
            ckpt.unlink(missing_ok=True)
            say(f"removed {ckpt.name}: its folds are finished")


def _check_training_sets(data: Megc3DB, folds: list[int]) -> None:
    """Refuse, before any training, a fold whose training subjects lack a class."""
    subjects = data.subject_list
    for f in folds:
        counts = np.bincount(data.y[data.subjects != subjects[f]], minlength=len(CLASS_NAMES))
        if (counts == 0).any():
            missing = [CLASS_NAMES[c] for c in np.flatnonzero(counts == 0)]
            raise DatasetError(
                f"fold {f} ({subjects[f]}): the training set has no sample of class(es) "
                f"{missing}; a model cannot learn a class it never sees"
            )


def build_network(name: str, kwargs: dict) -> torch.nn.Module:
    """``create_model`` for a user's choice: ValueError, with the message, for an unknown name
    or options the network does not take."""
    try:
        return create_model(name, **kwargs)
    except KeyError as exc:
        raise ValueError(exc.args[0]) from None
    except (TypeError, ValueError) as exc:
        raise ValueError(f"network {name!r} does not take the options {kwargs}: {exc}") from None


def check_model(data: Megc3DB, cfg: LosoConfig) -> None:
    """Build the network and run it on two samples, so that a network name, options or input
    kind that do not fit fail here, before any training (and not inside a worker)."""
    if cfg.input_kind in LANDMARK_KINDS and data.landmarks is None:
        raise DatasetError(f"input kind {cfg.input_kind!r} locates facial regions, but "
                           f"{data.root} has no landmarks5.csv")
    model = build_network(cfg.model, cfg.model_kwargs).eval()
    try:
        with torch.no_grad():
            out = model(model_inputs(data.x[:2], cfg, _rows(data.landmarks, slice(0, 2))))
    except (TypeError, RuntimeError, ValueError) as exc:
        raise ValueError(f"network {cfg.model!r} with options {cfg.model_kwargs} does not "
                         f"accept input kind {cfg.input_kind!r} (size {cfg.input_size}): "
                         f"{type(exc).__name__}: {exc}") from None
    if tuple(out.shape) != (2, len(CLASS_NAMES)):
        raise ValueError(f"network {cfg.model!r} gives outputs of shape {tuple(out.shape)[1:]}, "
                         f"not ({len(CLASS_NAMES)},)")


def _add_elapsed(run_dir: Path, seconds: float) -> None:
    path = run_dir / "elapsed.json"
    doc = json.loads(path.read_text()) if path.exists() else {"wall_s": 0.0, "sessions": 0}
    doc["wall_s"] += seconds
    doc["sessions"] += 1
    _atomic_write_json(path, doc)


def _elapsed(run_dir: Path) -> float | None:
    path = run_dir / "elapsed.json"
    return float(json.loads(path.read_text())["wall_s"]) if path.exists() else None


def _run_workers(data: Megc3DB, cfg: LosoConfig, run_dir: Path, folds: list[int],
                 pending: list[int], *, workers: int, chunk_size: int, device: str,
                 checkpoint_every: int, say: Callable[[str], None],
                 outer_epochs: str = "all") -> None:
    """Share the folds round robin among ``workers`` spawned processes. Each trains its
    pending outer folds, then (nested) selects its folds' epochs (the other way round with
    ``outer_epochs="chosen"``); everything lands in the run directory as per-fold files, so the
    parent only collects, and a rerun resumes."""
    import multiprocessing

    nested_todo = (_nested_todo(run_dir, folds) if cfg.select_epochs == "nested" else [])
    threads = max(1, torch.get_num_threads() // workers)
    shares = []
    for w in range(workers):
        mine = set(folds[w::workers])
        outer = [f for f in pending if f in mine]
        inner = [f for f in nested_todo if f in mine]
        if outer or inner:
            shares.append((outer, inner))
    if not shares:
        return
    ctx = multiprocessing.get_context("spawn")  # fork after torch init is unsafe
    procs = [ctx.Process(target=_worker_main, name=f"loso-worker-{i}",
                         args=(i, data, cfg, str(run_dir), outer, inner, chunk_size, device,
                               checkpoint_every, threads, outer_epochs))
             for i, (outer, inner) in enumerate(shares)]
    say(f"{len(procs)} worker processes, {threads} torch thread(s) each")
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join()
    except BaseException:
        for p in procs:
            p.terminate()
        for p in procs:
            p.join()
        raise
    failed = [p.name for p in procs if p.exitcode != 0]
    if failed:
        raise LosoWorkerError(f"{', '.join(failed)} failed (the error is printed above); the "
                           f"folds finished so far are kept in {run_dir}: rerun the same "
                           "command to resume")


def _worker_main(worker: int, data: Megc3DB, cfg: LosoConfig, run_dir: str, outer: list[int],
                 inner: list[int], chunk_size: int, device: str, checkpoint_every: int,
                 threads: int, outer_epochs: str = "all") -> None:
    import sys

    torch.set_num_threads(threads)

    def say(msg: str) -> None:
        print(f"[worker {worker}] {msg}", flush=True)

    try:
        if outer_epochs == "chosen":
            # The outer models need their folds' choices: this worker's share is made first
            # (its folds already chosen are only read back).
            chosen = select_epochs_nested(data, cfg, Path(run_dir), sorted({*outer, *inner}),
                                          chunk_size=chunk_size, device=device,
                                          progress=say)["chosen"]
            _train_outer_folds(data, cfg, Path(run_dir), outer, chunk_size=chunk_size,
                               device=device, checkpoint_every=checkpoint_every, say=say,
                               stop_at=chosen)
        else:
            _train_outer_folds(data, cfg, Path(run_dir), outer, chunk_size=chunk_size,
                               device=device, checkpoint_every=checkpoint_every, say=say)
            if inner:
                select_epochs_nested(data, cfg, Path(run_dir), inner, chunk_size=chunk_size,
                                     device=device, progress=say)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # the parent reports which worker failed and how to resume
        say(f"error: {type(exc).__name__}: {exc}")
        raise


def _train_outer_folds(data: Megc3DB, cfg: LosoConfig, run_dir: Path, pending: list[int], *,
                       chunk_size: int, device: str, checkpoint_every: int,
                       say: Callable[[str], None],
                       stop_at: dict[str, int] | None = None) -> None:
    """Train and score the outer folds ``pending`` (``chunk_size`` at a time), writing
    ``fold_XX.json`` for each and resuming a chunk from its checkpoint. ``stop_at``: each
    fold's chosen epoch (``select_epochs_nested(...)["chosen"]``) for outer models that stop
    there (``outer_epochs="chosen"``): a chunk trains to its folds' largest, and each fold is
    scored at its own."""
    subjects = data.subject_list
    test_idx = {f: np.flatnonzero(data.subjects == subjects[f]) for f in pending}
    fold_file = lambda f: run_dir / f"fold_{f:02d}.json"  # noqa: E731
    session_t0 = time.perf_counter()

    for c0 in range(0, len(pending), chunk_size):
        chunk = pending[c0:c0 + chunk_size]
        chunk_cfg = (dataclasses.replace(cfg, epochs=max(stop_at[str(f)] for f in chunk))
                     if stop_at else cfg)
        ckpt_path = run_dir / f"chunk_{chunk[0]:02d}_{chunk[-1]:02d}.pt"
        state = None
        if ckpt_path.exists():
            try:
                state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
            except Exception as exc:  # a damaged checkpoint costs its chunk, not the run
                say(f"folds {chunk[0]}..{chunk[-1]}: checkpoint {ckpt_path.name} is unreadable "
                    f"({type(exc).__name__}); training the chunk from the start")
                state = {}
            if state.get("fold_ids") != chunk:
                state = None
            else:
                say(f"folds {chunk[0]}..{chunk[-1]}: resuming from epoch {state['epoch']}")
        history: dict[int, list] = {f: [] for f in chunk}
        if state is not None:
            history = {int(k): v for k, v in json.loads(state.pop("history_json")).items()}
        timing = {"t0": time.perf_counter(),
                  "prior_s": float(state["elapsed_s"]) if state is not None else 0.0}

        # Each model sees only its own test subject, padded to a common length (cheap: the
        # leaky bookkeeping must not cost as much as training).
        width = max(len(test_idx[f]) for f in chunk)
        padded = np.stack([np.resize(test_idx[f], width) for f in chunk])

        def eval_hook(epoch: int, predict) -> None:
            probs = predict(padded, cfg.tta_shift)  # (M, T, C); test subjects only
            for j, f in enumerate(chunk):
                p = probs[j, :len(test_idx[f])]
                history[f].append({"epoch": epoch,
                                   "pred": p.argmax(-1).tolist(),
                                   "probs": np.round(p.numpy(), 6).tolist(),
                                   "correct": int((p.argmax(-1).numpy()
                                                   == data.y[test_idx[f]]).sum())})

        def save(snap: dict) -> None:
            snap["history_json"] = json.dumps(history)
            snap["elapsed_s"] = timing["prior_s"] + time.perf_counter() - timing["t0"]
            tmp = ckpt_path.with_suffix(".tmp")
            torch.save(snap, tmp)
            os.replace(tmp, ckpt_path)

        def on_epoch(epoch: int) -> None:
            last = chunk_cfg.epochs
            if epoch == 1 or epoch % max(1, cfg.epochs // 10) == 0 or epoch == last:
                el = timing["prior_s"] + time.perf_counter() - timing["t0"]
                say(f"folds {chunk[0]}..{chunk[-1]} ({len(chunk)}): epoch {epoch}/{last}"
                    f"  {el:.0f} s")

        train_sets = [np.setdiff1d(np.arange(len(data)), test_idx[f]) for f in chunk]
        models, _ = train_models(
            data.x, data.y, train_sets, chunk_cfg, chunk, device=device, eval_hook=eval_hook,
            state=state, checkpoint=save, checkpoint_every=checkpoint_every, on_epoch=on_epoch,
            landmarks=data.landmarks,
        )
        elapsed = timing["prior_s"] + time.perf_counter() - timing["t0"]
        for f, m in zip(chunk, models):
            if stop_at:
                # scored at its own chosen epoch (a chunk trains to its folds' largest)
                entry = next(h for h in history[f] if h["epoch"] == stop_at[str(f)])
                p = np.asarray(entry["probs"], dtype=np.float32)
            else:
                p = predict_probs(m, data.x[test_idx[f]], cfg,
                                  _rows(data.landmarks, test_idx[f]))
            _atomic_write_json(fold_file(f), {
                "fold": f, "subject": subjects[f], "indices": test_idx[f].tolist(),
                "probs": p.tolist(), "pred": p.argmax(-1).tolist(),
                "history": history[f],
                "chunk": [chunk[0], chunk[-1]], "chunk_wall_s": elapsed,
                "trained_epochs": chunk_cfg.epochs,
            })
            acc = float((p.argmax(-1) == data.y[test_idx[f]]).mean())
            say(f"fold {f:2d} {subjects[f]:<16} n={len(test_idx[f]):2d} acc={acc:.2f}")
        ckpt_path.unlink(missing_ok=True)
        done = c0 + len(chunk)
        say(f"{done}/{len(pending)} folds done"
            + _time_left(time.perf_counter() - session_t0, done, len(pending)))


def _time_left(spent_s: float, done: int, total: int) -> str:
    """", about N min left" at this session's pace so far (nothing once all are done)."""
    if done <= 0 or done >= total:
        return ""
    left = spent_s / done * (total - done)
    if left < 90:
        return f", about {left:.0f} s left"
    return (f", about {left / 60:.0f} min left" if left < 5400
            else f", about {left / 3600:.1f} h left")


def _inner_groups(train_subjects: list[str], k: int) -> list[list[str]]:
    # Round robin over the subjects in dataset order (one database after another), so the
    # split is deterministic and every inner group holds subjects of every database.
    return [train_subjects[g::k] for g in range(k)]


# The rule, in words, written beside every choice it makes (results files, manifests).
NESTED_RULE = ("inner subject-wise CV over the training subjects only: {k} groups by round "
               "robin over the subjects in dataset order; one model per group trained on the "
               "other groups with the same schedule (seed id 10000 + {k} * key + group), "
               "evaluated every eval_every epochs; the candidate epoch with the best pooled "
               "inner UF1 (all groups' validation predictions pooled) is chosen, the earliest "
               "on ties")


def _inner_jobs(data: Megc3DB, cfg: LosoConfig, key: int,
                exclude: list[str]) -> list[tuple[int, int, np.ndarray, np.ndarray]]:
    """(key, inner group, train idx, val idx) for the inner CV over every subject not in
    ``exclude`` (the outer test subject; nothing for training on all data)."""
    rest = [s for s in data.subject_list if s not in exclude]
    if len(rest) < cfg.inner_folds:
        raise ValueError(f"{len(rest)} training subjects cannot form {cfg.inner_folds} "
                         "inner groups (--inner-folds)")
    jobs = []
    for g, group in enumerate(_inner_groups(rest, cfg.inner_folds)):
        val = np.flatnonzero(np.isin(data.subjects, group))
        train = np.flatnonzero(~np.isin(data.subjects, group + list(exclude)))
        jobs.append((key, g, train, val))
    return jobs


def _inner_file(run_dir: Path, key: int, group: int) -> Path:
    return Path(run_dir) / f"inner_{key:02d}_{group}.json"


def _drop_inner_files(run_dir: Path, key: int, k: int) -> None:
    """The inner-model files of one fold, once its choice is in ``nested_XX.json``."""
    for g in range(k):
        _inner_file(run_dir, key, g).unlink(missing_ok=True)


def _save_inner(path: Path, val_probs: dict[int, np.ndarray],
                test_probs: dict[int, np.ndarray] | None, wall_s: float) -> None:
    # float32 values written as exact doubles (no rounding), so a resumed selection averages
    # and chooses exactly as an uninterrupted one does.
    _atomic_write_json(path, {
        "val_probs": {str(e): p.tolist() for e, p in val_probs.items()},
        "test_probs": (None if test_probs is None else
                       {str(e): p.tolist() for e, p in test_probs.items()}),
        "wall_s": wall_s})


def _load_inner(path: Path
                ) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray] | None, float] | None:
    try:
        doc = json.loads(path.read_text())
        # (Files of runs before validation probabilities were kept lack "val_probs": that
        # model is trained again, like a damaged one.)
        probs = {int(e): np.asarray(p, dtype=np.float32) for e, p in doc["val_probs"].items()}
        tp = doc["test_probs"]
        return probs, (None if tp is None else
                       {int(e): np.asarray(p, dtype=np.float32) for e, p in tp.items()}), \
            float(doc.get("wall_s", 0.0))
    except (OSError, ValueError, KeyError, TypeError):  # damaged: that model is retrained
        return None


def _train_inner(data: Megc3DB, cfg: LosoConfig, jobs: list, *, chunk_size: int,
                 device: str, say: Callable[[str], None],
                 test_of: dict[int, np.ndarray] | None = None,
                 cache_dir: Path | None = None) -> tuple[dict, dict, dict]:
    """Train every inner model (vectorised, ``chunk_size`` at a time). Returns
    {(key, group): {epoch: (n_val, C) validation probabilities}}, for the keys in ``test_of`` (outer
    fold -> its test indices) {(key, group): {epoch: test probabilities}} (the inner models
    also predict the outer test subject, for the CV ensemble; never used to choose), and
    {(key, group): training seconds} (its chunk's time shared among the chunk's models).

    With ``cache_dir``, each inner model's predictions are saved there
    (``inner_KK_G.json``) as soon as its chunk is trained, and models found there are not
    trained again: an interrupted selection loses at most the chunk in progress."""
    test_of = test_of or {}
    preds: dict[tuple[int, int], dict[int, np.ndarray]] = {}
    test_probs: dict[tuple[int, int], dict[int, np.ndarray]] = {}
    walls: dict[tuple[int, int], float] = {}
    if cache_dir is not None:
        todo = []
        for job in jobs:
            cached = _load_inner(_inner_file(cache_dir, job[0], job[1]))
            if cached is None or (job[0] in test_of) != (cached[1] is not None):
                todo.append(job)
                continue
            preds[(job[0], job[1])] = cached[0]
            walls[(job[0], job[1])] = cached[2]
            if cached[1] is not None:
                test_probs[(job[0], job[1])] = cached[1]
        if len(todo) < len(jobs):
            say(f"nested selection: {len(jobs) - len(todo)} of {len(jobs)} inner models "
                "already trained")
        jobs = todo
    t0 = time.perf_counter()
    for c0 in range(0, len(jobs), chunk_size):
        chunk = jobs[c0:c0 + chunk_size]
        chunk_t0 = time.perf_counter()
        rows = [np.concatenate([j[3], test_of.get(j[0], np.empty(0, np.int64))]) for j in chunk]
        width = max(len(r) for r in rows)
        padded = np.stack([np.resize(r, width) for r in rows])

        # The test subjects' rows again on their own, when they get the test-time translations
        # (the validation rows, which the choices are made on, never do). The joint call above
        # stays as it is, so a run without translations keeps its floats; a model of the chunk
        # without a test subject is given one of its validation rows, whose result is unused.
        test_padded = None
        if cfg.tta_shift and any(j[0] in test_of for j in chunk):
            test_rows = [test_of.get(j[0], j[3][:1]) for j in chunk]
            test_width = max(len(r) for r in test_rows)
            test_padded = np.stack([np.resize(r, test_width) for r in test_rows])

        def hook(epoch: int, predict, chunk=chunk, padded=padded,
                 test_padded=test_padded) -> None:
            probs = predict(padded)
            test_part = None if test_padded is None else predict(test_padded, cfg.tta_shift)
            for m, (f, g, _, val) in enumerate(chunk):
                preds.setdefault((f, g), {})[epoch] = probs[m, :len(val)].numpy()
                if f in test_of:
                    n_test = len(test_of[f])
                    test_probs.setdefault((f, g), {})[epoch] = (
                        probs[m, len(val):len(val) + n_test] if test_part is None
                        else test_part[m, :n_test]).numpy()

        # Seeds distinct from the outer folds' (which use 0..67) and the full model's (68).
        ids = [10_000 + f * cfg.inner_folds + g for f, g, _, _ in chunk]
        train_models(data.x, data.y, [j[2] for j in chunk], cfg, ids, device=device,
                     eval_hook=hook, landmarks=data.landmarks)
        per_model_s = (time.perf_counter() - chunk_t0) / len(chunk)
        for f, g, _, _ in chunk:
            walls[(f, g)] = per_model_s
            if cache_dir is not None:
                _save_inner(_inner_file(cache_dir, f, g), preds[(f, g)],
                            test_probs.get((f, g)), walls[(f, g)])
        say(f"nested selection: {min(c0 + chunk_size, len(jobs))}/{len(jobs)} inner models "
            f"trained  {time.perf_counter() - t0:.0f} s")
    return preds, test_probs, walls


def _choose(data: Megc3DB, jobs: list, preds: dict, key: int) -> tuple[list[int], list, list]:
    """Candidate epochs, pooled inner (UF1, UAR) per candidate, and the index of the chosen
    one (first maximum of UF1: the earliest epoch on ties)."""
    from training.metrics import uf1_uar

    kjobs = [j for j in jobs if j[0] == key]
    yv = np.concatenate([data.y[j[3]] for j in kjobs])
    epochs = sorted(preds[(key, kjobs[0][1])])
    scores = []
    for e in epochs:
        pv = np.concatenate([preds[(key, j[1])][e] for j in kjobs]).argmax(-1)
        scores.append(uf1_uar(yv, pv))
    best = int(np.argmax([s[0] for s in scores]))
    return epochs, scores, best


def _nested_file(run_dir: Path, fold: int) -> Path:
    return Path(run_dir) / f"nested_{fold:02d}.json"


def _nested_todo(run_dir: Path, folds: list[int]) -> list[int]:
    """Folds whose nested epoch choice is not yet in the run directory."""
    legacy = Path(run_dir) / "nested_epochs.json"  # one file for all folds (older runs)
    done = set(json.loads(legacy.read_text())["chosen"]) if legacy.exists() else set()
    return [f for f in folds if str(f) not in done and not _nested_file(run_dir, f).exists()]


def select_epochs_nested(data: Megc3DB, cfg: LosoConfig, run_dir: Path, folds: list[int], *,
                         chunk_size: int = 68, device: str = "cpu",
                         progress: Callable[[str], None] | None = None) -> dict:
    """For each outer fold, the evaluation epoch with the best pooled UF1 of an inner
    subject-wise CV over the fold's training subjects (earliest on ties). Uses only training
    subjects' labels. Each inner model's predictions are kept in ``run_dir`` as soon as it is
    trained, and each fold's choice in ``run_dir/nested_XX.json``, so an interrupted
    selection resumes from the last trained inner model."""
    say = progress or log.info
    run_dir = Path(run_dir)
    subjects = data.subject_list
    todo = _nested_todo(run_dir, folds)
    # Inner files of this call's folds whose choice is already written were left by an
    # interruption just after it (other folds' may belong to another worker, still running).
    for f in set(folds) - set(todo):
        _drop_inner_files(run_dir, f, cfg.inner_folds)
    select_t0 = time.perf_counter()
    # Folds in groups whose inner models make about one vectorised chunk.
    group = max(1, chunk_size // cfg.inner_folds)
    for g0 in range(0, len(todo), group):
        part = todo[g0:g0 + group]
        jobs = []  # (outer fold, inner group, train idx, val idx)
        for f in part:
            jobs += _inner_jobs(data, cfg, f, [subjects[f]])
        test_of = {f: np.flatnonzero(data.subjects == subjects[f]) for f in part}
        preds, test_probs, train_s = _train_inner(data, cfg, jobs, chunk_size=chunk_size,
                                                device=device, say=say, test_of=test_of,
                                                cache_dir=run_dir)
        for f in part:
            epochs, scores, best = _choose(data, jobs, preds, f)
            # The inner models' mean prediction of the test subject at the chosen epoch
            # (the chosen epoch only: other epochs would invite a leaky choice).
            inner_mean = np.mean([test_probs[(f, g)][epochs[best]]
                                  for g in range(cfg.inner_folds)], axis=0)
            # The inner models' validation probabilities at the chosen epoch (each training
            # subject predicted once, by the inner model that did not see it), for decision
            # rules chosen on training subjects only (training/calibrate.py).
            fold_jobs = [j for j in jobs if j[0] == f]
            _atomic_write_json(_nested_file(run_dir, f), {
                "fold": f, "chosen": epochs[best], "epochs": epochs,
                "inner_uf1": [round(s[0], 4) for s in scores],
                # training time of its inner models, a resumed session's earlier part included
                "wall_s": sum(train_s[(f, g)] for g in range(cfg.inner_folds)),
                "test_indices": test_of[f].tolist(),
                "inner_test_probs_mean": np.round(inner_mean, 6).tolist(),
                "inner_val_indices": np.concatenate([j[3] for j in fold_jobs]).tolist(),
                "inner_val_probs": np.round(np.concatenate(
                    [preds[(f, j[1])][epochs[best]] for j in fold_jobs]), 6).tolist()})
            _drop_inner_files(run_dir, f, cfg.inner_folds)
        done = min(g0 + group, len(todo))
        say(f"nested selection: epochs chosen for {done}/{len(todo)} folds"
            + _time_left(time.perf_counter() - select_t0, done, len(todo)))
    legacy = run_dir / "nested_epochs.json"
    old = json.loads(legacy.read_text()) if legacy.exists() else None
    chosen, curves, walls, epochs, inner_probs = {}, {}, [], None, {}
    for f in folds:
        if old is not None and str(f) in old["chosen"]:
            chosen[str(f)] = old["chosen"][str(f)]
            curves[str(f)] = old["inner_uf1_curves"][str(f)]
            epochs = old["epochs"]
            continue
        rec = json.loads(_nested_file(run_dir, f).read_text())
        chosen[str(f)], curves[str(f)], epochs = rec["chosen"], rec["inner_uf1"], rec["epochs"]
        walls.append(rec["wall_s"])
        if "inner_test_probs_mean" in rec:
            inner_probs[str(f)] = rec["inner_test_probs_mean"]
    wall = float(sum(walls)) + (float(old["wall_s"]) if old is not None else 0.0)
    return {"chosen": chosen, "inner_uf1_curves": curves, "epochs": epochs,
            "inner_folds": cfg.inner_folds, "wall_s": wall,
            # complete only when every fold has it (runs older than the CV ensemble lack it)
            "inner_test_probs_mean": inner_probs if len(inner_probs) == len(folds) else None}


def select_epochs_full(data: Megc3DB, cfg: LosoConfig, *, chunk_size: int = 68,
                       device: str = "cpu",
                       progress: Callable[[str], None] | None = None) -> dict:
    """The nested rule applied to the whole data set, for the model trained on all of it.

    Exactly the inner CV of :func:`select_epochs_nested`, with no subject held out: the same
    round-robin grouping (over all subjects), the same schedule, candidates and criterion.
    The inner models' seed key is ``len(subjects)``, the seed id of the full model itself
    (an outer fold f uses key f), so the seeds follow the same rule and collide with no
    LOSO model. Returns the selection record that goes into the manifest."""
    say = progress or log.info
    subjects = data.subject_list
    key = len(subjects)
    jobs = _inner_jobs(data, cfg, key, [])
    t0 = time.perf_counter()
    preds, _, _ = _train_inner(data, cfg, jobs, chunk_size=chunk_size, device=device, say=say)
    epochs, scores, best = _choose(data, jobs, preds, key)
    return {
        "rule": NESTED_RULE.format(k=cfg.inner_folds),
        "inner_folds": cfg.inner_folds,
        "inner_groups": _inner_groups(subjects, cfg.inner_folds),
        "inner_seed_ids": [10_000 + key * cfg.inner_folds + g for g in range(cfg.inner_folds)],
        "candidate_epochs": epochs,
        "inner_uf1": [round(float(s[0]), 6) for s in scores],
        "inner_uar": [round(float(s[1]), 6) for s in scores],
        "chosen_epochs": int(epochs[best]),
        "wall_s": round(time.perf_counter() - t0, 1),
        # Every sample's validation probabilities at the chosen epoch, for a decision rule
        # chosen on them (training/calibrate.py); not a manifest field (export removes it).
        "inner_val": (np.concatenate([j[3] for j in jobs]),
                      np.concatenate([preds[(key, j[1])][epochs[best]] for j in jobs])),
    }


def _ensemble_block(probs: np.ndarray, y_true: list, dbs: np.ndarray, k: int) -> dict:
    return {
        "description": (f"honest: per fold, the mean probability of the outer model and the "
                        f"{k} inner models of its nested selection, all at the chosen epoch "
                        "(no test label used)"),
        "n_models": k + 1,
        **pooled_scores(y_true, probs.argmax(-1), dbs),
        "probs": np.round(probs, 6).tolist(),
    }


def _collect(data: Megc3DB, cfg: LosoConfig, run_dir: Path, folds: list[int],
             results_path, info: dict, nested: dict | None = None,
             outer_epochs: str = "all") -> dict:
    # Outer models stopped at their chosen epochs have no later epochs: no fixed-schedule or
    # LEAKY best-epoch figure (the LEAKY one would be a maximum over fewer epochs).
    whole_schedule = outer_epochs == "all"
    subjects = data.subject_list
    y_true, y_pred, idx_all, probs_all = [], [], [], []
    leaky_pred, leaky_epochs, wall = [], {}, {}
    final_pred, ensemble_probs = [], []
    for f in folds:
        doc = json.loads((run_dir / f"fold_{f:02d}.json").read_text())
        idx = doc["indices"]
        idx_all += idx
        final_pred += doc["pred"]
        if nested is not None:
            entry = next(h for h in doc["history"] if h["epoch"] == nested["chosen"][str(f)])
            y_pred += entry["pred"]
            probs_all += entry["probs"]
            if nested.get("inner_test_probs_mean") is not None:
                # CV ensemble: the outer model and the k inner models, equal weights.
                k = nested["inner_folds"]
                ens = (np.asarray(entry["probs"])
                       + k * np.asarray(nested["inner_test_probs_mean"][str(f)])) / (k + 1)
                ensemble_probs.append(ens)
        else:
            y_pred += doc["pred"]
            probs_all += doc["probs"]
        y_true += data.y[idx].tolist()
        # Leaky: the evaluation epoch with the most correct test predictions (earliest on ties).
        best = max(doc["history"], key=lambda h: (h["correct"], -h["epoch"]))
        leaky_pred += best["pred"]
        leaky_epochs[subjects[f]] = best["epoch"]
        wall[tuple(doc["chunk"])] = doc["chunk_wall_s"]
    dbs = data.databases[idx_all]
    honest = evaluate(y_true, y_pred)
    leaky = evaluate(y_true, leaky_pred) if whole_schedule else None
    results = {
        "format": RESULTS_FORMAT,
        "protocol": ("LOSO, predictions of all folds pooled, scored once; epochs: "
                     + ("fixed" if nested is None else
                        "per fold by nested subject-wise CV on its training subjects only")),
        "complete": len(folds) == len(subjects),
        "folds_run": len(folds),
        "config": cfg.to_dict(),
        "dataset": {"name": "MEGC2019 3DB composite", "root": data.root, "n_samples": len(data),
                    "n_subjects": len(subjects), "class_counts": list(data.class_counts()),
                    "class_names": list(CLASS_NAMES)},
        "environment": {"torch": torch.__version__, "numpy": np.__version__,
                        "git_commit": git_commit(), "threads": torch.get_num_threads(),
                        "cpu": host_cpu(),
                        **info},
        "wall_time_s": float(sum(wall.values())),
        # Wall clock of the whole run (outer folds, nested selection, worker processes
        # running side by side), summed over the sessions of a resumed run.
        "total_wall_time_s": _elapsed(run_dir),
        "uf1": honest["uf1"],
        "uar": honest["uar"],
        "accuracy": honest["accuracy"],
        "confusion_matrix": honest["confusion_matrix"],
        "per_class": honest["per_class"],
        "per_database": {db: {k: v for k, v in r.items() if k != "per_class"}
                         for db, r in per_database(y_true, y_pred, dbs).items()},
        **({} if nested is None else {"nested_selection": {
            "chosen_epochs": {subjects[int(f)]: e for f, e in nested["chosen"].items()},
            "median_epochs": float(np.median(list(nested["chosen"].values()))),
            "inner_folds": nested["inner_folds"], "wall_s": nested["wall_s"],
            "inner_uf1_curves": {subjects[int(f)]: c
                                 for f, c in nested["inner_uf1_curves"].items()},
            "candidate_epochs": nested["epochs"],
            **({"fixed_final_epoch_same_run": {
                k: evaluate(y_true, final_pred)[k] for k in ("uf1", "uar", "accuracy")}}
               if whole_schedule else {}),
        }}),
        **({} if len(ensemble_probs) != len(folds) or not folds else {
            "nested_cv_ensemble": _ensemble_block(np.concatenate(ensemble_probs), y_true, dbs,
                                                  nested["inner_folds"])}),
        **({"leaky_best_epoch": {
            "WARNING": "LEAKY, paper-comparable only: each test subject's epoch was chosen by "
                       "looking at that subject's labels. Not an estimate of performance.",
            "eval_every": cfg.eval_every,
            "uf1": leaky["uf1"], "uar": leaky["uar"], "accuracy": leaky["accuracy"],
            "confusion_matrix": leaky["confusion_matrix"],
            "per_database": {db: {"uf1": r["uf1"], "uar": r["uar"]}
                             for db, r in per_database(y_true, leaky_pred, dbs).items()},
            "best_epoch_per_subject": leaky_epochs,
        }} if whole_schedule else {"outer_epochs": {
            "rule": "chosen: each outer model trained only to its fold's chosen epoch",
            "not_measured": "the LEAKY best-epoch and the fixed-schedule figures (they need "
                            "the epochs after the chosen one); the honest scores are those of "
                            "a run to the schedule's end",
        }}),
        "predictions": [
            {"index": int(i), "file": os.path.basename(str(data.files[i])),
             "subject": str(data.subjects[i]), "database": str(data.databases[i]),
             "label": int(data.y[i]), "pred": int(p), "probs": [round(float(v), 6) for v in pr]}
            for i, p, pr in zip(idx_all, y_pred, probs_all)
        ],
    }
    _atomic_write_json(run_dir / "results.json", results)
    if results_path is not None:
        Path(results_path).parent.mkdir(parents=True, exist_ok=True)
        _atomic_write_json(Path(results_path), results)
    return results
