"""Training the 3D network on flow clips from a raw-format database.

The published 3DB release holds one 28×28 map per sample, not frame sequences, so the
multi-scale 3D-ResNet50 (input: a 16-frame flow stack) cannot be trained faithfully on it.
Its input is built from raw frame sequences instead (``python -m training preprocess --kinds
stack16``, the live pipeline's flow code), and this module trains it on those clips.

``fit_clips`` is a plain full-data fit (no held-out subject): it shows that the network, its
input builder and the cache work together and that training converges. A LOSO evaluation needs
the licensed databases (not here) and a GPU: one 134×134×16 clip costs about 55 GFLOPs forward.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from training.models import create_model

__all__ = ["fit_clips", "clip_scale"]


def clip_scale(x: np.ndarray) -> np.ndarray:
    """Per-channel scale of (N, C, T, H, W) flow clips: the root mean square of each channel
    over the training clips (flow is signed and centred on zero motion, so no offset)."""
    rms = np.sqrt(np.mean(np.square(x, dtype=np.float64), axis=(0, 2, 3, 4)))
    return np.where(rms > 0, rms, 1.0).astype(np.float32)


def fit_clips(x: np.ndarray, y: np.ndarray, *, model: str = "ms3d_resnet50",
              model_kwargs: dict | None = None, steps: int = 30, batch_size: int = 4,
              lr: float = 1e-4, weight_decay: float = 1e-4, seed: int = 0,
              progress: Callable[[str], None] | None = None) -> dict:
    """Fit ``model`` on clips ``x`` (N, C, T, H, W) with labels ``y`` for ``steps`` Adam steps.

    Loss: the mean cross-entropy over the network's outputs (``forward_heads`` when it has it:
    the 3D network's paper trains each of its four outputs with its own cross-entropy), with
    inverse-frequency class weights. Input scaled per channel by :func:`clip_scale`. Returns
    the per-step losses, the training accuracy before and after (eval mode, after the BatchNorm
    statistics are recomputed at the final weights), the scale and the wall time."""
    say = progress or (lambda msg: None)
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    if x.ndim != 5 or len(x) != len(y) or len(y) == 0:
        raise ValueError(f"expected clips (N, C, T, H, W) and N labels, got {x.shape}, {y.shape}")
    if steps < 1 or batch_size < 1:
        raise ValueError("steps and batch_size must be >= 1")
    torch.manual_seed(seed)
    net = create_model(model, **(model_kwargs or {}))
    scale = clip_scale(x)
    xt = torch.as_tensor(x / scale.reshape(1, -1, 1, 1, 1))
    yt = torch.as_tensor(y)
    classes = int(max(y.max() + 1, 3))
    counts = np.bincount(y, minlength=classes).astype(np.float64)
    weight = torch.as_tensor(np.where(counts > 0, counts.sum() / (classes * np.maximum(counts, 1)),
                                      0.0), dtype=torch.float32)
    heads = getattr(net, "forward_heads", None)
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)

    def accuracy() -> float:
        net.eval()
        with torch.no_grad():
            pred = torch.cat([net(xt[i:i + batch_size]).argmax(1)
                              for i in range(0, len(xt), batch_size)])
        net.train()
        return float((pred == yt).float().mean())

    before = accuracy()
    losses = []
    t0 = time.perf_counter()
    order = torch.empty(0, dtype=torch.long)
    for step in range(1, steps + 1):
        if order.numel() < batch_size:
            order = torch.cat([order, torch.randperm(len(xt), generator=gen)])
        idx, order = order[:batch_size], order[batch_size:]
        outs = heads(xt[idx]) if heads is not None else [net(xt[idx])]
        loss = sum(F.cross_entropy(o, yt[idx], weight=weight) for o in outs) / len(outs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"loss is {losses[-1]} at step {step}")
        if step == 1 or step % max(1, steps // 10) == 0 or step == steps:
            say(f"step {step}/{steps}  loss {losses[-1]:.4f}  {time.perf_counter() - t0:.0f} s")
    # The running BatchNorm statistics trail the weights, badly so over a few steps on a few
    # clips; recompute them over the training clips at the final weights (as after SWA).
    torch.optim.swa_utils.update_bn([xt[i:i + batch_size] for i in range(0, len(xt), batch_size)],
                                    net)
    return {"model": model, "model_kwargs": dict(model_kwargs or {}), "n_clips": len(y),
            "clip_shape": list(x.shape[1:]), "steps": steps, "batch_size": batch_size,
            "lr": lr, "weight_decay": weight_decay, "seed": seed, "scale": scale.tolist(),
            "losses": [round(v, 6) for v in losses], "train_accuracy_before": before,
            "train_accuracy_after": accuracy(), "wall_s": round(time.perf_counter() - t0, 1)}
