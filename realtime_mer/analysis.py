"""Run the pipeline over a recorded video or a live camera and hand its frames and events to
the writers (:mod:`realtime_mer.writers`), keeping every event found so far when the input turns
out damaged, the camera disconnects, or the run is interrupted; or, with :func:`analyze`, give
the events as an iterator and write nothing."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence


from realtime_mer import __version__
from realtime_mer.camera import WebcamSource
from realtime_mer.capture import CaptureOptions, Frame, open_video
from realtime_mer.errors import InputError, OutputError
from realtime_mer.pipeline import Pipeline, PipelineOptions
from realtime_mer.events import EventRecord
from realtime_mer.report import SpottingStats
from realtime_mer.runtime import Backend
from realtime_mer.speech import voice_intervals
from realtime_mer.writers import ANNOTATED_MP4, EventLog, FinishedRun, RunWriter, report_writers

log = logging.getLogger(__name__)

__all__ = ["analyze", "analyze_video", "analyze_camera", "AnalysisResult", "VideoFacts",
           "ANNOTATED_MP4"]
ProgressCallback = Callable[[int, int | None], None]  # (frames done, frames expected or None)
EventCallback = Callable[[EventRecord], None]


@dataclass
class AnalysisResult:
    source: str
    out_dir: Path | None  # None: the writers were the caller's own
    events: list[EventRecord] = field(default_factory=list)
    feature_maps: list = field(default_factory=list)  # (28, 28, 3) map per event, same order
    summary: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # damage or disconnection met mid-run
    interrupted: bool = False

    @property
    def complete(self) -> bool:
        return not self.problems and not self.interrupted


def analyze_video(path: str | Path, out_dir: str | Path | None = None, *,
                  options: PipelineOptions = PipelineOptions(),
                  capture: CaptureOptions = CaptureOptions(),
                  engine: Backend | None = None,
                  progress: ProgressCallback | None = None,
                  on_event: EventCallback | None = None,
                  annotated_video: bool = False,
                  writers: Sequence[RunWriter] | None = None,
                  classify_in_background: bool = True) -> AnalysisResult:
    """Analyse a video file into ``writers``; by default (None) the standard outputs in
    ``out_dir`` (:func:`realtime_mer.writers.report_writers`): events.jsonl (written as events
    are found), trace.csv, events.csv, summary.json, timeline.png and report.html, and
    annotated.mp4 when ``annotated_video``. ``classify_in_background``: each event's flow and
    network run in a worker thread beside the next frames' face stage (the same events, faster
    on 2+ cores); False classifies inline, for the side-by-side benchmark.

    Raises :class:`InputError` before writing anything when the file cannot be opened as a
    video. Damage met later (a truncated file) ends the run early: the outputs are still written,
    with the problem in ``summary.json`` and ``AnalysisResult.problems``. On
    ``KeyboardInterrupt`` the outputs are written with ``interrupted: true`` and the interrupt is
    re-raised.
    """
    if writers is None and out_dir is None:
        raise ValueError("analyze_video needs out_dir for its standard outputs, or writers")
    if writers is not None and annotated_video:
        raise ValueError("annotated_video is one of the standard outputs: with writers of "
                         "your own, add realtime_mer.writers.AnnotatedVideo to them")
    path = Path(path)
    try:
        source = open_video(path, capture)  # raises InputError for missing / not-a-video files
    except BaseException:
        _close(writers or [])  # the run never started: the caller's writers are closed too
        raise
    with source:
        info = source.info
        facts = {"path": str(path), "width": info.width, "height": info.height,
                 "fps_nominal": info.fps_nominal, "frames_declared": info.n_frames_declared,
                 "duration_ms": info.duration_ms,
                 "variable_frame_rate": info.variable_frame_rate, "codec": info.codec}
        if capture.start_ms > 0 or capture.end_ms is not None:  # a segment of the file
            facts.update(start_ms=capture.start_ms, end_ms=capture.end_ms)
        options = _sized_for(options, info.fps_nominal)
        # An event's TV-L1 flow (hundreds of ms on a CPU) runs in a worker thread while the
        # face stage goes on with the next frames: OpenCV and MediaPipe release the GIL, so the
        # two overlap on a second core (1.26x faster on the 2-core CPU, the same events in the
        # same order; docs/BENCHMARK_PIPELINE.md).
        options = replace(options, classify_in_background=classify_in_background)
        voice = _voice(path)
        facts["audio_voice_s"] = _voiced_s(voice)
        if writers is None:
            writers = report_writers(out_dir, regions=options.spotter.region_names,
                                     per_face=options.faces == "all",
                                     annotated_video=annotated_video,
                                     fps_hint=info.fps_nominal or 30.0)
        return _run(iter(source), writers, None if out_dir is None else Path(out_dir),
                    path.name, facts, options, engine, voice=voice,
                    problems=lambda: list(source.errors), dropped=lambda: 0,
                    expected=source.frames_expected, progress=progress, on_event=on_event)


@dataclass(frozen=True)
class VideoFacts:
    """What :func:`analyze` knows of a video before its first frame: its size, nominal rate,
    declared frames and duration, codec, and how long a voice is heard in its audio (None: no
    audio track)."""

    path: str
    width: int
    height: int
    fps_nominal: float
    frames_declared: int | None
    duration_ms: float | None
    codec: str
    audio_voice_s: float | None


def analyze(path: str | Path, *, options: PipelineOptions = PipelineOptions(),
            capture: CaptureOptions = CaptureOptions(), engine: Backend | None = None
            ) -> tuple[Iterator[EventRecord], VideoFacts]:
    """The library's way in, as faster-whisper's ``transcribe``: ``events, facts =
    analyze("interview.mp4")`` opens the video (raising :class:`InputError` at once if it is
    not one) and returns the facts and an iterator; the work happens as the iterator is
    consumed, each event arriving as soon as it is classified, in order. Nothing is written:
    :func:`analyze_video` writes the reports. Stopping early (``break``) closes the video and
    the pipeline."""
    path = Path(path)
    source = open_video(path, capture)
    info = source.info
    try:
        voice = _voice(path)
    except BaseException:
        source.close()
        raise
    facts = VideoFacts(str(path), info.width, info.height, info.fps_nominal,
                       info.n_frames_declared, info.duration_ms, info.codec, _voiced_s(voice))
    options = _sized_for(options, info.fps_nominal)

    def events() -> Iterator[EventRecord]:
        with source, Pipeline(replace(options, classify_in_background=True), engine=engine,
                              source_name=path.name) as pipeline:
            pipeline.voice = voice
            for frame in source:
                yield from pipeline.process(frame).events
            for event, _ in pipeline.finish():
                yield event

    return events(), facts


def _sized_for(options: PipelineOptions, fps_nominal: float) -> PipelineOptions:
    """The ring buffer must hold buffer_seconds of *this* video: at 200 fps (CASME II, SAMM) a
    30 fps-sized buffer keeps under a second, and a long event's onset crop would already be
    overwritten. Capped where the spotter's own history is."""
    if fps_nominal <= 0:
        return options
    fps = min(fps_nominal, options.spotter.max_fps)
    return replace(options, fps_hint=max(options.fps_hint, fps))


