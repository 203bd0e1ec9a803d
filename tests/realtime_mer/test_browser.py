"""The demo in a real browser: headless Chromium (Debian's ``chromium`` and ``chromium-driver``,
driven with selenium) whose fake camera plays a real talking-head video. Annotated frames come
back, events fill the log, Reset mid-stream clears it while the stream goes on, Gradio's cache
stays small, and the frame rate and glass-to-glass lag are measured.

Each camera frame carries its number as a row of black and white blocks along the top edge. The
page records when each number first shows in the camera's <video> and when it first shows in
the annotated image that came back from the server: the difference is the lag."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
selenium = pytest.importorskip("selenium", reason="selenium is in the test extra")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="Debian's chromium and chromium-driver are not installed (.ci/run installs them)")

CODE_BITS, CODE_BLOCK, CODE_X, CODE_H = 12, 16, 100, 10  # the frame number's blocks
STREAM_S = 14.0  # measured streaming time before Reset
FPS = 30

_PAGE_PROBE = """
const bits = %d, block = %d, x0 = %d, h = %d;
window.__mer = {video: {}, shown: {}, frames: 0};
const canvas = document.createElement('canvas');
const ctx = canvas.getContext('2d', {willReadFrequently: true});
function readCode(source, width, mirrored) {
  // the blocks are drawn at the camera's size; scale to the element's own pixel size
  const scale = width / %d;
  canvas.width = source.naturalWidth || source.videoWidth;
  canvas.height = source.naturalHeight || source.videoHeight;
  ctx.drawImage(source, 0, 0);
  let code = 0;
  for (let b = 0; b < bits; b++) {
    let x = Math.round((x0 + b * block + block / 2) * scale);
    if (mirrored) x = canvas.width - 1 - x;
    const y = Math.round(h / 2 * scale);
    const p = ctx.getImageData(x, y, 1, 1).data;
    code = code * 2 + ((p[0] + p[1] + p[2]) / 3 > 128 ? 1 : 0);
  }
  return code;
}
function pollVideo() {
  const video = document.querySelector('video');
  if (video && video.videoWidth) {
    const code = readCode(video, video.videoWidth, false);
    if (!(code in window.__mer.video)) window.__mer.video[code] = performance.now();
  }
  setTimeout(pollVideo, 4);
}
pollVideo();
const seen = new WeakSet();
function watchImage(img) {
  img.addEventListener('load', () => {
    const now = performance.now();
    window.__mer.frames += 1;
    // the browser sends the camera's frames mirrored, as its preview shows them
    const code = readCode(img, img.naturalWidth, true);
    if (!(code in window.__mer.shown)) window.__mer.shown[code] = now;
  });
}
new MutationObserver(() => {
  const img = document.querySelector('#annotated img');
  if (img && !seen.has(img)) { seen.add(img); watchImage(img); }
}).observe(document.body, {subtree: true, childList: true});
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_camera_video(source: Path, path: Path, seconds: float) -> tuple[int, int]:
    """A real video as the .y4m the fake camera plays, each frame numbered in blocks."""
    import av

    with av.open(str(source)) as container:
        stream = container.streams.video[0]
        width, height = stream.width - stream.width % 2, stream.height - stream.height % 2
        out = av.open(str(path), "w", format="yuv4mpegpipe")
        video = out.add_stream("rawvideo", rate=FPS)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        for index, frame in enumerate(container.decode(video=0)):
            if index >= seconds * FPS:
                break
            rgb = frame.to_ndarray(format="rgb24")[:height, :width].copy()
            for bit in range(CODE_BITS):
                on = (index >> (CODE_BITS - 1 - bit)) & 1
                x = CODE_X + bit * CODE_BLOCK
                rgb[:CODE_H, x:x + CODE_BLOCK] = 255 if on else 0
            for packet in video.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                out.mux(packet)
        for packet in video.encode():
            out.mux(packet)
        out.close()
    return width, height


