"""Many recordings over Ray workers: one task per recording, on this machine (``workers``) or on
an existing cluster (``address``). Ray is an optional extra (``realtime-mer[ray]``).

Each task runs :func:`realtime_mer.analysis.analyze_video` in a worker process that keeps its
engine between recordings and is replaced after ``RECORDINGS_PER_WORKER`` of them, so whatever a
recording leaves in a process's heap cannot pile up. A worker uses the CPUs Ray gave the task and
no more (one, by default: its OpenCV, torch and ONNX Runtime thread pools are sized to it and
events are classified inline), so N workers on N cores do not contend. Recordings are handed out
longest first, so a long one does not finish alone at the end. A worker that dies (killed, out
of memory) has its recording retried once, then marked failed; a recording that is bad input
fails at once; neither stops the others. A rerun skips the recordings whose outputs are complete
and valid.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from realtime_mer.capture import IMAGE_SUFFIXES, CaptureOptions, probe_video
from realtime_mer.errors import InputError, MerError
from realtime_mer.pipeline import PipelineOptions
from realtime_mer.report import OUTPUT_FILES

log = logging.getLogger(__name__)

__all__ = ["EngineSpec", "RecordingResult", "complete_outputs", "run_on_ray",
           "running_recordings"]

# A worker process is replaced after this many recordings: starting one costs about a second
# (imports, the engine), which a fresh process per recording paid every time.
RECORDINGS_PER_WORKER = 8

RAY_MISSING = ("--workers and --ray-address run the batch on Ray, which is not installed: "
               "pip install 'realtime-mer[ray]'")


@dataclass(frozen=True)
class EngineSpec:
    """What a worker needs to load the engine itself (engines do not travel between
    processes)."""

    path: str
    backend: str = "auto"
    device: str = "auto"
    precision: str = "fp32"


@dataclass
class RecordingResult:
    """One recording's outcome: its summary (None when it failed), the error, the exit code
    (0 complete, 2 damaged input or failed), and whether an earlier run had done it."""

    video: Path
    out_dir: Path
    summary: dict | None
    error: str | None = None
    exit_code: int = 0
    skipped: bool = False


def complete_outputs(out_dir: Path) -> dict | None:
    """The summary of a finished, uninterrupted run whose every output is there, or None."""
    try:
        summary = json.loads((out_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or summary.get("interrupted") or \
            not summary.get("complete"):
        return None
    if not all((out_dir / name).is_file() for name in OUTPUT_FILES):
        return None
    return summary


@functools.lru_cache(maxsize=2)
def _engine_in_this_process(engine: EngineSpec, cpu_threads: int):
    """A worker loads each engine once and keeps it for its next recordings."""
    from realtime_mer.runtime import load_engine

    return load_engine(engine.path, backend=engine.backend, device=engine.device,
                       precision=engine.precision, cpu_threads=cpu_threads)


def _confine_to(cpus: int) -> None:
    """Size this worker's thread pools to the CPUs Ray gave its task. Left alone, OpenCV and
    torch (and ONNX Runtime, sized where the engine is loaded) each start a pool per core of the
    machine, so two workers on two cores would run several threads apiece and contend.
    MediaPipe's own threads are not under our control."""
    import cv2

    cv2.setNumThreads(cpus)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(cpus)


def _assigned_cpus() -> int:
    import ray

    return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))


def _analyze_in_worker(video: str, out_dir: str, engine: EngineSpec, options: PipelineOptions,
                       capture: CaptureOptions, annotated_video: bool) -> dict:
    """The task: one recording → a plain dict (what crosses back to the driver)."""
    from realtime_mer.analysis import analyze_video

    cpus = _assigned_cpus()
    try:
        backend = _engine_in_this_process(engine, cpus)
        _confine_to(cpus)  # after the engine: its backend may have imported torch
        # With one CPU, the classifier's background thread would only take turns with the face
        # stage on that core; inline gives the same events (with the PyTorch flow, whose
        # background thread batches waiting events, to the last bits).
        result = analyze_video(video, out_dir, options=options, capture=capture, engine=backend,
                               annotated_video=annotated_video,
                               classify_in_background=cpus > 1)
    except MerError as error:  # bad input: final, not retried
        return {"summary": None, "error": str(error), "exit_code": error.exit_code}
    return {"summary": result.summary, "error": "; ".join(result.problems) or None,
            "exit_code": 2 if result.problems else 0}


