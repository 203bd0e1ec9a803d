"""The Gradio streaming function, driven directly with frames of a real video."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from realtime_mer.analysis import analyze_video
from realtime_mer.app import EVENT_LOG_COLUMNS, LiveSession, analyze_upload, build_app
from realtime_mer.capture import open_video
from realtime_mer.runtime import default_engine_path, load_engine


@pytest.fixture(scope="module")
def engine():
    return load_engine(default_engine_path())


def test_stream_gives_the_same_events_as_analyze(media_dir, engine, tmp_path):
    """Frames pushed one by one as the browser would (RGB), with the video's own timestamps,
    produce the events that `analyze` writes for the same file (its first 4 s: blinks and
    classified expressions)."""
    from realtime_mer.capture import CaptureOptions

    path = media_dir / "talking" / "d9.mp4"
    segment = CaptureOptions(end_ms=4000.0)
    session = LiveSession(engine=engine)
    rows = []
    with open_video(path, segment) as source:
        for frame in source:
            rgb = cv2.cvtColor(frame.image_bgr, cv2.COLOR_BGR2RGB)
            annotated, rows = session.process_rgb(rgb, t_ms=frame.t_ms)
            assert annotated.shape == rgb.shape and annotated.dtype == np.uint8
    rows = session.finish()  # events whose background classification was still running
    expected = analyze_video(path, tmp_path, engine=engine, capture=segment).events
    assert len(rows) == len(expected) > 0
    assert any(e.label for e in expected)  # a classified event, not blinks alone
    columns = [EVENT_LOG_COLUMNS.index(c) for c in ("onset (s)", "apex (s)", "face", "kind",
                                                    "class")]
    got = sorted(tuple(r[c] for c in columns) for r in rows)
    want = sorted((round(e.onset_ms / 1000, 2), round(e.apex_ms / 1000, 2), e.face_id, e.kind,
                   e.label) for e in expected)
    assert got == want


def test_annotation_marks_the_face_and_the_missing_face(media_dir, engine):
    session = LiveSession(engine=engine)
    with open_video(media_dir / "single_face.mp4") as source:
        frame = next(iter(source))
    rgb = cv2.cvtColor(frame.image_bgr, cv2.COLOR_BGR2RGB)
    annotated, _ = session.process_rgb(rgb, t_ms=0.0)
    assert session.pipeline.frames_with_face == 1
    # the face box is drawn in green: some pixels changed to exactly that colour
    green = np.all(annotated == np.array([80, 200, 80], np.uint8), axis=-1)
    assert green.sum() > 100
    blank = np.zeros_like(rgb)
    annotated, _ = session.process_rgb(blank, t_ms=40.0)
    assert not np.array_equal(annotated, blank)  # "no face" is written on the frame
    assert session.pipeline.frames_with_face == 1


def test_the_demo_with_every_face_draws_each_with_its_id(media_dir, engine):
    """With faces="all" a live session follows the five people of the group photo: five
    face views with ids 1-5 in the pipeline's result, each box drawn on the frame."""
    from realtime_mer.pipeline import PipelineOptions

    session = LiveSession(engine=engine, options=PipelineOptions(faces="all"))
    rgb = cv2.cvtColor(cv2.imread(str(media_dir / "multi_face.jpg")), cv2.COLOR_BGR2RGB)
    plain = LiveSession(engine=engine)
    for t_ms in (0.0, 40.0, 80.0):
        annotated, _ = session.process_rgb(rgb, t_ms=t_ms)
        plain_annotated, _ = plain.process_rgb(rgb, t_ms=t_ms)
    result_faces = session.pipeline.tracker.stats.frames
    assert sorted(result_faces) == [1, 2, 3, 4, 5] and set(result_faces.values()) == {3}
    # every box is drawn (in green while its face is still): several times the green pixels
    # of the largest face's box alone
    def green(image):
        return np.all(image == np.array([80, 200, 80], np.uint8), axis=-1).sum()

    assert green(annotated) > 3 * green(plain_annotated) > 0


def test_annotation_asks_a_small_face_to_come_closer(media_dir, engine):
    """The same frame at half size puts the eyes ~34 px apart, under the 57 px the crop needs:
    the pipeline marks the frame and the annotation writes a note under the face box; at full
    size (~69 px) neither happens."""
    import dataclasses

    from realtime_mer.annotate import annotate
    from realtime_mer.capture import Frame
    from realtime_mer.pipeline import Pipeline

    with open_video(media_dir / "single_face.mp4") as source:
        full = next(iter(source)).image_bgr
    small = np.zeros_like(full)
    half = cv2.resize(full, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA)
    small[:half.shape[0], :half.shape[1]] = half
    for name, image in (("full", full), ("small", small)):
        with Pipeline(engine=engine) as pipeline:
            result = pipeline.process(Frame(t_ms=0.0, image_bgr=image, index=0))
        assert result.face.found and result.face_small is (name == "small"), name
        marked = annotate(image, dataclasses.replace(result, face_small=True), None)
        plain = annotate(image, dataclasses.replace(result, face_small=False), None)
        changed_rows = np.flatnonzero(np.any(marked != plain, axis=(1, 2)))
        assert changed_rows.size > 5
        assert changed_rows.min() > result.face.box_xyxy[3]  # under the face box
        drawn = annotate(image, result, None)
        assert np.array_equal(drawn, marked if name == "small" else plain)