def _voice(path: Path) -> list[tuple[float, float]] | None:
    """The recording's voiced stretches: the subject talks where the lips move while a voice is
    heard (Silero VAD, ~1 % of real time; None without an audio track)."""
    return voice_intervals(path) if path.is_file() else None


def _voiced_s(voice: list[tuple[float, float]] | None) -> float | None:
    return None if voice is None else round(sum(b - a for a, b in voice) / 1000.0, 2)


def analyze_camera(device: int | str, out_dir: str | Path, *, duration_s: float | None = None,
                   options: PipelineOptions = PipelineOptions(),
                   capture: CaptureOptions = CaptureOptions(),
                   engine: Backend | None = None, frame_timeout_s: float = 5.0,
                   progress: ProgressCallback | None = None,
                   on_event: EventCallback | None = None) -> AnalysisResult:
    """Analyse a live camera (OpenCV device index or stream URL) until ``duration_s`` passes,
    the camera disconnects, or Ctrl+C; a local video file plays in real time to its end.
    Frames the pipeline cannot keep up with are dropped at the source (oldest first) and counted
    in the summary."""
    camera = WebcamSource(device, capture)
    camera.start()  # raises InputError when the camera cannot be opened
    problems: list[str] = []

    def frames() -> Iterator[Frame]:
        deadline = None if duration_s is None else time.monotonic() + duration_s
        while deadline is None or time.monotonic() < deadline:
            try:
                frame = camera.read(timeout_s=frame_timeout_s)
            except InputError as error:
                problems.append(str(error))
                return
            if frame is None:
                if not camera.ended:  # a video file played to its end is a complete run
                    problems.append(f"no frame from camera {device!r} for {frame_timeout_s:g} s")
                return
            yield frame

    # A live source must not stall while an event is classified: frames would be dropped.
    options = replace(options, classify_in_background=True, drop_when_busy=True)
    try:
        facts = {"camera": str(device), "duration_limit_s": duration_s}
        writers = report_writers(out_dir, regions=options.spotter.region_names,
                                 per_face=options.faces == "all")
        return _run(frames(), writers, Path(out_dir), f"camera {device}", facts, options,
                    engine, problems=lambda: problems, dropped=lambda: camera.dropped,
                    expected=None, progress=progress, on_event=on_event)
    finally:
        camera.stop()


