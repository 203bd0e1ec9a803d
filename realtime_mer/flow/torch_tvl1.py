"""Batched TV-L1 optical flow in PyTorch (CPU or CUDA), at parity with OpenCV's
``cv2.optflow.DualTVL1OpticalFlow``.

The algorithm is the duality-based TV-L1 of Zach, Pock and Bischof (2007), in the form of
Sánchez, Meinhardt-Llopis and Facciolo (IPOL 2013) that OpenCV follows, with OpenCV's choices
reproduced so that the two agree to a fraction of a pixel:

* pyramid: each level is the previous one resized by ``scale_step`` with bilinear interpolation
  (pixel-centre convention, replicated border, no pre-blur); building stops before a level whose
  side would be under 16 px, so small images get fewer levels instead of an error;
* per level: ``p`` (the dual variable) starts at zero; ``warps`` times, ``I1`` and its centred
  gradient are warped by the current flow with bicubic interpolation (Keys a = -0.75, map
  coordinates rounded to 1/32 px as ``cv2.remap`` does, zero outside the image), then up to
  ``outer_iterations`` × ``inner_iterations`` iterations run, a 5×5 (``median_filtering``) median
  of the flow starting each outer iteration, until the squared change of the flow summed over the
  level falls under ``epsilon² · H · W`` (checked after every iteration, per pair);
* the flow goes to the next finer level by bilinear resize, multiplied by ``1 / scale_step``.

Every pair of a batch keeps its own stopping point: a pair that has converged is frozen on the
device (a mask), so a batch gives the same flows as the pairs one by one. The host looks at the
masks only every ``check_every`` iterations (one synchronisation there) to leave the loop once
every pair has stopped; see ``docs/BENCHMARKS.md`` ("Optical flow") for the measured cost.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from realtime_mer.flow.base import TVL1Options

log = logging.getLogger(__name__)

__all__ = ["TorchTVL1", "tvl1_flow", "strain_tensor"]

_FLT_EPSILON = float(np.finfo(np.float32).eps)
_MIN_LEVEL_SIDE = 16  # OpenCV stops adding pyramid levels below this side length
_MAP_SUBPIXELS = 32  # cv2.remap quantises map coordinates to 1/32 px (INTER_TAB_SIZE)
_CPU_BATCH = 4  # pairs iterated together on CPU (see TorchTVL1's cpu_batch)


# ----------------------------------------------------------------------------------------------
# building blocks (all on (N, H, W) or (N, C, H, W) tensors)
# ----------------------------------------------------------------------------------------------

def _linear_axis(n_in: int, n_out: int, scale: float, device) -> tuple:
    """Source indices and weights of a 1-D bilinear resize, OpenCV's convention: pixel centres
    map as ``src = (dst + 0.5) * scale - 0.5``, clamped to the edge (replicate)."""
    dst = torch.arange(n_out, dtype=torch.float64, device=device)
    src = (dst + 0.5) * scale - 0.5
    i0 = torch.floor(src)
    w = src - i0
    w = torch.where(i0 < 0, torch.zeros_like(w), w)
    i0 = i0.clamp(min=0)
    w = torch.where(i0 >= n_in - 1, torch.zeros_like(w), w)
    i0 = i0.clamp(max=n_in - 1).long()
    i1 = (i0 + 1).clamp(max=n_in - 1)
    return i0, i1, w


def resize_linear(x: torch.Tensor, size: tuple[int, int], scale: tuple[float, float]) -> torch.Tensor:
    """Bilinear resize of (..., H, W) to ``size`` with source/destination ``scale`` (y, x), as
    ``cv2.resize(..., interpolation=INTER_LINEAR)`` does for float images."""
    h_in, w_in = x.shape[-2:]
    h_out, w_out = size
    y0, y1, wy = _linear_axis(h_in, h_out, scale[0], x.device)
    x0, x1, wx = _linear_axis(w_in, w_out, scale[1], x.device)
    wy = wy.to(x.dtype)[:, None]
    wx = wx.to(x.dtype)
    rows = x[..., y0, :] * (1 - wy) + x[..., y1, :] * wy
    return rows[..., x0] * (1 - wx) + rows[..., x1] * wx


def centered_gradient(img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centred differences of (N, H, W); at the border half the one-sided difference (what
    replicating the edge and taking the centred difference gives, as OpenCV's TV-L1 does)."""
    pad = F.pad(img[:, None], (1, 1, 1, 1), mode="replicate")[:, 0]
    gx = 0.5 * (pad[:, 1:-1, 2:] - pad[:, 1:-1, :-2])
    gy = 0.5 * (pad[:, 2:, 1:-1] - pad[:, :-2, 1:-1])
    return gx, gy


