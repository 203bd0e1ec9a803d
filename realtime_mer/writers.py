"""What a run leaves behind. The pipeline gives each frame's result and each event; a writer
turns them into one output:

- :class:`EventLog`: ``events.jsonl``, a line the moment an event is spotted and again when it
  is classified (the durable record: a killed run keeps it);
- :class:`TraceFile`: ``trace.csv``, per frame and face, each region's value and floor;
- :class:`AnnotatedVideo`: ``annotated.mp4``, the input with faces, ids and last events drawn;
- :class:`Reports`: ``events.csv``, ``summary.json``, ``timeline.png`` and ``report.html``,
  written when the run ends;
- :class:`BatchIndex`: across recordings, ``index.csv`` and ``index.html``.

:func:`realtime_mer.analysis.analyze_video` feeds whichever writers it is given; without any it
takes :func:`report_writers`, the standard set that the CLI, the demo, the Ray workers and the
benchmarks share. A writer of one's own subclasses :class:`RunWriter`."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from realtime_mer.annotate import AnnotatedVideoWriter, annotate
from realtime_mer.capture import Frame
from realtime_mer.errors import OutputError
from realtime_mer.events import EventRecord
from realtime_mer.report import (EVENTS_CSV, EVENTS_JSONL, OUTPUT_FILES, REPORT_HTML,
                                 SUMMARY_JSON, TIMELINE_PNG, TRACE_CSV, EventWriter, SignalTrace,
                                 SpotTraceWriter, index_row, plot_timeline, write_csv,
                                 write_html, write_index, write_json)

log = logging.getLogger(__name__)

__all__ = ["RunWriter", "FinishedRun", "EventLog", "TraceFile", "AnnotatedVideo", "Reports",
           "BatchIndex", "report_writers", "ANNOTATED_MP4"]

ANNOTATED_MP4 = "annotated.mp4"


@dataclass(frozen=True)
class FinishedRun:
    """What the end-of-run outputs are made of."""

    source: str  # the input's name, as the reports title it
    summary: dict
    events: list[EventRecord]
    feature_maps: list  # (28, 28, 3) map per event, same order
    class_names: list[str]
    short_lived_faces: frozenset[int] = frozenset()  # tracks ignored as spurious


class RunWriter:
    """One output of a run. Each hook is called in the run's order and may be left as is:
    ``spotted`` (an event the moment it is found, before its class), ``event`` (a finished
    event), ``frame`` (every frame, after its events), ``close`` (the frames have ended; returns
    problems met, which go into the summary), ``finish`` (the summary is known). ``close``
    is called even when the run is interrupted or fails."""

    #: Where in the summary's per-stage timings this writer's ``frame`` is counted (None: not).
    timing_stage: str | None = None

    def spotted(self, event: EventRecord) -> None:
        pass

    def event(self, event: EventRecord, feature_map: Any) -> None:
        pass

    def frame(self, frame: Frame, result: Any) -> None:
        pass

    def close(self) -> list[str]:
        return []

    def finish(self, run: FinishedRun) -> None:
        pass


class EventLog(RunWriter):
    """``events.jsonl``, flushed and fsynced per line: the record that survives a kill."""

    def __init__(self, out_dir: Path) -> None:
        self._writer = EventWriter(Path(out_dir) / EVENTS_JSONL)

    @property
    def path(self) -> Path:
        return self._writer.path

    def spotted(self, event: EventRecord) -> None:
        self._writer.write(event)

    def event(self, event: EventRecord, feature_map: Any) -> None:
        if event.kind != "blink":  # a blink's line is final when it is spotted
            self._writer.write(event)

    def close(self) -> list[str]:
        self._writer.close()
        return []


class TraceFile(RunWriter):
    """``trace.csv``, written as the frames go (see :class:`realtime_mer.report.SpotTraceWriter`)."""

    def __init__(self, out_dir: Path, regions: Sequence[str]) -> None:
        self._writer = SpotTraceWriter(Path(out_dir) / TRACE_CSV, regions)

    def frame(self, frame: Frame, result: Any) -> None:
        self._writer.write(frame, result)

    def close(self) -> list[str]:
        self._writer.close()
        return []


class AnnotatedVideo(RunWriter):
    """``annotated.mp4``: each frame with its faces, their ids (when every face is tracked) and
    their last events. A failure to write it is a problem of the run, never a lost report."""

    def __init__(self, out_dir: Path, fps_hint: float, face_ids: bool) -> None:
        self._face_ids = face_ids
        self._last: EventRecord | None = None
        self._last_per_face: dict[int, EventRecord] = {}
        self._problems: list[str] = []
        self._video: AnnotatedVideoWriter | None = None
        try:
            self._video = AnnotatedVideoWriter(Path(out_dir) / ANNOTATED_MP4, fps_hint)
        except Exception as error:
            self._problems.append(f"could not write {ANNOTATED_MP4}: {error}")

    @property
    def timing_stage(self) -> str | None:  # timed only while there is a video to write
        return None if self._video is None else "annotate"

    def event(self, event: EventRecord, feature_map: Any) -> None:
        self._last = event
        self._last_per_face[event.face_id] = event

    def frame(self, frame: Frame, result: Any) -> None:
        if self._video is None:
            return
        try:
            self._video.write(annotate(frame.image_bgr, result, self._last,
                                       last_events=self._last_per_face,
                                       face_ids=self._face_ids), frame.t_ms)
        except Exception as error:
            self._problems.append(f"could not write {ANNOTATED_MP4}: {error}")
            self._give_up()

    def _give_up(self) -> None:
        try:
            self._video.close()
        except Exception:
            pass
        self._video = None

    def close(self) -> list[str]:
        if self._video is not None:
            try:
                self._video.close()
            except Exception as error:
                self._problems.append(f"could not finish {ANNOTATED_MP4}: {error}")
            self._video = None
        return self._problems


class Reports(RunWriter):
    """``events.csv``, ``summary.json``, ``timeline.png`` (one panel per face when every face
    is tracked) and ``report.html``, each written whole or not at all when the run ends."""

    def __init__(self, out_dir: Path, regions: Sequence[str], per_face: bool) -> None:
        self.out_dir = Path(out_dir)
        self._trace = SignalTrace(regions=list(regions))
        self._per_face = per_face
        self._face_traces: dict[int, SignalTrace] = {}

    def frame(self, frame: Frame, result: Any) -> None:
        self._trace.append(frame.t_ms, result.signal, result.threshold, result.floors)
        if self._per_face:
            self._append_face_traces(frame.t_ms, result)

    def _append_face_traces(self, t_ms: float, result: Any) -> None:
        """Each face's signal at the frames where it is seen, and one gap (NaN) where it goes
        missing, so a trace grows with its face's frames, not with the input's."""
        views = {view.face_id: view for view in result.faces}
        for face_id in views.keys() - self._face_traces.keys():
            self._face_traces[face_id] = SignalTrace()
        for face_id, face_trace in self._face_traces.items():
            view = views.get(face_id)
            if view is not None:
                face_trace.append(t_ms, view.signal, view.threshold)
            elif face_trace.signal and not np.isnan(face_trace.signal[-1]):
                face_trace.append(t_ms, None, None)

    def finish(self, run: FinishedRun) -> None:
        write_csv(self.out_dir / EVENTS_CSV, run.events, run.class_names)
        write_json(self.out_dir / SUMMARY_JSON, run.summary)
        timeline = self.out_dir / TIMELINE_PNG
        try:
            plot_timeline(timeline, self._trace, run.events, title=run.source,
                          face_traces={face_id: trace
                                       for face_id, trace in self._face_traces.items()
                                       if face_id not in run.short_lived_faces})
        except Exception as error:  # a plot must never cost the user the events
            log.warning("could not draw the timeline: %s", error)
        write_html(self.out_dir / REPORT_HTML, run.summary, run.events, timeline,
                   run.feature_maps)


def report_writers(out_dir: str | Path, *, regions: Sequence[str], per_face: bool = False,
                   annotated_video: bool = False, fps_hint: float = 30.0) -> list[RunWriter]:
    """The standard outputs in ``out_dir``: the event log, the trace, the reports and, when
    asked, the annotated video. An earlier run's files there go first, so the folder never mixes
    two runs. Raises :class:`OutputError` when the folder cannot be written (before any frame
    is read, so nothing is lost)."""
    out_dir = Path(out_dir)
    writers: list[RunWriter] = []
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        earlier = [out_dir / n for n in (*OUTPUT_FILES, ANNOTATED_MP4) if (out_dir / n).is_file()]
        if earlier:
            log.warning("%s: replacing the results of an earlier run (%s)", out_dir,
                        ", ".join(path.name for path in earlier))
            for path in earlier:
                path.unlink()
        writers.append(EventLog(out_dir))
        writers.append(TraceFile(out_dir, regions))
    except OSError as error:
        for writer in writers:
            writer.close()
        raise OutputError(f"cannot write the results into {out_dir}: "
                          f"{error.strerror or error}") from None
    writers.append(Reports(out_dir, regions, per_face))
    if annotated_video:
        writers.append(AnnotatedVideo(out_dir, fps_hint, face_ids=per_face))
    return writers


@dataclass
class BatchIndex:
    """``index.csv`` and ``index.html`` in ``out_dir``: a row per recording of a batch (where
    its report is, whether it is complete, its counts, what went wrong), rewritten after each
    recording so an interrupted batch keeps the index of what it finished."""

    out_dir: Path
    class_names: Sequence[str]
    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(self, video: str | Path, folder: Path, summary: dict | None,
            error: str | None = None) -> None:
        """One recording's row (summary None: it failed with ``error``); raises OSError when
        the index cannot be written (the recording's own folder holds its results regardless)."""
        self.rows.append(index_row(video, Path(folder).name, summary, self.class_names, error))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        write_index(self.out_dir, self.rows, self.class_names)
