"""What a network sees: its inputs from the maps, the mirror image, translations, and the test-time
averaging over views."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from realtime_mer.input_kinds import hflip_landmarks, network_inputs
from training.loso.config import LosoConfig


def hflip_maps(x: torch.Tensor) -> torch.Tensor:
    """Mirror (N, 3P, H, W) (u, v, strain) maps in [0, 1] left-right (P phases of the movement,
    each three channels).

    Mirroring the face also reverses horizontal motion, so u must be negated. The published u is
    min-max normalised per map, u' = (u - min)/(max - min); for -u that is (max - u)/(max - min)
    = 1 - u'. v and strain only move with the pixels. A constant u has no range to reverse (no
    motion, all zeros, as in a second phase that never went back) and stays as it is.
    """
    out = torch.flip(x, dims=(-1,)).clone()
    u = out[:, 0::3]
    still = u.amax(dim=(-2, -1), keepdim=True) == u.amin(dim=(-2, -1), keepdim=True)
    out[:, 0::3] = torch.where(still, u, 1.0 - u)
    return out


def normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    """(x - mean) / std per channel; a (u, v, strain) triple applies to each phase's three
    channels."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device)
    if x.ndim == 4 and x.shape[1] != m.numel() and x.shape[1] % m.numel() == 0:
        m, s = m.repeat(x.shape[1] // m.numel()), s.repeat(x.shape[1] // s.numel())
    return (x - m.view(1, -1, 1, 1)) / s.view(1, -1, 1, 1)


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
