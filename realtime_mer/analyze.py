"""Analyse a recorded video into the five report files, keeping every event found so far when
the input turns out damaged or the run is interrupted."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from realtime_mer import __version__
from realtime_mer.capture import CaptureOptions, open_video
from realtime_mer.errors import InputError
from realtime_mer.pipeline import Pipeline, PipelineOptions
from realtime_mer.report import (EVENTS_CSV, EVENTS_JSONL, SUMMARY_JSON, TIMELINE_PNG,
                                 EventRecord, EventWriter, SignalTrace, plot_timeline, write_csv,
                                 write_json)
from realtime_mer.runtime import Backend

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int | None], None]  # (frames done, frames expected or None)


@dataclass
class AnalysisResult:
    source: Path
    out_dir: Path
    events: list[EventRecord] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # damage met while reading the input
    interrupted: bool = False

    @property
    def complete(self) -> bool:
        return not self.problems and not self.interrupted


def analyze_video(path: str | Path, out_dir: str | Path, *,
                  options: PipelineOptions = PipelineOptions(),
                  capture: CaptureOptions = CaptureOptions(),
                  engine: Backend | None = None,
                  progress: ProgressCallback | None = None) -> AnalysisResult:
    """Run the pipeline over a video file and write events.jsonl (as events are found),
    events.csv, summary.json and timeline.png into ``out_dir``.

    Raises :class:`InputError` before writing anything when the file cannot be opened as a
    video. Damage met later (a truncated file) ends the run early: the outputs are still written,
    with the problem recorded in ``summary.json`` and in ``AnalysisResult.problems``. On
    ``KeyboardInterrupt`` the outputs are written with ``interrupted: true`` and the interrupt is
    re-raised.
    """
    path = Path(path)
    out_dir = Path(out_dir)
    source = open_video(path, capture)  # raises InputError for missing / not-a-video files
    out_dir.mkdir(parents=True, exist_ok=True)
    result = AnalysisResult(source=path, out_dir=out_dir)
    trace = SignalTrace()
    started = time.perf_counter()
    pipeline = Pipeline(options, engine=engine, source_name=path.name)
    writer = EventWriter(out_dir / EVENTS_JSONL)
    frames = 0
    try:
        with source:
            expected = source.info.n_frames_declared or None
            decode_start = time.perf_counter()
            for frame in source:
                pipeline.timer.add("decode", (time.perf_counter() - decode_start) * 1000.0)
                frame_result = pipeline.process(frame)
                frames += 1
                trace.append(frame.t_ms, frame_result.signal, frame_result.threshold)
                if frame_result.event is not None:
                    writer.write(frame_result.event)
                    result.events.append(frame_result.event)
                if progress is not None:
                    progress(frames, expected)
                decode_start = time.perf_counter()
            result.problems.extend(source.errors)
            if frames == 0 and not result.problems:
                result.problems.append("the video contains no decodable frames")
            info = source.info
    except KeyboardInterrupt:
        result.interrupted = True
        info = source.info
        raise
    except Exception:
        info = source.info
        raise
    finally:
        writer.close()
        wall_s = time.perf_counter() - started
        result.summary = _summary(path, info, pipeline, result, frames, trace, wall_s)
        _write_outputs(out_dir, result, pipeline.class_names, trace)
        pipeline.close()
    return result


def _summary(path, info, pipeline: Pipeline, result: AnalysisResult, frames: int,
             trace: SignalTrace, wall_s: float) -> dict:
    counts: dict[str, dict[str, int]] = {"micro": {}, "macro": {}}
    for event in result.events:
        counts.setdefault(event.kind, {})
        counts[event.kind][event.label] = counts[event.kind].get(event.label, 0) + 1
    video_s = (trace.times_ms[-1] - trace.times_ms[0]) / 1000.0 if len(trace.times_ms) > 1 else 0.0
    manifest = pipeline.engine.manifest
    return {
        "input": {
            "path": str(path), "width": info.width, "height": info.height,
            "fps_nominal": info.fps_nominal, "frames_declared": info.n_frames_declared,
            "duration_ms": info.duration_ms, "variable_frame_rate": info.variable_frame_rate,
            "codec": getattr(info, "codec", None),
        },
        "frames": {
            "processed": frames,
            "with_face": pipeline.frames_with_face,
            "without_face": frames - pipeline.frames_with_face,
            "with_several_faces": pipeline.frames_with_several_faces,
            "sequence_restarts": pipeline.sequence_restarts,
            "dropped": 0,  # a file is read at the consumer's pace; only live sources drop
        },
        "events": {
            "total": len(result.events),
            "micro": sum(e.kind == "micro" for e in result.events),
            "macro": sum(e.kind == "macro" for e in result.events),
            "per_class": counts,
        },
        "timings_ms": pipeline.timer.summary(),
        "throughput": {
            "wall_s": wall_s,
            "frames_per_s": frames / wall_s if wall_s > 0 else 0.0,
            "video_s": video_s,
            "realtime_factor": (video_s / wall_s) if wall_s > 0 else 0.0,
        },
        "engine": {"path": str(getattr(pipeline.engine, "path", "")), "backend":
                   pipeline.engine.name, "device": str(pipeline.engine.device),
                   "model": manifest.model, "sha256": manifest.sha256},
        "complete": result.complete,
        "interrupted": result.interrupted,
        "problems": list(result.problems),
        "version": __version__,
    }


def _write_outputs(out_dir: Path, result: AnalysisResult, class_names, trace) -> None:
    write_csv(out_dir / EVENTS_CSV, result.events, class_names)
    write_json(out_dir / SUMMARY_JSON, result.summary)
    try:
        plot_timeline(out_dir / TIMELINE_PNG, trace, result.events, title=result.source.name)
    except Exception as error:  # a plot must never cost the user the events
        log.warning("could not draw the timeline: %s", error)
