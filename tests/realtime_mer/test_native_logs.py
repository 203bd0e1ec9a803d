"""Native start-up chatter goes to the debug log, everything else written to stderr survives."""

from __future__ import annotations

import logging
import os
import threading

import pytest

from realtime_mer.native_logs import is_native_chatter, quiet_native_logs

# Lines as MediaPipe 0.10.21 and TFLite print them when a face-mesh graph starts.
CHATTER = [
    "INFO: Created TensorFlow Lite XNNPACK delegate for CPU.",
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "W0000 00:00:1796410755.831486   32618 inference_feedback_manager.cc:114] Feedback manager "
    "requires a model with a single signature inference. Disabling support for feedback tensors.",
    "I1204 19:02:11.000012 4242 gl_context.cc:357] GL version: 3.2",
]
NOT_CHATTER = [
    "E0000 00:00:1796410755.831486   32618 calculator_graph.cc:887] INVALID_ARGUMENT: bad input",
    "mer: error: video file not found: x.mp4",
    "Traceback (most recent call last):",
    "",
]


def _raw(err: str) -> str:
    """stderr without the lines of the CLI's log handler, which an earlier CLI test in the same
    process may have left on the realtime_mer logger (it would print the debug records too)."""
    return "".join(line for line in err.splitlines(keepends=True) if not line.startswith("mer: "))


@pytest.mark.parametrize("line", CHATTER)
def test_chatter_is_recognised(line):
    assert is_native_chatter(line)


@pytest.mark.parametrize("line", NOT_CHATTER)
def test_errors_and_our_own_messages_are_not_chatter(line):
    assert not is_native_chatter(line)


def test_block_moves_chatter_to_the_debug_log_and_keeps_the_rest(capfd, caplog):
    caplog.set_level(logging.DEBUG, logger="realtime_mer")
    with quiet_native_logs():
        os.write(2, (CHATTER[2] + "\n" + NOT_CHATTER[0] + "\n").encode())
        with quiet_native_logs():  # nested: one capture, restored by the outer block
            os.write(2, (CHATTER[0] + "\n").encode())
        os.write(2, b"after the inner block\n")
    os.write(2, b"outside\n")
    err = _raw(capfd.readouterr().err)
    assert err == NOT_CHATTER[0] + "\nafter the inner block\noutside\n"
    native = [r.getMessage() for r in caplog.records if r.getMessage().startswith("native: ")]
    assert native == ["native: " + CHATTER[2], "native: " + CHATTER[0]]


def test_disabled_block_leaves_stderr_alone(capfd, caplog):
    caplog.set_level(logging.DEBUG, logger="realtime_mer")
    with quiet_native_logs(enabled=False):
        os.write(2, (CHATTER[0] + "\n").encode())
    assert _raw(capfd.readouterr().err) == CHATTER[0] + "\n"
    assert not caplog.records


def test_concurrent_blocks_restore_stderr_once_all_end(capfd):
    """Descriptor 2 is process-wide: two threads' overlapping blocks share one capture."""
    first_in, second_done = threading.Event(), threading.Event()

    def first():
        with quiet_native_logs():
            first_in.set()
            second_done.wait(10)
            os.write(2, b"first\n")

    def second():
        first_in.wait(10)
        with quiet_native_logs():
            os.write(2, (CHATTER[1] + "\nsecond\n").encode())
        second_done.set()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    os.write(2, b"end\n")
    assert _raw(capfd.readouterr().err) == "second\nfirst\nend\n"
