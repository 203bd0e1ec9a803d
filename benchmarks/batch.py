"""A batch of real recordings over Ray: 1 and 2 worker processes on this machine and one process
without Ray, side by side (alternating, median of the repeats), the cost model for N workers,
and the same batch on a two-node Ray cluster started on this machine with `ray start` (loopback
only).

    python benchmarks/batch.py [--repeats 2] [--no-cluster]
    python benchmarks/batch.py --memory     # one worker's memory, the recordings twice over

Cost model: wall ≈ start-up + the busiest worker's share, the recordings handed out longest
first (each recording's time measured in the 1-worker run); for many recordings of similar
length that is start-up + per-recording time × count ÷ workers. Writes the tables into
docs/BENCHMARKS.md between its markers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MEDIA = REPO.parent / "shared" / "media"
DOC = REPO / "docs" / "BENCHMARKS.md"
BEGIN, END = "<!-- batch:begin -->", "<!-- batch:end -->"
MEMORY_BEGIN, MEMORY_END = "<!-- batch-memory:begin -->", "<!-- batch-memory:end -->"
VIDEOS = [MEDIA / "talking" / f"{n}.mp4" for n in ("d0", "d3", "d6", "d9", "d13", "d14")] + [
    MEDIA / "WolfgangLanger_Pexels.mp4", MEDIA / "single_face.mp4"]


def run_batch(out: Path, *extra: str, env: dict | None = None) -> float:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "realtime_mer.cli", "analyze", *map(str, VIDEOS),
                          "--out", str(out), "--no-progress", *extra],
                         capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if run.returncode != 0:
        raise SystemExit(f"batch failed ({run.returncode}): {run.stderr[-2000:]}")
    return wall


def per_recording_s(out: Path) -> list[float]:
    times = []
    for folder in sorted(p for p in out.iterdir() if p.is_dir()):
        times.append(json.loads((folder / "summary.json").read_text())["throughput"]["wall_s"])
    return times


def predicted(times: list[float], workers: int, startup: float) -> float:
    """Start-up plus the busiest worker's load, recordings given out longest first."""
    loads = [0.0] * workers
    for t in sorted(times, reverse=True):
        loads[loads.index(min(loads))] += t
    return startup + max(loads)


