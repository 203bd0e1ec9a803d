"""Report stage: events as JSON Lines (flushed as found), CSV, summary JSON and a timeline plot.

The JSON Lines file is the durable record: every event is written and flushed (and fsynced) the
moment it is found, so a run that is interrupted or crashes on damaged input keeps what it found.
The other outputs are derived at the end of a run from the same events.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from realtime_mer.events import EventRecord
from realtime_mer.face import small_face_note

log = logging.getLogger(__name__)

EVENTS_JSONL = "events.jsonl"
EVENTS_CSV = "events.csv"
SUMMARY_JSON = "summary.json"
TIMELINE_PNG = "timeline.png"
REPORT_HTML = "report.html"
TRACE_CSV = "trace.csv"
OUTPUT_FILES = (EVENTS_JSONL, EVENTS_CSV, SUMMARY_JSON, TIMELINE_PNG, REPORT_HTML, TRACE_CSV)
# A run over several videos also writes, beside their folders, one row per video.
INDEX_CSV = "index.csv"
INDEX_HTML = "index.html"
# The columns before and after the per-class counts of micro events (micro_<class>).
INDEX_COLUMNS_BEFORE_CLASSES = ("video", "folder", "status", "frames", "without_face",
                                "with_several_faces", "faces", "micro", "macro")
INDEX_COLUMNS_AFTER_CLASSES = ("small_face", "problems")


CSV_COLUMNS = (
    "source", "face_id", "kind", "label", "confidence", "onset_ms", "apex_ms", "offset_ms", "duration_ms",
    "onset_frame", "apex_frame", "offset_frame", "regions", "amplitude_pct", "floor_pct",
    "speech", "truncated", "peak", "threshold",
)


class EventWriter:
    """Appends events to a JSON Lines file, one flushed line per event."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "w", encoding="utf-8")
        self.count = 0

    def write(self, event: EventRecord) -> None:
        self._file.write(json.dumps(event.to_json(), sort_keys=True) + "\n")
        self._file.flush()
        # Events are rare (a few per minute), so paying for fsync buys durability cheaply.
        os.fsync(self._file.fileno())
        self.count += 1

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> "EventWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_events(path: str | Path) -> list[EventRecord]:
    """Read a JSON Lines file written by :class:`EventWriter` (a torn last line is skipped):
    one event per event_id, its last line (the classified one where it came), in the order the
    events were first written."""
    events: dict[int, EventRecord] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            event = EventRecord(**json.loads(line))
        except (json.JSONDecodeError, TypeError):
            log.warning("skipping an unreadable line in %s", path)
            continue
        key = event.event_id if event.event_id else -len(events) - 1
        events[key] = event
    return list(events.values())


def latest_per_event(events: Iterable[EventRecord]) -> list[EventRecord]:
    """The same rule as :func:`read_events` on records in memory."""
    out: dict[int, EventRecord] = {}
    for event in events:
        out[event.event_id if event.event_id else -len(out) - 1] = event
    return list(out.values())


#: Decimals of the CSV's numeric columns: the table is for people and spreadsheets, so times
#: keep 0.1 ms (frames are tens of ms apart) and probabilities and flow magnitudes 4 decimals;
#: events.jsonl keeps full precision.
_CSV_DECIMALS = {"confidence": 4, "onset_ms": 1, "apex_ms": 1, "offset_ms": 1, "duration_ms": 1,
                 "peak": 4, "threshold": 4, "amplitude_pct": 2, "floor_pct": 2}
_CSV_PROBABILITY_DECIMALS = 4


def _rounded(value: Any, decimals: int) -> Any:
    return round(value, decimals) if isinstance(value, float) and math.isfinite(value) else value


