"""`mer analyze` end to end on real videos, and every bad-input path: a clear one-line message,
a non-zero exit, no traceback, and whatever was found before the damage kept."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from realtime_mer.cli import main
from realtime_mer.report import OUTPUT_FILES, read_events

from tests.realtime_mer.pinned import assert_events_pinned


def run_cli(*args: str) -> int:
    return main(["analyze", *args, "--no-progress"])


def _reencode(source_path: Path, dest: Path, *, frames: int, rate: int,
              size: tuple[int, int] | None = None) -> None:
    """The first ``frames`` frames of a real video as H.264 at ``rate`` fps (resized to
    ``size`` = (width, height) if given)."""
    import av
    import cv2

    with av.open(str(source_path)) as source, av.open(str(dest), "w") as sink:
        stream = sink.add_stream("libx264", rate=rate)
        first = source.streams.video[0].codec_context
        stream.width, stream.height = size or (first.width, first.height)
        stream.pix_fmt = "yuv420p"
        for i, frame in enumerate(source.decode(video=0)):
            if i == frames:
                break
            image = frame.to_ndarray(format="rgb24")
            if size is not None:
                image = cv2.resize(image, size)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                sink.mux(packet)
        for packet in stream.encode():
            sink.mux(packet)


@pytest.fixture(scope="module")
def wolfgang_run(media_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("wolfgang")
    code = run_cli(str(media_dir / "WolfgangLanger_Pexels.mp4"), "--out", str(out))
    return code, out


def test_analyze_gives_the_pinned_events(wolfgang_run):
    """The events of a real interview, field for field as pinned (see tests/realtime_mer/pinned.py)."""
    _, out = wolfgang_run
    assert_events_pinned("WolfgangLanger_Pexels", read_events(out / "events.jsonl"))


def test_analyze_writes_all_outputs_with_complete_events(wolfgang_run):
    code, out = wolfgang_run
    assert code == 0
    for name in OUTPUT_FILES:
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames"]["processed"] == 472
    assert summary["frames"]["with_face"] > 400  # one woman on screen the whole time
    assert summary["input"]["width"] == 640 and summary["input"]["height"] == 360
    assert summary["complete"] is True
    for stage in ("decode", "face", "spotting"):
        assert summary["timings_ms"][stage]["count"] > 0
    events = read_events(out / "events.jsonl")
    assert len(events) == summary["events"]["total"] > 0  # strong expressions in this video
    for event in events:
        assert event.onset_ms <= event.apex_ms <= event.offset_ms
        if event.kind == "blink":  # reported as what it is, never classified
            assert event.label == "" and event.probabilities == {} and event.regions == ["lids"]
            continue
        small = event.duration_ms <= 500 and event.amplitude_pct <= 5.0
        assert event.kind == ("micro" if small else "macro")
        assert event.label in ("negative", "positive", "surprise")
        assert abs(sum(event.probabilities.values()) - 1.0) < 1e-4
        assert event.confidence == max(event.probabilities.values())
        assert event.regions and event.amplitude_pct > 0 and event.floor_pct > 0
    # events.csv says what events.jsonl says, field by field, in the same order, rounded for
    # people: times to 0.1 ms, probabilities and flow magnitudes to 4 decimals.
    import csv

    with open(out / "events.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(events)
    for row, event in zip(rows, events):
        for key in ("source", "kind", "label"):
            assert row[key] == getattr(event, key)
        for key in ("onset_frame", "apex_frame", "offset_frame"):
            assert int(row[key]) == getattr(event, key)
        for key, decimals in (("onset_ms", 1), ("apex_ms", 1), ("offset_ms", 1),
                              ("duration_ms", 1), ("confidence", 4), ("peak", 4),
                              ("threshold", 4)):
            assert len(row[key].partition(".")[2]) <= decimals, (key, row[key])
            assert float(row[key]) == pytest.approx(getattr(event, key), abs=0.5 * 10 ** -decimals)
        for name, p in event.probabilities.items():
            assert len(row[f"p_{name}"].partition(".")[2]) <= 4
            assert float(row[f"p_{name}"]) == pytest.approx(p, abs=5e-5)
    # The apex lies inside the event in frames as in time, and the summary counts by class.
    assert all(e.onset_frame <= e.apex_frame <= e.offset_frame for e in events)
    for kind in ("micro", "macro"):
        counted = summary["events"]["per_class"].get(kind, {})
        assert sum(counted.values()) == sum(e.kind == kind for e in events)
    page = (out / "report.html").read_text()
    # self-contained: one table row per event (+ header), images embedded, nothing fetched
    assert page.count("<tr>") == len(events) + 1
    assert page.count('alt="feature map" src="data:image/png;base64,') == \
        sum(e.kind != "blink" for e in events)  # a blink has no flow map of its own
    assert f"{summary['events']['blinks']} blinks" in page and "Detection floor" in page
    assert 'alt="timeline" src="data:image/png;base64,' in page
    assert "http://" not in page and "https://" not in page


def test_truncated_video_keeps_events_found_before_the_damage(media_dir, tmp_path, capsys,
                                                              wolfgang_run):
    source = media_dir / "WolfgangLanger_Pexels.mp4"
    truncated = tmp_path / "truncated.mp4"
    data = source.read_bytes()
    truncated.write_bytes(data[: int(len(data) * 0.6)])
    out = tmp_path / "out"
    code = run_cli(str(truncated), "--out", str(out))
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err and "truncated.mp4" in err
    summary = json.loads((out / "summary.json").read_text())
    assert 0 < summary["frames"]["processed"] < 472
    assert summary["complete"] is False and summary["problems"]
    # What was found on the intact part is what the full run found there.
    _, full_out = wolfgang_run
    cutoff = summary["frames"]["processed"]
    full_early = [e for e in read_events(full_out / "events.jsonl") if e.offset_frame < cutoff - 60]
    kept = read_events(out / "events.jsonl")
    assert [e.apex_ms for e in kept[: len(full_early)]] == [e.apex_ms for e in full_early]


@pytest.mark.parametrize("content", ["random", "text", "empty"])
def test_not_a_video_gives_a_clear_error(tmp_path, capsys, content):
    bad = tmp_path / "clip.mp4"
    # Fixed random bytes, not os.urandom: now and then a random blob (one in the first 147 of
    # a seeded search) holds an H.263 start code that FFmpeg's probe accepts as a raw H.263
    # stream; it then decodes a real (faceless) frame, which the CLI rightly reports as a
    # video without a face (exit 0).
    payload = {"random": random.Random(0).randbytes(200_000),
               "text": b"hello, not a video\n" * 100, "empty": b""}[content]
    bad.write_bytes(payload)
    code = run_cli(str(bad), "--out", str(tmp_path / "out"))
    err = capsys.readouterr().err
    assert code == 2
    assert "clip.mp4" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_missing_video(tmp_path, capsys):
    code = run_cli(str(tmp_path / "nowhere.mp4"), "--out", str(tmp_path / "out"))
    assert code == 2
    assert "nowhere.mp4" in capsys.readouterr().err


def test_image_given_as_video(media_dir, tmp_path, capsys):
    code = run_cli(str(media_dir / "single_face.jpg"), "--out", str(tmp_path / "out"))
    err = capsys.readouterr().err
    assert code == 2
    assert "single_face.jpg" in err and "Traceback" not in err


def test_video_without_a_face_reports_every_frame_faceless(media_dir, tmp_path):
    out = tmp_path / "out"
    assert run_cli(str(media_dir / "no_face.mp4"), "--out", str(out)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames"]["processed"] >= 95  # 98 declared; the last 3 do not decode
    assert summary["frames"]["without_face"] == summary["frames"]["processed"]
    assert summary["events"]["total"] == 0


def test_face_that_comes_and_goes(media_dir, tmp_path):
    out = tmp_path / "out"
    assert run_cli(str(media_dir / "face_noface.mov"), "--out", str(out)) == 0
    frames = json.loads((out / "summary.json").read_text())["frames"]
    assert frames["processed"] == 169
    assert 0 < frames["without_face"] < frames["processed"]
    assert frames["with_face"] + frames["without_face"] == frames["processed"]
    # the face vanishes behind title cards: the sequence restarts rather than computing flow
    # across the cut. The clip has two hard cuts (frame-to-frame thumbnail differences of 97
    # and 146 grey levels; every other one is under 6).
    assert frames["sequence_restarts"] >= 1
    assert frames["hard_cuts"] == 2


def test_several_videos_go_to_their_own_folders(media_dir, tmp_path):
    out = tmp_path / "out"
    code = run_cli(str(media_dir / "single_face.mp4"), str(media_dir / "no_face.mp4"),
                   "--out", str(out))
    assert code == 0
    for stem in ("single_face", "no_face"):
        for name in OUTPUT_FILES:
            assert (out / stem / name).exists()
    # The batch index: one row per video, saying what each video's own summary says, and a
    # page whose links open each video's report.
    import csv
    import re

    with open(out / "index.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["folder"] for row in rows] == ["single_face", "no_face"]
    for row in rows:
        summary = json.loads((out / row["folder"] / "summary.json").read_text())
        assert row["status"] == "complete" and row["problems"] == ""
        assert int(row["frames"]) == summary["frames"]["processed"]
        assert int(row["without_face"]) == summary["frames"]["without_face"]
        assert int(row["faces"]) == len(summary["faces"]["tracked"])
        assert (int(row["micro"]), int(row["macro"])) == (summary["events"]["micro"],
                                                          summary["events"]["macro"])
        assert sum(int(row[f"micro_{c}"]) for c in ("negative", "positive", "surprise")) == \
            summary["events"]["micro"]
    assert rows[1]["without_face"] == "95"
    assert (rows[0]["faces"], rows[1]["faces"]) == ("1", "0")
    links = re.findall(r'href="([^"]+)"', (out / "index.html").read_text())
    assert links == ["single_face/report.html", "no_face/report.html"]
    assert all((out / link).is_file() for link in links)


def test_one_bad_video_does_not_stop_the_others(media_dir, tmp_path, capsys):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(random.Random(0).randbytes(10_000))  # fixed bytes: see the test above
    out = tmp_path / "out"
    code = run_cli(str(bad), str(media_dir / "no_face.mp4"), "--out", str(out))
    assert code == 2
    assert (out / "no_face" / "summary.json").exists()
    assert "broken.mp4" in capsys.readouterr().err
    import csv

    with open(out / "index.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["folder"], row["status"]) for row in rows] == [("broken", "failed"),
                                                               ("no_face", "complete")]
    assert "cannot open" in rows[0]["problems"] and rows[0]["frames"] == ""


def test_missing_engine_file(media_dir, tmp_path, capsys):
    code = run_cli(str(media_dir / "no_face.mp4"), "--out", str(tmp_path / "out"),
                   "--engine", str(tmp_path / "absent.onnx"))
    err = capsys.readouterr().err
    assert code == 3
    assert "absent.onnx" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # refused before any work


def test_corrupt_engine_file(media_dir, tmp_path, capsys):
    from realtime_mer.runtime import default_engine_path

    engine = default_engine_path()
    copy = tmp_path / engine.name
    shutil.copy(engine, copy)
    shutil.copy(engine.with_name(engine.name + ".json"), tmp_path / (engine.name + ".json"))
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0xFF
    copy.write_bytes(bytes(data))
    code = run_cli(str(media_dir / "no_face.mp4"), "--out", str(tmp_path / "out"),
                   "--engine", str(copy))
    err = capsys.readouterr().err
    assert code == 3
    assert "sha256" in err.lower() and "Traceback" not in err


def test_huge_frames_are_downscaled(media_dir, tmp_path):
    """A 4K recording is read at --max-side (default 1280) so MediaPipe and memory stay bounded;
    the face is still found."""
    big = tmp_path / "big.mp4"
    _reencode(media_dir / "single_face.mp4", big, frames=12, rate=30, size=(3840, 2160))
    out = tmp_path / "out"
    assert run_cli(str(big), "--out", str(out)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["input"]["width"] == 3840
    assert summary["frames"]["processed"] == 12
    assert summary["frames"]["with_face"] == 12


def test_annotated_video_keeps_every_frame_and_its_time(media_dir, tmp_path):
    from realtime_mer.capture import open_video

    source = media_dir / "single_face.mp4"
    out = tmp_path / "out"
    assert run_cli(str(source), "--out", str(out), "--video") == 0
    with open_video(source) as original, open_video(out / "annotated.mp4") as annotated:
        times_in = [f.t_ms for f in original]
        frames_out = list(annotated)
    assert len(frames_out) == len(times_in)
    assert max(abs(a - f.t_ms) for a, f in zip(times_in, frames_out)) <= 1.0  # ms pts
    # the face box is drawn (green) on a frame where the face was found
    green = (abs(frames_out[10].image_bgr.astype(int) - (80, 200, 80)).sum(axis=-1) < 60)
    assert green.sum() > 100


def test_unwritable_output_is_refused_before_any_frame(media_dir, tmp_path, capsys):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the output folder should go")
    code = run_cli(str(media_dir / "no_face.mp4"), "--out", str(blocker))
    err = capsys.readouterr().err
    assert code == 5
    assert "cannot write the results into" in err and "Traceback" not in err
    assert blocker.read_text().startswith("a file")  # left alone


def test_batch_index_links_folders_with_any_name(media_dir, tmp_path):
    """Videos named with spaces, brackets and Cyrillic letters: the index's links are
    percent-encoded relative URLs that resolve to each video's report."""
    import re
    from urllib.parse import unquote

    named = tmp_path / "интервью 1 (copy).mp4"
    shutil.copyfile(media_dir / "no_face.mp4", named)
    out = tmp_path / "out dir"
    assert run_cli(str(named), str(media_dir / "no_face.mp4"), "--out", str(out)) == 0
    links = re.findall(r'href="([^"]+)"', (out / "index.html").read_text(encoding="utf-8"))
    assert len(links) == 2 and all(" " not in link and "(" not in link for link in links)
    assert [unquote(link) for link in links] == ["интервью 1 (copy)/report.html",
                                                 "no_face/report.html"]
    assert all((out / unquote(link)).is_file() for link in links)


