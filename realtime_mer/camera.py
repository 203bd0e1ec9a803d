"""Live cameras: an OpenCV capture (a device index, a device path or a stream URL) read by a
daemon thread into a bounded queue, each frame stamped with the capture clock; a local video
file's path plays like a camera, each frame at its own time."""

from __future__ import annotations

import collections
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import cv2

from realtime_mer.capture import CaptureOptions, Frame, downscale
from realtime_mer.errors import InputError

log = logging.getLogger(__name__)

__all__ = ["WebcamSource"]


def _is_local_file(device: int | str | os.PathLike) -> bool:
    if isinstance(device, int):
        return False
    text = os.fspath(device)
    return "://" not in text and Path(text).is_file()


def _open_capture(device: int | str | os.PathLike) -> Any:
    """``cv2.VideoCapture`` without OpenCV's own warnings on stderr (a camera index that does not
    exist makes each video backend print one); the caller's one-line error says what happened.
    ``--verbose`` (the realtime_mer logger at DEBUG) leaves OpenCV's logging as it is."""
    quiet = not log.isEnabledFor(logging.DEBUG)
    previous = cv2.getLogLevel()
    if quiet:
        cv2.setLogLevel(1)  # fatal only
    try:
        return cv2.VideoCapture(os.fspath(device) if isinstance(device, os.PathLike) else device)
    finally:
        if quiet:
            cv2.setLogLevel(previous)


class WebcamSource:
    """A live camera read by a daemon thread into a bounded queue.

    ``device`` is an OpenCV camera index, a device path/URL, or any already-open object with
    OpenCV's ``read()`` / ``isOpened()`` / ``release()`` (which is how tests drive it with a video
    file). When the consumer is slower than the camera the OLDEST queued frame is dropped and
    counted in ``dropped``: a live recognizer wants the present, not a growing backlog.

    A local video file given by its path plays like a camera: its frames are delivered at their
    own timestamps (not as fast as they decode, which would drop most of them), and its end is the
    end of the stream (``ended``), not a disconnection. A stream URL that stops is a disconnection.
    """

    #: consecutive failed reads after which the camera is considered gone
    max_failed_reads = 10
    #: pause between failed reads, so a flaky camera gets a moment without a busy loop
    retry_pause_s = 0.01

    def __init__(self, device: int | str | Any = 0, options: CaptureOptions | None = None) -> None:
        self.device = device
        self.options = options or CaptureOptions()
        self.dropped = 0
        self.frames_captured = 0
        self._queue: collections.deque[Frame] = collections.deque()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._cap: Any = None
        self._disconnected: str | None = None
        self._ended = False
        self._t0: float | None = None
        #: deliver frames at the file's own timestamps (set by start() for a local file path)
        self.paced = False

    # -- lifetime --------------------------------------------------------------------------
    def start(self) -> "WebcamSource":
        if self._thread is not None:
            return self
        cap = self.device
        if isinstance(cap, (int, str, os.PathLike)):
            self.paced = _is_local_file(cap)
            cap = _open_capture(cap)
        for name in ("read", "isOpened", "release"):
            if not callable(getattr(cap, name, None)):
                raise TypeError(f"device must be an index, a path or a capture object; {cap!r} "
                                f"has no {name}()")
        if not cap.isOpened():
            cap.release()
            raise InputError(f"cannot open camera {self.device!r} (not connected, busy, or no "
                             "permission)")
        self._cap = cap
        self._stop.clear()
        self._disconnected = None
        self._ended = False
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="mer-webcam", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop capturing and release the camera. Queued frames are discarded: after a restart
        they would be stale."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=2.0)
        with self._cond:
            self._queue.clear()
            self._cond.notify_all()

    def __enter__(self) -> "WebcamSource":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def ended(self) -> bool:
        """True once a paced video file has delivered its last frame."""
        return self._ended

    # -- producer --------------------------------------------------------------------------
    def _run(self) -> None:
        cap = self._cap
        failures = 0
        index = 0
        file_t_ms = -math.inf
        # A backend that reports no position for a paced file gets its nominal rate instead.
        step_ms = 1000.0 / (cap.get(cv2.CAP_PROP_FPS) or 30.0) if self.paced else 0.0
        try:
            while not self._stop.is_set():
                ok, image = cap.read()
                t = time.monotonic()
                if (not ok or image is None) and self.paced:
                    self._mark_ended(index)
                    return
                if not ok or image is None:
                    failures += 1
                    if failures >= self.max_failed_reads:
                        self._mark_disconnected(f"camera disconnected ({failures} failed reads in "
                                                f"a row after {index} frames)")
                        return
                    time.sleep(self.retry_pause_s)
                    continue
                failures = 0
                t_ms = (t - self._t0) * 1000.0
                if self.paced:
                    position = cap.get(cv2.CAP_PROP_POS_MSEC)  # the file's own clock
                    file_t_ms = position if position > file_t_ms else file_t_ms + step_ms
                    t_ms = max(file_t_ms, 0.0)
                    if self._stop.wait(max(0.0, self._t0 + t_ms / 1000.0 - time.monotonic())):
                        break
                frame = Frame(t_ms=t_ms, image_bgr=downscale(image, self.options.max_side),
                              index=index)
                index += 1
                self._put(frame)
        except Exception as exc:  # noqa: BLE001 - a driver error must reach the consumer
            self._mark_disconnected(f"camera disconnected: {exc}")
        finally:
            cap.release()
            self._cap = None

    def _put(self, frame: Frame) -> None:
        with self._cond:
            if len(self._queue) >= self.options.queue_size:
                self._queue.popleft()
                self.dropped += 1
            self._queue.append(frame)
            self.frames_captured += 1
            self._cond.notify()

    def _mark_ended(self, frames: int) -> None:
        log.info("the video file ended after %d frames", frames)
        with self._cond:
            self._ended = True
            self._cond.notify_all()

    def _mark_disconnected(self, message: str) -> None:
        log.warning("%s", message)
        with self._cond:
            self._disconnected = message
            self._cond.notify_all()

    # -- consumer --------------------------------------------------------------------------
    def read(self, timeout_s: float | None = 1.0) -> Frame | None:
        """The oldest queued frame, waiting up to ``timeout_s`` (None: forever). Returns None on
        timeout, after ``stop()`` or at the end of a video file (``ended``); raises ``InputError``
        once the camera is gone and every frame it delivered has been read."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while not self._queue:
                if self._disconnected is not None:
                    raise InputError(self._disconnected)
                if self._thread is None or self._ended:
                    return None
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(remaining)
            return self._queue.popleft()

    def __iter__(self) -> Iterator[Frame]:
        """Frames until the camera disconnects (ends quietly) or ``stop()`` is called."""
        while True:
            try:
                frame = self.read(timeout_s=0.5)
            except InputError:
                return
            if frame is None:
                if self._thread is None or self._ended:
                    return
                continue
            yield frame