class _atomic:
    """Write ``path`` through a temporary file renamed over it at the end: a report is either
    whole or absent (a full disk or a kill mid-write leaves no truncated file behind)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp")

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:
            os.replace(self.tmp, self.path)
        else:
            try:
                self.tmp.unlink()
            except OSError:
                pass


def _csv_cell(value: Any) -> Any:
    """Text that a spreadsheet would read as a formula (=, +, -, @ first; a file name from a
    user, say) is quoted with a leading apostrophe, the usual guard against CSV injection."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def write_csv(path: str | Path, events: Sequence[EventRecord], class_names: Sequence[str]) -> None:
    columns = list(CSV_COLUMNS) + [f"p_{name}" for name in class_names]
    with _atomic(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for event in events:
            row = {key: _rounded(getattr(event, key), _CSV_DECIMALS[key])
                   if key in _CSV_DECIMALS else getattr(event, key) for key in CSV_COLUMNS}
            row["regions"] = "+".join(event.regions)
            row = {key: _csv_cell(value) for key, value in row.items()}
            row.update({f"p_{name}": _rounded(event.probabilities.get(name, ""),
                                              _CSV_PROBABILITY_DECIMALS)
                        for name in class_names})
            writer.writerow(row)


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    """Write JSON atomically (temp file + rename), so a summary is never half-written."""
    with _atomic(path) as tmp:
        tmp.write_text(json.dumps(_finite(payload), indent=2, sort_keys=True, allow_nan=False,
                                  default=_json_default) + "\n")


def _finite(value: Any) -> Any:
    """NaN and infinities (an unknown duration, say) as null: strict JSON has no NaN, and
    parsers other than Python's refuse the file."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, np.ndarray):
        return _finite(value.tolist())
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


@dataclass
class SignalTrace:
    """The spotting signal over time, kept for the timeline plot (NaN where no face): the region
    standing highest over its threshold (value and threshold), and every region's floor."""

    times_ms: list[float] = field(default_factory=list)
    signal: list[float] = field(default_factory=list)
    threshold: list[float] = field(default_factory=list)
    floors: list[np.ndarray] = field(default_factory=list)
    regions: list[str] = field(default_factory=list)

    def append(self, t_ms: float, signal: float | None, threshold: float | None,
               floors: np.ndarray | None = None) -> None:
        self.times_ms.append(t_ms)
        self.signal.append(np.nan if signal is None else float(signal))
        self.threshold.append(np.nan if threshold is None else float(threshold))
        if self.regions:
            self.floors.append(np.full(len(self.regions), np.nan, np.float32) if floors is None
                               else np.asarray(floors, np.float32))


def _views(result: Any) -> list[tuple[int, Any]]:
    """(face id, view) per face of a pipeline FrameResult, or (0, the result) without a face."""
    return [(view.face_id, view) for view in result.faces] or [(0, result)]


class SpotTraceWriter:
    """``trace.csv``: per frame and face (``face_id``; 0 in a frame without one), each region's
    spotting value and detection floor (% of the eye distance; the floor is the smallest
    movement the spotter would report there and then, empty while warming up, inf while a blink
    or a glance masks the region), and whether the lids were masked for a blink and the person was talking.
    Written as the frames go (flushed every second of frames), so an interrupted run keeps it."""

    def __init__(self, path: str | Path, regions: Sequence[str]) -> None:
        self.path = Path(path)
        self.regions = list(regions)
        self._file = open(self.path, "w", newline="", encoding="utf-8")
        self._csv = csv.writer(self._file)
        slug = [r.replace(" ", "_") for r in self.regions]
        self._csv.writerow(["t_ms", "frame", "face_id", *(f"value_{r}" for r in slug),
                            *(f"floor_{r}" for r in slug), "blinking", "speaking"])
        self._since_flush = 0

    def write(self, frame: Any, result: Any) -> None:
        """One row per face of ``result`` (a pipeline FrameResult), or one without a face."""
        for face_id, view in _views(result):
            self._write_row(frame, face_id, view)
        self._since_flush += 1
        if self._since_flush >= 30:
            self._file.flush()
            self._since_flush = 0

    def _write_row(self, frame: Any, face_id: int, view: Any) -> None:
        values, floors = view.region_values, view.floors
        n = len(self.regions)
        face = values is not None
        row = [f"{frame.t_ms:.3f}", frame.index, face_id if face else 0]
        row += [f"{v:.4f}" for v in values] if face else [""] * n
        row += [("" if math.isnan(f) else "inf" if math.isinf(f) else f"{f:.4f}")
                for f in floors] if face and floors is not None else [""] * n
        row += [int(view.blinking), int(view.speaking)]
        self._csv.writerow(row)

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


class SpottingStats:
    """The figures of ``summary.json``'s ``spotting``, gathered frame by frame: per region, the
    floor's median, 10th and 90th percentile over the face frames where it was known (% of the
    eye distance) and the share of frames it was masked (a blink); the shares of face frames
    with a blink under way and with the person talking."""

    def __init__(self, regions: Sequence[str]) -> None:
        self.regions = list(regions)
        self._floors: list[np.ndarray] = []
        self._blinking = self._speaking = 0

    def add(self, result: Any) -> None:
        for _, view in _views(result):
            if view.region_values is not None and view.floors is not None:
                self._floors.append(np.asarray(view.floors, np.float32))
                self._blinking += bool(view.blinking)
                self._speaking += bool(view.speaking)

    def summary(self) -> dict[str, Any]:
        frames = len(self._floors)
        out: dict[str, Any] = {"frames": frames, "floors_pct": {}}
        floors = np.stack(self._floors) if frames else np.zeros((0, len(self.regions)))
        for k, region in enumerate(self.regions):
            column = floors[:, k]
            known = column[np.isfinite(column)]
            out["floors_pct"][region] = {
                "median": float(np.median(known)) if known.size else None,
                "p10": float(np.percentile(known, 10)) if known.size else None,
                "p90": float(np.percentile(known, 90)) if known.size else None,
                "masked_share": float(np.isinf(column).mean()) if frames else 0.0,
            }
        out["blinking_share"] = self._blinking / frames if frames else 0.0
        out["speaking_share"] = self._speaking / frames if frames else 0.0
        return out


#: Faces drawn in the timeline at most (one panel each).
MAX_TIMELINE_FACES = 6

_KIND_COLOURS = {"micro": "tab:red", "macro": "tab:blue", "blink": "tab:green"}


def plot_timeline(path: str | Path, trace: SignalTrace, events: Iterable[EventRecord],
                  title: str = "", face_traces: Mapping[int, SignalTrace] | None = None) -> None:
    """Top: the spotting signal and its threshold, each event shaded from onset to offset, apex
    marked and labelled (class and confidence; blinks as such). Below, when the trace has them:
    each region's detection floor, the smallest movement the spotter would report there and
    then (% of the eye distance; a micro-expression moves 1-3 %). ``face_traces`` (face id →
    that face's trace) with several faces: one signal panel per face with its own events,
    instead (the floors of every face are in trace.csv)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    events = list(events)
    if face_traces is not None and len(face_traces) > 1:
        # The faces seen longest, in id order: a crowd's every passer-by would make a page no
        # one reads (every face's values are in trace.csv).
        shown = sorted(sorted(face_traces, key=lambda i: -np.isfinite(
            np.asarray(face_traces[i].signal, float)).sum())[:MAX_TIMELINE_FACES])
        panels = [(f"face {face_id}", face_traces[face_id],
                   [e for e in events if e.face_id == face_id]) for face_id in shown]
        with_floors = False
    else:
        panels = [("", trace, events)]
        t_all = np.asarray(trace.times_ms, dtype=float)
        with_floors = bool(trace.regions) and len(trace.floors) == len(t_all) and len(t_all) > 0
    rows = len(panels) + with_floors
    height = 3.6 if rows == 1 else 5.6 if with_floors else 1.2 + 2.2 * rows
    fig, axes = plt.subplots(rows, 1, figsize=(12, height), dpi=100, sharex=True, squeeze=False)
    for row, (name, panel_trace, panel_events) in enumerate(panels):
        _signal_panel(axes[row, 0], panel_trace, panel_events, name)
    axes[0, 0].set_title(title or "micro-expression spotting", fontsize=10)
    t_s = np.asarray(trace.times_ms, dtype=float) / 1000.0
    if len(t_s):  # the whole input, whichever face came first
        axes[0, 0].set_xlim(t_s[0], max(t_s[-1], t_s[0] + 1e-3))
    if with_floors:
        floor_ax = axes[1, 0]
        floors = np.stack(trace.floors)
        for k, region in enumerate(trace.regions):
            # A masked region (a blink) has no floor: a gap in its line.
            floor_ax.plot(t_s, np.where(np.isfinite(floors[:, k]), floors[:, k], np.nan),
                          lw=0.9, label=region)
        floor_ax.axhspan(1.0, 3.0, color="tab:red", alpha=0.08, label="micro-expression sizes")
        floor_ax.set_yscale("log")
        floor_ax.set_ylabel("detection floor (%)")
        floor_ax.legend(loc="upper left", fontsize=7, ncol=5)
    axes[-1, 0].set_xlabel("time (s)")
    import warnings

    try:
        # A title in a script the font lacks (a Chinese file name) draws as boxes; matplotlib's
        # warning about each missing glyph is not the user's business on stderr.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Glyph .* missing from font")
            fig.tight_layout()
            with _atomic(path) as tmp:
                fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)


def _signal_panel(ax, trace: SignalTrace, events: Sequence[EventRecord], name: str) -> None:
    """One face's spotting signal against its threshold, with its events."""
    t_s = np.asarray(trace.times_ms, dtype=float) / 1000.0
    ax.plot(t_s, trace.signal, lw=0.9, color="black", label="spotting signal")
    ax.plot(t_s, trace.threshold, lw=0.9, ls="--", color="tab:orange", label="threshold")
    for event in events:
        colour = _KIND_COLOURS.get(event.kind, "tab:gray")
        ax.axvspan(event.onset_ms / 1000, event.offset_ms / 1000, color=colour, alpha=0.18)
        ax.axvline(event.apex_ms / 1000, color=colour, lw=0.8)
        text = "blink" if event.kind == "blink" else \
            f"{event.kind}: {event.label} {event.confidence:.2f}"
        ax.annotate(text, (event.apex_ms / 1000, 1.0), xycoords=("data", "axes fraction"),
                    rotation=90, va="top", ha="right", fontsize=7, color=colour)
    ax.set_ylabel(f"{name}: movement (%)" if name else "movement (% eye dist.)")
    if len(t_s):
        ax.set_xlim(t_s[0], max(t_s[-1], t_s[0] + 1e-3))
    ax.legend(loc="upper left", fontsize=8)


def write_html(path: str | Path, summary: dict[str, Any], events: Sequence[EventRecord],
               timeline_png: str | Path | None = None,
               feature_maps: Sequence[np.ndarray | None] = ()) -> None:
    """A self-contained HTML report (no external files or scripts): summary, the timeline image
    and a table of events with each event's (u, v, strain) feature map, all embedded."""
    import base64
    import html

    import cv2

    def png_data(image_bgr: np.ndarray) -> str:
        ok, encoded = cv2.imencode(".png", image_bgr)
        return "data:image/png;base64," + base64.b64encode(encoded.tobytes()).decode() if ok \
            else ""

    def map_image(feature_map: np.ndarray | None) -> str:
        if feature_map is None:
            return ""
        # (u, v, strain) in [0, 1] → RGB as the published maps store it, enlarged for the eye
        rgb = np.clip(feature_map * 255.0 + 0.5, 0, 255).astype(np.uint8)
        big = cv2.resize(rgb[..., ::-1], (112, 112), interpolation=cv2.INTER_NEAREST)
        return f'<img alt="feature map" src="{png_data(big)}">'

    esc = html.escape
    timeline = ""
    if timeline_png is not None and Path(timeline_png).exists():
        data = base64.b64encode(Path(timeline_png).read_bytes()).decode()
        timeline = f'<img style="max-width:100%" alt="timeline" src="data:image/png;base64,{data}">'
    frames = summary.get("frames", {})
    counts = summary.get("events", {})
    facts = summary.get("input", {})
    rows: dict[int, list[str]] = {}
    maps = list(feature_maps) + [None] * (len(events) - len(feature_maps))
    for event, feature_map in zip(events, maps):
        probabilities = ", ".join(f"{esc(k)} {v:.2f}" for k, v in event.probabilities.items())
        label = "–" if event.kind == "blink" else \
            f"<b>{esc(event.label)}</b> {event.confidence:.2f}"
        notes = [n for n, on in (("while talking", event.speech),
                                 ("cut short by the end of the input", event.truncated)) if on]
        where = esc(", ".join(event.regions))
        size = (f"eyes {event.amplitude_pct:.0f} % closed" if event.kind == "blink" else
                f"{event.amplitude_pct:.1f} % (floor {event.floor_pct:.1f} %)")
        rows.setdefault(event.face_id, []).append(
            f"<tr><td>{event.onset_ms / 1000:.2f}</td><td>{event.apex_ms / 1000:.2f}</td>"
            f"<td>{event.offset_ms / 1000:.2f}</td><td>{event.duration_ms:.0f}</td>"
            f"<td>{esc(event.kind)}{'<br>' + esc('; '.join(notes)) if notes else ''}</td>"
            f"<td>{where}</td><td>{size}</td><td>{label}</td>"
            f"<td>{probabilities}</td><td>{map_image(feature_map)}</td></tr>")
    problems = "".join(f"<li>{esc(p)}</li>" for p in summary.get("problems", []))
    segment = ""
    if facts.get("start_ms") is not None or facts.get("end_ms") is not None:
        end = facts.get("end_ms")
        segment = (f", segment {(facts.get('start_ms') or 0.0) / 1000:.2f} s to "
                   f"{'the end' if end is None else f'{end / 1000:.2f} s'}")
    face = summary.get("face") or {}
    if face.get("median_eye_distance_px") is not None:
        segment += f"; the face's eyes {face['median_eye_distance_px']:.0f} px apart (median)"
    floors = (summary.get("spotting") or {}).get("floors_pct") or {}
    floor_line = ""
    if any(v.get("median") is not None for v in floors.values()):
        floor_line = "Detection floor (median; the smallest movement the spotter could report, " \
            "% of the eye distance; micro-expressions move 1-3 %): " + ", ".join(
                f"{esc(region)} {v['median']:.1f}" for region, v in floors.items()
                if v.get("median") is not None) + "."
    small_face = ""
    if face.get("small"):
        note = small_face_note(face["median_eye_distance_px"], face["upsampling_eye_distance_px"],
                               sentence=True)
        small_face = f'<p class="bad">{esc(note)}</p>'
    engine = summary.get("engine")
    engine_line = "Spotting only: the events are not classified." if engine is None else \
        f"Engine: {esc(str(engine.get('model', '')))} ({esc(str(engine.get('backend', '')))})."
    faces = summary.get("faces") or {}
    per_face = faces.get("mode") == "all"
    header = ("<tr><th>onset (s)</th><th>apex (s)</th><th>offset (s)</th><th>duration (ms)</th>"
              "<th>kind</th><th>regions</th><th>size (% of the eye distance)</th><th>class</th>"
              "<th>probabilities</th><th>flow map (R u, G v, B strain)</th></tr>")
    empty = '<tr><td colspan="10">no events</td></tr>'
    faces_line = ""
    if per_face and (faces.get("tracked") or rows):
        tracked = faces.get("tracked", [])
        ignored = faces.get("ignored", {})
        faces_line = (f"<p>Faces tracked: {len(tracked)}"
                      + "".join(f"; face {f['face_id']}: {f['frames']} frames"
                                + (f", eyes {f['median_eye_distance_px']:.0f} px apart"
                                   if f.get("median_eye_distance_px") is not None else "")
                                for f in tracked)
                      + f". Ignored: {ignored.get('too_small', 0)} too small, "
                        f"{ignored.get('short_lived', 0)} short-lived.</p>")
        ids = [f["face_id"] for f in tracked] + sorted(set(rows) - {f["face_id"] for f in tracked})
        tables = "".join(f"<h2>Face {face_id}: events</h2><table>{header}"
                         f"{''.join(rows.get(face_id, [])) or empty}</table>" for face_id in ids)
    else:
        all_rows = [row for face_rows in rows.values() for row in face_rows]
        tables = f"<h2>Events</h2><table>{header}{''.join(all_rows) or empty}</table>"
    body = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>realtime-mer report: {esc(str(facts.get('path', facts.get('camera', ''))))}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:middle}}
