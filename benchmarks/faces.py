"""What each face costs with --faces all: 1, 2 and 4 real talking faces on one frame (a 2x2
grid of 512x512 tiles, empty tiles black, so only the number of faces changes), the face stage
and the whole spotting pipeline per frame, and memory; --faces largest on the one-face frame
beside them. Runs alternate between the cases; medians of the repeats.

    python benchmarks/faces.py [--repeats 3] [--frames 150] [--no-write]

Writes the table into docs/BENCHMARKS.md between its markers.
"""

from __future__ import annotations

import argparse
import gc
import resource
import statistics
import sys
import time
from pathlib import Path

import av
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MEDIA = REPO.parent / "shared" / "media" / "talking"
DOC = REPO / "docs" / "BENCHMARKS.md"
BEGIN, END = "<!-- faces:begin -->", "<!-- faces:end -->"
TILES = ("d3", "d9", "d14", "d6")  # four different real people, 480-512 px square

from benchmarks.doc_markers import write_between  # noqa: E402
from realtime_mer.capture import Frame  # noqa: E402
from realtime_mer.pipeline import Pipeline, PipelineOptions  # noqa: E402


def tiles(frames: int) -> list[list[np.ndarray]]:
    out = []
    for name in TILES:
        images = []
        with av.open(str(MEDIA / f"{name}.mp4")) as container:
            for frame in container.decode(video=0):
                image = frame.to_ndarray(format="bgr24")
                tile = np.zeros((512, 512, 3), np.uint8)
                tile[:image.shape[0], :image.shape[1]] = image[:512, :512]
                images.append(tile)
                if len(images) == frames:
                    break
        out.append(images)
    return out


def grid(parts: list[list[np.ndarray]], faces: int, i: int) -> np.ndarray:
    blank = np.zeros((512, 512, 3), np.uint8)
    cells = [parts[k][i] if k < faces else blank for k in range(4)]
    return np.vstack([np.hstack(cells[:2]), np.hstack(cells[2:])])


def run(parts, faces: int, mode: str, frames: int) -> dict:
    """One pass: median ms per frame of the face stage and of the whole frame."""
    pipeline = Pipeline(PipelineOptions(classify=False, faces=mode))
    whole = []
    try:
        for i in range(frames):
            image = grid(parts, faces, i)
            start = time.perf_counter()
            result = pipeline.process(Frame(t_ms=i * 1000.0 / 30, image_bgr=image, index=i))
            whole.append((time.perf_counter() - start) * 1000.0)
        tracked = len(result.faces)
        face_ms = pipeline.timer.summary()["face"]["median_ms"]
    finally:
        pipeline.close()
    return {"face_ms": face_ms, "frame_ms": statistics.median(whole[10:]), "tracked": tracked}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--frames", type=int, default=150)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    parts = tiles(args.frames)
    cases = [(1, "largest"), (1, "all"), (2, "all"), (4, "all")]
    runs: dict = {case: [] for case in cases}
    peak_mb: dict = {}
    for _ in range(args.repeats):
        for case in cases:
            gc.collect()
            runs[case].append(run(parts, case[0], case[1], args.frames))
            # ru_maxrss only grows: the cases run in rising order, so each one's peak is read
            # after it and the growth between cases is what a face adds.
            peak_mb[case] = max(peak_mb.get(case, 0.0),
                                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    rows = ["| faces in view | mode | faces tracked | face stage (ms/frame) | whole frame, "
            "spotting included (ms/frame) | per face (ms) | peak RSS (MB) |",
            "|---|---|---|---|---|---|---|"]
    for faces, mode in cases:
        face_ms = statistics.median(r["face_ms"] for r in runs[(faces, mode)])
        frame_ms = statistics.median(r["frame_ms"] for r in runs[(faces, mode)])
        tracked = runs[(faces, mode)][-1]["tracked"]
        rows.append(f"| {faces} | {mode} | {tracked} | {face_ms:.1f} | {frame_ms:.1f} | "
                    f"{frame_ms / max(tracked, 1):.1f} | {peak_mb[(faces, mode)]:.0f} |")
    table = "\n".join([
        f"A 1024x1024 frame holding 1, 2 or 4 real talking faces ({', '.join(TILES)}; the "
        f"other tiles black), {args.frames} frames, spotting without classification, medians "
        f"of {args.repeats} alternating runs on the 2-core CPU.", "", *rows])
    print(table)
    if not args.no_write:
        write_between(DOC, BEGIN, END, table,
                      missing=f"\n## Cost per face (`--faces all`)\n\n`python benchmarks/faces.py`"
                              f"\n\n{BEGIN}\n{END}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
