"""`mer analyze --workers N`: recordings as Ray tasks on this machine (real videos, real Ray)."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("ray", reason="Ray is the optional extra realtime-mer[ray]")


def _mer(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "realtime_mer.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def _events(folder):
    """Every column of every event: class probabilities too."""
    with open(folder / "events.csv", newline="") as file:
        return list(csv.DictReader(file))


@pytest.mark.timeout(600)
def test_a_batch_on_ray_workers_gives_each_recording_its_own_report_and_resumes(
        media_dir, tmp_path):
    """Two real recordings and a broken file over two Ray workers: the two get the events that
    analysing them one by one gives, the broken one is marked failed without stopping them
    (exit 2, one line on stderr), the index lists all three; a rerun skips the complete ones
    and leaves their files untouched."""
    good = [media_dir / "single_face.mp4", media_dir / "talking" / "d0.mp4"]
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00" * 4096)
    run = _mer("analyze", *good, broken, "--out", tmp_path / "ray", "--workers", 2)
    assert run.returncode == 2, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("mer: error:")]
    assert len(errors) == 1 and "broken.mp4" in errors[0]
    assert "WARNING" not in run.stderr
    with open(tmp_path / "ray" / "index.csv", newline="") as file:
        status = {row["folder"]: row["status"] for row in csv.DictReader(file)}
    assert status == {"single_face": "complete", "d0": "complete", "broken": "failed"}

    sequential = _mer("analyze", *good, "--out", tmp_path / "one-by-one")
    assert sequential.returncode == 0, sequential.stderr
    for name in ("single_face", "d0"):
        assert _events(tmp_path / "ray" / name) == _events(tmp_path / "one-by-one" / name)

    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "ray" / "d0").iterdir()}
    again = _mer("analyze", *good, "--out", tmp_path / "ray", "--workers", 2)
    assert again.returncode == 0 and again.stderr.count("already complete") == 2
    assert before == {p: p.stat().st_mtime_ns for p in (tmp_path / "ray" / "d0").iterdir()}


def test_workers_below_one_is_refused(tmp_path, media_dir):
    run = _mer("analyze", media_dir / "single_face.mp4", "--out", tmp_path, "--workers", 0)
    assert run.returncode == 2 and "--workers must be at least 1" in run.stderr


@pytest.mark.timeout(600)
def test_a_recording_whose_worker_is_killed_is_redone(media_dir, tmp_path):
    """SIGKILL to the worker process in the middle of a recording (its outputs begun): Ray's
    retry runs it again in a fresh worker, whose outputs are those of a sequential run."""
    import ray

    from realtime_mer.analysis import analyze_video
    from realtime_mer.batch import EngineSpec, run_on_ray, running_recordings
    from realtime_mer.capture import CaptureOptions
    from realtime_mer.pipeline import PipelineOptions
    from realtime_mer.runtime import default_engine_path, load_engine

    video = media_dir / "talking" / "d0.mp4"
    engine = EngineSpec(str(default_engine_path()))
    analyze_video(video, tmp_path / "sequential", engine=load_engine(engine.path))
    out = tmp_path / "ray"
    killed: list[float] = []
    stop = threading.Event()

    def kill_mid_recording() -> None:
        while not killed and not stop.wait(0.02):
            if not (out / "trace.csv").exists():
                continue  # the recording has not begun writing
            stop.wait(0.3)
            for pid in running_recordings():
                os.kill(pid, signal.SIGKILL)
                killed.append(time.time())
                return

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    killer = threading.Thread(target=kill_mid_recording, daemon=True)
    try:
        killer.start()
        [result] = run_on_ray([(video, out)], engine, PipelineOptions(), CaptureOptions(),
                              workers=2)
    finally:
        stop.set()
        killer.join()
        ray.shutdown()
    assert killed, "the recording was never seen running"
    assert result.exit_code == 0 and result.error is None and result.summary["complete"]
    # the summary is written at a recording's end: this one by the attempt after the kill
    assert (out / "summary.json").stat().st_mtime > killed[0]
    assert _events(out) == _events(tmp_path / "sequential")
