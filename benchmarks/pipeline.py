"""Benchmark of `mer analyze` on the real videos: per-stage median and p95 milliseconds and the
overall frames per second, compared with each video's own frame rate.

    python benchmarks/pipeline.py [--repeats 3] [--out docs/BENCHMARK_PIPELINE.md]

Each video is analysed --repeats times in this one run; the table reports the median over
repeats of each stage's per-frame median/p95, and the median throughput. Videos come from
../shared/media (or $MER_SHARED/media).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from realtime_mer.analyze import analyze_video  # noqa: E402
from realtime_mer.runtime import default_engine_path, load_engine  # noqa: E402

VIDEOS = ("WolfgangLanger_Pexels.mp4", "single_face.mp4", "face_noface.mov", "no_face.mp4")
STAGES = ("decode", "face", "buffer", "spotting", "features", "engine")


def shared_media() -> Path:
    root = Path(os.environ.get("MER_SHARED", REPO.parent / "shared"))
    media = root / "media"
    if not media.is_dir():
        sys.exit(f"benchmark needs the real videos in {media} (set MER_SHARED)")
    return media


def machine() -> str:
    try:
        import torch
        threads = torch.get_num_threads()
    except ImportError:
        threads = "?"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"torch threads {threads}, Python {platform.python_version()}")


def run(repeats: int) -> list[dict]:
    media = shared_media()
    engine = load_engine(default_engine_path())
    rows = []
    for name in VIDEOS:
        path = media / name
        runs = []
        for _ in range(repeats):
            with tempfile.TemporaryDirectory() as out:
                result = analyze_video(path, out, engine=engine)
            runs.append(result.summary)
        first = runs[0]
        row = {
            "video": name,
            "size": f"{first['input']['width']}x{first['input']['height']}",
            "video_fps": first["input"]["fps_nominal"],
            "frames": first["frames"]["processed"],
            "with_face": first["frames"]["with_face"],
            "events": first["events"]["total"],
            "fps": statistics.median(r["throughput"]["frames_per_s"] for r in runs),
        }
        row["realtime_x"] = row["fps"] / row["video_fps"] if row["video_fps"] else None
        for stage in STAGES:
            present = [r["timings_ms"][stage] for r in runs if stage in r["timings_ms"]]
            if present:
                row[f"{stage}_median"] = statistics.median(p["median_ms"] for p in present)
                row[f"{stage}_p95"] = statistics.median(p["p95_ms"] for p in present)
                row[f"{stage}_count"] = present[0]["count"]
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    head = ["video", "size", "frames", "face", "events", "fps", "× real time"] + [
        f"{s} med/p95 ms" for s in STAGES]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["video"], r["size"], str(r["frames"]), str(r["with_face"]), str(r["events"]),
                 f"{r['fps']:.1f}", f"{r['realtime_x']:.2f}" if r["realtime_x"] else "-"]
        for s in STAGES:
            cells.append(f"{r[f'{s}_median']:.2f} / {r[f'{s}_p95']:.2f} (n={r[f'{s}_count']})"
                         if f"{s}_median" in r else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="write the table (markdown) here")
    args = parser.parse_args()
    started = time.time()
    rows = run(args.repeats)
    text = table(rows)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            "# Pipeline benchmark (`mer analyze` on the real videos)\n\n"
            f"Machine: {machine()}. Command: `python benchmarks/pipeline.py --repeats "
            f"{args.repeats} --out {args.out}`; {time.strftime('%Y-%m-%d')}, "
            f"{time.time() - started:.0f} s.\n\nPer-stage milliseconds per frame are the median "
            "over repeats of each run's median and 95th percentile (features and engine run "
            "once per event, not per frame); fps is whole-run frames per second including "
            "decoding, × real time is fps over the video's own frame rate.\n\n" + text + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
