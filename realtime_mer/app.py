"""The Gradio demo: a live webcam tab (annotated frames + event log) and an upload tab that runs
``analyze`` on a file and offers its outputs.

The live tab's frames travel on their own WebSocket (:mod:`realtime_mer.live_socket`, with the
page's script ``static/live.js``); each frame is handled by :meth:`LiveSession.stream_update`,
which holds one pipeline per open page, so it can be tested on frames of a real video without a
browser.
"""

from __future__ import annotations

import atexit
import base64
import collections
import html
import logging
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np

from realtime_mer.annotate import annotate, flow_map_image, signal_strip
from realtime_mer.capture import Frame
from realtime_mer.face import small_face_note
from realtime_mer.pipeline import FrameResult, Pipeline, PipelineOptions
from realtime_mer.events import EventRecord
from realtime_mer.report import OUTPUT_FILES
from realtime_mer.runtime import Backend

log = logging.getLogger(__name__)

EVENT_LOG_COLUMNS = ["onset (s)", "apex (s)", "face", "kind", "class", "confidence",
                     "duration (ms)", "regions", "size (%)", "floor (%)", "talking"]
_MAX_LOG_ROWS = 200
_STRIP_SPAN_MS = 8000.0  # the live strip shows this much of the spotting signal
_CARDS = 4  # event cards shown, newest first
_STRIP_EVERY = 3  # frames per update of the strip


def event_row(event: EventRecord) -> list:
    """One row of the event tables, in the order of ``EVENT_LOG_COLUMNS``."""
    return [round(event.onset_ms / 1000, 2), round(event.apex_ms / 1000, 2), event.face_id,
            event.kind,
            event.label, round(event.confidence, 3), round(event.duration_ms),
            "+".join(event.regions), round(event.amplitude_pct, 1), round(event.floor_pct, 1),
            "yes" if event.speech else ""]


@dataclass(frozen=True)
class StreamUpdate:
    """What one streamed frame sends back to the browser. The log and the cards come only when
    they changed since the version the browser shows (``log_rows`` and ``cards_html`` None)."""

    annotated: np.ndarray
    strip: np.ndarray
    strip_redrawn: bool  # False: the strip is the one sent before
    log_rows: list[list] | None
    cards_html: str | None
    log_version: int