def _odd_even_merge_sort(n: int) -> list[tuple[int, int]]:
    """Comparators (i, j), i < j, of Batcher's odd-even merge sort of n = 2^m wires."""
    pairs = []
    p = 1
    while p < n:
        k = p
        while k >= 1:
            for j in range(k % p, n - k, 2 * k):
                for i in range(min(k, n - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return pairs


def _median_network(m: int) -> tuple[list[tuple[str, tuple, tuple]], tuple]:
    """A min/max program that returns the median of m (odd) inputs: a sorting network padded
    with -inf/+inf wires to a power of two, constants folded away, and only the operations the
    middle output depends on kept (212 min/max for m = 25, 30 for m = 9). Elementwise min/max
    over shifted views is what lets the median fuse into one kernel on GPU and CPU alike."""
    n = 1 << (m - 1).bit_length()
    lo = (n - m) // 2
    wires: list = [("in", i) for i in range(m)] + ["lo"] * lo + ["hi"] * (n - m - lo)
    nodes: list = []
    for i, j in _odd_even_merge_sort(n):
        a, b = wires[i], wires[j]
        if a == "lo" or b == "hi":
            continue
        if a == "hi" or b == "lo":
            wires[i], wires[j] = b, a
            continue
        nodes.append(("min", a, b))
        nodes.append(("max", a, b))
        wires[i], wires[j] = ("node", len(nodes) - 2), ("node", len(nodes) - 1)
    out = wires[lo + m // 2]
    needed: set = set()
    stack = [out]
    while stack:
        w = stack.pop()
        if w[0] == "node" and w[1] not in needed:
            needed.add(w[1])
            stack += [nodes[w[1]][1], nodes[w[1]][2]]
    program = [(k, op, a, b) for k, (op, a, b) in enumerate(nodes) if k in needed]
    return program, out


_MEDIAN_PROGRAMS = {k: _median_network(k * k) for k in (3, 5)}


def median_filter(x: torch.Tensor, k: int) -> torch.Tensor:
    """k×k (3 or 5) median of (N, H, W) with the edge replicated, as ``cv2.medianBlur``."""
    r = k // 2
    pad = F.pad(x[:, None], (r, r, r, r), mode="replicate")[:, 0]
    h, w = x.shape[-2:]
    taps = [pad[:, dy:dy + h, dx:dx + w] for dy in range(k) for dx in range(k)]
    program, out = _MEDIAN_PROGRAMS[k]
    values: dict = {}

    def get(wire):
        return taps[wire[1]] if wire[0] == "in" else values[wire[1]]

    for key, op, a, b in program:
        lhs, rhs = get(a), get(b)
        # where(a < b) rather than minimum/maximum: no NaN propagation to honour (inputs are
        # finite), so the compiled CPU kernel vectorises to compare + blend
        less = lhs < rhs
        values[key] = torch.where(less, lhs, rhs) if op == "min" else torch.where(less, rhs, lhs)
    return get(out)


def median_filter_sort(x: torch.Tensor, k: int) -> torch.Tensor:
    """Same result as :func:`median_filter` by sorting each k×k patch; faster in eager mode (one
    sort instead of hundreds of separate elementwise kernels), slower once compiled."""
    r = k // 2
    pad = F.pad(x[:, None], (r, r, r, r), mode="replicate")
    n, h, w = x.shape
    patches = F.unfold(pad, k).transpose(1, 2).contiguous()  # (N, H*W, k*k)
    return patches.median(dim=-1).values.view(n, h, w)


def _cubic_weights(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Keys cubic convolution weights (a = -0.75, OpenCV's and PyTorch's) of the four taps at
    offsets -1, 0, 1, 2 for a fractional position t in [0, 1)."""
    a = -0.75
    w0 = ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a
    w1 = ((a + 2) * t - (a + 3)) * t * t + 1
    s = 1 - t
    w2 = ((a + 2) * s - (a + 3)) * s * s + 1
    return w0, w1, w2, 1 - w0 - w1 - w2


def warp_bicubic(stack: torch.Tensor, u1: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
    """Sample (N, C, H, W) at ``(x + u1, y + u2)`` with bicubic interpolation (a = -0.75), zero
    outside the image, coordinates rounded to 1/32 px like ``cv2.remap(..., INTER_CUBIC)``.
    Sixteen gathers shared by the C channels; pure tensor code, so it compiles to one kernel."""
    n, c, h, w = stack.shape
    xs = torch.arange(w, device=stack.device, dtype=torch.float32)
    ys = torch.arange(h, device=stack.device, dtype=torch.float32)[:, None]
    qx = torch.round((xs + u1.float()) * _MAP_SUBPIXELS)
    qy = torch.round((ys + u2.float()) * _MAP_SUBPIXELS)
    x0 = torch.floor(qx / _MAP_SUBPIXELS)
    y0 = torch.floor(qy / _MAP_SUBPIXELS)
    wx = _cubic_weights((qx - x0 * _MAP_SUBPIXELS) / _MAP_SUBPIXELS)
    wy = _cubic_weights((qy - y0 * _MAP_SUBPIXELS) / _MAP_SUBPIXELS)
    x0 = x0.long()
    y0 = y0.long()
    flat = stack.reshape(n, c, h * w)
    out = torch.zeros_like(stack)
    for j in range(4):
        yy = y0 + (j - 1)
        inside_y = (yy >= 0) & (yy < h)
        row_base = yy.clamp(0, h - 1) * w
        row = torch.zeros_like(stack)
        for i in range(4):
            xx = x0 + (i - 1)
            inside = inside_y & (xx >= 0) & (xx < w)
            idx = (row_base + xx.clamp(0, w - 1)).reshape(n, 1, h * w).expand(n, c, h * w)
            tap = torch.gather(flat, 2, idx).view(n, c, h, w)
            row = row + torch.where(inside[:, None], tap, 0.0) * wx[i][:, None]
        out = out + row * wy[j][:, None]
    return out


def _shift_prev(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x[i-1] along ``dim`` with a zero before the first element."""
    if dim == -1:
        return F.pad(x[..., :-1], (1, 0))
    return F.pad(x[..., :-1, :], (0, 0, 1, 0))


def _forward_diff(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x[i+1] - x[i] along ``dim``, zero at the last element."""
    if dim == -1:
        return F.pad(x[..., 1:] - x[..., :-1], (0, 1))
    return F.pad(x[..., 1:, :] - x[..., :-1, :], (0, 0, 0, 1))


def tvl1_step(u1, u2, p11, p12, p21, p22, i1wx, i1wy, grad, rho_c, active,
              l_t: float, theta: float, taut: float, stop_error: float):
    """One inner iteration for the whole batch: thresholding (v), flow update (u), dual update
    (p). Pairs whose ``active`` flag is off keep their state. Returns the new state and flags.
    Pure tensor code so that ``torch.compile`` can fuse it into a few kernels."""
    rho = rho_c + i1wx * u1 + i1wy * u2
    lg = l_t * grad
    safe = torch.where(grad > _FLT_EPSILON, grad, torch.ones_like(grad))
    fi = torch.where(rho < -lg, l_t,
                     torch.where(rho > lg, -l_t,
                                 torch.where(grad > _FLT_EPSILON, -rho / safe, 0.0)))
    div1 = p11 - _shift_prev(p11, -1) + p12 - _shift_prev(p12, -2)
    div2 = p21 - _shift_prev(p21, -1) + p22 - _shift_prev(p22, -2)
    nu1 = u1 + fi * i1wx + theta * div1
    nu2 = u2 + fi * i1wy + theta * div2
    err = ((nu1 - u1).float().square() + (nu2 - u2).float().square()).sum(dim=(1, 2))
    u1x, u1y = _forward_diff(nu1, -1), _forward_diff(nu1, -2)
    u2x, u2y = _forward_diff(nu2, -1), _forward_diff(nu2, -2)
    ng1 = 1.0 + taut * torch.sqrt(u1x * u1x + u1y * u1y)
    ng2 = 1.0 + taut * torch.sqrt(u2x * u2x + u2y * u2y)
    a = active[:, None, None]
    u1 = torch.where(a, nu1, u1)
    u2 = torch.where(a, nu2, u2)
    p11 = torch.where(a, (p11 + taut * u1x) / ng1, p11)
    p12 = torch.where(a, (p12 + taut * u1y) / ng1, p12)
    p21 = torch.where(a, (p21 + taut * u2x) / ng2, p21)
    p22 = torch.where(a, (p22 + taut * u2y) / ng2, p22)
    active = active & (err > stop_error)
    return u1, u2, p11, p12, p21, p22, active


def tvl1_steps(step, median_fn, k: int, median: int, u1, u2, p11, p12, p21, p22, i1wx, i1wy,
               grad, rho_c, active, l_t: float, theta: float, taut: float, stop_error: float):
    """``k`` inner iterations (``step`` = :func:`tvl1_step` or its compiled form); if ``median``
    > 1, first a median filter (``median_fn``) of the flow of the pairs still iterating."""
    if median > 1:
        a = active[:, None, None]
        u1 = torch.where(a, median_fn(u1, median), u1)
        u2 = torch.where(a, median_fn(u2, median), u2)
    for _ in range(k):
        u1, u2, p11, p12, p21, p22, active = step(
            u1, u2, p11, p12, p21, p22, i1wx, i1wy, grad, rho_c, active,
            l_t, theta, taut, stop_error)
    return u1, u2, p11, p12, p21, p22, active


def pyramid_sizes(h: int, w: int, nscales: int, scale_step: float) -> list[tuple[int, int]]:
    """Level sizes, finest first, as OpenCV computes them (each from the previous one, rounded),
    stopping before a level with a side under 16 px."""
    sizes = [(h, w)]
    for _ in range(1, max(1, nscales)):
        ph, pw = sizes[-1]
        nh, nw = int(round(ph * scale_step)), int(round(pw * scale_step))
        if nh < _MIN_LEVEL_SIDE or nw < _MIN_LEVEL_SIDE:
            break
        sizes.append((nh, nw))
    return sizes


def strain_tensor(flow: torch.Tensor) -> torch.Tensor:
    """Optical strain magnitude of a batch of flows, on the flow's device.

    flow: (N, 2, H, W) pixels (channel 0 = u, 1 = v), H, W >= 2. Returns (N, H, W):
    |ε| = sqrt(u_x² + v_y² + ½ (u_y + v_x)²), central differences, one-sided at the border
    (the same numbers as :func:`realtime_mer.flow.optical_strain`).
    """
    if flow.ndim != 4 or flow.shape[1] != 2:
        raise ValueError(f"flow must be (N, 2, H, W); got {tuple(flow.shape)}")
    if flow.shape[2] < 2 or flow.shape[3] < 2:
        raise ValueError(f"flow must be at least 2×2 for derivatives; got {tuple(flow.shape)}")
    f = flow.float()
    u_y, u_x = torch.gradient(f[:, 0], dim=(1, 2))
    v_y, v_x = torch.gradient(f[:, 1], dim=(1, 2))
    return torch.sqrt(u_x**2 + v_y**2 + 0.5 * (u_y + v_x) ** 2)


# ----------------------------------------------------------------------------------------------
# the estimator
# ----------------------------------------------------------------------------------------------

@dataclass
class _RunStats:
    """Iterations actually run per level (max over the batch), for benchmarks and tests."""

    iterations: list


def compile_cache_dir() -> Path:
    """Where torch.compile keeps this flow's kernels between runs: ``$MER_CACHE_DIR/inductor``,
    else ``$XDG_CACHE_HOME/realtime-mer/inductor`` (``~/.cache/...``)."""
    base = os.environ.get("MER_CACHE_DIR")
    if base:
        return Path(base) / "inductor"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "realtime-mer" \
        / "inductor"


def _keep_compiled_kernels() -> None:
    """Point torch's compile cache at :func:`compile_cache_dir` unless the user chose one:
    torch's default lives in /tmp, which a reboot empties, and the first compile costs minutes
    on a small CPU (a run that finds the cache warms up in seconds; docs/BENCHMARKS.md)."""
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        folder = compile_cache_dir()
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)


def _resolve_device(device) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but torch.cuda.is_available() is False")
    return dev


class TorchTVL1:
    """Batched TV-L1 optical flow in PyTorch, the same algorithm and parameters as
    ``cv2.optflow.DualTVL1OpticalFlow`` (see the module docstring for what is reproduced).

    Parameters
    ----------
    options: :class:`TVL1Options` (OpenCV's names and defaults). ``gamma`` must be 0 and
        ``use_initial_flow`` False (the only settings implemented).
    device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or a torch device.
    dtype: ``torch.float32`` (default) or, on CUDA, ``torch.float16`` / ``torch.bfloat16`` for the
        iteration state (half the memory traffic; error measured in ``docs/BENCHMARKS.md``). The
        pyramid, warping and output stay float32.
    compile: fuse the inner iteration, the median and the warp with ``torch.compile``
        (``dynamic=True``: one compile serves every level and batch size of 2 or more; batch 1
        compiles once more). Default on, CPU and CUDA: it is what makes ours faster than OpenCV
        on both (docs/BENCHMARKS.md). The first call in a fresh machine compiles for minutes on
        a small CPU; torch caches the result on disk, and a later process starts in ~20 s.
    compact: drop converged pairs from the working batch (default: on for CPU eager only; not
        with CUDA graphs, and off when compiled, see the comment in ``__init__``).
    check_every: the host reads the per-pair "still iterating" flags every this many iterations
        (a device synchronisation); between checks, converged pairs are frozen on the device, so
        the result does not depend on it, only the time does. Default: 1 on CPU eager, 5 on CPU
        compiled (the 5 iterations are one compiled call), ``inner_iterations`` on CUDA. Must
        divide ``inner_iterations`` or be a multiple of it; otherwise it is lowered to a divisor.
    cpu_batch: on CPU, the pairs of a batch go through the pyramid in groups of this many
        (default 4; 0 = all at once): a group's state stays in cache and iterates only as long
        as its own slowest pair. Not used on CUDA.
    cuda_graphs: replay the ``check_every`` iterations as a CUDA graph (CUDA only; default on).

    Input: greyscale images, numpy or torch, uint8 or float (0..255 scale, like OpenCV's 8-bit
    input). Colour images (a trailing channel axis of 3 or 4) are refused with a ``ValueError``,
    as are pairs of different sizes, NaN/inf values and empty batches; convert colour frames with
    ``cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)`` first. Float input is used as it is (not rounded
    to 8 bits as the OpenCV wrapper does).
    Output: flow in pixels, channel 0 = u (+right), 1 = v (+down), ``prev(x) ≈ nxt(x + flow)``.
    """

    name = "torch-tvl1"

    def __init__(self, options: TVL1Options = TVL1Options(), device="auto",
                 dtype: torch.dtype = torch.float32, compile: bool | None = None,
                 check_every: int | None = None, cuda_graphs: bool | None = None,
                 compact: bool | None = None, cpu_batch: int | None = None) -> None:
        if options.gamma != 0.0:
            raise ValueError("TorchTVL1 implements gamma = 0 only (OpenCV's default)")
        if options.use_initial_flow:
            raise ValueError("TorchTVL1 does not implement use_initial_flow")
        if options.median_filtering not in (0, 1, 3, 5):
            raise ValueError("median_filtering must be 0, 1, 3 or 5 (what cv2.medianBlur takes "
                             f"for float images); got {options.median_filtering}")
        if not 0.0 < options.scale_step < 1.0:
            raise ValueError(f"scale_step must be in (0, 1); got {options.scale_step}")
        for field in ("nscales", "warps", "inner_iterations", "outer_iterations"):
            if getattr(options, field) < 1:
                raise ValueError(f"{field} must be >= 1; got {getattr(options, field)}")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be float32, float16 or bfloat16; got {dtype}")
        self.options = options
        self.device = _resolve_device(device)
        self.dtype = dtype
        if dtype != torch.float32 and self.device.type != "cuda":
            raise ValueError("half precision is offered on CUDA only (it is slower on CPU)")
        self.compile = True if compile is None else bool(compile)
        inner = options.inner_iterations
        if check_every is None:
            # a host check is free on CPU (check every iteration, as OpenCV does); on CUDA it is a
            # synchronisation that also ends a CUDA graph replay: once per outer iteration (30)
            # measured 1.3x faster than every 10 on an H100 (docs/BENCHMARKS.md)
            # On CPU compiled, every 5 iterations: one compiled call per 5 iterations (the
            # per-call overhead dominates small levels and small batches; see _ChunkSteps)
            check_every = inner if self.device.type == "cuda" else (5 if self.compile else 1)
        k = max(1, int(check_every))
        if k < inner:
            while inner % k:
                k -= 1
        elif k % inner:
            k = inner
        self.check_every = k
        self.cuda_graphs = (self.device.type == "cuda") if cuda_graphs is None else bool(cuda_graphs)
        if self.cuda_graphs and self.device.type != "cuda":
            self.cuda_graphs = False
        # compaction drops converged pairs from the working batch, so a batch costs the sum of
        # its pairs' iterations rather than N × the slowest; it changes shapes, so not with graphs
        # Not with compile either: the changing batch sizes trip the compiled kernels' shape
        # guards, and past torch's recompile limit the functions fall back to slow eager code.
        self.compact = (not self.cuda_graphs and not self.compile) if compact is None else (
            bool(compact))
        if self.compact and self.cuda_graphs:
            raise ValueError("compact=True and cuda_graphs=True exclude each other")
        if self.compile:
            _keep_compiled_kernels()
            # dynamic=True: one compiled kernel set serves every pyramid level and batch size
            # (per-size specialisation recompiles for each level, minutes on a small CPU).
            self._step = torch.compile(tvl1_step, dynamic=True, fullgraph=True)
            self._median = torch.compile(median_filter, dynamic=True, fullgraph=True)
            self._warp = torch.compile(warp_bicubic, dynamic=True, fullgraph=True)
        else:
            self._warp = warp_bicubic
            self._step = tvl1_step
            self._median = median_filter_sort if self.device.type == "cpu" else median_filter
        # CPU compiled: the ``check_every`` iterations (and the median that may start them) are
        # one compiled function, so a call into compiled code costs one guard check and one set
        # of kernels per chunk instead of per iteration (the per-call overhead dominates the
        # small pyramid levels and batch 1; docs/BENCHMARKS.md)
        self._fused_chunks = self.compile and self.device.type == "cpu"
        self._chunk_fns: dict = {}
        if cpu_batch is None:
            cpu_batch = _CPU_BATCH if self.device.type == "cpu" else 0
        self.cpu_batch = max(0, int(cpu_batch))
        self._graphs: dict = {}
        self.last_stats: _RunStats | None = None

    # -- numpy API (FlowEstimator) -------------------------------------------------------------

    def compute(self, prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
        prev = np.asarray(prev)
        nxt = np.asarray(nxt)
        _check_images(prev, nxt, batched=False)
        return self.compute_batch(prev[None], nxt[None])[0]

    def compute_batch(self, prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
        prev = np.asarray(prev)
        nxt = np.asarray(nxt)
        _check_images(prev, nxt, batched=True)
        p = torch.from_numpy(np.ascontiguousarray(prev, dtype=np.float32))
        n = torch.from_numpy(np.ascontiguousarray(nxt, dtype=np.float32))
        flow = self.flow_tensor(p, n)
        return flow.permute(0, 2, 3, 1).contiguous().cpu().numpy()

    # -- tensor API ---------------------------------------------------------------------------

    def strain_tensor(self, flow: torch.Tensor) -> torch.Tensor:
        """(N, 2, H, W) flow → (N, H, W) strain magnitude, on the flow's device."""
        return strain_tensor(flow)

    @torch.no_grad()
    def flow_tensor(self, prev: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
        """(N, H, W) greyscale 0..255 (any real dtype, any device) → (N, 2, H, W) float32 flow
        on ``self.device``."""
        if not (isinstance(prev, torch.Tensor) and isinstance(nxt, torch.Tensor)):
            raise ValueError("flow_tensor takes torch tensors; use compute_batch for numpy")
        _check_images(prev, nxt, batched=True)
        i0 = prev.to(self.device, torch.float32)
        i1 = nxt.to(self.device, torch.float32)
        if not bool(torch.isfinite(i0).all() & torch.isfinite(i1).all()):
            raise ValueError("images contain NaN or inf values")
        m = self.cpu_batch if self.device.type == "cpu" else 0
        if not m or len(i0) <= m:
            return self._flow(i0, i1)
        # CPU: pairs go through the whole pyramid in groups of ``cpu_batch``: a group's state
        # stays in cache, and a group iterates only as long as its own slowest pair
        flows, stats = [], []
        for start in range(0, len(i0), m):
            stop = min(start + m, len(i0))
            if stop - start == 1 and m > 1:  # no group of 1 (a recompile): take 2
                start -= 1
                flows[-1] = flows[-1][:-1]
            flows.append(self._flow(i0[start:stop], i1[start:stop]))
            stats.append(self.last_stats.iterations)
        self.last_stats = _RunStats(iterations=[
            [max(w) for w in zip(*levels)] for levels in zip(*stats)])
        return torch.cat(flows)

    def _flow(self, i0: torch.Tensor, i1: torch.Tensor) -> torch.Tensor:
        o = self.options
        n, h, w = i0.shape
        sizes = pyramid_sizes(h, w, o.nscales, o.scale_step)
        inv = 1.0 / o.scale_step
        levels = [(i0, i1)]
        for size in sizes[1:]:
            a, b = levels[-1]
            levels.append((resize_linear(a, size, (inv, inv)), resize_linear(b, size, (inv, inv))))
        stats = []
        u1 = u2 = None
        for s in range(len(sizes) - 1, -1, -1):
            a, b = levels[s]
            if u1 is None:
                u1 = torch.zeros_like(a)
                u2 = torch.zeros_like(a)
            else:
                ph, pw = u1.shape[-2:]
                scale = (ph / sizes[s][0], pw / sizes[s][1])
                u1 = resize_linear(u1, sizes[s], scale) * inv
                u2 = resize_linear(u2, sizes[s], scale) * inv
            u1, u2, its = self._one_scale(a, b, u1, u2)
            stats.append(its)
        self.last_stats = _RunStats(iterations=stats[::-1])
        return torch.stack((u1, u2), dim=1).float()

    def _one_scale(self, i0, i1, u1, u2):
        o = self.options
        n, h, w = i0.shape
        dt = self.dtype
        stop_error = o.epsilon * o.epsilon * h * w
        l_t = o.lambda_ * o.theta
        taut = o.tau / o.theta
        i1x, i1y = centered_gradient(i1)
        stack = torch.stack((i1, i1x, i1y), dim=1)
        p = [torch.zeros(n, h, w, device=i0.device, dtype=dt) for _ in range(4)]
        u1 = u1.to(dt)
        u2 = u2.to(dt)
        total = o.inner_iterations * o.outer_iterations
        k = self.check_every
        median = o.median_filtering if o.median_filtering > 1 else 0
        its = []
        full = [u1, u2, *p]  # the level's state for the whole batch
        for _ in range(o.warps):
            u1f, u2f = full[0].float(), full[1].float()
            warped = self._warp(stack, u1f, u2f)
            i1w, i1wx, i1wy = warped[:, 0], warped[:, 1], warped[:, 2]
            grad = i1wx * i1wx + i1wy * i1wy
            rho_c = i1w - i1wx * u1f - i1wy * u2f - i0
            consts = [t.to(dt).contiguous() for t in (i1wx, i1wy, grad, rho_c)]
            active = torch.ones(n, dtype=torch.bool, device=i0.device)
            work = list(full)
            rows = None  # batch rows of ``work`` when compacted, None = all
            done = 0
            while done < total:
                med = median if done % o.inner_iterations == 0 else 0
                u1, u2, *p, active = self._run_steps(
                    k, med, work[0], work[1], work[2:], consts, active, l_t, o.theta, taut,
                    stop_error)
                work = [u1, u2, *p]
                done += k
                n_active = int(active.sum())
                if n_active == 0:
                    break
                if self.compact and n_active < len(active) and len(active) > 2:
                    full = self._write_back(full, work, rows)
                    keep = torch.nonzero(active).squeeze(1)
                    if len(keep) == 1:
                        # never a batch of 1: a compiled kernel would specialise (recompile) for it
                        keep = torch.cat((keep, torch.nonzero(~active)[:1].squeeze(1)))
                    rows = keep if rows is None else rows[keep]
                    work = [t[keep] for t in work]
                    consts = [t[keep] for t in consts]
                    active = active[keep]
            full = self._write_back(full, work, rows)
            its.append(done)
        return full[0].float(), full[1].float(), its

    @staticmethod
    def _write_back(full, work, rows):
        if rows is None:
            return list(work)
        for dst, src in zip(full, work):
            dst[rows] = src
        return full

    def _run_steps(self, k, med, u1, u2, p, consts, active, l_t, theta, taut, stop_error):
        args = (u1, u2, *p, *consts, active)
        if self._fused_chunks:
            fn = self._chunk_fns.get((k, med))
            if fn is None:
                fn = torch.compile(_ChunkSteps(k, med), dynamic=True, fullgraph=True)
                self._chunk_fns[(k, med)] = fn
            return fn(*args, l_t, theta, taut, stop_error)
        if not self.cuda_graphs:
            return tvl1_steps(self._step, self._median, k, med, *args, l_t, theta, taut,
                              stop_error)
        key = (k, med, tuple(u1.shape), l_t, theta, taut, stop_error)
        graph = self._graphs.get(key)
        if graph is None:
            graph = _GraphedSteps(self._step, self._median, k, med, args,
                                  (l_t, theta, taut, stop_error))
            self._graphs[key] = graph
        return graph(args)


class _ChunkSteps:
    """``k`` iterations (after a ``med``×``med`` median if ``med`` > 1) as one function of the
    state, for ``torch.compile`` on CPU: built from the uncompiled blocks, so the whole chunk
    becomes one graph."""

    def __init__(self, k: int, med: int) -> None:
        self.k, self.med = k, med
        self.__name__ = f"tvl1_chunk_{k}_{med}"

    def __call__(self, *args):
        return tvl1_steps(tvl1_step, median_filter, self.k, self.med, *args)


class _GraphedSteps:
    """A CUDA graph of ``k`` iterations for one level size: static input buffers are filled by
    copies, the captured kernels replayed, and the static outputs returned (cloned, since the
    next replay overwrites them)."""

    def __init__(self, step, median_fn, k, med, args, scalars):
        def steps(*a):
            return tvl1_steps(step, median_fn, *a)

        self.static_in = [a.clone() for a in args]
        # warm up on a side stream (compilation, autotuning, allocator) before capturing
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                steps(k, med, *self.static_in, *scalars)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_out = steps(k, med, *self.static_in, *scalars)

    def __call__(self, args):
        for dst, src in zip(self.static_in, args):
            if dst.data_ptr() != src.data_ptr():
                dst.copy_(src)
        self.graph.replay()
        # state flows straight back into the inputs for the next chunk: outputs are copied into
        # the input buffers so the caller's next call finds them already in place
        outs = self.static_out
        for i in range(6):
            self.static_in[i].copy_(outs[i])
        self.static_in[10].copy_(outs[6])
        return tuple(self.static_in[:6]) + (self.static_in[10],)


def _check_images(prev, nxt, batched: bool) -> None:
    """Raise ``ValueError`` for what the flow cannot take: colour, size mismatch, empty."""
    want = 3 if batched else 2
    for name, image in (("prev", prev), ("nxt", nxt)):
        shape = tuple(image.shape)
        if len(shape) == want + 1 and shape[-1] in (3, 4):
            raise ValueError(
                f"{name} looks like a colour image (shape {shape}); TV-L1 takes greyscale. "
                "Convert with cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) first.")
        if len(shape) != want:
            expect = "(N, H, W)" if batched else "(H, W)"
            raise ValueError(f"{name} must be greyscale {expect}; got shape {shape}")
        if batched and shape[0] == 0:
            raise ValueError(f"{name} is an empty batch (shape {shape})")
        if shape[-1] == 0 or shape[-2] == 0:
            raise ValueError(f"{name} is empty (shape {shape})")
        if isinstance(image, np.ndarray):
            if not (np.issubdtype(image.dtype, np.number) or image.dtype == np.bool_):
                raise ValueError(f"{name} must be numeric; got dtype {image.dtype}")
            if np.issubdtype(image.dtype, np.complexfloating):
                raise ValueError(f"{name} must be real; got dtype {image.dtype}")
    if tuple(prev.shape) != tuple(nxt.shape):
        raise ValueError(f"prev and nxt differ in size: {tuple(prev.shape)} vs {tuple(nxt.shape)}")
    if isinstance(prev, np.ndarray):
        for name, image in (("prev", prev), ("nxt", nxt)):
            if np.issubdtype(image.dtype, np.floating) and not np.isfinite(image).all():
                raise ValueError(f"{name} contains NaN or inf values")


def tvl1_flow(prev: torch.Tensor, nxt: torch.Tensor, options: TVL1Options = TVL1Options(),
              device="auto") -> torch.Tensor:
    """Function form: (N, H, W) pair batch → (N, 2, H, W) flow (builds a :class:`TorchTVL1`)."""
    return TorchTVL1(options, device=device, compile=False).flow_tensor(prev, nxt)
