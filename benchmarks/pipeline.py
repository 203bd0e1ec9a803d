"""Benchmark of `mer analyze` on the real videos: per-stage median and p95 milliseconds and the
overall frames per second, compared with each video's own frame rate.

    python benchmarks/pipeline.py [--repeats 3] [--engines engines/*.onnx] [--out docs/BENCHMARK_PIPELINE.md]

Each video is analysed --repeats times in this one run; the table reports the median over
repeats of each stage's per-frame median/p95, and the median throughput. Videos come from
../shared/media (or $MER_SHARED/media).

A second table times the engines (every engine in engines/ with its manifest, or --engines)
side by side on the same real 3DB maps, one event at a time, calls interleaved round robin so
that a noisy shared machine slows them alike; the ratio to the default engine is taken within
this run.
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

from realtime_mer.analysis import analyze_video  # noqa: E402
from realtime_mer.runtime import default_engine_path, load_engine  # noqa: E402

VIDEOS = ("WolfgangLanger_Pexels.mp4", "single_face.mp4", "face_noface.mov", "no_face.mp4")
STAGES = ("decode", "face", "buffer", "spotting", "features", "engine")


def shared_root() -> Path:
    return Path(os.environ.get("MER_SHARED", REPO.parent / "shared"))


def shared_media() -> Path:
    media = shared_root() / "media"
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


def time_background_classification(repeats: int) -> list[dict]:
    """Whole-run frames per second of analyze with each event classified inline (the frame
    loop waits for its TV-L1) and in a worker thread (the flow overlaps the next frames' face
    stage), alternated run by run on the videos that have events; the ratio is taken per pair
    of neighbouring runs, so the shared machine's drift cancels."""
    media = shared_media()
    engine = load_engine(default_engine_path())
    rows = []
    for name in VIDEOS:
        fps: dict[bool, list[float]] = {False: [], True: []}
        events: dict[bool, list] = {}
        for _ in range(repeats):
            for background in (False, True):
                with tempfile.TemporaryDirectory() as out:
                    result = analyze_video(media / name, out, engine=engine,
                                           classify_in_background=background)
                fps[background].append(result.summary["throughput"]["frames_per_s"])
                events[background] = [(e.apex_frame, e.label) for e in result.events]
        if not events[False]:
            continue  # without events there is nothing to overlap
        rows.append({"video": name, "events": len(events[False]),
                     "same_events": events[False] == events[True],
                     "inline_fps": statistics.median(fps[False]),
                     "background_fps": statistics.median(fps[True]),
                     "speedup": statistics.median(b / a for a, b in zip(fps[False], fps[True])),
                     "runs": repeats})
    return rows


def time_max_faces(repeats: int, frames: int = 200) -> list[dict]:
    """The face stage alone (MediaPipe + alignment) per frame with 4 faces tracked (the
    default: MediaPipe keeps looking for more, so the largest is the subject) and with 1
    (--max-faces 1), on the first frames of the Wolfgang video, alternated run by run."""
    from realtime_mer.capture import open_video
    from realtime_mer.face import FaceAligner, FaceOptions

    with open_video(shared_media() / "WolfgangLanger_Pexels.mp4") as source:
        images = [(f.image_bgr, f.t_ms) for _, f in zip(range(frames), source)]
    ms: dict[int, list[float]] = {4: [], 1: []}
    for _ in range(repeats):
        for max_faces in ms:
            with FaceAligner(FaceOptions(max_faces=max_faces)) as aligner:
                aligner.process(*images[0])  # graph start and first detection, not per frame
                t0 = time.perf_counter()
                for image, t_ms in images[1:]:
                    aligner.process(image, t_ms)
                ms[max_faces].append((time.perf_counter() - t0) * 1e3 / (len(images) - 1))
    return [{"max_faces": k, "median_ms": statistics.median(v), "runs": repeats,
             "frames": len(images) - 1,
             "x_faster_than_4": statistics.median(a / b for a, b in zip(ms[4], v))}
            for k, v in ms.items()]


def max_faces_table(rows: list[dict]) -> str:
    lines = ["| --max-faces | face stage, median ms / frame | speed vs 4 (median of paired runs) |",
             "|---|---|---|"]
    lines += [f"| {r['max_faces']} | {r['median_ms']:.2f} | {r['x_faster_than_4']:.2f}x |"
              for r in rows]
    return "\n".join(lines)


def background_table(rows: list[dict]) -> str:
    lines = ["| video | events | same events | fps inline | fps in a worker thread | "
             "speed-up (median of paired runs) |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['video']} | {r['events']} | {'yes' if r['same_events'] else 'NO'} | "
              f"{r['inline_fps']:.1f} | {r['background_fps']:.1f} | {r['speedup']:.2f}x |"
              for r in rows]
    return "\n".join(lines)


