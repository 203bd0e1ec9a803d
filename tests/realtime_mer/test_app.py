"""The Gradio streaming function, driven directly with frames of a real video."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from realtime_mer.analyze import analyze_video
from realtime_mer.app import LiveSession, analyze_upload, build_app
from realtime_mer.capture import open_video
from realtime_mer.runtime import default_engine_path, load_engine


@pytest.fixture(scope="module")
def engine():
    return load_engine(default_engine_path())


def test_stream_gives_the_same_events_as_analyze(media_dir, engine, tmp_path):
    """Frames pushed one by one as the browser would (RGB), with the video's own timestamps,
    produce the events that `analyze` writes for the same file."""
    path = media_dir / "WolfgangLanger_Pexels.mp4"
    session = LiveSession(engine=engine)
    rows = []
    with open_video(path) as source:
        for frame in source:
            rgb = cv2.cvtColor(frame.image_bgr, cv2.COLOR_BGR2RGB)
            annotated, rows = session.process_rgb(rgb, t_ms=frame.t_ms)
            assert annotated.shape == rgb.shape and annotated.dtype == np.uint8
    rows = session.finish()  # events whose background classification was still running
    expected = analyze_video(path, tmp_path, engine=engine).events
    assert len(rows) == len(expected) > 0
    got = sorted((r[0], r[1], r[2], r[3]) for r in rows)
    want = sorted((round(e.onset_ms / 1000, 2), round(e.apex_ms / 1000, 2), e.kind, e.label)
                  for e in expected)
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
            with open_video(media_dir / "WolfgangLanger_Pexels.mp4") as source:
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


def test_upload_error_does_not_show_the_servers_paths(tmp_path, engine):
    bad = tmp_path / "server-side-secret-dir" / "clip.mp4"
    bad.parent.mkdir()
    bad.write_bytes(b"not a video")
    *_, message = analyze_upload(str(bad), engine, LiveSession(engine).options,
                                 out_root=tmp_path / "uploads")
    assert message.startswith("Error:") and "clip.mp4" in message
    assert "server-side-secret-dir" not in message and str(tmp_path) not in message
