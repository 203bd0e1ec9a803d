"""The live view's WebSocket, driven as the page drives it (FastAPI's test client, real frames of
a real video, the real pipeline): every frame sent is answered, annotated or dropped for a newer
one; events reach the log; Reset empties it; what is not a camera frame is refused with a line;
a page beyond the limit and a page of another site are turned away; a closed socket closes
its session."""

from __future__ import annotations

import contextlib
import io
import json
import struct
import time
import zlib

import cv2
import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from realtime_mer.app import LiveSession, LiveSessions
from realtime_mer.capture import open_video
from realtime_mer.live_socket import (
    ANNOTATED, DROPPED, LIVE_SOCKET_PATH, MAX_FRAME_BYTES, STRIP, FrameRefused, LiveSockets,
    decode_frame,
)
from realtime_mer.runtime import default_engine_path, load_engine


@pytest.fixture(scope="module")
def engine():
    return load_engine(default_engine_path())


def _client(engine, limit: int = 4, other_origins: tuple[str, ...] = (), idle_s: float = 60.0):
    sessions = LiveSessions(lambda: LiveSession(engine=engine))
    sockets = LiveSockets(sessions, limit=limit, other_origins=other_origins, idle_s=idle_s)
    app = FastAPI()
    app.add_api_websocket_route(LIVE_SOCKET_PATH, sockets.serve)
    return TestClient(app), sessions


@contextlib.contextmanager
def _page(client, sessions, **kwargs):
    """A page's socket that leaves as a page does: it closes, and the server is done with it
    (its session closed) before the test client tears the connection down. (The client cancels
    the server's side as soon as it leaves, which would race the server's own close.)"""
    with client.websocket_connect(LIVE_SOCKET_PATH, **kwargs) as ws:
        yield ws
        ws.close()
        assert _all_closed(sessions)


def _open_within(sessions, count: int, within_s: float = 5.0) -> bool:
    """``count`` sessions open within ``within_s`` (the server opens a socket's session after
    it has accepted the socket, and closes it in a worker thread after the socket's end)."""
    deadline = time.monotonic() + within_s
    while len(sessions) != count and time.monotonic() < deadline:
        time.sleep(0.05)
    return len(sessions) == count


def _all_closed(sessions) -> bool:
    return _open_within(sessions, 0)


def _jpeg_frames(path, count: int) -> list[bytes]:
    frames = []
    with open_video(path) as source:
        for frame in source:
            frames.append(cv2.imencode(".jpg", frame.image_bgr)[1].tobytes())
            if len(frames) == count:
                break
    return frames


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_every_frame_is_answered_and_events_reach_the_log_until_reset(media_dir, engine):
    client, sessions = _client(engine)
    frames = _jpeg_frames(media_dir / "talking" / "d9.mp4", 150)  # 5 s: d9 blinks in them
    answered = dropped = strips = 0
    logs: list[list] = []
    with _page(client, sessions) as ws:
        for index, frame in enumerate(frames):
            ws.send_bytes(frame)
            if index % 2 == 0:  # two frames in flight, as the page keeps them
                continue
            pending = 2
            while pending:
                message = ws.receive()
                if message.get("text"):
                    data = json.loads(message["text"])
                    assert "error" not in data, data
                    logs.append(data["log"])
                    continue
                kind = message["bytes"][:1]
                if kind == STRIP:
                    strips += 1
                    continue
                pending -= 1
                if kind == DROPPED:
                    dropped += 1
                else:
                    assert kind == ANNOTATED
                    answered += 1
                    picture = cv2.imdecode(np.frombuffer(message["bytes"][1:], np.uint8),
                                           cv2.IMREAD_COLOR)
                    assert picture.shape == (480, 512, 3)
        # at worst one of each pair is dropped for the other
        assert answered + dropped == len(frames) and answered >= len(frames) // 2
        assert strips > 0 and logs and logs[-1], "no event reached the log"
        assert len(logs[-1][0]) == 11  # the log's columns (EVENT_LOG_COLUMNS)
        assert sessions.peek("socket-1").frames == answered
        ws.send_text(json.dumps({"reset": True}))
        while True:  # (a strip or the last frame's log may still be on its way)
            message = ws.receive()
            if message.get("text") and json.loads(message["text"]).get("log") == []:
                break
        assert "No events yet" in json.loads(message["text"])["cards"]
        assert sessions.peek("socket-1").events == []
    assert _all_closed(sessions)  # the socket closed: its session (pipeline, threads) with it


def test_what_is_not_a_camera_frame_is_refused_with_a_line(engine):
    client, sessions = _client(engine)
    with _page(client, sessions) as ws:
        for message, words in ((b"not a picture", "JPEG, PNG or WebP"),
                               (_png_claiming(3000, 3000), "3000x3000 refused"),
                               (_png_claiming(40_000, 40_000), "claims more than"),
                               (b"\xff" * (MAX_FRAME_BYTES + 1), "MB refused")):
            ws.send_bytes(message)
            assert ws.receive_bytes() == DROPPED
            assert words in json.loads(ws.receive_text())["error"]
        ws.send_text("{\"launch\": 1}")
        assert json.loads(ws.receive_text()) == {"error": "unknown command"}
        assert sessions.peek("socket-1").frames == 0


def test_frames_are_checked_before_they_are_decoded():
    with pytest.raises(FrameRefused, match="1920x1921 refused"):
        decode_frame(_png_claiming(1920, 1921))
    gif = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    with pytest.raises(FrameRefused, match="not GIF"):
        decode_frame(gif.getvalue())
    ok = cv2.imencode(".png", np.full((6, 4, 3), (10, 20, 30), np.uint8))[1].tobytes()
    assert decode_frame(ok)[0, 0].tolist() == [30, 20, 10]  # RGB, as the page's pictures


def test_a_page_beyond_the_limit_is_turned_away(engine):
    client, sessions = _client(engine, limit=1)
    with _page(client, sessions):
        assert _open_within(sessions, 1)
        with client.websocket_connect(LIVE_SOCKET_PATH) as second:
            assert "1 live views at once" in json.loads(second.receive_text())["error"]
        assert _open_within(sessions, 1)


def test_a_page_of_another_site_cannot_open_the_socket(engine):
    from starlette.websockets import WebSocketDisconnect

    client, sessions = _client(engine, other_origins=("https://abc123.gradio.live",))
    with pytest.raises(WebSocketDisconnect) as refused:
        with client.websocket_connect(LIVE_SOCKET_PATH,
                                      headers={"origin": "http://elsewhere.example"}):
            pass
    assert refused.value.code == 1008 and len(sessions) == 0
    with _page(client, sessions, headers={"origin": "http://testserver"}):
        assert _open_within(sessions, 1)  # the demo's own page (the test client's host)
    with _page(client, sessions, headers={"origin": "https://ABC123.gradio.live"}):
        assert _open_within(sessions, 1)  # its share link


def test_a_page_that_stops_sending_is_closed_with_its_session(engine):
    client, sessions = _client(engine, idle_s=0.5)
    with client.websocket_connect(LIVE_SOCKET_PATH) as ws:
        assert _open_within(sessions, 1)
        closed = ws.receive()
        assert closed["type"] == "websocket.close" and closed["code"] == 1001
    assert _all_closed(sessions)