def shared_maps(n: int, phases: int = 1) -> "np.ndarray":
    """The first n real 3DB maps (the events an engine sees in the pipeline are maps like these);
    for an engine of two phases, CausalNet's maps of both phases of the same samples."""
    import numpy as np

    from training.data.megc3db import load_megc3db, load_phases

    data = shared_root() / "data"
    if phases == 2:
        return np.asarray(load_phases(data / "megc2019_3db",
                                      data / "megc2019_3db_causalnet").x[:n], np.float32)
    return np.asarray(load_megc3db(data / "megc2019_3db").x[:n], np.float32)


def time_engines(paths: list[Path], calls: int) -> list[dict]:
    """Per-event engine latency (predict on one map), engines interleaved call by call."""
    engines = [load_engine(p) for p in paths]
    maps = {phases: shared_maps(calls, phases) for phases in {e.manifest.phases for e in engines}}
    for engine in engines:  # warm-up: first calls allocate and pick kernels
        for m in maps[engine.manifest.phases][:5]:
            engine.predict(m[None])
    times: list[list[float]] = [[] for _ in engines]
    for i in range(min(len(m) for m in maps.values())):
        for k, engine in enumerate(engines):
            m = maps[engine.manifest.phases][i]
            t0 = time.perf_counter()
            engine.predict(m[None])
            times[k].append((time.perf_counter() - t0) * 1e3)
    default = default_engine_path().resolve()
    medians = [statistics.median(t) for t in times]
    is_default = [p.resolve() == default for p in paths]
    base = next((m for m, d in zip(medians, is_default) if d), None)
    rows = []
    for p, engine, t, med, d in zip(paths, engines, times, medians, is_default):
        # An ensemble file (.ens) is a list: its size is its members', its networks theirs.
        parts = getattr(engine, "members", [engine])
        networks = sum(m.manifest.networks for m in parts)
        rows.append({"engine": p.name, "bytes": sum(m.path.stat().st_size for m in parts),
                     "members": networks,
                     "loso_uf1": (engine.manifest.loso or {}).get("uf1"),
                     "median_ms": med, "p95_ms": sorted(t)[int(0.95 * (len(t) - 1))],
                     "calls": len(t), "x_default": med / base if base else None,
                     "default": d})
    return rows


def time_cut_detection(calls: int) -> list[dict]:
    """Per-frame cost of the face stage's hard-cut test (thumbnail and mean absolute difference)
    on a real frame of each video and on the first one scaled to 1920x1080, sizes interleaved."""
    import cv2

    from realtime_mer.capture import open_video
    from realtime_mer.face import cut_score, cut_thumbnail

    media = shared_media()
    frames = {}
    for name in VIDEOS:
        with open_video(media / name) as source:
            image = next(iter(source)).image_bgr
        frames.setdefault(f"{image.shape[1]}x{image.shape[0]}", image)
    first = next(iter(frames.values()))
    frames["1920x1080"] = cv2.resize(first, (1920, 1080), interpolation=cv2.INTER_LINEAR)
    previous = {size: cut_thumbnail(image) for size, image in frames.items()}
    times: dict[str, list[float]] = {size: [] for size in frames}
    for _ in range(calls):
        for size, image in frames.items():
            t0 = time.perf_counter()
            cut_score(previous[size], cut_thumbnail(image))
            times[size].append((time.perf_counter() - t0) * 1e3)
    return [{"size": size, "median_ms": statistics.median(t),
             "p95_ms": sorted(t)[int(0.95 * (len(t) - 1))], "calls": len(t)}
            for size, t in times.items()]


def cut_table(rows: list[dict]) -> str:
    lines = ["| frame size | median ms / frame | p95 ms |", "|---|---|---|"]
    lines += [f"| {r['size']} | {r['median_ms']:.3f} | {r['p95_ms']:.3f} |" for r in rows]
    return "\n".join(lines)


