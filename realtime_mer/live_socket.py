"""The live view's transport: the page's camera frames over a WebSocket, each annotated frame
sent back as soon as it is ready.

Gradio's webcam stream sends a frame only after the answer to the previous one came back, so the
frame rate is one over the whole round trip (about 18 a second on two cores). Here the page keeps
up to two frames in flight and the server always works on the newest frame it holds: the rate
is the server's own, and a frame that the server could not get to in time is dropped (and said
to be), never queued behind others, so the lag stays that of one or two frames.

Messages. Page → server: a camera frame as one binary JPEG (or PNG) message; the text
``{"reset": true}``. Server → page: binary messages whose first byte says what follows
(:data:`ANNOTATED` + JPEG, :data:`STRIP` + JPEG, :data:`DROPPED` alone: a frame that was
skipped for a newer one), and text JSON with the event log (``{"log": rows, "cards": html}``)
when it changed, or ``{"error": message}``.

Frames come from whoever reaches the port: each is size-checked before it is decoded
(:func:`decode_frame`), a page of another site is refused, a connection beyond
:data:`MAX_LIVE_SOCKETS` is turned away, and the session's pipeline is closed when its socket
closes.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import logging
from dataclasses import dataclass, field

import cv2
import numpy as np
from fastapi import WebSocket

from realtime_mer.app import LiveSession, LiveSessions, event_cards

log = logging.getLogger(__name__)

LIVE_SOCKET_PATH = "/mer/live"
MAX_LIVE_SOCKETS = 4  # live pages served at once (the two cores are shared by all of them)
MAX_FRAME_BYTES = 4 * 2**20  # one camera frame, compressed
MAX_FRAME_PIXELS = 1920 * 1920  # one camera frame, decoded
JPEG_QUALITY = 85
SESSION_IDLE_S = 60.0  # a live page that sends nothing this long is closed, its pipeline freed
ANNOTATED, STRIP, DROPPED = b"\x01", b"\x02", b"\x00"



class FrameRefused(ValueError):
    """A message that is not a camera frame this server takes (its reason is the message)."""


def decode_frame(data: bytes) -> np.ndarray:
    """A camera frame (JPEG, PNG or WebP bytes) → RGB array. Its size is read from the header
    first, so a small file that claims a huge picture is refused before anything is
    allocated."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > MAX_FRAME_BYTES:
        raise FrameRefused(f"frame of {len(data) / 2**20:.1f} MB refused (at most "
                           f"{MAX_FRAME_BYTES // 2**20} MB)")
    try:
        with Image.open(io.BytesIO(data)) as header:
            kind, (width, height) = header.format, header.size
    except Image.DecompressionBombError:  # PIL's own limit, far above ours
        raise FrameRefused(f"frame refused: it claims more than {MAX_FRAME_PIXELS} "
                           "pixels") from None
    except (UnidentifiedImageError, OSError):
        raise FrameRefused("a frame must be a JPEG, PNG or WebP picture") from None
    if kind not in ("JPEG", "PNG", "WEBP"):
        raise FrameRefused(f"a frame must be a JPEG, PNG or WebP picture, not {kind}")
    if width * height > MAX_FRAME_PIXELS:
        raise FrameRefused(f"frame of {width}x{height} refused (at most "
                           f"{MAX_FRAME_PIXELS} pixels)")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise FrameRefused("the frame could not be decoded")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _jpeg(image_rgb: np.ndarray) -> bytes | None:
    bgr = cv2.cvtColor(np.ascontiguousarray(image_rgb), cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    return encoded.tobytes() if ok else None


@dataclass
class _Inbox:
    """What the receiving side hands the answering side of one socket: the newest frame not
    yet taken, a pending Reset, and the log version the page shows."""

    frame: bytes | None = None
    reset: bool = False
    shown: int = -1
    wake: asyncio.Event = field(default_factory=asyncio.Event)


def _answer_frame(session: LiveSession, data: bytes, shown: int
                  ) -> tuple[list[bytes | str], int]:
    """One frame, from its bytes to the messages that answer it (run off the event loop: the
    decoding, the pipeline and the encoding all cost CPU) → (messages, the log version the page
    will show)."""
    try:
        update = session.stream_update(decode_frame(data), shown)
    except FrameRefused as refused:
        return [DROPPED, json.dumps({"error": str(refused)})], shown
    picture = _jpeg(update.annotated)
    messages: list[bytes | str] = [DROPPED if picture is None else ANNOTATED + picture]
    strip = _jpeg(update.strip) if update.strip_redrawn else None
    if strip is not None:
        messages.append(STRIP + strip)
    if update.log_rows is not None:
        messages.append(json.dumps({"log": update.log_rows, "cards": update.cards_html}))
        shown = update.log_version
    return messages, shown


class LiveSockets:
    """The WebSocket endpoint of one demo: one live session per open socket, owned by it (made
    when the socket opens, closed when it closes or has been idle for ``idle_s``)."""

    def __init__(self, sessions: LiveSessions, limit: int = MAX_LIVE_SOCKETS,
                 other_origins: tuple[str, ...] = (), idle_s: float = SESSION_IDLE_S) -> None:
        self.sessions = sessions
        self.limit = limit
        # pages served under another address that may open the socket (the share link)
        self.other_origins = {_netloc(url) for url in other_origins}
        self.idle_s = idle_s
        self._open = 0
        self._ids = itertools.count(1)

    async def serve(self, websocket: WebSocket) -> None:
        """One page's stream, from its first frame until its socket closes. (The annotation is
        how FastAPI knows to hand over the socket.)"""
        if not _same_origin(websocket, self.other_origins):
            # Another site's page in the user's browser may not drive this demo (a browser
            # lets any page open a socket to 127.0.0.1; it always says which page it is).
            await websocket.close(code=1008)
            return
        await websocket.accept()
        if self._open >= self.limit:
            await websocket.send_text(json.dumps(
                {"error": f"the demo serves {self.limit} live views at once; try again later"}))
            await websocket.close(code=1013)  # try again later
            return
        self._open += 1
        key = f"socket-{next(self._ids)}"
        session = self.sessions.open(key)  # this socket's own: closed below (idle: _receive)
        inbox, sending = _Inbox(), asyncio.Lock()  # one message at a time on the socket

        async def send(message: bytes | str) -> None:
            async with sending:
                if isinstance(message, bytes):
                    await websocket.send_bytes(message)
                else:
                    await websocket.send_text(message)

        sides = [asyncio.create_task(self._receive(websocket, send, inbox)),
                 asyncio.create_task(self._answer(send, session, inbox))]
        why = "its tab closed"
        try:
            done, _ = await asyncio.wait(sides, return_when=asyncio.FIRST_COMPLETED)
            for side in done:
                if side.exception() is not None:  # a bug, not the page: said, and the view ends
                    log.error("live view failed", exc_info=side.exception())
                    why = "it failed"
                    await websocket.close(code=1011)
                elif side.result() == "idle":
                    why = f"no frame for {self.idle_s:.0f} s"
                    await websocket.close(code=1001)
        except Exception:  # noqa: BLE001 - the page has gone while the socket was closed
            pass
        finally:
            self._open -= 1
            for side in sides:
                side.cancel()
            try:
                await asyncio.gather(*sides, return_exceptions=True)
                # the pipeline's threads stop at once (not from the event loop's thread)
                await asyncio.to_thread(self.sessions.close, key, why)
            except BaseException:  # cancelled itself (the server stops): close here, then go
                self.sessions.close(key, why)
                raise

    async def _receive(self, websocket: WebSocket, send, inbox: _Inbox) -> str:
        """Take the page's messages until it leaves ("gone") or sends nothing for ``idle_s``
        ("idle"); a frame replaces the one not yet taken, which is answered as dropped."""
        while True:
            try:
                message = await asyncio.wait_for(websocket.receive(), self.idle_s)
            except asyncio.TimeoutError:
                return "idle"
            if message["type"] == "websocket.disconnect":
                return "gone"
            data, text = message.get("bytes"), message.get("text")
            if data is not None:
                if inbox.frame is not None:  # not reached in time: the newer frame wins
                    await send(DROPPED)
                inbox.frame = data
                inbox.wake.set()
            elif text is not None:
                try:
                    command = json.loads(text)
                except (ValueError, RecursionError):
                    command = None
                if command == {"reset": True}:
                    inbox.reset = True  # done by the answering side, between two frames
                    inbox.wake.set()
                else:
                    await send(json.dumps({"error": "unknown command"}))

    async def _answer(self, send, session: LiveSession, inbox: _Inbox) -> None:
        """Answer the newest frame, one at a time; a Reset is done between two frames, so that
        no frame's old log can be sent after the emptied one."""
        while True:
            await inbox.wake.wait()
            inbox.wake.clear()
            if inbox.reset:
                inbox.reset = False
                await asyncio.to_thread(session.reset)
                inbox.shown = -1  # the next frame sends the log from now on
                await send(json.dumps({"log": [], "cards": event_cards([])}))
            data, inbox.frame = inbox.frame, None
            if data is None:
                continue
            try:
                messages, inbox.shown = await asyncio.to_thread(_answer_frame, session, data,
                                                                inbox.shown)
            except Exception as error:  # noqa: BLE001 - one bad frame must not end the view
                log.exception("live frame failed")
                messages = [DROPPED, json.dumps({"error": "this frame failed: "
                                                          f"{type(error).__name__}"})]
            for message in messages:
                await send(message)


def _netloc(url: str) -> str:
    from urllib.parse import urlsplit

    return urlsplit(url).netloc.lower()


def _same_origin(websocket: WebSocket, other_origins: set[str]) -> bool:
    """The page that opens the socket was served by this demo (its Origin names the host and
    port the socket was opened on, or the demo's share link); a client that is not a browser
    sends no Origin."""
    origin = websocket.headers.get("origin")
    if origin is None:
        return True
    page = _netloc(origin)
    return page == websocket.headers.get("host", "").lower() or page in other_origins


def attach(app, sessions) -> LiveSockets:
    """Serve the live WebSocket on ``app`` (a launched Gradio app) beside Gradio's own routes."""
    share_url = getattr(app, "share_url", None)
    sockets = LiveSockets(sessions, other_origins=(share_url,) if share_url else ())
    app.server_app.add_api_websocket_route(LIVE_SOCKET_PATH, sockets.serve)
    config = getattr(getattr(app, "server", None), "config", None)  # Gradio's uvicorn server
    if config is not None:  # read by uvicorn at each new connection
        # The frames are JPEG: compressing them again costs both ends CPU for nothing.
        config.ws_per_message_deflate = False
        # A message larger than a frame may be is refused before it is buffered whole.
        config.ws_max_size = MAX_FRAME_BYTES + 2**16
    return sockets
