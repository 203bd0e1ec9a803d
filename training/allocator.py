"""Keep freed heap memory in the process, so that training steps stop paying for page faults.

Why: a CPU training step of a small network allocates and frees the same few activation
tensors every step (STSTNet: about ten of 3.2 MB each at batch 64). glibc's malloc returns
freed memory at the top of its heap to the kernel once it exceeds the trim threshold, and
serves large blocks with fresh ``mmap`` pages; either way the next step touches new pages and
the kernel zeroes each one on its first write. Keeping the memory cuts a short STSTNet
training run's page faults about 15x (``tests/training/test_cpu_memory.py``); together with the
input bank it made two-worker training 1.28-1.38x faster (``benchmarks/loso.py``, the column
"workers, runner without its CPU memory changes").

The fix is glibc's own knobs (``mallopt``, the same settings as the ``MALLOC_TRIM_THRESHOLD_``
and ``MALLOC_MMAP_THRESHOLD_`` environment variables, but settable from inside the running
process): never trim the heap, and serve blocks up to ``MMAP_THRESHOLD_BYTES`` from it. The
heap then stays at its peak size and every step reuses the same pages. Only where memory comes
from changes, never what is computed: results are bitwise the same (tested).

Blocks larger than the threshold (the big networks' activations) still come from ``mmap`` and
go back to the kernel when freed, so a process does not hold on to gigabytes.
"""

from __future__ import annotations

import ctypes
import logging
import sys

__all__ = ["MMAP_THRESHOLD_BYTES", "keep_freed_memory"]

log = logging.getLogger(__name__)

# glibc's mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc's own upper bound for its dynamic mmap threshold on 64-bit systems: blocks up to this
# size are the ones it would itself learn to keep in the heap.
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
_NEVER_TRIM = 2**31 - 1  # mallopt takes an int; the largest is "never" in practice

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse (process-wide, idempotent).

    Returns True where it took effect (Linux with glibc), False elsewhere (other C libraries
    and operating systems have their own policies; nothing is changed there)."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if not sys.platform.startswith("linux"):
        return False
    try:
        # The process's own symbols: the C library it runs on, without a library search.
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # C libraries without mallopt
        log.debug("no glibc mallopt; the C library's own allocation policy stays")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # The order matters: setting either one turns off glibc's dynamic adjustment of both.
    ok = (mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
          and mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM) == 1)
    _applied = ok
    return ok