.bad{{color:#b00}}</style></head><body>
<h1>Micro-expression report</h1>
<p>Input: <code>{esc(str(facts.get('path', facts.get('camera', ''))))}</code>
{esc(str(facts.get('width', '')))}×{esc(str(facts.get('height', '')))}{segment},
{frames.get('processed', 0)} frames ({frames.get('without_face', 0)} without a face,
{frames.get('with_several_faces', 0)} with several faces, {frames.get('dropped', 0)} dropped;
{frames.get('hard_cuts', 0)} hard cuts).
Events: {counts.get('micro', 0)} micro ({counts.get('micro_during_speech', 0)} while talking),
{counts.get('macro', 0)} macro, {counts.get('blinks', 0)} blinks.
{floor_line}
{engine_line}</p>
{f'<p class="bad">Incomplete run:</p><ul class="bad">{problems}</ul>' if problems else ''}
{faces_line}
{small_face}
{'<p class="bad">Interrupted: the events found before the interruption are listed.</p>' if summary.get('interrupted') else ''}
{timeline}
{tables}</body></html>
"""
    with _atomic(path) as tmp:
        tmp.write_text(body, encoding="utf-8")


def index_row(video: str | Path, folder: str, summary: dict[str, Any] | None,
              class_names: Sequence[str], error: str | None = None) -> dict[str, Any]:
    """One video's row of the batch index: where its report is, whether it is complete
    ("complete", "incomplete": damaged or interrupted, results kept; "failed": no results),
    its frame and event counts (micro events per class too) and what went wrong."""
    row: dict[str, Any] = {"video": str(video), "folder": folder}
    if summary is None:
        row.update(status="failed", problems=error or "")
        return row
    frames = summary.get("frames", {})
    events = summary.get("events", {})
    micro_per_class = events.get("per_class", {}).get("micro", {})
    row.update(
        status="complete" if summary.get("complete") else "incomplete",
        frames=frames.get("processed", 0), without_face=frames.get("without_face", 0),
        with_several_faces=frames.get("with_several_faces", 0),
        faces=len((summary.get("faces") or {}).get("tracked", [])),  # faces followed
        micro=events.get("micro", 0), macro=events.get("macro", 0),
        small_face=bool((summary.get("face") or {}).get("small", False)),
        problems="; ".join(summary.get("problems", [])
                           + (["interrupted"] if summary.get("interrupted") else [])),
        **{f"micro_{name}": micro_per_class.get(name, 0) for name in class_names})
    return row


def write_index(out_dir: str | Path, rows: Sequence[dict[str, Any]],
                class_names: Sequence[str]) -> None:
    """``index.csv`` and ``index.html`` in ``out_dir``: one row per video of a batch, the page
    linking each video's report. Rewritten after every video, so an interrupted batch keeps
    the index of what it finished."""
    import html
    from urllib.parse import quote

    out_dir = Path(out_dir)
    columns = [*INDEX_COLUMNS_BEFORE_CLASSES, *(f"micro_{name}" for name in class_names),
               *INDEX_COLUMNS_AFTER_CLASSES]
    with _atomic(out_dir / INDEX_CSV) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows({k: _csv_cell(v) for k, v in row.items()} for row in rows)
    esc = html.escape
    body = []
    for row in rows:
        report = Path(row["folder"]) / REPORT_HTML
        name = esc(Path(row["video"]).name)
        # A relative URL: folder names with spaces or other characters are percent-encoded.
        link = (f'<a href="{esc(quote(report.as_posix()), quote=True)}">{name}</a>'
                if row["status"] != "failed" and (out_dir / report).exists() else name)
        cells = "".join(f"<td>{esc(str(row.get(c, '')))}</td>" for c in columns[2:])
        body.append(f"<tr><td>{link}</td><td>{esc(row['folder'])}</td>{cells}</tr>")
    header = "".join(f"<th>{esc(c)}</th>" for c in columns)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>realtime-mer: {len(rows)} videos</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}</style></head><body>
<h1>Micro-expression reports: {len(rows)} videos</h1>
<table><tr>{header}</tr>
{''.join(body)}
</table></body></html>
"""
    with _atomic(out_dir / INDEX_HTML) as tmp:
        tmp.write_text(page, encoding="utf-8")