def _expected_work(video: Path, capture: CaptureOptions) -> float:
    """A recording's length in ms, as far as can be told without decoding it (0 where it
    cannot: it goes last): only the order in which recordings are handed out, so nothing here
    may stop the batch."""
    try:
        if video.is_dir():  # a database's folder of frames
            frames = sum(1 for f in video.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            return 1000.0 * frames / (capture.image_fps or 30.0)
        duration = probe_video(video).duration_ms
    except Exception:  # noqa: BLE001 - unreadable, too long a name, not a video: fails later
        return 0.0
    if not math.isfinite(duration):  # the container does not say
        return 0.0
    end = duration if capture.end_ms is None else min(duration, capture.end_ms)
    return max(end - capture.start_ms, 0.0)


def running_recordings(driver_pid: int | None = None) -> list[int]:
    """The process ids of the Ray workers started by this driver (by default this process)
    that are analysing a recording now: Ray names a worker after the task it runs. Linux
    (/proc) only; for tests and measurements."""
    driver_pid = os.getpid() if driver_pid is None else driver_pid

    def descends(pid: int) -> bool:
        while pid > 1:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                return False
            pid = int(next(line.split()[1] for line in status.splitlines()
                           if line.startswith("PPid:")))
            if pid == driver_pid:
                return True
        return False

    pids = []
    for entry in Path("/proc").iterdir():
        try:
            running = entry.name.isdigit() and (entry / "cmdline").read_bytes().startswith(
                f"ray::{_analyze_in_worker.__name__}".encode())
        except OSError:  # the process ended meanwhile
            continue
        if running and descends(int(entry.name)):
            pids.append(int(entry.name))
    return pids


@functools.lru_cache(maxsize=1)
def _remote_task():
    """The Ray task, made once per driver process: Ray counts ``max_calls`` per function, so a
    remote function made anew for each batch would let a worker outlive the limit across
    batches. A recording is retried once if its worker process dies."""
    import ray

    return ray.remote(num_cpus=1, max_calls=RECORDINGS_PER_WORKER,
                      max_retries=1)(_analyze_in_worker)


def run_on_ray(jobs: list[tuple[Path, Path]], engine: EngineSpec, options: PipelineOptions,
               capture: CaptureOptions, *, workers: int | None = None,
               address: str | None = None, annotated_video: bool = False,
               on_result: Callable[[RecordingResult], None] | None = None,
               ) -> list[RecordingResult]:
    """Analyse ``jobs`` ((video, output folder) pairs) as Ray tasks; ``on_result`` is called as
    each recording finishes (in finishing order), the results are returned in ``jobs`` order.
    ``address``: join that cluster; else start Ray here with ``workers`` processes."""
    try:
        import ray
    except ImportError:
        raise InputError(RAY_MISSING) from None

    results: dict[int, RecordingResult] = {}
    pending = []
    for number, (video, out_dir) in enumerate(jobs):
        summary = complete_outputs(out_dir)
        if summary is not None:
            results[number] = RecordingResult(video, out_dir, summary, skipped=True)
            if on_result is not None:
                on_result(results[number])
        else:
            pending.append(number)
    if not pending:
        return [results[n] for n in range(len(jobs))]

    started_here = not ray.is_initialized()
    if started_here:
        if address:
            ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
        else:
            # "local": a Ray of its own, even where `ray start` runs a cluster on this machine
            ray.init(address="local", num_cpus=workers, include_dashboard=False,
                     logging_level=logging.ERROR, log_to_driver=False)
    try:
        task = _remote_task()
        pending.sort(key=lambda n: _expected_work(Path(jobs[n][0]), capture), reverse=True)
        running = {task.remote(str(jobs[n][0]), str(jobs[n][1]), engine, options, capture,
                               annotated_video): n for n in pending}
        while running:
            done, _ = ray.wait(list(running), num_returns=1)
            number = running.pop(done[0])
            video, out_dir = jobs[number]
            try:
                outcome = ray.get(done[0])
                result = RecordingResult(video, out_dir, outcome["summary"], outcome["error"],
                                         outcome["exit_code"])
            except ray.exceptions.RayTaskError as error:  # the analysis itself raised
                result = RecordingResult(video, out_dir, None,
                                         f"internal error: {error.cause!r}", 70)
            except ray.exceptions.RayError as error:  # its worker died, and again on the retry
                result = RecordingResult(video, out_dir, None,
                                         f"its worker died twice ({type(error).__name__})", 2)
            results[number] = result
            if on_result is not None:
                on_result(result)
    finally:
        if started_here:
            ray.shutdown()
    return [results[n] for n in range(len(jobs))]
