"""Errors the product raises on bad input. The CLI turns each into a one-line message and a
non-zero exit code; nothing in the library prints a traceback for a user's mistake."""

from __future__ import annotations

import signal


class MerError(Exception):
    """Base of every error a user can cause and fix. ``exit_code`` is what the CLI returns."""

    exit_code = 1


class InputError(MerError):
    """A video, image or stream cannot be opened or decoded (missing, corrupt, not a video)."""

    exit_code = 2


class OutputError(MerError):
    """The output folder or a report file cannot be written (not a folder, no permission,
    disk full)."""

    exit_code = 5


class EngineError(MerError):
    """An engine file or its manifest is missing, corrupt, or does not match what is asked."""

    exit_code = 3


class DatasetError(MerError):
    """A training dataset folder or label file is missing, incomplete or inconsistent."""

    exit_code = 4


class BackendUnavailable(EngineError):
    """An explicitly requested backend or device (TensorRT, CUDA) is not available here."""


class ServeError(MerError):
    """The demo cannot listen where it was asked to (the port is taken, the address is not this
    machine's)."""

    exit_code = 6



class Terminated(KeyboardInterrupt):
    """SIGTERM (a timeout, systemd, ``docker stop``), raised where Ctrl+C would be so that every
    stop takes the same path: the work stops, what is finished is kept, and the process exits
    143."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def sigterm_as_interrupt():
    """Make SIGTERM raise :class:`Terminated` where signals can be handled (the main thread);
    returns the handler it replaced, or None where it changed nothing."""
    try:
        return signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (a test runner, an embedding application)
        return None
