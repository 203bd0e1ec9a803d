"""The ``mer`` command: analyse recorded videos, run the live demo, inspect the engine.

Every error a user can cause ends with a one-line message on stderr and a non-zero exit code
(2 bad input, 3 engine problem, 130 interrupted by Ctrl+C, 143 terminated by SIGTERM); tracebacks
are shown only with ``--debug``. Ctrl+C and SIGTERM (a timeout, systemd, ``docker stop``) stop a
run the same way: within a couple of seconds, with the reports written from what was found.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import sys
from pathlib import Path

from realtime_mer import __version__, native_logs
from realtime_mer.errors import (
    InputError, MerError, OutputError, Terminated, sigterm_as_interrupt,
)

log = logging.getLogger("realtime_mer")

EXIT_INPUT_DAMAGED = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, what a shell reports for a terminated process
EXIT_INTERNAL = 70  # EX_SOFTWARE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mer", description="Real-time micro-expression recognition.")
    parser.add_argument("--version", action="version", version=f"realtime-mer {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    # The same two flags after the command (`mer analyze x.mp4 --debug`); SUPPRESS keeps a
    # subcommand from resetting what was given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log progress details")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    analyze = commands.add_parser(
        "analyze", parents=[common], help="find and classify micro-expressions in recorded videos",
        description="Run the pipeline over each video and write events.jsonl (as events are "
                    "found), events.csv, summary.json, timeline.png and report.html. With one video the "
                    "files go straight into --out; with several, into --out/<video name>/ (<video name>-2, "
                    "-3, ... for videos that share a name). Exit codes: 0 all complete, 2 an "
                    "input damaged or unreadable, 3 engine problem, 5 output not writable, "
                    "130 interrupted.")
    analyze.add_argument("videos", nargs="+", type=Path, metavar="VIDEO")
    analyze.add_argument("--out", type=Path, required=True, metavar="DIR",
                         help="output folder (created if missing)")
    _add_engine_arguments(analyze)
    analyze.add_argument("--workers", type=int, default=None, metavar="N",
                         help="analyse the videos in N worker processes on Ray (one video per "
                              "task; needs realtime-mer[ray]); a rerun skips the videos whose "
                              "outputs are complete")
    analyze.add_argument("--ray-address", default=None, metavar="ADDR",
                         help="run the batch on an existing Ray cluster (ray start --head ...) "
                              "instead of starting Ray here")
    analyze.add_argument("--max-side", type=_max_side, default=1280, metavar="PX",
                         help="downscale frames whose longer side exceeds this (default 1280; "
                              "0 keeps full size)")
    analyze.add_argument("--video", action="store_true",
                         help="also write annotated.mp4: the input with the face box, the "
                              "spotting signal and the events drawn on it")
    analyze.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_faces_arguments(analyze)
    _add_flow_argument(analyze)
    analyze.add_argument("--start", type=_time_of_day, default=0.0, metavar="TIME",
                         help="analyse from this time in the video: seconds (75.5) or "
                              "[hh:]mm:ss(.s) (1:15.5); the file is entered by a seek, events "
                              "keep the video's own times and frame numbers")
    analyze.add_argument("--end", type=_time_of_day, default=None, metavar="TIME",
                         help="analyse up to this time in the video (same formats)")
    analyze.add_argument("--fps", type=_frame_rate, default=None, metavar="FPS",
                         help="frame rate of a VIDEO that is a folder of frame images (a "
                              "database's recording: 200 for CASME II and SAMM, 100 for "
                              "SMIC-HS); the images are taken in natural order (img2 before "
                              "img10)")

    live = commands.add_parser(
        "live", parents=[common], help="analyse a webcam or stream live, printing events as they are found",
        description="Read a camera (OpenCV device index) or stream URL in a capture thread; "
                    "frames the pipeline cannot keep up with are dropped oldest-first and "
                    "counted. Writes the same files as analyze into --out; stops at --duration, "
                    "when the camera disconnects, or on Ctrl+C (everything found is kept). A "
                    "video file's path plays like a camera, each frame at its own time, to its "
                    "end (analyze reads every frame of a file instead).")
    live.add_argument("--camera", default="0",
                      help="device index, stream URL or video file (default 0)")
    live.add_argument("--out", type=Path, default=Path("mer-live"), metavar="DIR")
    live.add_argument("--duration", type=float, default=None, metavar="SECONDS")
    _add_engine_arguments(live)
    live.add_argument("--max-side", type=_max_side, default=1280, metavar="PX",
                      help="downscale frames whose longer side exceeds this (default 1280; 0 "
                           "keeps full size)")
    live.add_argument("--no-progress", action="store_true",
                      help="no status line (frames, rate, events)")
    _add_faces_arguments(live)
    _add_flow_argument(live)

    demo = commands.add_parser(
        "demo", parents=[common], help="the live webcam demo (Gradio web app)",
        description="Serve the Gradio app: webcam streaming with annotated frames, a strip of "
                    "each region's spotting signal, cards for the latest events and an event "
                    "log, and an upload tab that analyses a file. Exit code 6 when the port is "
                    "taken or the address is not this machine's.")
    demo.add_argument("--host", default="127.0.0.1",
                      help="address to listen on (default 127.0.0.1: this machine only)")
    demo.add_argument("--port", type=_port, default=7860, help="port to listen on (1-65535, "
                      "default 7860)")
    demo.add_argument("--share", action="store_true",
                      help="also open a public Gradio share link (off by default)")
    _add_engine_arguments(demo)
    _add_flow_argument(demo)
    _add_faces_arguments(demo)

    info = commands.add_parser(
        "info", parents=[common], help="what the engine is, how it scored, how it runs here",
        description="A short summary of the engine (model, input, classes, its honest LOSO "
                    "score, training data) and the backend and device it runs on here; --json "
                    "prints the whole manifest instead.")
    _add_engine_arguments(info)
    info.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    return parser


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 1-65535, got {value}")
    return value


def _max_side(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of pixels: {text!r}") from None
    if value != 0 and value < 16:
        raise argparse.ArgumentTypeError(f"must be 0 (full size) or at least 16, got {value}")
    return value


def _frame_rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a frame rate: {text!r}") from None
    if not (math.isfinite(value) and 0 < value <= 10_000):
        raise argparse.ArgumentTypeError(f"a frame rate must be in (0, 10000], got {text!r}")
    return value


def _time_of_day(text: str) -> float:
    """A position in a video, in milliseconds, from seconds ("75.5") or [hh:]mm:ss(.s)."""
    parts = text.strip().split(":")
    try:
        if len(parts) > 3 or not all(parts):
            raise ValueError
        values = [float(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a time: {text!r} (seconds such as 75.5, or [hh:]mm:ss such as 1:15.5)") from None
    if any(v < 0 or not math.isfinite(v) for v in values) or any(v >= 60 for v in values[1:]):
        raise argparse.ArgumentTypeError(f"not a time: {text!r} (minutes and seconds under 60)")
    seconds = 0.0
    for value in values:
        seconds = seconds * 60.0 + value
    return seconds * 1000.0


def _output_dirs(videos: list[Path], out: Path) -> list[Path]:
    """One folder per video under ``out`` (``out`` itself for a single video); videos that share
    a file name (a/x.mp4, b/x.mp4) get -2, -3, ... so that no report overwrites another."""
    if len(videos) == 1:
        return [out]
    seen: dict[str, int] = {}
    dirs = []
    for video in videos:
        n = seen[video.stem] = seen.get(video.stem, 0) + 1
        dirs.append(out / (video.stem if n == 1 else f"{video.stem}-{n}"))
    return dirs


def _add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", type=Path, default=None, metavar="FILE",
                        help="engine file (.onnx, .pt2, or an ensemble .ens) with its .json "
                             "manifest beside it (default: the shipped "
                             "engines/ststnet_cv6_mirror_shift2_cal_3db.onnx, or $MER_ENGINE)")
    parser.add_argument("--backend", default="auto",
                        choices=["auto", "onnxruntime", "torch", "tensorrt"])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto (CUDA where the backend can use it, else CPU), cpu or cuda")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16"],
                        help="TensorRT only: fp16 lets it run layers in half precision "
                             "(default fp32); the compiled program is kept for the next run")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    native_logs.set_capture(not args.debug)  # --debug: native output unfiltered, as written
    previous = sigterm_as_interrupt()
    try:
        return _run_command(args)
    finally:
        native_logs.set_capture(True)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run_command(args) -> int:
    try:
        if args.command == "analyze":
            return _analyze(args)
        if args.command == "live":
            return _live(args)
        if args.command == "demo":
            return _demo(args)
        if args.command == "info":
            return _info(args)
    except Terminated:
        print("mer: terminated (SIGTERM); the events found so far and the reports are kept",
              file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print("mer: interrupted; the events found so far and the reports are kept",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except MerError as error:
        if args.debug:
            raise
        print(f"mer: error: {error}", file=sys.stderr)
        return error.exit_code
    except Exception as error:  # a bug, not the user's doing: say so, keep the output short
        if args.debug:
            raise
        print(f"mer: internal error: {type(error).__name__}: {error} (outputs written so far "
              "are kept; rerun with --debug for the traceback and please report it)",
              file=sys.stderr)
        return EXIT_INTERNAL
    return 1


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the message (so a progress bar or a
    test's capture sees it), and is installed once however often ``main`` runs in a process."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _configure_logging(verbose: bool) -> None:
    for handler in [h for h in log.handlers if isinstance(h, _StderrHandler)]:
        log.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("mer: %(levelname)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if verbose else logging.WARNING)


def _pipeline_options(args=None):
    # The engine is loaded once by _load_engine and handed to the pipeline, so the options keep
    # their defaults (their engine fields are only for callers that let the pipeline load one).
    from dataclasses import replace

    from realtime_mer.pipeline import PipelineOptions

    options = PipelineOptions(faces=getattr(args, "faces", None) or "largest")
    max_faces = getattr(args, "max_faces", None)
    if max_faces is not None:
        options = replace(options, face=replace(options.face, max_faces=max_faces),
                          tracker=replace(options.tracker, max_faces=max_faces))
    flow = getattr(args, "flow", None)
    if flow is not None:
        options = replace(options, features=replace(options.features, flow=flow))
        from realtime_mer.features import uses_torch_flow

        if uses_torch_flow(options.features):
            print("mer: warming up the PyTorch TV-L1 (torch.compile: minutes the first time on "
                  "a machine, seconds once its kernels are in ~/.cache/realtime-mer/inductor)",
                  file=sys.stderr, flush=True)
    return options


def _add_flow_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--flow", choices=["auto", "opencv-tvl1", "torch-tvl1"], default="auto",
        help="the TV-L1 that makes each event's feature map: auto (the project's PyTorch TV-L1 "
             "on a CUDA GPU when there is one, else OpenCV's, the default), opencv-tvl1, or "
             "torch-tvl1 (also on a CPU, compiled at start)")


def _add_faces_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--faces", choices=["largest", "all"], default="largest",
        help="largest: the largest face in view is the subject (the default); all: every face "
             "is tracked apart under its own id (an interview recorded side by side, a group), "
             "kept while the face is away for up to 3 s but not across a cut to another shot, "
             "each with its own spotter; events, summary, CSV, report, timeline and annotated "
             "video say whose face moved. The cost per frame grows with the number of faces")
    parser.add_argument(
        "--max-faces", type=int, choices=range(1, 11), default=None, metavar="N",
        help="faces tracked at once. With --faces largest (default 4, so the largest face is "
             "the subject even with others in view), 1 makes the face stage about 1.5x faster "
             "when only one person can appear; with others in view, the tracked face may then "
             "not be the largest, and frames with several faces are not counted. With --faces "
             "all (default 8): the largest faces first")


def _load_engine(args):
    from realtime_mer.runtime import default_engine_path, load_engine

    return load_engine(args.engine or default_engine_path(), backend=args.backend,
                       device=args.device, precision=args.precision)


def _analyze(args) -> int:
    from tqdm import tqdm

    from realtime_mer.analysis import analyze_video
    from realtime_mer.capture import CaptureOptions
    from realtime_mer.writers import BatchIndex

    engine = _load_engine(args)  # fail on a bad engine before touching any video
    options = _pipeline_options(args)
    if args.end is not None and args.end <= args.start:
        raise InputError(f"--end ({args.end / 1000:g} s) must be after --start "
                         f"({args.start / 1000:g} s)")
    capture = CaptureOptions(max_side=args.max_side or None, start_ms=args.start,
                             end_ms=args.end, image_fps=args.fps)
    exit_code = 0
    batch = len(args.videos) > 1
    index = BatchIndex(args.out, list(engine.manifest.class_names))

    def add_to_index(video: Path, out_dir: Path, summary: dict | None,
                     error: str | None = None) -> None:
        if not batch:
            return
        try:
            index.add(video, out_dir, summary, error)
        except OSError as err:  # the videos' own folders hold their results regardless
            log.warning("could not write the batch index in %s: %s", args.out, err)

    if args.workers is not None or args.ray_address:
        return _analyze_on_ray(args, options, capture, add_to_index)
    for video, out_dir in zip(args.videos, _output_dirs(args.videos, args.out)):
        bars: list = []  # the bar appears with the first frame, not for a file that fails

        def progress(done: int, expected: int | None, bars=bars, name=video.name) -> None:
            if args.no_progress:
                return
            if not bars:
                bars.append(tqdm(desc=name, total=expected, unit="frame", file=sys.stderr,
                                 dynamic_ncols=True, leave=True))
            bars[0].update(done - bars[0].n)

        try:
            result = analyze_video(video, out_dir, options=options, capture=capture,
                                   engine=engine, progress=progress, annotated_video=args.video)
        except (InputError, OutputError) as error:  # this video fails, the others still run
            where = "" if str(video) in str(error) else f"{video}: "
            print(f"mer: error: {where}{error}", file=sys.stderr)
            exit_code = max(exit_code, error.exit_code)
            add_to_index(video, out_dir, None, str(error))
            continue
        except KeyboardInterrupt:  # its outputs are written (interrupted): index them too
            try:
                add_to_index(video, out_dir, json.loads((out_dir / "summary.json").read_text()))
            except (OSError, ValueError):
                pass
            raise
        finally:
            for bar in bars:
                bar.close()
        s = result.summary
        faces = s["faces"]["tracked"]
        print(f"{video.name}: {s['frames']['processed']} frames "
              f"({s['frames']['without_face']} without a face), "
              + (f"{len(faces)} face{'s' if len(faces) != 1 else ''} tracked, "
                 if s["faces"]["mode"] == "all" else "") +
              f"{s['events']['micro']} micro / {s['events']['macro']} macro events, "
              f"{s['throughput']['frames_per_s']:.1f} frames/s → {out_dir}")
        for problem in result.problems:
            print(f"mer: error: {video}: {problem}; the {len(result.events)} events found are "
                  f"kept in {out_dir}", file=sys.stderr)
            exit_code = max(exit_code, EXIT_INPUT_DAMAGED)
        add_to_index(video, out_dir, s)
    if batch and index.rows:
        print(f"{len(index.rows)} videos: index of the reports → {args.out / 'index.html'}")
    return exit_code


def _analyze_on_ray(args, options, capture, add_to_index) -> int:
    """``mer analyze --workers N`` / ``--ray-address``: one Ray task per video, a line per
    finished video, the index rewritten after each, videos already done skipped."""
    from realtime_mer.batch import EngineSpec, run_on_ray
    from realtime_mer.runtime import default_engine_path

    if args.workers is not None and args.workers < 1:
        raise InputError(f"--workers must be at least 1; got {args.workers}")
    jobs = list(zip(args.videos, _output_dirs(args.videos, args.out)))
    engine = EngineSpec(str(args.engine or default_engine_path()), args.backend, args.device,
                        args.precision)
    finished = []

    def report(result) -> None:
        finished.append(result)
        where = f"[{len(finished)}/{len(jobs)}] {result.video.name}"
        if result.skipped:
            print(f"{where}: already complete in {result.out_dir}, skipped", file=sys.stderr)
        elif result.summary is None:
            print(f"mer: error: {where}: {result.error}", file=sys.stderr)
        else:
            s = result.summary
            print(f"{where}: {s['frames']['processed']} frames, {s['events']['micro']} micro / "
                  f"{s['events']['macro']} macro events → {result.out_dir}")
            if result.error:
                print(f"mer: error: {where}: {result.error}; the events found are kept",
                      file=sys.stderr)
        add_to_index(result.video, result.out_dir, result.summary, result.error)

    results = run_on_ray(jobs, engine, options, capture, workers=args.workers,
                         address=args.ray_address, annotated_video=args.video,
                         on_result=report)
    if len(jobs) > 1:
        print(f"{len(jobs)} videos: index of the reports → {args.out / 'index.html'}")
    return max((r.exit_code for r in results), default=0)


def _live(args) -> int:
    from realtime_mer.analysis import analyze_camera
    from realtime_mer.capture import CaptureOptions

    from tqdm import tqdm

    _check_camera_argument(args.camera)
    engine = _load_engine(args)
    camera = int(args.camera) if args.camera.isdigit() else args.camera
    bars: list = []  # a status line on stderr, from the first frame: frames, rate, events
    found = [0]

    def show(event) -> None:
        found[0] += 1
        what = f"{event.label:8s} {event.confidence:.2f}" if event.kind != "blink" else " " * 13
        whose = f"face {event.face_id}  " if args.faces == "all" else ""
        line = (f"{event.onset_ms / 1000:8.2f} s  {whose}{event.kind:5s}  {what}  "
                f"({event.duration_ms:.0f} ms, {'+'.join(event.regions)})")
        if bars:
            bars[0].set_postfix(events=found[0], refresh=False)
        tqdm.write(line, file=sys.stdout)  # above the status line, which then redraws
        sys.stdout.flush()

    def progress(done: int, _expected: int | None) -> None:
        if args.no_progress:
            return
        if not bars:
            name = args.camera if args.camera.isdigit() or "://" in args.camera \
                else Path(args.camera).name
            bars.append(tqdm(desc=f"camera {name}", unit="frame", file=sys.stderr,
                             dynamic_ncols=True, leave=True, postfix={"events": 0}))
        bars[0].update(done - bars[0].n)

    try:
        result = analyze_camera(camera, args.out, duration_s=args.duration,
                                options=_pipeline_options(args),
                                capture=CaptureOptions(max_side=args.max_side or None),
                                engine=engine, on_event=show, progress=progress)
    finally:
        for bar in bars:
            bar.close()
    frames = result.summary["frames"]
    print(f"{frames['processed']} frames ({frames['dropped']} dropped, {frames['without_face']} "
          f"without a face), {len(result.events)} events → {args.out}")
    for problem in result.problems:
        print(f"mer: error: {problem}; the {len(result.events)} events found before it are kept "
              f"in {args.out}", file=sys.stderr)
    return EXIT_INPUT_DAMAGED if result.problems else 0


def _check_camera_argument(camera: str) -> None:
    """A camera is an index, a stream URL, a device node or a video file that exists: anything
    else is a file that is not there, and is called that (not a camera that cannot open)."""
    if camera.isdigit() or "://" in camera or Path(camera).exists():
        return
    raise InputError(f"no such video file or camera device: {camera}")


def _demo(args) -> int:
    from realtime_mer.app import build_app, launch

    engine = _load_engine(args)
    app = build_app(engine=engine, options=_pipeline_options(args))
    # Said once the server listens, with the address it got: a taken port is an error instead.
    try:
        launch(app, host=args.host, port=args.port, share=args.share, block=True,
               on_ready=lambda url: print(f"mer demo: serving on {url} (Ctrl+C to stop)",
                                          flush=True))
    except KeyboardInterrupt:  # Ctrl+C is how a server is stopped; a second one lands here
        app.close()
    print("mer demo: stopped", flush=True)
    return 0


def _info(args) -> int:
    engine = _load_engine(args)
    manifest = engine.manifest
    if args.json:
        payload = {"engine": str(getattr(engine, "path", args.engine)), "backend": engine.name,
                   "device": str(engine.device), "manifest": manifest.to_dict()}
        if hasattr(engine, "members"):  # an ensemble: what each member is and how it runs
            payload["members"] = [{"engine": str(m.path), "backend": m.name,
                                   "device": str(m.device), "model": m.manifest.model,
                                   "input_kind": m.manifest.input.get("kind", "map28"),
                                   "loso": m.manifest.loso} for m in engine.members]
        print(json.dumps(payload, indent=2, sort_keys=True))
        return 0
    for line in _engine_summary(engine):
        print(line)
    return 0


def _engine_summary(engine) -> list[str]:
    """The facts a user looks for, one per line."""
    m = engine.manifest
    shape = "×".join(str(v) for v in m.input.get("shape", [])[1:])
    loso = m.loso or {}
    training = m.training or {}

    def score(key: str) -> str:
        value = loso.get(key)
        return f"{value:.3f}" if isinstance(value, (int, float)) else "–"

    protocol = loso.get("protocol")
    protocol = f", {protocol.split(';')[0]}" if isinstance(protocol, str) else ""
    lines = [f"engine:   {getattr(engine, 'path', '')}",
             f"runs on:  {engine.name} ({engine.device})",
             f"model:    {m.model}, input {m.input.get('kind', 'map28')} {shape} "
             f"({', '.join(m.input.get('channels', []))})",
             f"classes:  {', '.join(m.class_names)}",
             f"LOSO:     UF1 {score('uf1')}, UAR {score('uar')} (honest leave-one-subject-out"
             f"{protocol})"]
    if training:
        counts = training.get("class_counts")
        lines.append(f"trained:  {training.get('data', '?')}, {training.get('n_samples', '?')} "
                     f"samples of {training.get('n_subjects', '?')} subjects"
                     + (f", classes {counts}" if counts else ""))
    for member in getattr(engine, "members", []):
        lines.append(f"member:   {member.path.name} ({member.manifest.model}, "
                     f"{member.name} on {member.device})")
    lines.append(f"sha256:   {m.sha256}")
    lines.append("(mer info --json prints the whole manifest)")
    return lines


def run() -> None:
    """The ``mer`` executable: :func:`main`, then the exit. A run stopped by Ctrl+C or SIGTERM
    may leave the classifier thread inside a flow computation nobody waits for; the process then
    ends at once (its reports are written and flushed) instead of letting the interpreter's
    shutdown tear down native code that is still running."""
    import os
    import threading

    code = main()
    if any(t.name == "mer-classify" and t.is_alive() for t in threading.enumerate()):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