def test_upload_tab_reports_errors_instead_of_raising(tmp_path, engine):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00" * 1000)
    files, timeline, rows, message = analyze_upload(str(bad), engine, LiveSession(engine).options)
    assert files == [] and rows == [] and message.startswith("Error:")


def test_demo_serves_on_loopback_by_default(engine):
    import urllib.request

    from realtime_mer import cli
    from realtime_mer.app import launch

    args = cli.build_parser().parse_args(["demo"])
    assert args.host == "127.0.0.1" and args.share is False
    app = build_app(engine)
    url = launch(app, host=args.host, port=None, share=args.share, block=False)
    try:
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(url, timeout=30) as response:
            assert response.status == 200
            assert b"realtime-mer" in response.read()
    finally:
        app.close()


def test_upload_reports_are_kept_an_hour_then_removed(tmp_path, engine, media_dir):
    import os
    import time

    from realtime_mer.app import UPLOAD_KEEP_S

    root = tmp_path / "uploads"
    old = root / "run-old"
    old.mkdir(parents=True)
    (old / "summary.json").write_text("{}")
    stale = time.time() - UPLOAD_KEEP_S - 60
    os.utime(old, (stale, stale))
    files, _, _, message = analyze_upload(str(media_dir / "no_face.mp4"), engine,
                                          LiveSession(engine).options, out_root=root)
    assert not old.exists()  # older than the keep time: removed
    assert files and all(Path(f).parent.parent == root for f in files)
    assert "frames" in message


def test_upload_message_warns_of_a_small_face(tmp_path, engine, media_dir):
    from tests.realtime_mer.test_cli import _reencode

    small = tmp_path / "small.mp4"
    _reencode(media_dir / "single_face.mp4", small, frames=40, rate=30, size=(128, 72))
    options = LiveSession(engine).options
    *_, message = analyze_upload(str(small), engine, options, out_root=tmp_path / "uploads")
    assert "The face is small" in message
    *_, message = analyze_upload(str(media_dir / "single_face.mp4"), engine, options,
                                 out_root=tmp_path / "uploads")
    assert "frames" in message and "small" not in message


def test_demo_on_a_taken_port_is_a_clear_error_not_an_internal_one(capsys):
    """`mer demo --port P` with P in use: one line naming the port and the option to change,
    exit 6, and no "serving on" announced before the server listens."""
    import socket

    from realtime_mer.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["demo", "--port", str(port)])
    captured = capsys.readouterr()
    assert code == 6, captured.err
    assert f"port {port} on 127.0.0.1 is in use; choose another with --port" in captured.err
    assert "internal error" not in captured.err and "Traceback" not in captured.err
    assert "serving on" not in captured.out


def test_reset_while_streaming_neither_crashes_nor_keeps_the_log(media_dir, engine):
    """Reset pressed while frames stream in (two Gradio worker threads): no error in either, and
    the log the reset returns is empty."""
    import threading

    session = LiveSession(engine=engine)
    errors, resets = [], []

    def stream():
        try:
            with open_video(media_dir / "talking" / "d3.mp4") as source:
                for frame in source:
                    session.process_rgb(cv2.cvtColor(frame.image_bgr, cv2.COLOR_BGR2RGB),
                                        t_ms=frame.t_ms + 100_000.0 * len(resets))
        except Exception as error:  # noqa: BLE001 - any error in the stream fails the test
            errors.append(error)

    worker = threading.Thread(target=stream)
    worker.start()
    while worker.is_alive():
        worker.join(timeout=1.0)
        session.reset()
        resets.append(session.log_rows())
    assert not errors, errors
    assert resets and all(rows == [] for rows in resets)
    session.close()


def test_a_reset_that_comes_during_a_frame_leaves_the_browser_an_empty_log(media_dir, engine):
    """The browser keeps the log it was sent until the version changes. A Reset pressed while a
    frame is being answered (from another thread) must not pair that frame's old log
    with the reset's version, or the old log stays on screen; the next frame brings the empty
    log."""
    import threading

    session = LiveSession(engine=engine)
    update = None
    with open_video(media_dir / "talking" / "d9.mp4") as source:
        frames = (cv2.cvtColor(frame.image_bgr, cv2.COLOR_BGR2RGB) for frame in source)
        for rgb in frames:  # stream until the log has an event (d9 blinks)
            update = session.stream_update(rgb, shown_version=-1)
            if update.log_rows:
                break
        assert update is not None and update.log_rows, "no event in the clip"
        rgb = next(frames)

    original_strip, resetter = session.strip, threading.Thread(target=session.reset)

    def strip_while_reset_is_pressed(redraw: bool = True):
        resetter.start()
        resetter.join(timeout=0.3)  # what the reset may do while this frame is answered
        return original_strip(redraw)

    session.strip = strip_while_reset_is_pressed
    update = session.stream_update(rgb, shown_version=update.log_version)
    resetter.join()
    session.strip = original_strip
    shown = update.log_rows
    # the next frame (no face in it, so no new event) carries the log the page must show
    following = session.stream_update(np.zeros_like(rgb), shown_version=update.log_version)
    if following.log_rows is not None:
        shown = following.log_rows
    assert shown == [] and session.log_rows() == []
    session.close()


