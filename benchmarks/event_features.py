"""Per-event feature maps (onset/apex pair → 28×28×3 map): milliseconds per event with OpenCV's
TV-L1 on the CPU and with the project's PyTorch TV-L1 (one event alone, and events waiting
together as one batch), on real aligned face pairs of the talking-head clips.

    python benchmarks/event_features.py [--devices cpu cuda] [--batches 1 16] [--repeats 5]
                                        [--out experiments/results/event_features.json]

Every time is the median of ``--repeats`` runs after a warm-up (compilation, CUDA graphs). The
maps of each path are compared with OpenCV's (Pearson r per channel, the lowest of a batch).
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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from realtime_mer.capture import open_video  # noqa: E402
from realtime_mer.face import FaceAligner  # noqa: E402
from realtime_mer.features import CALIBRATED_TVL1, FeatureExtractor, FeatureOptions  # noqa: E402


def media_dir() -> Path:
    env = os.environ.get("MER_SHARED")
    return (Path(env) if env else ROOT.parent / "shared") / "media"


def real_pairs(n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Aligned crops 200 ms apart from the talking clips, ``n`` pairs in all."""
    pairs: list[tuple[np.ndarray, np.ndarray]] = []
    clips = sorted((media_dir() / "talking").glob("*.mp4"))
    if not clips:
        raise SystemExit(f"no clips in {media_dir() / 'talking'} (set MER_SHARED)")
    while len(pairs) < n:
        for clip in clips:
            crops = []
            with open_video(clip) as source, FaceAligner() as aligner:
                for frame in source:
                    face = aligner.process(frame.image_bgr, frame.t_ms)
                    if face.found:
                        crops.append(face.crop)
                    if len(crops) >= 3 * 6 + 6:
                        break
            pairs += [(crops[i], crops[i + 6]) for i in range(0, len(crops) - 6, 3)]
            if len(pairs) >= n:
                break
    return pairs[:n]


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def _min_r(maps, reference) -> float:
    return min(float(np.corrcoef(a[..., c].ravel(), b[..., c].ravel())[0, 1])
               for a, b in zip(maps, reference) for c in range(3))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", nargs="*", default=None,
                        help="torch devices for the PyTorch TV-L1 (default: cuda if present; none: OpenCV only)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--opencv-events", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch

    from realtime_mer.flow.torch_tvl1 import TorchTVL1

    devices = args.devices if args.devices is not None else (
        ["cuda"] if torch.cuda.is_available() else [])
    pairs = real_pairs(max(args.batches + [args.opencv_events]))
    cpu = FeatureExtractor(FeatureOptions())
    reference = [cpu.process(o, a) for o, a in pairs]
    rows = [{"path": f"OpenCV TV-L1, CPU ({os.cpu_count()} cores)", "batch": 1,
             "ms_per_event": round(_median_ms(
                 lambda: [cpu.process(o, a) for o, a in pairs[:args.opencv_events]],
                 args.repeats) / args.opencv_events, 2), "min_r": 1.0}]
    for device in devices:
        extractor = FeatureExtractor(FeatureOptions(flow="torch-tvl1"),
                                     TorchTVL1(CALIBRATED_TVL1, device=device))
        for batch in args.batches:
            chunk = pairs[:batch]

            def run():
                maps = extractor.process_batch(chunk) if batch > 1 else \
                    [extractor.process(*chunk[0])]
                if device == "cuda":
                    torch.cuda.synchronize()
                return maps

            ms = _median_ms(run, args.repeats) / batch
            rows.append({"path": f"PyTorch TV-L1, {device}", "batch": batch,
                         "ms_per_event": round(ms, 2),
                         "min_r": round(_min_r(run(), reference[:batch]), 4)})
    base = rows[0]["ms_per_event"]
    lines = ["| path | events together | ms per event | × the CPU path | lowest r vs OpenCV |",
             "|---|---|---|---|---|"]
    for row in rows:
        row["speedup"] = round(base / row["ms_per_event"], 1)
        lines.append(f"| {row['path']} | {row['batch']} | {row['ms_per_event']} | "
                     f"{row['speedup']} | {row['min_r']} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": platform.node(), "rows": rows}, indent=2))
        args.out.with_suffix(".md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
