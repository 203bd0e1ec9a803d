"""The pipeline's background classifier: one worker thread that takes events in order, so a
frame loop never waits for an event's flow and network (hundreds of ms on a CPU)."""

from __future__ import annotations

import os
import queue
import threading
from concurrent.futures import Future

__all__ = ["ClassifierThread"]


class ClassifierThread:
    """One daemon thread that classifies events in order. Not a ThreadPoolExecutor: its worker
    threads are joined when the interpreter exits, so a run stopped by Ctrl+C or SIGTERM would
    wait for a flow computation it has already given up.

    Jobs submitted with a ``batch`` function are taken together when several wait in a row
    (at most ``max_batch``): a GPU flow computes a batch of pairs in about the time of one."""

    def __init__(self, niceness: int = 0, max_batch: int = 16) -> None:
        self._queue: queue.Queue = queue.Queue()
        self._niceness = niceness
        self._max_batch = max_batch
        self._held = None  # an item taken while gathering a batch that did not belong to it
        self._thread = threading.Thread(target=self._work, name="mer-classify", daemon=True)
        self._thread.start()

    def submit(self, fn, job, batch=None) -> Future:
        future: Future = Future()
        self._queue.put((future, fn, job, batch))
        return future

    def _next(self, block: bool = True):
        if self._held is not None:
            item, self._held = self._held, None
            return item
        return self._queue.get() if block else self._queue.get_nowait()

    def _work(self) -> None:
        if self._niceness:
            try:  # this thread only: Linux schedules threads as tasks of their own
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self._niceness)
            except (AttributeError, OSError):
                pass
        while True:
            item = self._next()
            if item is None:
                return
            items = [item]
            while item[3] is not None and len(items) < self._max_batch:
                try:
                    more = self._next(block=False)
                except queue.Empty:
                    break
                if more is None or more[3] != item[3]:  # bound methods: equal, not identical
                    self._held = more
                    break
                items.append(more)
            items = [i for i in items if i[0].set_running_or_notify_cancel()]  # not cancelled
            if not items:
                continue
            try:
                if len(items) == 1:
                    results = [items[0][1](items[0][2])]
                else:
                    results = items[0][3]([job for _, _, job, _ in items])
                for (future, *_), result in zip(items, results):
                    future.set_result(result)
            except BaseException as error:  # handed to whoever reads the results
                for future, *_ in items:
                    future.set_exception(error)

    def shutdown(self, join: bool = True) -> None:
        """Finish what is queued (abandoned jobs are cancelled and skipped), then stop; without
        ``join``, do not wait for that."""
        self._queue.put(None)
        if join:
            self._thread.join()