def _proc_status(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _rss_mb(pid: int) -> float:
    return _proc_status(pid, "VmRSS") / 1024


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """``mer demo`` as a user starts it, with Gradio's cache in a folder the test can read."""
    folder = tmp_path_factory.mktemp("demo")
    cache = folder / "gradio-cache"
    port = _free_port()
    env = dict(os.environ, GRADIO_TEMP_DIR=str(cache), GRADIO_ANALYTICS_ENABLED="False")
    log = open(folder / "demo.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "realtime_mer.cli", "demo", "--verbose",
                               "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                              env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the demo exited: {(folder / 'demo.log').read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.5)
    yield {"url": f"http://127.0.0.1:{port}/", "pid": server.pid, "cache": cache,
           "folder": folder}
    server.terminate()
    server.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def browser(demo, media_dir):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    camera = demo["folder"] / "camera.y4m"
    width, _ = _write_camera_video(media_dir / "talking" / "d9.mp4", camera, STREAM_S + 8)
    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1400,1400",
                 "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                 f"--use-file-for-fake-video-capture={camera}",
                 f"--user-data-dir={demo['folder'] / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.camera_width = width
    yield driver
    driver.quit()


def _click(driver, text: str, timeout: float = 30) -> None:
    """Click the visible button with this text (in the page: Gradio re-renders its elements)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if driver.execute_script(
                "const b = [...document.querySelectorAll('button')].find("
                "b => b.innerText.trim() === arguments[0] && b.offsetParent !== null);"
                "if (b) { b.click(); return true; } return false;", text):
            return
        time.sleep(0.2)
    raise AssertionError(f"no button {text!r} on the page")


def _log_rows(driver) -> list[str]:
    return driver.execute_script(
        "return [...document.querySelectorAll('#event-log [role=row]')]"
        ".filter(r => !r.querySelector('[role=columnheader]'))"
        ".map(r => r.innerText.trim()).filter(t => /[0-9]/.test(t));")


@pytest.mark.timeout(300)
def test_demo_streams_annotated_frames_events_and_resets_in_a_real_browser(demo, browser):
    browser.get(demo["url"])
    browser.execute_script(_PAGE_PROBE % (CODE_BITS, CODE_BLOCK, CODE_X, CODE_H,
                                          browser.camera_width))
    rss_start = _rss_mb(demo["pid"])
    _click(browser, "Click to Access Webcam")
    _click(browser, "Record")
    start = time.monotonic()
    cache_peak = 0
    rows: list[str] = []
    while time.monotonic() - start < STREAM_S:
        time.sleep(0.5)
        cache_peak = max(cache_peak, _folder_bytes(demo["cache"]))
        rows = _log_rows(browser) or rows
    probe = browser.execute_script("return window.__mer;")
    streamed_s = time.monotonic() - start

    # annotated frames came back, and events filled the log (blinks at least: d9 blinks)
    assert probe["frames"] > 3 * STREAM_S, probe["frames"]
    browser.save_screenshot(str(demo["folder"] / "streaming.png"))
    assert rows, "no event reached the log"
    cards = browser.execute_script("return document.querySelector('#cards').innerText;")
    assert "onset" in cards and "apex" in cards

    # Reset mid-stream: the log and the cards empty, the clock starts again from 0 (the events
    # that follow are new ones), and annotated frames keep coming
    assert max(float(row.split()[0]) for row in rows) > 3.0
    _click(browser, "Reset")
    reset_at, emptied = time.monotonic(), False
    while time.monotonic() - reset_at < 3.0:
        emptied = emptied or (_log_rows(browser) == [] and "No events yet" in browser.execute_script(
            "return document.querySelector('#cards').innerText;"))
        time.sleep(0.1)
    assert emptied, "Reset did not clear the log and the cards"
    # (a frame that was being processed when Reset came may bring the old log back for a
    # moment; the next frame replaces it)
    new_clock = False
    while not new_clock and time.monotonic() - reset_at < 6.0:
        since_reset, rows_now = time.monotonic() - reset_at, _log_rows(browser)
        new_clock = all(float(row.split()[0]) <= since_reset for row in rows_now)
        time.sleep(0.2)
    assert new_clock, (since_reset, rows_now)
    before = browser.execute_script("return window.__mer.frames;")
    time.sleep(3.0)
    after = browser.execute_script("return window.__mer.frames;")
    assert after > before + 10, (before, after)

    # matched frames: lag from the camera's <video> to the annotated image on the page
    video, shown = probe["video"], probe["shown"]
    lags = np.array([shown[c] - video[c] for c in shown if c in video and shown[c] >= video[c]])
    assert lags.size > 30, lags.size
    fps = probe["frames"] / streamed_s
    result = {"annotated_fps": round(fps, 1), "lag_ms_median": round(float(np.median(lags)), 1),
              "lag_ms_p90": round(float(np.percentile(lags, 90)), 1), "matched": int(lags.size),
              "cache_peak_mb": round(cache_peak / 2**20, 2),
              "server_rss_mb": [round(rss_start), round(_rss_mb(demo["pid"]))],
              "log_rows": len(rows)}
    print("browser demo:", json.dumps(result))
    out = os.environ.get("MER_BROWSER_RESULT")
    if out:
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
    # Gradio's cache: the streamed frames travel inline, nothing piles up
    assert cache_peak <= 10 * 2**20, cache_peak

    # the tab leaves: its pipeline (MediaPipe graph, classifier thread) is closed at once
    browser.get("about:blank")
    server_log = demo["folder"] / "demo.log"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "live session closed: its tab closed (0 open)" \
            not in server_log.read_text():
        time.sleep(0.5)
    assert "live session closed: its tab closed (0 open)" in server_log.read_text()