@dataclass
class LiveSession:
    """Pipeline state of one live stream. Frames arrive as RGB (what the browser sends); their
    time is the moment they arrive (the capture clock), since a browser stream has no pts."""

    engine: Backend
    options: PipelineOptions = field(default_factory=PipelineOptions)
    pipeline: Pipeline | None = None
    events: list[EventRecord] = field(default_factory=list)
    frames: int = 0
    _t0: float | None = None
    _last_arrival: float | None = None
    _fps: float = 0.0
    # Bumped whenever the event log changes: the stream sends the log and the cards only then.
    log_version: int = 0
    _history: collections.deque = field(default_factory=collections.deque, repr=False)
    _cards: collections.deque = field(default_factory=lambda: collections.deque(maxlen=_CARDS),
                                      repr=False)
    _last_strip: np.ndarray | None = field(default=None, repr=False)
    _last_per_face: dict = field(default_factory=dict, repr=False)  # face id → its last event
    # The stream and the Reset button run in different worker threads: a frame and a reset
    # must not interleave (the pipeline's queues are not shared-state safe).
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def process_rgb(self, image_rgb: np.ndarray, t_ms: float | None = None
                    ) -> tuple[np.ndarray, list[list]]:
        """One frame → (annotated RGB frame, event log rows, newest first)."""
        with self._lock:
            return self._process(image_rgb, t_ms)

    def stream_update(self, image_rgb: np.ndarray, shown_version: int,
                      t_ms: float | None = None) -> StreamUpdate:
        """One streamed frame → everything the browser redraws, read under the same lock as
        the frame: a Reset between the frame and the reading of the log's version would pair
        the old log with the new version, and the browser would keep showing the old log."""
        with self._lock:
            annotated, rows = self._process(image_rgb, t_ms)
            # the strip moves a few pixels a frame: redrawn every third frame
            redraw = self.frames % _STRIP_EVERY == 1 or self._last_strip is None
            strip = self.strip(redraw=redraw)
            if self.log_version == shown_version:
                return StreamUpdate(annotated, strip, redraw, None, None, shown_version)
            return StreamUpdate(annotated, strip, redraw, rows, self.cards_html(),
                                self.log_version)

    def _process(self, image_rgb: np.ndarray, t_ms: float | None
                 ) -> tuple[np.ndarray, list[list]]:
        if self.pipeline is None:
            # Classification runs beside the stream so a browser frame is never held up by it.
            self.pipeline = Pipeline(replace(self.options, classify_in_background=True,
                                             drop_when_busy=True, classifier_niceness=10),
                                     engine=self.engine, source_name="webcam")
        now = time.monotonic()
        if t_ms is None:
            self._t0 = now if self._t0 is None else self._t0
            t_ms = (now - self._t0) * 1000.0
        if self._last_arrival is not None and now > self._last_arrival:
            rate = 1.0 / (now - self._last_arrival)
            self._fps = rate if self._fps == 0 else 0.9 * self._fps + 0.1 * rate
        self._last_arrival = now
        image_bgr = cv2.cvtColor(np.ascontiguousarray(image_rgb), cv2.COLOR_RGB2BGR)
        result = self.pipeline.process(Frame(t_ms=t_ms, image_bgr=image_bgr, index=self.frames))
        self.frames += 1
        self._remember(result)
        if result.events:
            self.events.extend(result.events)
            del self.events[:-_MAX_LOG_ROWS]
            self._cards.extend(zip(result.events, result.feature_maps))
            self.log_version += 1
        for event in result.events:
            self._last_per_face[event.face_id] = event
        annotated = annotate(image_bgr, result, self.events[-1] if self.events else None,
                             self._fps, last_events=self._last_per_face,
                             face_ids=self.options.faces == "all")
        return cv2.cvtColor(annotated, cv2.COLOR_BGR2RGB), self.log_rows()

    def _remember(self, result: FrameResult) -> None:
        """Keep the strip's window of per-region values, thresholds and blink/speech state."""
        regions = len(self.options.spotter.regions)
        missing = np.full(regions, np.nan)
        values = missing if result.region_values is None else result.region_values
        thresholds = missing if result.thresholds is None else result.thresholds
        mark = 1 if result.blinking else 2 if result.speaking else 0
        self._history.append((result.t_ms, values, thresholds, mark))
        while self._history and self._history[0][0] < result.t_ms - _STRIP_SPAN_MS:
            self._history.popleft()

    def strip(self, redraw: bool = True) -> np.ndarray:
        """The live strip (RGB): each region's spotting value against its threshold over the
        last seconds, blinks and speech shaded (``redraw=False``: the last one drawn)."""
        if not redraw and self._last_strip is not None:
            return self._last_strip
        if not self._history:
            image = signal_strip(np.empty(0), np.empty((0, 0)), np.empty((0, 0)),
                                 np.empty(0, np.int8), _STRIP_SPAN_MS)
        else:
            t, values, thresholds, marks = zip(*self._history)
            image = signal_strip(np.asarray(t), np.stack(values), np.stack(thresholds),
                                 np.asarray(marks), _STRIP_SPAN_MS)
        self._last_strip = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        return self._last_strip

    def cards_html(self) -> str:
        """The newest events as cards: kind and times (onset and apex, as in the reports), the
        regions and size, the class probabilities, and the event's flow map."""
        return event_cards(list(self._cards)[::-1])

    def finish(self) -> list[list]:
        """Collect events still being classified (end of a stream) → the event log rows."""
        if self.pipeline is not None:
            done = self.pipeline.finish()
            self.events.extend(event for event, _ in done)
            self._cards.extend(done)
            self.log_version += 1
        return self.log_rows()

    def log_rows(self) -> list[list]:
        return [event_row(e) for e in reversed(self.events)]

    def reset(self) -> None:
        """Start again, also while frames are streaming (the frame in progress finishes
        first); the log is cleared."""
        with self._lock:
            self._reset()

    def _reset(self) -> None:
        if self.pipeline is not None:
            self.pipeline.reset()
        self.events.clear()
        self._history.clear()
        self._cards.clear()
        self._last_per_face.clear()
        self._last_strip = None
        self.log_version += 1
        self.frames = 0
        self._t0 = self._last_arrival = None
        self._fps = 0.0

    def close(self) -> None:
        with self._lock:
            if self.pipeline is not None:
                self.pipeline.close()
                self.pipeline = None


