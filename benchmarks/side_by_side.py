"""Each face of a side-by-side recording against its half alone: pairs of real talking clips
written losslessly next to each other (so each half decodes to the same pixels as the half
written alone), the pair analysed with --faces all, each half alone with the largest face. An
event of a half counts as found when the pair's face has an event of the same kind with an onset
within 40 ms, and the other way round. It checks that tracking every face apart gives each
person the events they would get alone (the spotter's own benchmark is benchmarks/spotting.py).

    python benchmarks/side_by_side.py [--frames N] [--no-write]

Writes the table into docs/BENCHMARKS.md between its markers; the videos and runs go to
runs/side_by_side/ (rebuilt each time: a changed spotter must be measured afresh).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import av
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.doc_markers import write_between  # noqa: E402

MEDIA = REPO.parent / "shared" / "media" / "talking"
DOC = REPO / "docs" / "BENCHMARKS.md"

BEGIN, END = "<!-- side-by-side:begin -->", "<!-- side-by-side:end -->"
#: four real people, each on the left and on the right once
PAIRS = (("d3", "d9"), ("d14", "d6"), ("d9", "d14"), ("d6", "d3"))
TILE = 512  # the clips are 480-512 px square; each is padded to a 512 px tile
ONSET_TOLERANCE_MS = 40.0


def read_frames(path: Path, limit: int | None = None) -> list[np.ndarray]:
    """The first ``limit`` frames of a video, BGR."""
    with av.open(str(path)) as container:
        out = []
        for frame in container.decode(video=0):
            out.append(frame.to_ndarray(format="bgr24"))
            if limit is not None and len(out) == limit:
                break
        return out


def write_lossless(path: Path, images: list[np.ndarray], rate: int = 30) -> None:
    """H.264 at qp 0 in 4:4:4: a half of a side-by-side video decodes to the same pixels as the
    same half written alone, so the two runs see the same faces."""
    with av.open(str(path), "w") as sink:
        stream = sink.add_stream("libx264", rate=rate)
        stream.width, stream.height = images[0].shape[1], images[0].shape[0]
        stream.pix_fmt = "yuv444p"
        stream.options = {"qp": "0", "preset": "ultrafast"}
        for image in images:
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="bgr24")):
                sink.mux(packet)
        for packet in stream.encode():
            sink.mux(packet)


def padded(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """``image`` in the top-left corner of a black height x width frame."""
    out = np.zeros((height, width, 3), np.uint8)
    out[:image.shape[0], :image.shape[1]] = image[:height, :width]
    return out


def matched(events, reference, tolerance_ms: float = ONSET_TOLERANCE_MS) -> int:
    """Events of ``events`` with an event of the same kind in ``reference`` whose onset is
    within ``tolerance_ms``."""
    return sum(any(e.kind == r.kind and abs(e.onset_ms - r.onset_ms) <= tolerance_ms
                   for r in reference) for e in events)


def make_pair(folder: Path, left: str, right: str, frames: int | None) -> int:
    """left.mp4, right.mp4 and both.mp4 (the two side by side) in ``folder``; returns the
    number of frames."""
    a = [padded(i, TILE, TILE) for i in read_frames(MEDIA / f"{left}.mp4", frames)]
    b = [padded(i, TILE, TILE) for i in read_frames(MEDIA / f"{right}.mp4", len(a))]
    n = min(len(a), len(b))
    write_lossless(folder / "left.mp4", a[:n])
    write_lossless(folder / "right.mp4", b[:n])
    write_lossless(folder / "both.mp4", [np.hstack([x, y]) for x, y in zip(a[:n], b[:n])])
    return n


def run_pair(folder: Path) -> list[dict]:
    """Each half against the face of the pair that sits in it."""
    from realtime_mer.analysis import analyze_video
    from realtime_mer.pipeline import PipelineOptions

    alone = {half: analyze_video(folder / f"{half}.mp4", folder / half,
                                 options=PipelineOptions(classify=False))
             for half in ("left", "right")}
    both = analyze_video(folder / "both.mp4", folder / "both",
                         options=PipelineOptions(classify=False, faces="all"))
    side_of = _side_of_each_face(folder / "both.mp4")
    unplaced = {e.face_id for e in both.events} - set(side_of)
    if unplaced or len(both.summary["faces"]["tracked"]) != 2:
        raise SystemExit(f"{folder / 'both.mp4'}: faces {sorted(unplaced)} not placed in a half "
                         f"or not two faces tracked ({both.summary['faces']['tracked']})")
    rows = []
    for half in ("left", "right"):
        own = [e for e in both.events if side_of.get(e.face_id) == half]
        ref = alone[half].events
        rows.append({"half": half, "alone": len(ref), "found": matched(ref, own),
                     "in_pair": len(own), "matched": matched(own, ref),
                     "faces_tracked": len(both.summary["faces"]["tracked"])})
    return rows


def _side_of_each_face(video: Path) -> dict[int, str]:
    """Which half each face id sits in: the face tracker over the pair's first frames gives the
    ids in the order the analysis gives them (the same tracker, the same frames)."""
    from realtime_mer.tracks import FaceTracker

    sides: dict[int, str] = {}
    with FaceTracker() as tracker:
        for i, image in enumerate(read_frames(video, 30)):
            faces, _ = tracker.process(image, i * 1000.0 / 30)
            for f in faces:
                centre = (f.face.box_xyxy[0] + f.face.box_xyxy[2]) / 2
                sides.setdefault(f.face_id, "left" if centre < TILE else "right")
    return sides


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=None,
                        help="frames of each pair (default: the whole shorter clip)")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--cache", type=Path, default=REPO / "runs" / "side_by_side")
    args = parser.parse_args()
    start = time.monotonic()
    table = ["| left \\| right | frames | half | events alone | found in the pair | "
             "events in the pair | matched | faces tracked |",
             "|---|---|---|---|---|---|---|---|"]
    totals = np.zeros(4, int)
    for left, right in PAIRS:
        folder = args.cache / f"{left}_{right}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        frames = make_pair(folder, left, right, args.frames)
        for row in run_pair(folder):
            name = left if row["half"] == "left" else right
            table.append(f"| {left} \\| {right} | {frames} | {name} ({row['half']}) | "
                         f"{row['alone']} | "
                         f"{row['found']} | {row['in_pair']} | {row['matched']} | "
                         f"{row['faces_tracked']} |")
            totals += [row["alone"], row["found"], row["in_pair"], row["matched"]]
            print(table[-1], flush=True)
    f1 = (totals[1] + totals[3]) / max(1, totals[0] + totals[2])
    table.append(f"| **all** | | | {totals[0]} | **{totals[1]}** | {totals[2]} | **{totals[3]}** "
                 f"| |")
    text = "\n".join([
        f"Pairs of real talking clips side by side (30 fps, lossless; "
        f"{'the whole shorter clip' if args.frames is None else f'at most {args.frames} frames'}"
        f"), "
        f"each face of the pair (`--faces all`) against its half analysed alone: an event "
        f"counts when the other run has one of the same kind (micro, macro or blink) with an "
        f"onset within {ONSET_TOLERANCE_MS:.0f} ms. Agreement F1 {f1:.3f}; "
        f"`python benchmarks/side_by_side.py`, {(time.monotonic() - start) / 60:.0f} min on "
        f"the 2-core CPU.", "", *table])
    print(text)
    if not args.no_write:
        write_between(DOC, BEGIN, END, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
