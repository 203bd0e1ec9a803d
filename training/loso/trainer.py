"""The vectorised trainer: several folds trained together as one stacked ensemble (torch.func),
each with its own weights, optimiser state, batches and augmentation draws."""

from __future__ import annotations

import copy
import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap

from realtime_mer.errors import DatasetError
from realtime_mer.input_kinds import hflip_landmarks, input_kind
from training.data.megc3db import CLASS_NAMES, Megc3DB
from training.allocator import keep_freed_memory
from training.models import create_model
from training.loso.config import LosoConfig
from training.loso.views import average_over_test_views, hflip_maps, model_inputs, shift_images, translations


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
    other_offset: int | None = None,
) -> tuple[list[torch.nn.Module], dict]:
    """Train one model per entry of ``train_sets`` (indices into ``x``), all at once.

    x: (N, 3, H, W) float32 maps in [0, 1]; y: (N,) int; landmarks: (N, 5, 2) or None, for the
    input kinds that locate facial regions (mirrored with the maps by the flip). ``fold_ids``
    seed each model (init, batches, flips, shifts) so a model's run does not depend on the
    others. ``eval_hook(epoch, predict)`` is called every ``cfg.eval_every`` epochs and at the
    end; ``predict(index, tta_shift=0)`` maps an (M, T) index array into ``x`` (row m for model
    m) to (M, T, C) probabilities in eval mode, with the test-time mirror of ``cfg.tta`` and the
    translations of ``tta_shift`` (the callers pass ``cfg.tta_shift`` for test subjects only).
    ``state``/``checkpoint`` resume and save training. ``other_offset``: with
    ``cfg.other_maps_share``, row ``i + other_offset`` of ``x`` is sample ``i`` as the other
    preprocessing makes it, drawn instead of row ``i`` in that share of the draws.
    ``channels_last``: feed a one-model chunk its images in channels-last layout; None
    (default) does so on a CPU for the networks that declare ``channels_last_on_cpu``
    (:func:`trains_channels_last`; the result differs from the default layout by
    floating-point order only). Returns the trained models (eval mode, CPU) and the final state.
    """
    n_models = len(train_sets)
    num_classes = len(CLASS_NAMES)
    if cfg.other_maps_share and other_offset is None:
        raise ValueError("other_maps_share needs the other map set (load both sets)")
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
            if cfg.other_maps_share:
                # the same samples, some as the other preprocessing makes them (drawn only
                # when asked, so a run on one set keeps its random streams)
                other = torch.stack([torch.rand(cfg.batch_size, generator=g)
                                     < cfg.other_maps_share for g in gens])
                idx = idx + other.long() * other_offset
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
    if input_kind(cfg.input_kind).uses_landmarks and data.landmarks is None:
        raise DatasetError(f"input kind {cfg.input_kind!r} locates facial regions, but "
                           f"{data.root} has no landmarks5.csv")
    if data.x.shape[1] != 3 * cfg.phases:
        raise ValueError(f"the schedule feeds {cfg.phases} phase(s) of (u, v, strain) maps, "
                         f"but the data has {data.x.shape[1]} channels")
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
