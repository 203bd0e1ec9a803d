"""Events pinned from real videos: a change meant to keep behaviour (a refactor, a new writer)
must give the same events, field for field. The files in ``pinned_events/`` were written by the
product on this project's 2-core CPU machine; ``MER_PIN_EVENTS=write python -m pytest -m media
-k pinned`` rewrites them after a change that is meant to change the events (say so in the
commit)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterable

from realtime_mer.events import EventRecord

PINNED_DIR = Path(__file__).parent / "pinned_events"
#: Integers, strings and flags must match exactly. Floats match bit for bit on the machine that
#: pinned them; across CPUs whose SIMD paths sum in another order the last bits may differ, so
#: a float may move by 1e-9 relative, far below anything an event's meaning depends on.
FLOAT_REL_TOL = 1e-9


def assert_events_pinned(name: str, events: Iterable[EventRecord]) -> None:
    path = PINNED_DIR / f"{name}.jsonl"
    records = [event.to_json() for event in events]
    if os.environ.get("MER_PIN_EVENTS") == "write":
        path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records),
                        encoding="utf-8")
        return
    pinned = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(records) == len(pinned), f"{name}: {len(records)} events, pinned {len(pinned)}"
    for number, (got, want) in enumerate(zip(records, pinned), start=1):
        assert got.keys() == want.keys(), f"{name} event {number}: fields differ"
        for key, value in want.items():
            assert _same(got[key], value), \
                f"{name} event {number} {key}: {got[key]!r}, pinned {value!r}"


def _same(got, want) -> bool:
    if isinstance(want, float) and isinstance(got, (int, float)):
        return math.isclose(got, want, rel_tol=FLOAT_REL_TOL, abs_tol=1e-12)
    if isinstance(want, dict):
        return got.keys() == want.keys() and all(_same(got[k], want[k]) for k in want)
    if isinstance(want, list):
        return len(got) == len(want) and all(_same(a, b) for a, b in zip(got, want))
    return got == want
