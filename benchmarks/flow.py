"""TV-L1 optical flow: pairs per second and end-point error, OpenCV (CPU) vs our TorchTVL1.

    python benchmarks/flow.py [--sizes 128 224] [--batches 1 16 64] [--devices cpu cuda]
                              [--repeats 3] [--out experiments/results/flow_bench.json]

Face pairs: real ones from ../shared/media (or $MER_SHARED) when present (CASME II consecutive
and distant frames, the calibration onset/apex pair, frames of the real videos), resized to each
size; else smooth random textures shifted by a smooth flow. OpenCV runs pair by pair (its batch
is a loop), so its pairs/s is measured on a few pairs and holds for every batch size. Every time
is the median of ``--repeats`` runs after one warm-up run (compilation, CUDA graph capture).
Error columns: mean end-point error (px) against OpenCV's flow of the same pairs at the same
parameters, and for the fast preset against our own flow at the default setting.

Prints a markdown table and writes the same rows to ``--out`` (JSON) and ``--out`` with ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from realtime_mer.flow import OpenCVTVL1, TVL1Options  # noqa: E402


def shared_media() -> Path | None:
    env = os.environ.get("MER_SHARED")
    for cand in ([Path(env)] if env else []) + [ROOT.parent / "shared"]:
        if (cand / "media").is_dir():
            return cand / "media"
    return None


def _video_frames(path: Path, indices: list[int]) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(path))
    frames, i = {}, 0
    while cap.isOpened() and i <= max(indices):
        ok, frame = cap.read()
        if not ok:
            break
        if i in indices:
            frames[i] = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
        i += 1
    cap.release()
    return [frames[k] for k in indices if k in frames]


def _centre_square(image: np.ndarray) -> np.ndarray:
    h, w = image.shape
    s = min(h, w)
    return image[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]


def real_pairs(media: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """Unresized greyscale (prev, next) pairs of real faces."""
    pairs = []
    cal = media / "calibration"
    pairs.append((cv2.imread(str(cal / "s03_s03_po_11_onset.png"), 0),
                  cv2.imread(str(cal / "s03_s03_po_11_apex.png"), 0)))
    fr = [cv2.imread(str(media / "casme2_frames" / f"{i:03d}.jpg"), 0) for i in range(1, 11)]
    pairs += [(fr[i], fr[i + 1]) for i in range(9)] + [(fr[0], fr[9]), (fr[0], fr[5])]
    for name, idx in (("single_face.mp4", [10, 11, 30, 34]),
                      ("WolfgangLanger_Pexels.mp4", [100, 101, 200, 203])):
        if (media / name).exists():
            f = [_centre_square(x) for x in _video_frames(media / name, idx)]
            pairs += [(f[k], f[k + 1]) for k in range(0, len(f) - 1, 2)]
    return pairs


def synthetic_pairs(n: int = 12, size: int = 256) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    out = []
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    for _ in range(n):
        img = cv2.GaussianBlur(rng.random((size, size)).astype(np.float32) * 255, (0, 0), 3)
        img = cv2.normalize(img, None, 0, 255, cv2.NORM_MINMAX)
        u = 2 * np.sin(xs / 40 + rng.random() * 6).astype(np.float32)
        v = 2 * np.cos(ys / 50 + rng.random() * 6).astype(np.float32)
        nxt = cv2.remap(img, xs - u, ys - v, cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT)
        out.append((img.astype(np.uint8), nxt.astype(np.uint8)))
    return out


def batch_of(pairs, size: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rs = [(cv2.resize(a, (size, size), interpolation=cv2.INTER_AREA),
           cv2.resize(b, (size, size), interpolation=cv2.INTER_AREA)) for a, b in pairs]
    idx = [i % len(rs) for i in range(n)]
    return np.stack([rs[i][0] for i in idx]), np.stack([rs[i][1] for i in idx])


def epe(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(((a - b) ** 2).sum(-1)).mean())


def timed(fn, repeats: int, sync=lambda: None) -> float:
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 224])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--devices", nargs="+", default=None, help="cpu and/or cuda (default: all)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--opencv-pairs", type=int, default=8, help="pairs timed for OpenCV")
    ap.add_argument("--cpu-eager", action="store_true", help="also time CPU eager (slow)")
    ap.add_argument("--half", action="store_true", help="also time CUDA float16")
    ap.add_argument("--fast", action="store_true", help="also time the fast preset")
    ap.add_argument("--ablation", action="store_true",
                    help="CUDA: also time without CUDA graphs, without compile, and with the "
                         "host check every 30 iterations instead of 10")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    import torch

    from realtime_mer.flow.torch_tvl1 import TorchTVL1

    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    media = shared_media()
    pairs = real_pairs(media) if media else synthetic_pairs()
    source = "real face pairs" if media else "synthetic textures"
    opt = TVL1Options()
    machine = {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "opencv": cv2.__version__,
        "torch_threads": torch.get_num_threads(), "opencv_threads": cv2.getNumThreads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "pairs": f"{len(pairs)} {source}",
    }
    print(json.dumps(machine), flush=True)
    rows = []
    ocv = OpenCVTVL1(opt)
    for size in args.sizes:
        prev, nxt = batch_of(pairs, size, max(args.batches))
        n_unique = min(len(pairs), len(prev))
        t0 = time.perf_counter()
        ref = ocv.compute_batch(prev[:n_unique], nxt[:n_unique])
        print(f"size {size}: OpenCV reference flows of {n_unique} pairs in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
        ref_all = ref[np.arange(len(prev)) % n_unique]
        m = min(args.opencv_pairs, n_unique)
        ocv_s = timed(lambda: ocv.compute_batch(prev[:m], nxt[:m]), args.repeats) / m
        ocv_pps = 1.0 / ocv_s
        rows.append(dict(impl="opencv-tvl1", device="cpu", size=size, batch="any",
                         pairs_per_s=ocv_pps, speedup=1.0, epe_vs_opencv=0.0))
        print(f"size {size}: OpenCV {ocv_pps:.2f} pairs/s", flush=True)
        variants = []
        for dev in devices:
            if dev == "cpu":
                variants.append(("torch-tvl1 compiled", dict(device="cpu", compile=True), opt))
                if args.cpu_eager:
                    variants.append(("torch-tvl1 eager", dict(device="cpu", compile=False), opt))
            else:
                variants.append(("torch-tvl1 fp32", dict(device="cuda"), opt))
                if args.half:
                    variants.append(("torch-tvl1 fp16", dict(device="cuda", dtype=torch.float16),
                                     opt))
                if args.ablation:
                    variants += [
                        ("fp32 check every 30", dict(device="cuda", check_every=30), opt),
                        ("fp32 no CUDA graphs", dict(device="cuda", cuda_graphs=False), opt),
                        ("fp32 eager, no graphs",
                         dict(device="cuda", cuda_graphs=False, compile=False), opt),
                    ]
            if args.fast:
                kw = dict(device=dev, compile=True)
                variants.append(("torch-tvl1 fast preset", kw, TVL1Options.fast()))
        full_ours = {}
        for label, kw, o in variants:
            est = TorchTVL1(o, **kw)
            sync = torch.cuda.synchronize if est.device.type == "cuda" else (lambda: None)
            for b in args.batches:
                p, q = prev[:b], nxt[:b]
                t = time.perf_counter()
                out = est.compute_batch(p, q)  # warm-up: compile, graph capture
                warm = time.perf_counter() - t
                s = timed(lambda: est.compute_batch(p, q), args.repeats, sync)
                row = dict(impl=label, device=kw["device"], size=size, batch=b,
                           pairs_per_s=b / s, speedup=(b / s) / ocv_pps,
                           epe_vs_opencv=epe(out, ref_all[:b]), first_call_s=warm)
                if o == opt:
                    full_ours[(kw["device"], b)] = out
                else:
                    base = full_ours.get((kw["device"], b))
                    row["epe_vs_default"] = epe(out, base) if base is not None else None
                rows.append(row)
                print(json.dumps(row), flush=True)
    table = format_table(rows, machine)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
        args.out.with_suffix(".md").write_text(table + "\n")
    return 0


def format_table(rows, machine) -> str:
    head = ("| impl | device | size | batch | pairs/s | × OpenCV | EPE vs OpenCV (px) | "
            "EPE vs default (px) | first call (s) |\n|---|---|---|---|---|---|---|---|---|")
    lines = [f"Machine: {machine['processor']}, {machine['cpu_count']} CPUs"
             f"{', ' + machine['cuda'] if machine['cuda'] else ''}; torch {machine['torch']}, "
             f"OpenCV {machine['opencv']}; {machine['pairs']}.", "", head]
    for r in rows:
        evd = r.get("epe_vs_default")
        first = r.get("first_call_s")
        lines.append(
            f"| {r['impl']} | {r['device']} | {r['size']} | {r['batch']} | "
            f"{r['pairs_per_s']:.1f} | {r['speedup']:.1f} | {r['epe_vs_opencv']:.4f} | "
            f"{'' if evd is None else f'{evd:.4f}'} | "
            f"{'' if first is None else f'{first:.1f}'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
