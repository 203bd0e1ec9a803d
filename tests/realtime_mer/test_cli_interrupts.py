"""Runs that stop before their end, end to end: Ctrl+C, SIGTERM and SIGKILL during `mer analyze`,
an interrupted batch, live runs that end at their duration or lose their camera. Nothing found
before the stop is lost, and the reports are whole."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from realtime_mer.cli import main
from realtime_mer.report import OUTPUT_FILES, read_events


def run_cli(*args: str) -> int:
    return main(["analyze", *args, "--no-progress"])


# main() returns 130 after Ctrl+C, yet 1 run in 12 (the interrupt 0.8 s into the second video)
# ended by SIGINT (returncode -2) after main() had printed its message and kept everything. No
# library replaces the SIGINT handler (checked with sigaction); the likely cause is CPython
# flagging an interrupt as unhandled when it passes through code run by PyRun_* (as native
# bindings may do), which makes the interpreter re-raise SIGINT at exit. A shell shows 130 either
# way and the outputs are complete, so both count as the expected exit.
_EXIT_AFTER_CTRL_C = (130, -2)


@pytest.fixture(scope="module")
def wolfgang_run(media_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("wolfgang")
    code = run_cli(str(media_dir / "WolfgangLanger_Pexels.mp4"), "--out", str(out))
    return code, out


def _ctrl_c_during(args: list[str], started: Path, after_s: float,
                   sig: int | None = None) -> str:
    """Run `mer ARGS` in a subprocess, send it Ctrl+C (or ``sig``) ``after_s`` seconds after
    ``started`` appears (an events file: frames are flowing), and return its stderr once it
    has exited as an interrupted (terminated) run; the exit must come within 3 s of the
    signal."""
    import signal
    import time

    sig = signal.SIGINT if sig is None else sig
    # A test runner started in the background of a shell inherits SIGINT ignored, and Python
    # then keeps it ignored; the user at a terminal has the default, which the child gets here.
    process = subprocess.Popen(
        [sys.executable, "-m", "realtime_mer.cli", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(after_s)
    sent = time.monotonic()
    process.send_signal(sig)
    _, err = process.communicate(timeout=120)
    took = time.monotonic() - sent
    if sig == signal.SIGTERM:
        assert process.returncode == 143, err
        assert "terminated (SIGTERM); the events found so far and the reports are kept" in err
    else:
        assert process.returncode in _EXIT_AFTER_CTRL_C, err
        assert "interrupted; the events found so far and the reports are kept" in err
    assert took < 3.0, f"the run took {took:.1f} s to stop"
    return err


def test_sigterm_stops_at_once_with_every_report_written(media_dir, tmp_path):
    """SIGTERM (a timeout, systemd, docker stop) stops like Ctrl+C: exit 143 within seconds,
    summary.json, events.csv and report.html written and valid, every spotted event in
    events.jsonl (the unclassified ones marked so)."""
    import signal

    out = tmp_path / "out"
    _ctrl_c_during(["analyze", str(media_dir / "WolfgangLanger_Pexels.mp4"), "--out", str(out)],
                   out / "events.jsonl", 4.0, sig=signal.SIGTERM)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["complete"] is False
    events = read_events(out / "events.jsonl")
    assert summary["events"]["total"] == len(events)
    import csv

    with open(out / "events.csv", newline="", encoding="utf-8") as handle:
        assert len(list(csv.DictReader(handle))) == len(events)
    assert (out / "report.html").read_text().rstrip().endswith("</html>")


def test_interrupted_run_keeps_events_and_summary(media_dir, tmp_path):
    """SIGINT half-way: exit 130, summary written with interrupted=true, events file intact."""
    out = tmp_path / "out"
    err = _ctrl_c_during(["analyze", str(media_dir / "WolfgangLanger_Pexels.mp4"), "--out",
                          str(out), "--no-progress"], out / "events.jsonl", after_s=3.0)
    assert "Traceback" not in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True
    assert 0 < summary["frames"]["processed"] < 472
    read_events(out / "events.jsonl")  # every line parses


def _last_flushed_frame(trace) -> int:
    """The last whole frame row of a trace.csv being written (0 before any)."""
    import csv

    try:
        with open(trace, newline="", encoding="utf-8") as handle:
            frames = [int(row["frame"]) for row in csv.DictReader(handle)
                      if (row.get("frame") or "").isdigit() and row.get("speaking") is not None]
    except (OSError, ValueError):
        return 0
    return max(frames, default=0)


@pytest.mark.parametrize("kill_at_frame", [40, 150])
def test_sigkill_loses_no_event_spotted_a_second_before(media_dir, tmp_path, wolfgang_run,
                                                         kill_at_frame):
    """SIGKILL cannot be handled: what is on disk is what was written. Every event is written
    (and fsynced) the moment it is spotted, so each event of the complete run that the killed
    run had spotted a second (40 frames at its rate) before its last flushed trace line is in
    its events.jsonl, with the same times. The run is killed once its trace has reached a
    frame (early, and after the first events), however fast the machine is."""
    import signal
    import time

    _, complete = wolfgang_run
    everything = read_events(complete / "events.jsonl")
    out = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-m", "realtime_mer.cli", "analyze",
         str(media_dir / "WolfgangLanger_Pexels.mp4"), "--out", str(out), "--no-progress"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while (_last_flushed_frame(out / "trace.csv") < kill_at_frame
           and time.monotonic() < deadline and process.poll() is None):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    reached = _last_flushed_frame(out / "trace.csv") - 40
    assert reached + 40 >= kill_at_frame, "the run never reached the frame to be killed at"
    kept = {(round(e.onset_ms, 3), e.kind) for e in read_events(out / "events.jsonl")}
    due = [e for e in everything if e.offset_frame + 2 <= reached]
    print(f"killed at frame >= {reached + 40}: {len(due)} events due, {len(kept)} on disk")
    assert due or kill_at_frame < 100, "the run should have spotted events by then"
    for event in due:
        assert (round(event.onset_ms, 3), event.kind) in kept, event


def test_live_camera_that_disconnects(media_dir, tmp_path, capsys, monkeypatch):
    """A video file opened through OpenCV, treated as a stream URL (not played at its own pace),
    stands in for a camera: it delivers frames faster than the pipeline consumes them (so the
    capture thread drops the oldest) and then "disconnects" when it ends. The run stops with a
    clear message and keeps its outputs."""
    import realtime_mer.camera

    monkeypatch.setattr(realtime_mer.camera, "_is_local_file", lambda device: False)
    out = tmp_path / "live"
    code = main(["live", "--camera", str(media_dir / "single_face.mp4"), "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 2
    assert "disconnected" in captured.err and "Traceback" not in captured.err
    summary = json.loads((out / "summary.json").read_text())
    frames = summary["frames"]
    assert frames["processed"] > 0
    assert frames["processed"] + frames["dropped"] <= 72
    assert summary["problems"]
    for name in OUTPUT_FILES:
        assert (out / name).exists()


def test_live_on_a_video_file_plays_it_in_real_time_to_a_complete_end(media_dir, tmp_path,
                                                                      capsys):
    """`mer live --camera FILE` plays the file like a camera: frames at their own times, so a
    pipeline faster than 30 frames/s keeps (nearly) all of them, and the file's end is a
    complete run with exit 0, not a disconnection."""
    out = tmp_path / "live"
    code = main(["live", "--camera", str(media_dir / "single_face.mp4"), "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "disconnected" not in captured.err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] is True and summary["problems"] == []
    frames = summary["frames"]
    assert frames["processed"] + frames["dropped"] == 72
    assert frames["processed"] >= 36  # as fast as decoding, far fewer survive a queue of 8
    # The status line counts the frames analysed and the events found.
    status = captured.err.replace("\r", "\n").splitlines()
    last = [line for line in status if line.startswith("camera single_face.mp4:")][-1]
    assert f"{frames['processed']}frame" in last
    assert f"events={summary['events']['total']}" in last
    assert main(["live", "--camera", str(media_dir / "single_face.mp4"), "--out",
                 str(tmp_path / "quiet"), "--no-progress"]) == 0
    assert "camera single_face.mp4" not in capsys.readouterr().err


def test_live_run_stops_at_its_duration_with_a_complete_result(media_dir, tmp_path):
    """A camera that would deliver 3.6 s of frames (72 at 50 ms each) is read for 1 s: the run
    ends on time, not at the disconnect, so it is complete and nothing is reported wrong."""
    from realtime_mer.analysis import analyze_camera
    from tests.realtime_mer.test_capture import _SlowCapture

    camera = _SlowCapture(media_dir / "single_face.mp4", 0.05)
    result = analyze_camera(camera, tmp_path / "live", duration_s=1.0)
    frames = result.summary["frames"]
    assert result.complete and not result.problems
    assert 0 < frames["processed"] and frames["processed"] + frames["dropped"] < 72
    assert result.summary["input"]["duration_limit_s"] == 1.0
    assert json.loads((tmp_path / "live" / "summary.json").read_text())["complete"] is True


def test_interrupted_batch_keeps_the_index_of_what_it_did(media_dir, tmp_path):
    """Ctrl+C during the second video of a batch: the index lists the finished first video and
    the interrupted second one (its results kept, marked incomplete)."""
    import csv

    out = tmp_path / "out"
    _ctrl_c_during(["analyze", str(media_dir / "single_face.mp4"),
                    str(media_dir / "WolfgangLanger_Pexels.mp4"), "--out", str(out),
                    "--no-progress"], out / "WolfgangLanger_Pexels" / "events.jsonl", after_s=2.0)
    with open(out / "index.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["folder"], row["status"]) for row in rows] == [
        ("single_face", "complete"), ("WolfgangLanger_Pexels", "incomplete")]
    assert rows[1]["problems"] == "interrupted"
    assert 0 < int(rows[1]["frames"]) < 472
