"""Shared fixtures. Real data lives in ../shared (or $MER_SHARED); tests that need it skip with a
reason when it is absent, so a user's fresh clone still passes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def find_shared_dir() -> Path | None:
    env = os.environ.get("MER_SHARED")
    # An explicit MER_SHARED wins, even when it points nowhere: that is how a run is made to
    # behave like a fresh clone without ../shared.
    candidates = [Path(env)] if env else [REPO_ROOT.parent / "shared"]
    for candidate in candidates:
        if (candidate / "data" / "megc2019_3db").is_dir() or (candidate / "media").is_dir():
            return candidate
    return None


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    found = find_shared_dir()
    if found is None:
        pytest.skip("../shared (or $MER_SHARED) with the real data and media is not present")
    return found


@pytest.fixture(scope="session")
def media_dir(shared_dir: Path) -> Path:
    return shared_dir / "media"


@pytest.fixture(scope="session")
def megc_dir(shared_dir: Path) -> Path:
    path = shared_dir / "data" / "megc2019_3db"
    if not path.is_dir():
        pytest.skip(f"{path} is not present")
    return path


#: The kinds of test, each a marker (``pytest -m media``): set here from where a test lives and
#: what it needs, so that no test has to remember to mark itself.
KINDS = {
    "unit": "no real data, no subprocess",
    "media": "real video, photos or the 3DB maps from ../shared",
    "cli": "the commands end to end, in subprocesses or through their main()",
    "browser": "the demo in a real headless Chromium",
}
_CLI_FILES = {"test_cli.py", "test_cli_interrupts.py", "test_batch.py", "test_install.py", "test_readme.py",
              "test_loso_stops.py"}


def _kind(item) -> str:
    if item.path.name == "test_browser.py":
        return "browser"
    if item.path.name in _CLI_FILES:
        return "cli"
    if "shared_dir" in item.fixturenames:  # every real-data fixture stands on it
        return "media"
    return "unit"


def pytest_configure(config) -> None:
    for kind, what in KINDS.items():
        config.addinivalue_line("markers", f"{kind}: {what}")


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        item.add_marker(getattr(pytest.mark, _kind(item)))
    # `-m media` on the command line replaces the configured `-m 'not slow'`: the long runs stay
    # out unless the expression asks for them.
    if "slow" not in (config.option.markexpr or ""):
        slow = [item for item in items if item.get_closest_marker("slow")]
        if slow:
            config.hook.pytest_deselected(items=slow)
            items[:] = [item for item in items if not item.get_closest_marker("slow")]


def pytest_report_header(config) -> list[str]:
    found = find_shared_dir()
    data = (f"real data: {found}" if found is not None else
            "real data: NOT FOUND (../shared or $MER_SHARED): the tests on real video and the "
            "3DB maps will be skipped")
    kinds = "; ".join(f"{kind} ({what})" for kind, what in KINDS.items())
    return [data, f"test kinds (pick with -m KIND): {kinds}; slow and gpu run only when asked "
                  "(-m slow, -m gpu)"]


def pytest_terminal_summary(terminalreporter) -> None:
    """Per kind of test: how many passed, failed and were skipped, and the time they took; and
    how many were skipped for want of the real data, so that a fresh clone's green run is not
    mistaken for the whole suite."""
    tally: dict[str, dict[str, float]] = {}
    for outcome, reports in terminalreporter.stats.items():
        for report in reports:
            keywords = getattr(report, "keywords", None) or {}
            kind = next((k for k in KINDS if k in keywords), None)
            if kind is None:
                continue
            counts = tally.setdefault(kind, {"seconds": 0.0})
            # set-up and tear-down count in the time; a test counts once, by its outcome
            counts["seconds"] += getattr(report, "duration", 0.0)
            if outcome in ("passed", "failed") and report.when == "call" or \
                    outcome in ("skipped", "error"):
                counts[outcome] = counts.get(outcome, 0) + 1
    kinds = ["".join([f"{kind} ", ", ".join(f"{int(counts[o])} {o}" for o in
                                          ("passed", "failed", "skipped", "error")
                                          if counts.get(o)), f" ({counts['seconds']:.0f} s)"])
             for kind, counts in tally.items() if len(counts) > 1]
    if kinds:
        terminalreporter.write_line("by kind: " + "; ".join(kinds))
    skipped = terminalreporter.stats.get("skipped", [])
    missing = sum("is not present" in str(getattr(report, "longrepr", "")) for report in skipped)
    if missing:
        terminalreporter.write_line(
            f"{missing} tests skipped: the real data is missing (put it in ../shared, or set "
            "MER_SHARED to the folder that holds its data/ and media/)", yellow=True)
