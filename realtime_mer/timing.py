"""Per-stage wall-clock timing, read by the CLI summary, the benchmarks and the UI."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np


class StageTimer:
    """Collects durations (ms) per named stage.

    ``synchronize`` is called before each reading of the clock when a stage runs asynchronous
    device work (``torch.cuda.synchronize``), so GPU time lands in the stage that queued it.
    """

    def __init__(self, synchronize: Callable[[], None] | None = None) -> None:
        self._synchronize = synchronize
        self.samples: dict[str, list[float]] = defaultdict(list)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self._synchronize is not None:
            self._synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self._synchronize is not None:
                self._synchronize()
            self.samples[name].append((time.perf_counter() - start) * 1000.0)

    def add(self, name: str, duration_ms: float) -> None:
        self.samples[name].append(duration_ms)

    def reset(self) -> None:
        self.samples.clear()

    def summary(self) -> dict[str, dict[str, float]]:
        """{stage: {count, median_ms, p95_ms, mean_ms, total_ms}}"""
        out = {}
        # Snapshot first: a background classification may still be adding a stage (a live run
        # stopped twice with Ctrl+C), and a dict must not grow while it is iterated.
        for name, values in [(n, list(v)) for n, v in list(self.samples.items())]:
            array = np.asarray(values, dtype=float)
            out[name] = {
                "count": int(array.size),
                "median_ms": float(np.median(array)),
                "p95_ms": float(np.percentile(array, 95)),
                "mean_ms": float(array.mean()),
                "total_ms": float(array.sum()),
            }
        return out