def test_upload_error_does_not_show_the_servers_paths(tmp_path, engine):
    bad = tmp_path / "server-side-secret-dir" / "clip.mp4"
    bad.parent.mkdir()
    bad.write_bytes(b"not a video")
    *_, message = analyze_upload(str(bad), engine, LiveSession(engine).options,
                                 out_root=tmp_path / "uploads")
    assert message.startswith("Error:") and "clip.mp4" in message
    assert "server-side-secret-dir" not in message and str(tmp_path) not in message


def test_the_strip_draws_each_region_against_its_threshold_and_shades_blinks():
    """Region 0 rises above its threshold in the last second: only its row gets red pixels; a
    blink in the first seconds shades those columns."""
    from realtime_mer.annotate import signal_strip

    t = np.arange(0, 8000, 33.0)
    values = np.full((t.size, 4), 0.5)
    thresholds = np.full((t.size, 4), 1.0)
    values[t > 7000, 0] = 2.0
    marks = np.zeros(t.size, np.int8)
    marks[t < 1000] = 1
    strip = signal_strip(t, values, thresholds, marks, span_ms=8000.0, row_height=44)
    red = np.all(strip == (60, 60, 230), axis=-1)
    rows_with_red = np.flatnonzero(red.any(axis=1))
    assert rows_with_red.size and rows_with_red.max() < 44  # region 0's row only
    assert np.flatnonzero(red.any(axis=0)).min() > strip.shape[1] * 0.8  # in its last second
    assert np.all(strip[30, 20] == (70, 45, 45)) and not np.all(strip[30, 300] == (70, 45, 45))


def test_event_cards_escape_what_they_show_and_give_every_probability():
    from realtime_mer.app import event_cards
    from realtime_mer.report import EventRecord

    event = EventRecord(onset_ms=1200, apex_ms=1400, offset_ms=1600, duration_ms=400,
                        kind="micro", label="<script>x</script>", confidence=0.6,
                        probabilities={"<script>x</script>": 0.6, "surprise": 0.4}, peak=2.0,
                        threshold=1.0, onset_frame=36, apex_frame=42, offset_frame=48,
                        regions=["brows"], amplitude_pct=2.1, floor_pct=1.0)
    flow = np.zeros((28, 28, 3), np.float32)
    flow[10:14, 10:14, 0] = 1.0
    html = event_cards([(event, flow)])
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "onset 1.20 s, apex 1.40 s" in html and "surprise" in html and "0.40" in html
    assert html.count("data:image/png;base64,") == 1
    assert event_cards([]) == "<p>No events yet.</p>"


def test_each_live_session_has_its_own_pipeline_closed_with_it(media_dir, engine):
    """Each page gets its own pipeline; closing one closes its pipeline at once and leaves the
    others; shutdown closes the rest. (A page that stops sending: test_live_socket.)"""
    from realtime_mer.app import LiveSessions

    sessions = LiveSessions(lambda: LiveSession(engine=engine))
    with open_video(media_dir / "single_face.mp4") as source:
        rgb = cv2.cvtColor(next(iter(source)).image_bgr, cv2.COLOR_BGR2RGB)
    for key in ("a", "b", "c"):
        sessions.open(key).process_rgb(rgb, t_ms=0.0)
    a = sessions.peek("a")
    assert len(sessions) == 3 and a.pipeline is not None and sessions.peek("b") is not a
    sessions.close("a")  # the page closed
    assert len(sessions) == 2 and a.pipeline is None and sessions.peek("b").pipeline is not None
    sessions.shutdown()
    assert len(sessions) == 0


def test_an_abandoned_upload_stops_and_leaves_nothing(tmp_path, engine, media_dir):
    asked = []

    def abandoned():
        asked.append(1)
        return len(asked) > 5  # the browser leaves after five frames

    files, timeline, rows, message = analyze_upload(
        str(media_dir / "WolfgangLanger_Pexels.mp4"), engine, LiveSession(engine).options,
        out_root=tmp_path / "reports", abandoned=abandoned)
    assert (files, timeline, rows) == ([], None, []) and message.startswith("Stopped")
    assert len(asked) == 6 and list((tmp_path / "reports").iterdir()) == []
