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


def pytest_report_header(config) -> str:
    found = find_shared_dir()
    if found is None:
        return ("real data: NOT FOUND (../shared or $MER_SHARED): the tests on real video and "
                "the 3DB maps will be skipped")
    return f"real data: {found}"


def pytest_terminal_summary(terminalreporter) -> None:
    """Say how many tests were skipped for want of the real data, so that a fresh clone's
    green run is not mistaken for the whole suite."""
    skipped = terminalreporter.stats.get("skipped", [])
    missing = sum("is not present" in str(getattr(report, "longrepr", "")) for report in skipped)
    if missing:
        terminalreporter.write_line(
            f"{missing} tests skipped: the real data is missing (put it in ../shared, or set "
            "MER_SHARED to the folder that holds its data/ and media/)", yellow=True)
