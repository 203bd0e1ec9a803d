"""Benchmarks write their tables into the docs between a pair of HTML comment markers, so the
prose around a table stays hand-written and a rerun replaces the table only."""

from __future__ import annotations

import re
from pathlib import Path


def write_between(doc: Path, begin: str, end: str, text: str, missing: str | None = None) -> None:
    """Replace what lies between ``begin`` and ``end`` in ``doc`` with ``text``. Where the
    markers are absent, ``missing`` (a section holding them) is appended first; without it the
    absence is an error."""
    content = doc.read_text(encoding="utf-8")
    if begin not in content:
        if missing is None:
            raise SystemExit(f"{doc} has no {begin} marker")
        content += missing
    doc.write_text(re.sub(re.escape(begin) + ".*?" + re.escape(end),
                          lambda _: f"{begin}\n{text}\n{end}", content, flags=re.S),
                   encoding="utf-8")
