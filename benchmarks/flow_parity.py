"""`--flow torch-tvl1` against the default OpenCV TV-L1 on real videos: the same events (kind,
onset, apex), the same classes, and how close each event's feature map is (Pearson r per
channel, the lowest over the events) and its class probabilities.

    python benchmarks/flow_parity.py [--videos PATH ...] [--device cpu]

The PyTorch flow is compiled (its kernels come from ~/.cache/realtime-mer/inductor after the
first run). Writes the table into docs/BENCHMARKS.md between its markers.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from realtime_mer.capture import open_video  # noqa: E402
from realtime_mer.pipeline import Pipeline, PipelineOptions  # noqa: E402

DOC = REPO / "docs" / "BENCHMARKS.md"
BEGIN, END = "<!-- flow-parity:begin -->", "<!-- flow-parity:end -->"
MEDIA = REPO.parent / "shared" / "media"


def run(video: Path, flow: str) -> tuple[list, list, float]:
    options = PipelineOptions()
    options = replace(options, features=replace(options.features, flow=flow))
    events, maps = [], []
    with Pipeline(options) as pipeline, open_video(video) as source:
        for frame in source:
            result = pipeline.process(frame)
            events += result.events
            maps += result.feature_maps
        for event, feature_map in pipeline.finish():
            events.append(event)
            maps.append(feature_map)
        features_ms = pipeline.timer.summary().get("features", {}).get("median_ms", 0.0)
    return events, maps, features_ms


def compare(video: Path) -> dict:
    ref_events, ref_maps, ref_ms = run(video, "opencv-tvl1")
    events, maps, ms = run(video, "torch-tvl1")
    same_spots = [(e.kind, e.onset_ms, e.apex_ms) for e in ref_events] == \
        [(e.kind, e.onset_ms, e.apex_ms) for e in events]
    classified = [(a, b, ma, mb) for a, b, ma, mb in zip(ref_events, events, ref_maps, maps)
                  if ma is not None and mb is not None]
    r = [float(np.corrcoef(ma[..., c].ravel(), mb[..., c].ravel())[0, 1])
         for _, _, ma, mb in classified for c in range(3)]
    prob_diff = [max(abs(a.probabilities[k] - b.probabilities[k]) for k in a.probabilities)
                 for a, b, _, _ in classified]
    return {"video": video.name, "events": len(ref_events), "same_events": same_spots,
            "classified": len(classified),
            "same_classes": sum(a.label == b.label for a, b, _, _ in classified),
            "min_r": min(r) if r else float("nan"),
            "max_prob_diff": max(prob_diff) if prob_diff else 0.0,
            "opencv_ms": ref_ms, "torch_ms": ms}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", type=Path, nargs="+", default=[
        MEDIA / "talking" / "d3.mp4", MEDIA / "talking" / "d9.mp4",
        MEDIA / "WolfgangLanger_Pexels.mp4"])
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    rows = [compare(video) for video in args.videos]
    lines = ["| video | events | same events (kind, onset, apex) | same class | lowest map r | "
             "largest probability difference | features ms per event, OpenCV / PyTorch |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['video']} | {row['events']} | "
                     f"{'yes' if row['same_events'] else 'no'} | {row['same_classes']} of "
                     f"{row['classified']} | {row['min_r']:.4f} | {row['max_prob_diff']:.3f} | "
                     f"{row['opencv_ms']:.0f} / {row['torch_ms']:.0f} |")
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        text = DOC.read_text()
        DOC.write_text(re.sub(re.escape(BEGIN) + ".*?" + re.escape(END),
                              f"{BEGIN}\n{table}\n{END}", text, flags=re.S))
    return 0 if all(row["same_events"] for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