def test_videos_that_share_a_name_do_not_overwrite_each_other(media_dir, tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        shutil.copy(media_dir / "no_face.mp4", tmp_path / folder / "clip.mp4")
    out = tmp_path / "out"
    assert run_cli(str(tmp_path / "a" / "clip.mp4"), str(tmp_path / "b" / "clip.mp4"),
                   "--out", str(out)) == 0
    first = json.loads((out / "clip" / "summary.json").read_text())
    second = json.loads((out / "clip-2" / "summary.json").read_text())
    assert first["input"]["path"].endswith(os.path.join("a", "clip.mp4"))
    assert second["input"]["path"].endswith(os.path.join("b", "clip.mp4"))


def test_debug_and_bad_max_side_on_the_command_line(tmp_path, capsys):
    from realtime_mer.errors import EngineError

    missing = str(tmp_path / "nowhere.mp4")
    engine = ["--engine", str(tmp_path / "absent.onnx")]
    assert main(["analyze", missing, "--out", str(tmp_path / "o"), *engine]) == 3
    # --debug works after the command as well as before it: the error is raised, not printed.
    with pytest.raises(EngineError):
        main(["analyze", missing, "--out", str(tmp_path / "o"), *engine, "--debug"])
    with pytest.raises(EngineError):
        main(["--debug", "analyze", missing, "--out", str(tmp_path / "o"), *engine])
    with pytest.raises(SystemExit) as exit_info:
        main(["analyze", missing, "--out", str(tmp_path / "o"), "--max-side", "8"])
    assert exit_info.value.code == 2
    assert "at least 16" in capsys.readouterr().err


def test_high_frame_rate_video_gets_a_ring_buffer_for_its_rate(media_dir, tmp_path):
    """A 200 fps recording (the rate of CASME II and SAMM) must keep the same seconds of history
    as a 30 fps one, or a long event's onset crop is overwritten before the event closes."""
    fast = tmp_path / "fast.mp4"
    _reencode(media_dir / "single_face.mp4", fast, frames=30, rate=200)
    out = tmp_path / "out"
    assert run_cli(str(fast), "--out", str(out)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["input"]["fps_nominal"] == pytest.approx(200, rel=0.01)
    from realtime_mer.pipeline import PipelineOptions

    seconds = PipelineOptions().buffer_seconds
    assert summary["frames"]["ring_buffer_slots"] >= seconds * 200


def test_summary_json_has_no_nan(tmp_path):
    import numpy as np

    from realtime_mer.report import write_json

    path = tmp_path / "s.json"
    write_json(path, {"duration_ms": float("nan"), "x": [np.float32("inf"), 1.5],
                      "a": np.array([np.nan, 2.0])})

    def refuse(name):
        raise AssertionError(f"{name} in strict JSON")

    doc = json.loads(path.read_text(), parse_constant=refuse)
    assert doc == {"duration_ms": None, "x": [None, 1.5], "a": [None, 2.0]}


def test_annotated_video_that_cannot_be_written_costs_only_itself(media_dir, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "annotated.mp4").mkdir(parents=True)  # a folder where the video file should go
    code = run_cli(str(media_dir / "no_face.mp4"), "--out", str(out), "--video")
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "annotated.mp4" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames"]["processed"] >= 95  # the whole video was still analysed
    assert any("annotated.mp4" in p for p in summary["problems"])
    for name in OUTPUT_FILES:
        assert (out / name).exists()


def test_info_describes_the_engine_that_would_run(capsys):
    from realtime_mer.runtime import default_engine_path, load_engine, sha256_file

    assert main(["info"]) == 0
    summary = capsys.readouterr().out.splitlines()
    assert len(summary) <= 12  # the facts, not the manifest
    manifest = load_engine(default_engine_path()).manifest
    text = "\n".join(summary)
    assert str(default_engine_path()) in text and "onnxruntime" in text
    assert f"UF1 {manifest.loso['uf1']:.3f}" in text and manifest.sha256 in text
    assert "negative, positive, surprise" in text
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert Path(info["engine"]) == default_engine_path()
    assert info["backend"] == "onnxruntime" and info["device"] in ("cpu", "cuda")
    assert info["manifest"]["sha256"] == sha256_file(default_engine_path())
    assert info["manifest"]["class_names"] == ["negative", "positive", "surprise"]


def test_messages_name_the_real_problem(capsys, tmp_path):
    """A missing file given to `mer live` is a missing file, not a camera; an impossible port is
    refused by the parser; an address that is not this machine's is said to be so (exit 6),
    not reported as a taken port."""
    assert main(["live", "--camera", str(tmp_path / "nope.mp4"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"mer: error: no such video file or camera device: {tmp_path}/nope.mp4"
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--port", "99999"])
    assert exit_info.value.code == 2 and "a port is 1-65535" in capsys.readouterr().err
    from realtime_mer.app import _check_address
    from realtime_mer.errors import ServeError

    with pytest.raises(ServeError, match="not an address of this machine"):
        _check_address("10.9.9.9", 7861)
    with pytest.raises(ServeError, match="unknown host"):
        _check_address("no-such-host.invalid", 7861)
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ServeError, match="in use"):
            _check_address("127.0.0.1", taken.getsockname()[1])


def test_stderr_carries_no_native_library_chatter(media_dir, tmp_path):
    """A clean run's stderr is the CLI's own: MediaPipe's start-up warnings (printed by native
    code at every graph start, here also at the video's face restarts) are in the debug log."""
    from realtime_mer.native_logs import is_native_chatter

    result = subprocess.run(
        [sys.executable, "-m", "realtime_mer.cli", "analyze",
         str(media_dir / "face_noface.mov"), "--out", str(tmp_path / "out"), "--no-progress"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    chatter = [line for line in result.stderr.splitlines()
               if is_native_chatter(line) or line.startswith(("W0000", "I0000"))]
    assert chatter == []
    assert "face_noface.mov" in result.stdout
    # --debug leaves the native output as the libraries write it (a native crash inside a
    # capture would lose its message), and main() restores the capture for the process.
    debug = subprocess.run(
        [sys.executable, "-m", "realtime_mer.cli", "--debug", "analyze",
         str(media_dir / "single_face.mp4"), "--out", str(tmp_path / "debug"), "--no-progress"],
        capture_output=True, text=True, timeout=120)
    assert debug.returncode == 0, debug.stderr
    assert any(is_native_chatter(line) for line in debug.stderr.splitlines())
    from realtime_mer import native_logs

    assert main(["--debug", "analyze", str(media_dir / "no_face.mp4"), "--out",
                 str(tmp_path / "in_process"), "--no-progress"]) == 0
    assert native_logs._capture_enabled


def test_small_face_is_reported_and_a_large_enough_one_is_not(media_dir, tmp_path, capsys):
    """The same recording shrunk to 128x72 puts the eyes ~14 px apart, far below the 57 px at
    which the face crop needs no enlarging: the summary, the report and stderr say so (exit 0,
    it is still analysed). At its own size (eyes ~69 px apart) nothing is said."""
    small = tmp_path / "small.mp4"
    _reencode(media_dir / "single_face.mp4", small, frames=40, rate=30, size=(128, 72))
    assert run_cli(str(small), "--out", str(tmp_path / "small")) == 0
    err = capsys.readouterr().err
    face = json.loads((tmp_path / "small" / "summary.json").read_text())["face"]
    assert face["small"] is True
    assert face["median_eye_distance_px"] < 20 < face["upsampling_eye_distance_px"]
    assert err.count("the face is small") == 1
    assert "The face is small" in (tmp_path / "small" / "report.html").read_text()

    assert run_cli(str(media_dir / "single_face.mp4"), "--out", str(tmp_path / "large")) == 0
    assert "the face is small" not in capsys.readouterr().err
    face = json.loads((tmp_path / "large" / "summary.json").read_text())["face"]
    assert face["small"] is False
    assert face["median_eye_distance_px"] > face["upsampling_eye_distance_px"]
    assert "The face is small" not in (tmp_path / "large" / "report.html").read_text()


def test_rerun_into_the_same_folder_replaces_the_earlier_run_whole(media_dir, tmp_path, capsys):
    """A second run into a folder that holds a first run's results (with its annotated video)
    replaces them all: no annotated.mp4 of the first run is left beside the second run's
    events, and stderr says what was replaced; other files in the folder are not touched."""
    out = tmp_path / "out"
    video = str(media_dir / "single_face.mp4")
    assert run_cli(video, "--out", str(out), "--video") == 0
    assert (out / "annotated.mp4").exists()
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert run_cli(video, "--out", str(out)) == 0
    err = capsys.readouterr().err
    assert "replacing the results of an earlier run" in err and "annotated.mp4" in err
    assert not (out / "annotated.mp4").exists()
    assert (out / "notes.txt").read_text() == "mine"
    for name in OUTPUT_FILES:
        assert (out / name).exists(), name


def test_analyze_classifies_in_the_background_with_the_same_events_as_inline(media_dir,
                                                                              wolfgang_run):
    """analyze overlaps each event's TV-L1 with the face stage of the next frames; the events
    (frames, classes, probabilities) and their order are those of the pipeline classifying
    each event inline, with the frame that closed it."""
    from realtime_mer.capture import open_video
    from realtime_mer.pipeline import Pipeline, PipelineOptions

    code, out = wolfgang_run
    background = read_events(out / "events.jsonl")
    assert code == 0 and len(background) >= 3
    inline = []
    with Pipeline(PipelineOptions(classify_in_background=False)) as pipeline, \
            open_video(media_dir / "WolfgangLanger_Pexels.mp4") as source:
        for frame in source:
            result = pipeline.process(frame)
            for event in result.events:
                assert event.offset_frame <= frame.index  # closed by this frame
                inline.append(event)
        inline.extend(event for event, _ in pipeline.finish())  # open at the end: truncated
    assert [(e.onset_frame, e.apex_frame, e.offset_frame, e.kind, e.label) for e in background] \
        == [(e.onset_frame, e.apex_frame, e.offset_frame, e.kind, e.label) for e in inline]
    for a, b in zip(background, inline):
        for name in a.probabilities:
            assert a.probabilities[name] == pytest.approx(b.probabilities[name], abs=1e-6)


def test_start_and_end_analyse_a_segment_in_the_videos_own_time(media_dir, tmp_path, capsys):
    """`--start 0:05 --end 12.5` analyses the frames from 5 s to 12.5 s: the summary says which
    segment, every event lies in it with the video's own times and frame numbers, and the
    progress total is the segment's. Times that cannot be read, or an end before the start,
    are refused before any work."""
    from realtime_mer.capture import open_video

    path = media_dir / "WolfgangLanger_Pexels.mp4"
    out = tmp_path / "segment"
    assert run_cli(str(path), "--out", str(out), "--start", "0:05", "--end", "12.5") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["input"]["start_ms"], summary["input"]["end_ms"]) == (5000.0, 12500.0)
    with open_video(path) as source:
        in_range = [f.index for f in source if 5000.0 <= f.t_ms <= 12500.0]
    assert summary["frames"]["processed"] == len(in_range) and summary["complete"]
    page = (out / "report.html").read_text()
    assert "segment 5.00 s to 12.50 s" in page
    assert f"eyes {summary['face']['median_eye_distance_px']:.0f} px apart (median)" in page
    events = read_events(out / "events.jsonl")
    assert events
    for event in events:
        assert 5000.0 <= event.onset_ms <= event.offset_ms <= 12500.0
        assert in_range[0] <= event.onset_frame <= event.offset_frame <= in_range[-1]
    capsys.readouterr()
    for args, message in ((["--start", "1:x"], "not a time"), (["--start", "0:75"], "under 60")):
        with pytest.raises(SystemExit) as exit_info:  # argparse: usage and exit 2
            run_cli(str(path), "--out", str(tmp_path / "bad"), *args)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert run_cli(str(path), "--out", str(tmp_path / "bad"), "--start", "10", "--end", "5") == 2
    assert "must be after --start" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_a_folder_of_frames_gives_the_events_of_the_video_it_came_from(media_dir, tmp_path,
                                                                      wolfgang_run):
    """The Wolfgang video written out as img1.png ... img472.png and analysed with --fps at the
    video's rate: the same frames, so the same events, frames, classes and probabilities."""
    import cv2

    from realtime_mer.capture import open_video

    code, out = wolfgang_run
    folder = tmp_path / "frames"
    folder.mkdir()
    with open_video(media_dir / "WolfgangLanger_Pexels.mp4") as source:
        fps = source.info.fps_nominal
        for frame in source:
            cv2.imwrite(str(folder / f"img{frame.index + 1}.png"), frame.image_bgr)
    assert run_cli(str(folder), "--fps", repr(fps), "--out", str(tmp_path / "out")) == 0
    video_events = read_events(out / "events.jsonl")
    folder_events = read_events(tmp_path / "out" / "events.jsonl")
    assert len(video_events) >= 3
    assert [(e.onset_frame, e.apex_frame, e.offset_frame, e.kind, e.label)
            for e in folder_events] == [(e.onset_frame, e.apex_frame, e.offset_frame, e.kind,
                                         e.label) for e in video_events]
    for a, b in zip(folder_events, video_events):
        assert a.apex_ms == pytest.approx(b.apex_ms, abs=0.01)
        for name in a.probabilities:
            assert a.probabilities[name] == pytest.approx(b.probabilities[name], abs=1e-5)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["input"]["codec"] == "images" and summary["frames"]["processed"] == 472


def test_max_faces_sets_how_many_faces_are_tracked(media_dir, tmp_path):
    """A clip of the group photo: by default several faces are seen in its frames (the largest
    is the subject); with --max-faces 1 MediaPipe tracks one face only, which the summary
    records, and no frame counts several faces."""
    import av
    import cv2

    clip = tmp_path / "group.mp4"
    image = cv2.imread(str(media_dir / "multi_face.jpg"))[100:600, 250:950]  # as test_face
    height, width = (image.shape[0] // 2) * 2, (image.shape[1] // 2) * 2
    with av.open(str(clip), "w") as sink:
        stream = sink.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for _ in range(10):
            frame = av.VideoFrame.from_ndarray(image[:height, :width], format="bgr24")
            for packet in stream.encode(frame):
                sink.mux(packet)
        for packet in stream.encode():
            sink.mux(packet)
    summaries = {}
    for name, extra in (("default", []), ("one", ["--max-faces", "1"])):
        assert run_cli(str(clip), "--out", str(tmp_path / name), *extra) == 0
        summaries[name] = json.loads((tmp_path / name / "summary.json").read_text())
    assert summaries["default"]["face"]["max_faces"] == 4
    assert summaries["default"]["frames"]["with_several_faces"] >= 5
    assert summaries["one"]["face"]["max_faces"] == 1
    assert summaries["one"]["frames"]["with_several_faces"] == 0
    assert summaries["one"]["frames"]["with_face"] == 10


def test_a_file_name_in_any_script_gives_no_extra_stderr(media_dir, tmp_path, capsys):
    """A recording named in Chinese and Russian: the timeline's title cannot draw the glyphs,
    and matplotlib's warnings about that stay off stderr (the run prints nothing there)."""
    import shutil

    video = tmp_path / "面试_интервью.mp4"
    shutil.copy(media_dir / "single_face.mp4", video)
    assert run_cli(str(video), "--out", str(tmp_path / "out")) == 0
    assert capsys.readouterr().err == ""
    assert (tmp_path / "out" / "timeline.png").stat().st_size > 0


def test_flow_option_reaches_the_features(capsys):
    from realtime_mer.cli import _pipeline_options, build_parser

    for flow in ("opencv-tvl1", "torch-tvl1", "auto"):
        args = build_parser().parse_args(["analyze", "x.mp4", "--out", "o", "--flow", flow])
        assert _pipeline_options(args).features.flow == flow
    assert "warming up the PyTorch TV-L1" in capsys.readouterr().err  # said for torch-tvl1
    assert build_parser().parse_args(["demo"]).flow == "auto"


def test_workers_without_ray_say_how_to_get_it(monkeypatch, media_dir, tmp_path, capsys):
    import sys

    from realtime_mer import cli

    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    code = cli.main(["analyze", str(media_dir / "single_face.mp4"), "--out", str(tmp_path),
                     "--workers", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "pip install 'realtime-mer[ray]'" in err[0]