def _data_url(image_bgr: np.ndarray, kind: str = ".png", params: tuple = ()) -> str:
    """A picture inside the page (no file): PNG, or ``.jpg`` with cv2's encoder ``params``."""
    ok, encoded = cv2.imencode(kind, image_bgr, list(params))
    mime = "image/png" if kind == ".png" else "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(encoded).decode()}" if ok else ""


def event_cards(events: list[tuple[EventRecord, np.ndarray | None]]) -> str:
    """HTML cards for events (given newest first): everything in them is escaped or drawn here;
    the flow map is an inline picture, so no file is written per event."""
    if not events:
        return "<p>No events yet.</p>"
    cards = []
    for event, feature_map in events:
        title = "blink" if event.kind == "blink" else \
            f"{event.kind}: {event.label} {event.confidence:.2f}"
        lines = [f"<b>{html.escape(title)}</b>",
                 f"onset {event.onset_ms / 1000:.2f} s, apex {event.apex_ms / 1000:.2f} s, "
                 f"{event.duration_ms:.0f} ms",
                 html.escape(f"{'+'.join(event.regions) or '-'}, size {event.amplitude_pct:.1f} %"
                             f" (floor {event.floor_pct:.1f} %)"
                             + (", talking" if event.speech else "")
                             + (", cut short" if event.truncated else ""))]
        bars = "".join(
            f"<div style='display:flex;gap:4px;align-items:center'>"
            f"<span style='width:70px'>{html.escape(name)}</span>"
            f"<span style='display:inline-block;height:8px;width:{round(100 * p)}px;"
            f"background:#e07b39'></span><span>{p:.2f}</span></div>"
            for name, p in sorted(event.probabilities.items(), key=lambda kv: -kv[1]))
        picture = "" if feature_map is None else \
            f"<img alt='flow map' width='96' height='96' src='{_data_url(flow_map_image(feature_map))}'>"
        cards.append("<div style='display:flex;gap:10px;border:1px solid #8884;border-radius:6px;"
                     f"padding:6px;margin:4px 0'>{picture}<div>{'<br>'.join(lines)}{bars}"
                     "</div></div>")
    return "".join(cards)


def live_view_html() -> str:
    """The live tab's elements; static/live.js fills them."""
    header = "".join(f"<th role='columnheader'>{html.escape(name)}</th>"
                     for name in EVENT_LOG_COLUMNS)
    return f"""
<div id="mer-live">
  <div style="display:flex;gap:12px;flex-wrap:wrap">
    <figure style="margin:0;flex:1;min-width:280px"><figcaption>camera</figcaption>
      <video id="mer-camera" autoplay muted playsinline style="width:100%"></video></figure>
    <figure id="annotated" style="margin:0;flex:1;min-width:280px"><figcaption>annotated
      </figcaption><img alt="" style="width:100%"></figure>
  </div>
  <p><button id="mer-start" class="lg primary">Start camera</button>
    <button id="mer-stop" class="lg secondary">Stop</button>
    <button id="mer-reset" class="lg secondary">Reset</button>
    <span id="mer-status" style="margin-left:8px">Press Start camera.</span></p>
  <div style="display:flex;gap:12px;flex-wrap:wrap">
    <figure id="strip" style="margin:0;flex:1;min-width:280px"><figcaption>spotting signal per
      region</figcaption><img alt="" style="width:100%"></figure>
    <div style="flex:1;min-width:280px"><b>latest events</b>
      <div id="cards">{event_cards([])}</div></div>
  </div>
  <b>event log (newest first)</b>
  <table id="event-log" style="width:100%"><thead><tr role="row">{header}</tr></thead>
    <tbody></tbody></table>
</div>"""


