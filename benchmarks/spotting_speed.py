"""Per-frame cost of the face stage and the spotter, this checkout against an earlier revision,
side by side in one run.

    python benchmarks/spotting_speed.py [--baseline REV] [--repeats 5] [--video PATH ...]

The earlier revision is checked out into a temporary git worktree; each repeat runs the same
measurement once in each tree, alternately (a noisy shared machine slows both alike), in a
fresh process: the pipeline over the video (spotting and, where the revision always classifies,
classification in the background), reading the per-frame medians of its "face" and "spotting"
stages. The table gives the median over repeats and the ratio, and is written to
docs/BENCHMARK_SPOTTING_SPEED.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Runs inside either tree: only APIs both revisions have.
_MEASURE = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from realtime_mer.capture import open_video
from realtime_mer.pipeline import Pipeline, PipelineOptions
with open_video(sys.argv[2]) as source, Pipeline(PipelineOptions()) as pipeline:
    for frame in source:
        pipeline.process(frame)
    pipeline.finish()
    summary = pipeline.timer.summary()
print(json.dumps({k: summary[k]["median_ms"] for k in ("face", "spotting")}))
"""


def measure(tree: Path, video: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(tree), str(video)],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(tree)})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default="e40a707",
                        help="the revision to compare with (default: the spotter before the "
                             "per-region rebuild)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--video", type=Path, action="append")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "BENCHMARK_SPOTTING_SPEED.md")
    args = parser.parse_args(argv)
    shared = Path(os.environ.get("MER_SHARED", REPO.parent / "shared"))
    videos = args.video or [shared / "media" / "talking" / "d9.mp4",
                            shared / "media" / "WolfgangLanger_Pexels.mp4"]
    with tempfile.TemporaryDirectory() as tmp:
        baseline = Path(tmp) / "baseline"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(baseline),
                        args.baseline], check=True, capture_output=True)
        try:
            results = {video.name: {"baseline": [], "now": []} for video in videos}
            for repeat in range(args.repeats):
                for video in videos:
                    for name, tree in (("baseline", baseline), ("now", REPO)):
                        results[video.name][name].append(measure(tree, video))
                print(f"repeat {repeat + 1}/{args.repeats} done", file=sys.stderr)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force",
                            str(baseline)], capture_output=True)
    lines = [f"Face stage and spotter per frame (median ms over {args.repeats} alternating "
             f"repeats of each tree's per-frame medians), revision {args.baseline} against this "
             "checkout, measured side by side by `python benchmarks/spotting_speed.py`.", "",
             "| video | stage | baseline (ms) | now (ms) | now / baseline |", "|---|---|---|---|---|"]
    for video, runs in results.items():
        totals = {}
        for stage in ("face", "spotting"):
            old = statistics.median(r[stage] for r in runs["baseline"])
            new = statistics.median(r[stage] for r in runs["now"])
            totals[stage] = (old, new)
            lines.append(f"| {video} | {stage} | {old:.2f} | {new:.2f} | {new / old:.2f} |")
        old = sum(o for o, _ in totals.values())
        new = sum(n for _, n in totals.values())
        lines.append(f"| {video} | **face + spotting** | {old:.2f} | {new:.2f} | "
                     f"**{new / old:.2f}** |")
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.write_text("# Spotting speed\n\n" + table, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
