"""The demo under use, in a real browser (headless Chromium with a fake camera playing a real
talking-head clip; the harness of tests/realtime_mer/browser.py):

1. ``--repeats`` live sessions, one after the other, each stream for ``--stream-s`` seconds:
   annotated frames per second and the glass-to-glass lag of matched frames (the median over
   the sessions, each session's in the JSON), the peak size of Gradio's temporary files;
2. ``--sessions`` sessions are opened, stream a few seconds and are abandoned (their tab
   closed): the server's memory at its start, at its peak, and once every session is closed.

    python benchmarks/demo_soak.py [--stream-s 60] [--repeats 3] [--sessions 50] [--clip PATH]

Writes the table into docs/DEMO.md (between its markers) and docs/DEMO_SOAK.json.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.realtime_mer import browser as harness  # noqa: E402

DOC, JSON_OUT = REPO / "docs" / "DEMO.md", REPO / "docs" / "DEMO_SOAK.json"
BEGIN, END = "<!-- demo-soak:begin -->", "<!-- demo-soak:end -->"


def _wait_for(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    return predicate()


def soak(clip: Path, stream_s: float, sessions: int, session_s: float, repeats: int = 3
         ) -> dict:
    with tempfile.TemporaryDirectory(prefix="mer-soak-") as folder:
        folder = Path(folder)
        camera = folder / "camera.y4m"
        # the fake camera loops the file: 20 s of the clip is enough for any run
        width, height = harness.write_camera_video(clip, camera, 20.0)
        server = harness.DemoServer(folder)
        driver = None
        try:
            time.sleep(3.0)
            rss_start = harness.rss_mb(server.pid)
            driver = harness.start_browser(camera, folder / "profile")
            runs, cache_peak, rss_peak = [], 0, rss_start
            for repeat in range(repeats):
                driver.get(server.url)
                harness.install_probe(driver, width)
                harness.start_streaming(driver)
                print(f"streaming {repeat + 1} of {repeats} for {stream_s:.0f} s ...",
                      file=sys.stderr)
                start = time.monotonic()
                while time.monotonic() - start < stream_s:
                    time.sleep(1.0)
                    cache_peak = max(cache_peak, harness.folder_bytes(server.cache))
                    rss_peak = max(rss_peak, harness.rss_mb(server.pid))
                runs.append(harness.frame_measures(driver, time.monotonic() - start))
                events = len(harness.log_rows(driver))
                if repeat + 1 < repeats:
                    driver.get("about:blank")  # the next session starts afresh
            live = {key: float(np.median([run[key] for run in runs]))
                    for key in ("annotated_fps", "lag_ms_median", "lag_ms_p90")}
            live["matched"] = sum(run["matched"] for run in runs)
            live["runs"] = runs
            driver.get("about:blank")  # this session leaves too
            first = driver.current_window_handle
            print(f"{sessions} sessions, {session_s:.0f} s each ...", file=sys.stderr)
            for index in range(sessions):
                driver.switch_to.new_window("tab")
                driver.get(server.url)
                harness.start_streaming(driver)
                time.sleep(session_s)
                rss_peak = max(rss_peak, harness.rss_mb(server.pid))
                driver.close()  # abandoned: the tab goes without Stop or Reset
                driver.switch_to.window(first)
                if (index + 1) % 10 == 0:
                    print(f"  {index + 1} sessions, server {harness.rss_mb(server.pid):.0f} MB",
                          file=sys.stderr)
            all_closed = _wait_for(lambda: server.log_text().rstrip().endswith("(0 open)"), 60)
            time.sleep(5.0)
            rss_end = harness.rss_mb(server.pid)
            opened = server.log_text().count("live session opened")
            closed = server.log_text().count("live session closed")
        finally:
            if driver is not None:
                driver.quit()
            server.close()
    return {
        "clip": clip.name, "camera": f"{width}x{height} at {harness.FPS} fps",
        "stream_s": stream_s, "repeats": repeats, **live, "events_in_log": events,
        "cache_peak_mb": round(cache_peak / 2**20, 2),
        "sessions": sessions, "session_s": session_s, "sessions_opened": opened,
        "sessions_closed": closed, "all_closed": all_closed,
        "rss_start_mb": round(rss_start), "rss_peak_mb": round(rss_peak),
        "rss_end_mb": round(rss_end), "rss_end_minus_start_mb": round(rss_end - rss_start),
    }


def _table(r: dict) -> str:
    return "\n".join([
        f"Measured by `python benchmarks/demo_soak.py` (camera: `{r['clip']}`, {r['camera']}; "
        "server and headless Chromium on the same 2-core machine).",
        "",
        "| what | measured | aim |",
        "|---|---|---|",
        f"| annotated frames per second ({r['repeats']} sessions of {r['stream_s']:.0f} s, "
        f"median; each: {', '.join(str(run['annotated_fps']) for run in r['runs'])}) | "
        f"{r['annotated_fps']:.1f} | ≥ 25 |",
        f"| glass-to-glass lag, median / p90 ({r['matched']} matched frames; p90 of each "
        f"session: {', '.join(str(run['lag_ms_p90']) for run in r['runs'])}) | "
        f"{r['lag_ms_median']:.1f} / {r['lag_ms_p90']:.1f} ms | p90 ≤ 100 ms |",
        f"| Gradio's temporary files during that stream, peak | {r['cache_peak_mb']} MB | "
        "≤ 10 MB |",
        f"| sessions opened and abandoned (tab closed) | {r['sessions']} "
        f"({r['session_s']:.0f} s of streaming each); {r['sessions_closed']} of "
        f"{r['sessions_opened']} closed by the server | all closed |",
        f"| server memory (RSS): start / peak / after | {r['rss_start_mb']} / "
        f"{r['rss_peak_mb']} / {r['rss_end_mb']} MB ({r['rss_end_minus_start_mb']:+d} MB) | "
        "after ≤ start + 100 MB |",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stream-s", type=float, default=60.0)
    parser.add_argument("--repeats", type=int, default=3, help="live sessions measured")
    parser.add_argument("--sessions", type=int, default=50)
    parser.add_argument("--session-s", type=float, default=3.0)
    parser.add_argument("--clip", type=Path,
                        default=REPO.parent / "shared" / "media" / "talking" / "d9.mp4")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    if not (harness.CHROMIUM and harness.CHROMEDRIVER):
        print("demo_soak: needs Debian's chromium and chromium-driver", file=sys.stderr)
        return 2
    result = soak(args.clip, args.stream_s, args.sessions, args.session_s, args.repeats)
    table = _table(result)
    print(table)
    if not args.no_write:
        JSON_OUT.write_text(json.dumps(result, indent=2) + "\n")
        text = DOC.read_text()
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), f"{BEGIN}\n{table}\n{END}",
                      text, flags=re.S)
        DOC.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
