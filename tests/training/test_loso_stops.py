"""A LOSO run with worker processes, stopped from outside: SIGTERM stops the workers with the
parent (exit 143, one line saying what is kept); a parent that is killed outright cannot stop
them, so each worker stops itself when its parent is gone instead of holding the cores."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT


def _children(pid: int) -> list[int]:
    """The spawned worker processes of ``pid`` (not a resource tracker)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == pid and b"spawn_main" in cmdline:
            found.append(int(stat.parent.name))
    return found


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has stopped; only its exit status waits to be read


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process table in /proc")
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_stopping_a_run_stops_its_worker_processes(tmp_path, megc_dir, stop):
    log = (tmp_path / "out.txt").open("w+")
    workers: list[int] = []
    run = subprocess.Popen(
        [sys.executable, "-m", "training", "loso", "--data", str(megc_dir),
         "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "res.json"),
         "--folds", "0,1", "--workers", "2", "--threads", "2", "--epochs", "5000"],
        cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(workers) < 2 and time.monotonic() < deadline and run.poll() is None:
            time.sleep(0.5)
            workers = _children(run.pid)
        assert len(workers) == 2, Path(log.name).read_text()
        time.sleep(3.0)  # the workers are training
        assert all(_running(w) for w in workers)
        run.send_signal(stop)
        code = run.wait(timeout=60)
        deadline = time.monotonic() + 30
        while any(_running(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [w for w in workers if _running(w)], Path(log.name).read_text()
        output = Path(log.name).read_text()
        if stop == signal.SIGTERM:
            assert code == 143, output
            assert ("terminated (SIGTERM): finished folds and checkpoints are kept; rerun the "
                    "same command to resume") in output
            assert "Traceback" not in output
        else:
            assert code == -signal.SIGKILL
            assert "the parent process is gone: stopping" in output
    finally:
        if run.poll() is None:
            run.kill()
        for worker in workers:  # a failed test leaves no orphan training on
            if _running(worker):
                os.kill(worker, signal.SIGKILL)
        log.close()


def test_a_stop_while_workers_start_waits_until_they_are_started():
    """SIGTERM while the workers are being handed their data is held until every one is
    started, then handled by the handler in place before (which stops them all): a stop in
    the middle of the hand-over would leave a worker dying on a truncated pickle."""
    from training.loso.runner import _stops_deferred

    seen = []
    interrupt = signal.getsignal(signal.SIGINT)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        with _stops_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
            assert seen == [], "the stop came while the workers were being started"
        assert seen == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGINT) is interrupt  # put back as it was
    finally:
        signal.signal(signal.SIGTERM, previous)
