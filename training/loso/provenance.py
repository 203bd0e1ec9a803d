"""Where a run came from and how long it took: the commit, the CPU, elapsed time, and atomic writes
of its files."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import torch


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
            capture_output=True, text=True, timeout=10,
        )
        sha = out.stdout.strip()
        return sha if len(sha) == 40 and all(c in "0123456789abcdef" for c in sha) else None
    except Exception:
        return None


def host_cpu() -> dict:
    """The CPU the numbers came from: its identity, the vector ISA torch dispatches to and the
    oneDNN version. CPU training is deterministic on one host but a rerun on another host with
    other kernels need not be bit-identical (seed 0 of the SGD runs moved by 0.003), so a
    result file says which host produced it."""
    cpu: dict = {"capability": torch.backends.cpu.get_cpu_capability()}
    onednn = re.search(r"MKL-DNN v([\d.]+)", torch.__config__.show())
    cpu["onednn"] = onednn.group(1) if onednn else None
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:  # not Linux: the ISA and oneDNN version are still recorded
        return cpu
    wanted = {"model name": "model_name", "cpu family": "family", "model": "model",
              "stepping": "stepping"}
    for line in lines:
        if not line.strip():
            break  # the first processor's block is enough: the cores of a host are alike
        key, _, value = line.partition(":")
        if key.strip() in wanted:
            cpu[wanted[key.strip()]] = value.strip()
    return cpu


def _atomic_write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _add_elapsed(run_dir: Path, seconds: float) -> None:
    path = run_dir / "elapsed.json"
    doc = json.loads(path.read_text()) if path.exists() else {"wall_s": 0.0, "sessions": 0}
    doc["wall_s"] += seconds
    doc["sessions"] += 1
    _atomic_write_json(path, doc)


def _elapsed(run_dir: Path) -> float | None:
    path = run_dir / "elapsed.json"
    return float(json.loads(path.read_text())["wall_s"]) if path.exists() else None


def _time_left(spent_s: float, done: int, total: int) -> str:
    """", about N min left" at this session's pace so far (nothing once all are done)."""
    if done <= 0 or done >= total:
        return ""
    left = spent_s / done * (total - done)
    if left < 90:
        return f", about {left:.0f} s left"
    return (f", about {left / 60:.0f} min left" if left < 5400
            else f", about {left / 3600:.1f} h left")
