"""The Gradio demo: a live webcam tab (annotated frames + event log) and an upload tab that runs
``analyze`` on a file and offers its outputs.

The streaming function is :meth:`LiveSession.process_rgb`; it holds one pipeline per browser
session, so it can be tested on frames of a real video without a browser.
"""

from __future__ import annotations

import atexit
import logging
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np

from realtime_mer.annotate import annotate
from realtime_mer.capture import Frame
from realtime_mer.face import small_face_note
from realtime_mer.pipeline import FrameResult, Pipeline, PipelineOptions
from realtime_mer.report import OUTPUT_FILES, EventRecord
from realtime_mer.runtime import Backend

log = logging.getLogger(__name__)

EVENT_LOG_COLUMNS = ["onset (s)", "apex (s)", "kind", "class", "confidence", "duration (ms)",
                     "regions", "size (%)", "floor (%)", "talking"]
_MAX_LOG_ROWS = 200


def event_row(event: EventRecord) -> list:
    """One row of the event tables, in the order of ``EVENT_LOG_COLUMNS``."""
    return [round(event.onset_ms / 1000, 2), round(event.apex_ms / 1000, 2), event.kind,
            event.label, round(event.confidence, 3), round(event.duration_ms),
            "+".join(event.regions), round(event.amplitude_pct, 1), round(event.floor_pct, 1),
            "yes" if event.speech else ""]


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
    # The stream and the Reset button run in different worker threads: a frame and a reset
    # must not interleave (the pipeline's queues are not shared-state safe).
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def process_rgb(self, image_rgb: np.ndarray | None, t_ms: float | None = None
                    ) -> tuple[np.ndarray | None, list[list]]:
        """One streamed frame → (annotated RGB frame, event log rows, newest first)."""
        if image_rgb is None:
            return None, self.log_rows()
        with self._lock:
            return self._process(image_rgb, t_ms)

    def _process(self, image_rgb: np.ndarray, t_ms: float | None
                 ) -> tuple[np.ndarray | None, list[list]]:
        if self.pipeline is None:
            # Classification runs beside the stream so a browser frame is never held up by it.
            self.pipeline = Pipeline(replace(self.options, classify_in_background=True,
                                             drop_when_busy=True),
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
        if result.events:
            self.events.extend(result.events)
            del self.events[:-_MAX_LOG_ROWS]
        annotated = annotate(image_bgr, result, self.events[-1] if self.events else None,
                             self._fps)
        return cv2.cvtColor(annotated, cv2.COLOR_BGR2RGB), self.log_rows()

    def finish(self) -> list[list]:
        """Collect events still being classified (end of a stream) → the event log rows."""
        if self.pipeline is not None:
            self.events.extend(event for event, _ in self.pipeline.finish())
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
        self.frames = 0
        self._t0 = self._last_arrival = None
        self._fps = 0.0

    def close(self) -> None:
        with self._lock:
            if self.pipeline is not None:
                self.pipeline.close()
                self.pipeline = None


UPLOAD_KEEP_S = 3600.0  # an upload's report stays downloadable this long
UPLOAD_MAX_SIDE = 1280  # the CLI's default: a 4K upload must not cost the face stage 10x
UPLOAD_MAX_SIZE = "500mb"  # larger uploads are refused by the server before they are stored
SESSION_TTL_S = 120  # a live session's pipeline is freed this long after its last frame


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


def analyze_upload(video_path: str | None, engine: Backend, options: PipelineOptions,
                   progress=None, out_root: Path | None = None):
    """Upload tab: analyse a file into a fresh folder under ``out_root`` → (output files,
    timeline, event rows, message)."""
    from realtime_mer.analyze import analyze_video
    from realtime_mer.capture import CaptureOptions
    from realtime_mer.errors import MerError

    if not video_path:
        return [], None, [], "Choose a video file first."
    out_dir = _fresh_output_dir(out_root or Path(tempfile.gettempdir()) / "mer-analyze")

    def report(done: int, expected: int | None) -> None:
        if progress is not None and expected:
            progress(min(done / expected, 1.0), desc=f"frame {done} of {expected}")

    try:
        result = analyze_video(video_path, out_dir, options=options, engine=engine,
                               capture=CaptureOptions(max_side=UPLOAD_MAX_SIDE), progress=report)
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


def _close_session(session: LiveSession | None) -> None:
    if session is not None:
        session.close()


def build_app(engine: Backend, options: PipelineOptions = PipelineOptions(),
              temp_root: Path | None = None):
    import gradio as gr

    temp_root = temp_root or _instance_folder()

    def stream(image, session: LiveSession | None):
        if session is None:
            session = LiveSession(engine=engine, options=options)
        annotated, rows = session.process_rgb(image)
        return annotated, rows, session

    def clear(session: LiveSession | None):
        if session is not None:
            session.reset()
        return None, [], session

    def upload(video, progress=gr.Progress()):
        return analyze_upload(video, engine, options, progress, out_root=temp_root / "reports")

    manifest = engine.manifest
    # Gradio's cache of uploads and streamed frames: files older than 10 minutes go, checked
    # every 5 minutes, so a demo that runs for days does not fill the disk.
    with gr.Blocks(title="realtime-mer", delete_cache=(300, 600)) as app:
        gr.Markdown(
            f"## realtime-mer: micro-expression recognition\nModel **{manifest.model}** "
            f"({engine.name} on {engine.device}); classes: {', '.join(manifest.class_names)}.")
        with gr.Tab("Live webcam"):
            # A browser session's pipeline (MediaPipe graph, worker thread) is closed when
            # Gradio drops the session's state, not left to leak.
            session = gr.State(None, time_to_live=SESSION_TTL_S,
                               delete_callback=_close_session)
            with gr.Row():
                camera = gr.Image(sources=["webcam"], streaming=True, label="webcam")
                annotated = gr.Image(label="annotated", streaming=True)
            events = gr.Dataframe(headers=EVENT_LOG_COLUMNS, label="event log (newest first)")
            reset = gr.Button("Reset")
            camera.stream(stream, [camera, session], [annotated, events, session],
                          stream_every=0.05, concurrency_limit=4)
            reset.click(clear, [session], [annotated, events, session])
        with gr.Tab("Analyze a file"):
            video = gr.File(label="video file", file_types=["video"], type="filepath")
            run = gr.Button("Analyze", variant="primary")
            message = gr.Markdown()
            timeline = gr.Image(label="timeline", type="filepath")
            table = gr.Dataframe(headers=EVENT_LOG_COLUMNS, label="events")
            files = gr.File(label="outputs", file_count="multiple")
            # One analysis at a time: a long upload must not starve the live sessions' cores.
            run.click(upload, [video], [files, timeline, table, message], concurrency_limit=1)
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

    _check_address(host, port)
    try:
        _, local_url, _ = app.queue().launch(
            server_name=host, server_port=port, share=share, inbrowser=False, quiet=True,
            prevent_thread_lock=True, max_file_size=UPLOAD_MAX_SIZE)
    except OSError as error:
        if "empty port" in str(error):  # Gradio's wording; its advice names its own API
            raise ServeError(f"port {port} on {host} is in use; choose another with --port") \
                from None
        raise ServeError(f"cannot serve the demo on {host}:{port}: {error}") from None
    if on_ready is not None:
        on_ready(local_url)
    if block:
        app.block_thread()  # until Ctrl+C, which closes the server
    return local_url