def _run(frames: Iterator[Frame], writers: Sequence[RunWriter], out_dir: Path | None,
         name: str, facts: dict, options: PipelineOptions, engine: Backend | None, *,
         voice: list[tuple[float, float]] | None = None, problems: Callable[[], list[str]],
         dropped: Callable[[], int], expected: int | None, progress: ProgressCallback | None,
         on_event: EventCallback | None) -> AnalysisResult:
    result = AnalysisResult(source=name, out_dir=out_dir)
    stats = SpottingStats(options.spotter.region_names)
    first_ms = last_ms = None
    started = time.perf_counter()
    try:
        pipeline = Pipeline(options, engine=engine, source_name=name)
    except BaseException:
        _close(writers)
        raise
    pipeline.voice = voice

    def spotted(event: EventRecord) -> None:
        for writer in writers:
            writer.spotted(event)

    # Every event reaches the writers the moment it is spotted (without its class), and again
    # with its class when the classifier is done: a killed run keeps what was spotted.
    pipeline.on_spotted = spotted
    count = 0

    def keep(event: EventRecord, feature_map) -> None:
        for writer in writers:
            writer.event(event, feature_map)
        result.events.append(event)
        result.feature_maps.append(feature_map)
        if on_event is not None:
            on_event(event)

    try:
        read_start = time.perf_counter()
        for frame in frames:
            pipeline.timer.add("decode", (time.perf_counter() - read_start) * 1000.0)
            frame_result = pipeline.process(frame)
            count += 1
            first_ms = frame.t_ms if first_ms is None else first_ms
            last_ms = frame.t_ms
            stats.add(frame_result)
            for event, feature_map in zip(frame_result.events, frame_result.feature_maps):
                keep(event, feature_map)
            for writer in writers:
                if writer.timing_stage is None:
                    writer.frame(frame, frame_result)
                else:
                    with pipeline.timer.stage(writer.timing_stage):
                        writer.frame(frame, frame_result)
            if progress is not None:
                progress(count, expected)
            read_start = time.perf_counter()
        for event, feature_map in pipeline.finish():  # still being classified in the background
            keep(event, feature_map)
        if count == 0 and not problems():
            result.problems.append("the input gave no decodable frames")
    except KeyboardInterrupt:
        result.interrupted = True
        # Ctrl+C (or SIGTERM) stops at once: events still waiting for the classifier are kept
        # unclassified, the reports are written from what was found, and the run ends.
        try:
            for event, feature_map in pipeline.abandon():
                keep(event, feature_map)
        except (KeyboardInterrupt, Exception) as error:
            log.warning("events still being classified were lost: %r", error)
        raise
    finally:
        result.problems.extend(_close(writers))
        result.problems.extend(problems())
        pipeline.warn_if_small_face()
        media_s = (last_ms - first_ms) / 1000.0 if count > 1 else 0.0
        result.summary = _summary(facts, pipeline, result, count, dropped(), media_s,
                                  time.perf_counter() - started, stats)
        finished = FinishedRun(name, result.summary, result.events, result.feature_maps,
                               list(pipeline.class_names),
                               frozenset(pipeline.short_lived_faces()))
        try:
            for writer in writers:
                writer.finish(finished)
        except OSError as error:
            log_path = next((w.path for w in writers if isinstance(w, EventLog)), None)
            kept = "" if log_path is None else f" (the events found so far are in {log_path})"
            where = out_dir if out_dir is not None else "the writers' outputs"
            raise OutputError(f"cannot write the results into {where}: "
                              f"{error.strerror or error}{kept}") from None
        finally:
            pipeline.close()
    return result