def engine_table(rows: list[dict]) -> str:
    lines = ["| engine | bytes | networks | honest LOSO UF1 | median ms / event | p95 ms | × default |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        name = f"**{r['engine']}** (default)" if r["default"] else r["engine"]
        uf1 = f"{r['loso_uf1']:.4f}" if r["loso_uf1"] is not None else "-"
        ratio = f"{r['x_default']:.2f}" if r["x_default"] is not None else "-"
        lines.append(f"| {name} | {r['bytes']:,} | {r['members']} | {uf1} | "
                     f"{r['median_ms']:.3f} | {r['p95_ms']:.3f} | {ratio} |")
    return "\n".join(lines)


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


def engine_share(rows: list[dict], engine_rows: list[dict]) -> str:
    """One sentence: the slowest engine's median per event against the median flow-feature
    cost per event of the videos that had events."""
    features = [r["features_median"] for r in rows if "features_median" in r]
    if not features or not engine_rows:
        return "no video had an event to compare the engines' cost with."
    per_event = statistics.median(features)
    slow = max(engine_rows, key=lambda r: r["median_ms"])
    return (f"the slowest engine ({slow['engine']}, {slow['median_ms']:.1f} ms) adds "
            f"{100 * slow['median_ms'] / per_event:.1f} % to an event's flow features "
            f"({per_event:.0f} ms).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--engines", type=Path, nargs="*", default=None, metavar="FILE",
                        help="engines to time side by side (default: every engine in engines/ "
                             "with a manifest)")
    parser.add_argument("--calls", type=int, default=200,
                        help="events (real 3DB maps) per engine in the engine table")
    parser.add_argument("--out", type=Path, default=None, help="write the table (markdown) here")
    args = parser.parse_args()
    engine_paths = args.engines if args.engines is not None else sorted(
        p for pattern in ("*.onnx", "*.ens") for p in (REPO / "engines").glob(pattern)
        if p.with_name(p.name + ".json").exists())
    started = time.time()
    rows = run(args.repeats)
    text = table(rows)
    print(text)
    engine_rows = time_engines(engine_paths, args.calls) if engine_paths else []
    engines_text = engine_table(engine_rows) if engine_rows else ""
    engines_arg = (" --engines " + " ".join(str(p) for p in args.engines)) if args.engines else ""
    print(engines_text)
    cut_rows = time_cut_detection(args.calls)
    cut_text = cut_table(cut_rows)
    print(cut_text)
    background_rows = time_background_classification(args.repeats)
    background_text = background_table(background_rows)
    print(background_text)
    max_faces_rows = time_max_faces(args.repeats)
    max_faces_text = max_faces_table(max_faces_rows)
    print(max_faces_text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            "# Pipeline benchmark (`mer analyze` on the real videos)\n\n"
            f"Machine: {machine()}. Command: `python benchmarks/pipeline.py --repeats "
            f"{args.repeats} --calls {args.calls}{engines_arg} --out {args.out}`; "
            f"{time.strftime('%Y-%m-%d')}, "
            f"{time.time() - started:.0f} s.\n\nPer-stage milliseconds per frame are the median "
            "over repeats of each run's median and 95th percentile (features and engine run "
            "once per event, not per frame); fps is whole-run frames per second including "
            "decoding, × real time is fps over the video's own frame rate. The pipeline uses "
            f"the default engine, `{default_engine_path().name}`.\n\n" + text + "\n\n"
            "## Engines side by side (ONNX Runtime, one event = one map, "
            f"{args.calls} real 3DB maps, calls interleaved)\n\n" + engines_text + "\n\n"
            "The per-frame stages do not use the engine, so frames per second do not depend on "
            f"it; {engine_share(rows, engine_rows)} Engines that are not in the repository "
            "are built on demand (`docs/RESULTS.md`).\n\n"
            f"## Hard-cut test of the face stage ({args.calls} calls per size, interleaved)\n\n"
            "The face stage restarts MediaPipe's tracking at a hard cut (`FaceOptions."
            "cut_threshold`); the test runs on every frame and is part of the face column "
            "above.\n\n" + cut_text + "\n\n"
            f"## Events classified inline or in a worker thread ({args.repeats} runs each, "
            "alternated)\n\n"
            "`analyze` classifies each event (TV-L1 flow, strain, the engine) in a worker "
            "thread while the face stage goes on with the next frames; OpenCV and MediaPipe "
            "release the GIL, so the two share the cores. Inline, the frame loop waits for "
            "each event. Videos without events are left out (nothing to overlap).\n\n"
            + background_text + "\n\n"
            f"## Faces tracked at once (`--max-faces`; {args.repeats} runs each, alternated, "
            f"{max_faces_rows[0]['frames']} frames of the Wolfgang video)\n\n"
            "The face stage alone. With 4 (the default) MediaPipe keeps running its detector "
            "while fewer faces are tracked, so that the largest face in view is the subject; "
            "1 stops at the first face found.\n\n" + max_faces_text + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(
            {"videos": rows, "engines": engine_rows, "cut_detection": cut_rows,
             "background_classification": background_rows, "max_faces": max_faces_rows},
            indent=2) + "\n")


if __name__ == "__main__":
    main()
