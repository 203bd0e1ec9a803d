"""Runs stopped from outside, on a 10-minute real video (the talking-head clips, looped):

1. SIGKILL at several moments of `mer analyze`: every event whose spotting closed at least 1 s
   before the kill is in events.jsonl (compared with an uninterrupted run over the same part
   of the video);
2. SIGTERM and Ctrl+C (SIGINT): the time from the signal to the exit, the exit code, and
   whether summary.json, events.csv and report.html are complete and valid.

    python benchmarks/interrupt.py [--kills 20 60 120] [--stop-after 45]

The video is built once into runs/interrupt/. Writes the table into docs/RELIABILITY.md
(between its markers) and docs/RELIABILITY.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from realtime_mer.report import read_events  # noqa: E402

WORK = REPO / "runs" / "interrupt"
DOC, JSON_OUT = REPO / "docs" / "RELIABILITY.md", REPO / "docs" / "RELIABILITY.json"
BEGIN, END = "<!-- interrupt:begin -->", "<!-- interrupt:end -->"
CLIPS = ("d3", "d9", "d14", "d0")  # the 512-px talking clips
SIDE, FPS, MINUTES = 512, 30, 10


def ten_minute_video(media: Path) -> Path:
    """The talking clips one after another, looped to 10 minutes, 512×512 at 30 fps."""
    import av
    import cv2

    path = WORK / "ten_minutes.mp4"
    if path.is_file():
        return path
    WORK.mkdir(parents=True, exist_ok=True)
    frames_per_clip = []
    for name in CLIPS:
        with av.open(str(media / "talking" / f"{name}.mp4")) as container:
            frames_per_clip.append([cv2.resize(f.to_ndarray(format="rgb24"), (SIDE, SIDE))
                                    for f in container.decode(video=0)])
    partial = path.with_suffix(".part.mp4")
    with av.open(str(partial), "w") as out:
        stream = out.add_stream("libx264", rate=FPS)
        stream.width = stream.height = SIDE
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "20", "preset": "veryfast"}
        total, index = MINUTES * 60 * FPS, 0
        while index < total:
            for frames in frames_per_clip:
                for rgb in frames:
                    if index >= total:
                        break
                    for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                        out.mux(packet)
                    index += 1
        for packet in stream.encode():
            out.mux(packet)
    partial.rename(path)
    return path


def _analyze(video: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "realtime_mer.cli", "analyze", str(video),
                             "--out", str(out), "--no-progress", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _last_trace_ms(out: Path) -> float:
    """The media time of the last frame the run had written to trace.csv."""
    last = 0.0
    try:
        with open(out / "trace.csv", newline="") as file:
            for row in csv.reader(file):
                if row and row[0] != "t_ms":
                    try:
                        last = float(row[0])
                    except ValueError:  # a torn last line
                        pass
    except FileNotFoundError:
        pass
    return last


def _key(event) -> tuple[float, float, str]:
    return (round(event.onset_ms), round(event.apex_ms), event.kind)


def kill_runs(video: Path, moments: list[float]) -> list[dict]:
    results = []
    for moment in moments:
        out = WORK / f"kill-{moment:.0f}"
        started = time.monotonic()
        run = _analyze(video, out)
        time.sleep(moment)
        run.send_signal(signal.SIGKILL)
        run.wait()
        elapsed = time.monotonic() - started
        reached = _last_trace_ms(out)
        kept = read_events(out / "events.jsonl") if (out / "events.jsonl").exists() else []
        results.append({"kill_after_s": moment, "media_reached_s": round(reached / 1000, 1),
                        "media_per_wall_s": round(reached / 1000 / elapsed, 2),
                        "kept": kept})
    return results


def check_kills(video: Path, kills: list[dict]) -> list[dict]:
    """An uninterrupted run over the part of the video the longest kill reached is the
    reference (the pipeline is causal: its events there are the full run's)."""
    end_s = max(k["media_reached_s"] for k in kills) + 5
    reference_dir = WORK / "reference"
    run = _analyze(video, reference_dir, "--end", f"{end_s:.1f}")
    run.wait()
    reference = read_events(reference_dir / "events.jsonl")
    rows = []
    for kill in kills:
        # closed at least 1 s (of wall time) before the kill: its offset is that much media
        # time before the last frame written, plus the spotter's release after the offset
        margin_ms = 1000.0 * kill["media_per_wall_s"] + 500.0
        due = [e for e in reference
               if e.offset_ms <= kill["media_reached_s"] * 1000 - margin_ms]
        kept = {_key(e) for e in kill["kept"]}
        missing = [e for e in due if _key(e) not in kept]
        rows.append({"kill_after_s": kill["kill_after_s"],
                     "media_reached_s": kill["media_reached_s"], "events_due": len(due),
                     "events_kept": len(kill["kept"]), "due_missing": len(missing),
                     "classified_of_kept": sum(e.classified for e in kill["kept"])})
    return rows


def _valid_outputs(out: Path) -> dict:
    ok = {}
    try:
        summary = json.loads((out / "summary.json").read_text())
        ok["summary.json"] = bool(summary.get("interrupted"))
    except (OSError, ValueError):
        ok["summary.json"] = False
    try:
        with open(out / "events.csv", newline="") as file:
            rows = list(csv.reader(file))
        ok["events.csv"] = len(rows) >= 1 and rows[0][0] == "source"
    except (OSError, IndexError):
        ok["events.csv"] = False
    try:
        text = (out / "report.html").read_text()
        ok["report.html"] = text.rstrip().endswith("</html>")
    except OSError:
        ok["report.html"] = False
    return ok


def stop_runs(video: Path, after_s: float) -> list[dict]:
    rows = []
    for name, sig in (("SIGTERM", signal.SIGTERM), ("Ctrl+C (SIGINT)", signal.SIGINT)):
        out = WORK / f"stop-{sig.name}"
        run = _analyze(video, out)
        time.sleep(after_s)
        sent = time.monotonic()
        run.send_signal(sig)
        try:
            run.wait(timeout=30)
        except subprocess.TimeoutExpired:
            run.kill()
            run.wait()
        exit_s = time.monotonic() - sent
        stderr = run.stderr.read().strip().splitlines()
        rows.append({"signal": name, "exit_s": round(exit_s, 2), "exit_code": run.returncode,
                     "outputs": _valid_outputs(out), "last_line": stderr[-1] if stderr else ""})
    return rows


def _table(kills: list[dict], stops: list[dict], video_s: float) -> str:
    lines = [f"Measured by `python benchmarks/interrupt.py` on a {video_s / 60:.0f}-minute real "
             "video (the talking-head clips looped, 512×512, 30 fps), 2-core CPU.", "",
             "| SIGKILL after | media reached | events kept | events closed ≥ 1 s before the "
             "kill | of those missing |", "|---|---|---|---|---|"]
    for k in kills:
        lines.append(f"| {k['kill_after_s']:.0f} s | {k['media_reached_s']} s | "
                     f"{k['events_kept']} ({k['classified_of_kept']} classified) | "
                     f"{k['events_due']} | {k['due_missing']} |")
    lines += ["", "| signal | exit after | exit code | summary.json / events.csv / report.html "
              "valid | last line on stderr |", "|---|---|---|---|---|"]
    for s in stops:
        valid = " / ".join("yes" if s["outputs"][name] else "no"
                           for name in ("summary.json", "events.csv", "report.html"))
        lines.append(f"| {s['signal']} | {s['exit_s']} s | {s['exit_code']} | {valid} | "
                     f"{s['last_line'].replace('|', '/')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=float, nargs="+", default=[20.0, 60.0, 120.0])
    parser.add_argument("--stop-after", type=float, default=45.0)
    parser.add_argument("--media", type=Path, default=REPO.parent / "shared" / "media")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    video = ten_minute_video(args.media)
    print(f"video: {video}", file=sys.stderr)
    kills = check_kills(video, kill_runs(video, args.kills))
    stops = stop_runs(video, args.stop_after)
    table = _table(kills, stops, MINUTES * 60)
    print(table)
    if not args.no_write:
        JSON_OUT.write_text(json.dumps({"kills": kills, "stops": stops}, indent=2,
                                       default=str) + "\n")
        text = DOC.read_text() if DOC.exists() else f"{BEGIN}\n{END}\n"
        DOC.write_text(re.sub(re.escape(BEGIN) + ".*?" + re.escape(END),
                              f"{BEGIN}\n{table}\n{END}", text, flags=re.S))
    return 0 if all(k["due_missing"] == 0 for k in kills) else 1


if __name__ == "__main__":
    raise SystemExit(main())
