"""Keep the native libraries' start-up chatter off the user's terminal.

MediaPipe's C++ graph and TensorFlow Lite write informational lines and warnings straight to file
descriptor 2 each time a face-mesh graph starts ("Created TensorFlow Lite XNNPACK delegate",
"Feedback manager requires a model with a single signature", ...). No environment variable or
Python API turns them off in mediapipe 0.10.21 (absl logging is not initialised, so
``GLOG_minloglevel`` and ``TF_CPP_MIN_LOG_LEVEL`` have no effect), and they bury the CLI's one-line
errors. ``quiet_native_logs`` points descriptor 2 at a temporary file for the duration of a graph
start, then hands the captured lines to the ``realtime_mer`` logger at DEBUG (``--verbose`` shows
them). A line that is not recognised as that chatter, a native error, or anything another thread
wrote meanwhile, goes back to the real stderr unchanged, so nothing is lost.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import threading
from typing import IO, Iterator

log = logging.getLogger(__name__)

__all__ = ["quiet_native_logs", "is_native_chatter", "set_capture"]

# glog/absl lines at INFO or WARNING ("I0000 00:00:17964.. 123 file.cc:45] ..."; "W1204 ..."),
# TFLite's "INFO: ..." banner and absl's notice that logging was not initialised. Errors ("E...",
# "F...") are not chatter: they stay on stderr.
_CHATTER = re.compile(
    r"^(?:[IW]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ [\w./-]+:\d+\] "
    r"|INFO: Created TensorFlow Lite "
    r"|WARNING: All log messages before absl::InitializeLog\(\) is called)"
)

_lock = threading.Lock()
_capture_enabled = True
_depth = 0
_saved_fd: int | None = None
_capture: IO[bytes] | None = None


def set_capture(enabled: bool) -> None:
    """Turn the capture on or off for the whole process. ``mer --debug`` turns it off: a native
    crash inside a captured block would take its last words with it, and whoever debugs wants
    every line as the libraries write it."""
    global _capture_enabled
    _capture_enabled = bool(enabled)


def is_native_chatter(line: str) -> bool:
    """True for an informational or warning line of MediaPipe's or TFLite's native logging."""
    return bool(_CHATTER.match(line))


def _flush_python_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def _enter() -> None:
    global _depth, _saved_fd, _capture
    with _lock:
        if _depth == 0:
            try:
                saved = os.dup(2)
            except OSError:  # no descriptor 2 (a detached service): nothing to quieten
                saved = None
            if saved is not None:
                _flush_python_streams()
                _capture = tempfile.TemporaryFile()
                os.dup2(_capture.fileno(), 2)
                _saved_fd = saved
        _depth += 1


def _exit() -> None:
    global _depth, _saved_fd, _capture
    with _lock:
        _depth -= 1
        if _depth > 0 or _saved_fd is None or _capture is None:
            return
        _flush_python_streams()
        os.dup2(_saved_fd, 2)
        os.close(_saved_fd)
        capture, _saved_fd, _capture = _capture, None, None
    capture.seek(0)
    text = capture.read().decode("utf-8", errors="replace")
    capture.close()
    passthrough = []
    for line in text.splitlines(keepends=True):
        if is_native_chatter(line):
            log.debug("native: %s", line.rstrip())
        else:
            passthrough.append(line)
    data = "".join(passthrough).encode("utf-8", errors="replace")
    while data:  # a pipe may take a long write in parts
        data = data[os.write(2, data):]


@contextlib.contextmanager
def quiet_native_logs(enabled: bool = True) -> Iterator[None]:
    """Capture what native code writes to stderr inside the block (see the module docstring).

    Thread-safe and re-entrant: descriptor 2 is process-wide, so concurrent blocks share one
    capture, restored when the last of them ends.
    """
    if not (enabled and _capture_enabled):
        yield
        return
    _enter()
    try:
        yield
    finally:
        _exit()