def two_node_cluster(folder: Path) -> float:
    """`ray start` twice on loopback: a head and a second node, one CPU each; the batch joins
    the cluster with --ray-address."""
    ray = str(Path(sys.executable).with_name("ray"))
    port = "6391"
    # Ray's token authentication, as a cluster should run: one token (~/.ray/auth_token) that
    # both nodes and the driver read
    env = dict(os.environ, RAY_AUTH_MODE="token")
    node = ["--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
    try:
        subprocess.run([ray, "get-auth-token", "--generate"], check=True, capture_output=True,
                       env=env, timeout=60)
        subprocess.run([ray, "start", "--head", "--port", port, "--include-dashboard=false",
                        *node], check=True, capture_output=True, env=env, timeout=180)
        subprocess.run([ray, "start", "--address", f"127.0.0.1:{port}", *node],
                       check=True, capture_output=True, env=env, timeout=180)
        return run_batch(folder / "cluster", "--ray-address", f"127.0.0.1:{port}", env=env)
    finally:
        subprocess.run([ray, "stop", "--force"], capture_output=True, env=env, timeout=180)


def worker_memory(rounds: int = 2) -> str:
    """The recordings ``rounds`` times over as one batch through one worker, its resident
    memory sampled every 0.1 s: each recording's peak and the worker process that ran it (a
    process is replaced after RECORDINGS_PER_WORKER recordings). Memory that piled up from one
    recording to the next would show as a rising peak within a process."""
    import threading

    import ray

    from realtime_mer.batch import (RECORDINGS_PER_WORKER, EngineSpec, run_on_ray,
                                    running_recordings)
    from realtime_mer.capture import CaptureOptions
    from realtime_mer.pipeline import PipelineOptions
    from realtime_mer.runtime import default_engine_path

    def running_workers() -> dict[int, float]:
        rss = {}
        for pid in running_recordings():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            rss[pid] = next(int(line.split()[1]) / 1024 for line in status.splitlines()
                            if line.startswith("VmRSS:"))
        return rss

    window: dict[int, float] = {}
    lock = threading.Lock()
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.1):
            for pid, mb in running_workers().items():
                with lock:
                    window[pid] = max(window.get(pid, 0.0), mb)

    rows, pids = [], {}

    def finished(result) -> None:
        with lock:
            seen = dict(window)
            window.clear()
        pid, peak = max(seen.items(), key=lambda item: item[1]) if seen else (0, 0.0)
        pids.setdefault(pid, len(pids) + 1)
        rows.append(f"| {len(rows) + 1} | {result.video.name} | {pids[pid]} | {peak:.0f} |")

    with tempfile.TemporaryDirectory(prefix="mer-batch-memory-") as tmp:
        jobs = [(video, Path(tmp) / f"r{r}" / video.stem) for r in range(rounds)
                for video in VIDEOS]
        ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            run_on_ray(jobs, EngineSpec(str(default_engine_path())), PipelineOptions(),
                       CaptureOptions(), workers=1, on_result=finished)
        finally:
            stop.set()
            sampler.join()
            ray.shutdown()
    return "\n".join([f"One worker, the {len(VIDEOS)} recordings {rounds} times over (longest "
                      f"first; a worker process is replaced after {RECORDINGS_PER_WORKER}):", "",
                      "| # | recording | worker process | peak RSS (MB) |", "|---|---|---|---|",
                      *rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-cluster", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--memory", action="store_true",
                        help="only measure one worker's memory, the recordings twice over")
    args = parser.parse_args(argv)
    if args.memory:
        table = worker_memory()
        print(table)
        if not args.no_write:
            write_between(MEMORY_BEGIN, MEMORY_END, table)
        return 0
    walls: dict[int, list[float]] = {0: [], 1: [], 2: []}  # 0: one process, no Ray
    with tempfile.TemporaryDirectory(prefix="mer-batch-") as tmp:
        folder = Path(tmp)
        for _ in range(args.repeats):
            for workers in (0, 1, 2):
                extra = ("--workers", str(workers)) if workers else ()
                walls[workers].append(run_batch(folder / f"w{workers}", *extra))
                print(f"{workers or 'no Ray,'} worker(s): {walls[workers][-1]:.1f} s",
                      file=sys.stderr)
        times = per_recording_s(folder / "w1")
        cluster = None if args.no_cluster else two_node_cluster(folder)
    plain, one, two = (statistics.median(walls[w]) for w in (0, 1, 2))
    startup = max(one - sum(times), 0.0)
    rows = [
        "| run | wall (s) | predicted (s) |", "|---|---|---|",
        f"| one process, no Ray (`mer analyze` on the list) | {plain:.1f} | |",
        f"| 1 worker, this machine | {one:.1f} | {predicted(times, 1, startup):.1f} (fit) |",
        f"| 2 workers, this machine | {two:.1f} | {predicted(times, 2, startup):.1f} |",
    ]
    if cluster is not None:
        rows.append(f"| 2-node cluster on loopback (`ray start`, 1 CPU each) | {cluster:.1f} | "
                    f"{predicted(times, 2, startup):.1f} |")
    table = "\n".join([
        f"{len(VIDEOS)} real recordings ({sum(times):.0f} s of analysis in all, "
        f"{min(times):.1f}–{max(times):.1f} s each); start-up {startup:.1f} s (the 1-worker "
        f"run minus its recordings); speed-up of 2 workers over 1: **{one / two:.2f}×**, over "
        f"one process without Ray: **{plain / two:.2f}×** (median of {args.repeats} "
        "alternating runs each, 2-core CPU).", "", *rows, "",
        "For N machines: wall ≈ start-up + the busiest worker's share (about per-recording "
        "time × count ÷ N for many recordings of similar length)."])
    print(table)
    if not args.no_write:
        write_between(BEGIN, END, table)
    return 0


def write_between(begin: str, end: str, table: str) -> None:
    text = DOC.read_text()
    DOC.write_text(re.sub(re.escape(begin) + ".*?" + re.escape(end),
                          lambda _: f"{begin}\n{table}\n{end}", text, flags=re.S))


if __name__ == "__main__":
    raise SystemExit(main())