def live_page_head() -> str:
    """What the page's head gets: the live view's script."""
    script = (Path(__file__).parent / "static" / "live.js").read_text()
    return f"<script>{script}</script>"


UPLOAD_KEEP_S = 3600.0  # an upload's report stays downloadable this long
UPLOAD_MAX_SIDE = 1280  # the CLI's default: a 4K upload must not cost the face stage 10x
UPLOAD_MAX_SIZE = "500mb"  # larger uploads are refused by the server before they are stored
SESSION_STATES = 32  # browser sessions whose Gradio state is kept


def _instance_folder() -> Path:
    """This demo's own temporary folder (another demo on the machine has its own), removed when
    the process exits."""
    folder = Path(tempfile.mkdtemp(prefix="mer-demo-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def _fresh_output_dir(root: Path, keep_s: float = UPLOAD_KEEP_S) -> Path:
    """A new folder for one upload's report, after deleting the reports older than ``keep_s``
    (a long-running demo would otherwise fill the disk)."""
    root.mkdir(parents=True, exist_ok=True)
    cutoff = time.time() - keep_s
    for old in root.iterdir():
        try:
            if old.is_dir() and old.stat().st_mtime < cutoff:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:  # another process removed it first
            pass
    return Path(tempfile.mkdtemp(prefix="run-", dir=root))


class UploadAbandoned(Exception):
    """The browser that asked for an analysis has gone: the analysis stops at the next frame."""


def analyze_upload(video_path: str | None, engine: Backend, options: PipelineOptions,
                   progress=None, out_root: Path | None = None, abandoned=lambda: False):
    """Upload tab: analyse a file into a fresh folder under ``out_root`` → (output files,
    timeline, event rows, message). ``abandoned()`` is asked at every frame: when it says the
    browser has left, the analysis stops (nobody would read it) and its folder is removed."""
    from realtime_mer.analysis import analyze_video
    from realtime_mer.capture import CaptureOptions
    from realtime_mer.errors import MerError

    if not video_path:
        return [], None, [], "Choose a video file first."
    out_dir = _fresh_output_dir(out_root or Path(tempfile.gettempdir()) / "mer-analyze")

    def report(done: int, expected: int | None) -> None:
        if abandoned():
            raise UploadAbandoned
        if progress is not None and expected:
            progress(min(done / expected, 1.0), desc=f"frame {done} of {expected}")

    try:
        result = analyze_video(video_path, out_dir, options=options, engine=engine,
                               capture=CaptureOptions(max_side=UPLOAD_MAX_SIDE), progress=report)
    except UploadAbandoned:
        shutil.rmtree(out_dir, ignore_errors=True)
        log.info("upload analysis stopped: its browser left")
        return [], None, [], "Stopped: the page was closed."
    except MerError as error:
        # The server's paths are nobody's business in the browser: the user's file name only.
        text = str(error).replace(str(video_path), Path(video_path).name)
        text = text.replace(str(Path(video_path).parent), "")
        return [], None, [], f"Error: {text}"
    files = [str(out_dir / name) for name in OUTPUT_FILES if (out_dir / name).exists()]
    rows = [event_row(e) for e in result.events]
    s = result.summary
    message = (f"{s['frames']['processed']} frames, {s['frames']['without_face']} without a "
               f"face; {s['events']['micro']} micro and {s['events']['macro']} macro events.")
    face = s.get("face") or {}
    if face.get("small"):
        message += " " + small_face_note(face["median_eye_distance_px"],
                                         face["upsampling_eye_distance_px"], sentence=True)
    if result.problems:
        message += " Problems: " + "; ".join(result.problems) + " (events before it are kept)."
    timeline = str(out_dir / "timeline.png") if (out_dir / "timeline.png").exists() else None
    return files, timeline, rows, message


def _return_freed_memory() -> None:
    """Hand the memory a closed session freed back to the system. glibc keeps freed blocks in
    per-thread arenas, and a session's threads (MediaPipe, classifier) leave hundreds of MB
    there that RSS keeps counting until ``malloc_trim``."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


class LiveSessions:
    """The live sessions of one demo, by key (each live socket's own). A session's pipeline
    (MediaPipe graph, classifier thread) is closed by its owner, the live socket, when it
    closes or idles (``live_socket``); whatever is still open goes at :meth:`shutdown`."""

    def __init__(self, make) -> None:
        self._make = make
        self._sessions: dict[str, LiveSession] = {}
        self._lock = threading.Lock()

    def open(self, key: str) -> LiveSession:
        """A new session under ``key``, for its caller to close."""
        with self._lock:
            session = self._sessions[key] = self._make()
            log.info("live session opened (%d open)", len(self._sessions))
            return session

    def peek(self, key: str) -> LiveSession | None:
        with self._lock:
            return self._sessions.get(key)

    def close(self, key: str, why: str = "its tab closed") -> None:
        with self._lock:
            session = self._sessions.pop(key, None)
        if session is not None:
            session.close()
            _return_freed_memory()
            log.info("live session closed: %s (%d open)", why, len(self._sessions))

    def __len__(self) -> int:
        return len(self._sessions)

    def shutdown(self) -> None:
        for key in list(self._sessions):
            self.close(key, "the demo stops")


def _warm_up(engine: Backend, options: PipelineOptions) -> None:
    """Open a live pipeline, give it a frame and compute one map, then close it: the models
    and libraries a session needs are loaded before the first visitor, who then does not wait
    for them (and the server's memory at start is what any session returns it to)."""
    session = LiveSession(engine=engine, options=options)
    session.process_rgb(np.zeros((240, 320, 3), np.uint8), t_ms=0.0)
    session.pipeline.warm_up()
    session.close()
    _return_freed_memory()


def build_app(engine: Backend, options: PipelineOptions = PipelineOptions(),
              temp_root: Path | None = None, warm_up: bool = True):
    import gradio as gr

    if warm_up:
        _warm_up(engine, options)

    temp_root = temp_root or _instance_folder()

    sessions = LiveSessions(lambda: LiveSession(engine=engine, options=options))

    left: set[str] = set()  # browser sessions gone while their upload was being analysed
    uploading: set[str] = set()

    def leave(request: gr.Request):
        if request.session_hash in uploading:
            left.add(request.session_hash)

    def upload(video, request: gr.Request, progress=gr.Progress()):
        key = request.session_hash
        uploading.add(key)
        try:
            return analyze_upload(video, engine, options, progress,
                                  out_root=temp_root / "reports", abandoned=lambda: key in left)
        finally:
            uploading.discard(key)
            left.discard(key)

    # Gradio passes the request to a parameter annotated gr.Request; this module's annotations
    # are strings (postponed), which Gradio would not resolve to its class.
    for handler in (leave, upload):
        handler.__annotations__["request"] = gr.Request

    manifest = engine.manifest
    # Gradio's cache of uploads and streamed frames: files older than 10 minutes go, checked
    # every 5 minutes, so a demo that runs for days does not fill the disk.
    with gr.Blocks(title="realtime-mer", delete_cache=(300, 600)) as app:
        gr.Markdown(
            f"## realtime-mer: micro-expression recognition\nModel **{manifest.model}** "
            f"({engine.name} on {engine.device}); classes: {', '.join(manifest.class_names)}.")
        with gr.Tab("Live webcam"):
            # The page's own script (static/live.js, added to the page's head by launch)
            # streams the camera over the live socket (live_socket.py), not through Gradio's
            # webcam, which waits for every answer before it sends the next frame.
            gr.HTML(live_view_html())
        with gr.Tab("Analyze a file"):
            video = gr.File(label="video file", file_types=["video"], type="filepath")
            run = gr.Button("Analyze", variant="primary")
            message = gr.Markdown()
            timeline = gr.Image(label="timeline", type="filepath")
            table = gr.Dataframe(headers=EVENT_LOG_COLUMNS, label="events")
            files = gr.File(label="outputs", file_count="multiple")
            # One analysis at a time: a long upload must not starve the live sessions' cores.
            run.click(upload, [video], [files, timeline, table, message], concurrency_limit=1)
        app.unload(leave)  # the tab closed: its upload's analysis stops at the next frame
    app.live_sessions = sessions  # for tests and for the soak benchmark
    return app


def _check_address(host: str, port: int | None) -> None:
    """Say what is wrong with the address before Gradio tries it (its own message calls every
    failure a taken port): a name that does not resolve, an address that is not this
    machine's, a port that is taken."""
    import errno
    import socket

    from realtime_mer.errors import ServeError

    try:
        infos = socket.getaddrinfo(host, port or 0, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise ServeError(f"unknown host {host!r}; give an address of this machine "
                         "(127.0.0.1 by default, 0.0.0.0 for every interface)") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise ServeError(f"port {port} on {host} is in use; choose another with "
                                 "--port") from None
            if error.errno == errno.EADDRNOTAVAIL:
                raise ServeError(f"{host} is not an address of this machine; use 127.0.0.1 "
                                 "(this machine only) or 0.0.0.0 (every interface)") from None
            if error.errno == errno.EACCES:
                raise ServeError(f"no permission to listen on port {port} (ports under 1024 "
                                 "need privileges); choose another with --port") from None
            raise ServeError(f"cannot serve the demo on {host}:{port}: "
                             f"{error.strerror or error}") from None


def launch(app, host: str = "127.0.0.1", port: int | None = 7860, share: bool = False,
           block: bool = True, on_ready=None):
    """Serve the app. Loopback only unless ``host`` says otherwise; no share link unless asked.
    Returns the local URL (``block=False`` returns at once, for tests and embedding;
    ``on_ready(url)`` is called once the server listens, before blocking). A port that is taken
    or an address that is not this machine's raises :class:`ServeError`."""
    from realtime_mer.errors import ServeError

    from realtime_mer.live_socket import attach

    _check_address(host, port)
    try:
        _, local_url, _ = app.queue().launch(
            server_name=host, server_port=port, share=share, inbrowser=False, quiet=True,
            prevent_thread_lock=True, max_file_size=UPLOAD_MAX_SIZE, head=live_page_head(),
            # Gradio keeps a closed tab's own state for an hour; at most SESSION_STATES of them
            # here (the oldest go first). The live sessions are not in Gradio's state (each
            # belongs to its socket).
            state_session_capacity=SESSION_STATES)
    except OSError as error:
        if "empty port" in str(error):  # Gradio's wording; its advice names its own API
            raise ServeError(f"port {port} on {host} is in use; choose another with --port") \
                from None
        raise ServeError(f"cannot serve the demo on {host}:{port}: {error}") from None
    attach(app, app.live_sessions)  # the live view's frames travel on their own socket
    if on_ready is not None:
        on_ready(local_url)
    if block:
        app.block_thread()  # until Ctrl+C, which closes the server
    return local_url