def _close(writers: Sequence[RunWriter]) -> list[str]:
    """Every writer closed, whatever the others do; the problems they met."""
    problems: list[str] = []
    for writer in writers:
        try:
            problems.extend(writer.close())
        except Exception as error:
            problems.append(f"could not finish an output ({type(writer).__name__}): {error}")
    return problems


def _summary(facts: dict, pipeline: Pipeline, result: AnalysisResult, frames: int, dropped: int,
             video_s: float, wall_s: float, stats: SpottingStats) -> dict:
    per_class: dict[str, dict[str, int]] = {"micro": {}, "macro": {}}
    for event in result.events:
        if event.kind == "blink":
            continue
        per_class.setdefault(event.kind, {})
        per_class[event.kind][event.label] = per_class[event.kind].get(event.label, 0) + 1
    engine = pipeline.engine
    return {
        "input": facts,
        "frames": {
            "processed": frames,
            "with_face": pipeline.frames_with_face,
            "without_face": frames - pipeline.frames_with_face,
            "with_several_faces": pipeline.frames_with_several_faces,
            "sequence_restarts": pipeline.sequence_restarts,
            "hard_cuts": pipeline.hard_cuts,  # shot changes; face tracking restarts at each
            # Frames of history kept for an event's onset (sized from the input's frame rate).
            "ring_buffer_slots": pipeline.buffer_capacity,
            "dropped": dropped,  # only live sources drop; a file is read at the consumer's pace
        },
        "face": pipeline.face_size(),
        "faces": _faces(pipeline, result.events),
        "events": {
            "total": len(result.events),
            "micro": sum(e.kind == "micro" for e in result.events),
            "macro": sum(e.kind == "macro" for e in result.events),
            "blinks": sum(e.kind == "blink" for e in result.events),
            "micro_during_speech": sum(e.kind == "micro" and e.speech for e in result.events),
            "truncated": sum(e.truncated for e in result.events),
            "unclassified": sum(not e.classified for e in result.events),
            "classification_drops": pipeline.classification_drops,
            "per_class": per_class,
        },
        "spotting": stats.summary(),
        "timings_ms": pipeline.timer.summary(),
        "throughput": {
            "wall_s": wall_s,
            "frames_per_s": frames / wall_s if wall_s > 0 else 0.0,
            "media_s": video_s,
            "realtime_factor": (video_s / wall_s) if wall_s > 0 else 0.0,
        },
        # None: spotting only (PipelineOptions.classify False), no engine loaded
        "engine": None if engine is None else {
            "path": str(getattr(engine, "path", "")), "backend": engine.name,
            "device": str(engine.device), "model": engine.manifest.model,
            "sha256": engine.manifest.sha256},
        "complete": result.complete,
        "interrupted": result.interrupted,
        "problems": list(result.problems),
        "version": __version__,
    }


def _faces(pipeline: Pipeline, events: list[EventRecord]) -> dict:
    """The faces followed, each with its event counts, and the faces ignored."""
    faces = pipeline.faces_summary()
    for face in faces["tracked"]:
        own = [e for e in events if e.face_id == face["face_id"]]
        face["events"] = {kind: sum(e.kind == kind for e in own)
                          for kind in ("micro", "macro", "blink")}
    return faces
