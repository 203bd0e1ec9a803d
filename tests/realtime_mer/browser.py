"""A real browser on the demo, for its test and its soak benchmark: ``mer demo`` started as a
user starts it, headless Chromium (Debian's ``chromium`` and ``chromium-driver``, driven with
selenium) whose fake camera plays a real video, and a probe in the page.

Each camera frame carries its number as a row of black and white blocks along the top edge. The
probe records when each number first shows in the camera's <video> and when it first shows in
the annotated image that came back from the server: the difference is the glass-to-glass lag."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
CODE_BITS, CODE_BLOCK, CODE_X, CODE_H = 12, 16, 100, 10  # the frame number's blocks
FPS = 30

_PAGE_PROBE = """
const bits = %d, block = %d, x0 = %d, h = %d;
window.__mer = {video: [], shown: [], frames: 0, lastVideo: -1};
const canvas = document.createElement('canvas');
const ctx = canvas.getContext('2d', {willReadFrequently: true});
function readCode(source, width) {
  // the blocks are drawn at the camera's size; scale to the element's own pixel size
  const scale = width / %d;
  canvas.width = source.naturalWidth || source.videoWidth;
  canvas.height = source.naturalHeight || source.videoHeight;
  ctx.drawImage(source, 0, 0);
  let code = 0;
  for (let b = 0; b < bits; b++) {
    const x = Math.round((x0 + b * block + block / 2) * scale);
    const y = Math.round(h / 2 * scale);
    const p = ctx.getImageData(x, y, 1, 1).data;
    code = code * 2 + ((p[0] + p[1] + p[2]) / 3 > 128 ? 1 : 0);
  }
  return code;
}
function noteVideoFrame(video) {
  const code = readCode(video, video.videoWidth);
  // the camera loops its file: every change of frame is kept, matched later by time
  if (code !== window.__mer.lastVideo) {
    window.__mer.video.push([code, performance.now()]);
    window.__mer.lastVideo = code;
  }
}
function watchVideo() {
  // once per frame the camera's <video> presents (the probe must not be what loads the page)
  const video = document.querySelector('video');
  if (!video) { setTimeout(watchVideo, 20); return; }
  const onFrame = () => {
    if (video.videoWidth) noteVideoFrame(video);
    video.requestVideoFrameCallback(onFrame);
  };
  video.requestVideoFrameCallback(onFrame);
}
watchVideo();
const seen = new WeakSet();
function watchImage(img) {
  img.addEventListener('load', () => {
    const now = performance.now();
    window.__mer.frames += 1;
    const code = readCode(img, img.naturalWidth);
    window.__mer.shown.push([code, now]);
  });
}
new MutationObserver(() => {
  const img = document.querySelector('#annotated img');
  if (img && !seen.has(img)) { seen.add(img); watchImage(img); }
}).observe(document.body, {subtree: true, childList: true});
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_camera_video(source: Path, path: Path, seconds: float) -> tuple[int, int]:
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


def proc_status(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def rss_mb(pid: int) -> float:
    return proc_status(pid, "VmRSS") / 1024


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


class DemoServer:
    """``mer demo --verbose`` in its own process, Gradio's cache in ``folder/gradio-cache``."""

    def __init__(self, folder: Path, timeout_s: float = 120.0) -> None:
        self.folder = Path(folder)
        self.cache = self.folder / "gradio-cache"
        self.log_path = self.folder / "demo.log"
        port = free_port()
        self.url = f"http://127.0.0.1:{port}/"
        env = dict(os.environ, GRADIO_TEMP_DIR=str(self.cache), GRADIO_ANALYTICS_ENABLED="False")
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "realtime_mer.cli", "demo", "--verbose", "--port", str(port)],
            stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the demo exited: {self.log_path.read_text()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.5)
        self.close()
        raise RuntimeError(f"the demo did not listen within {timeout_s:.0f} s")

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_text(self) -> str:
        return self.log_path.read_text()

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self._log.close()


def start_browser(camera: Path, profile: Path):
    """Headless Chromium whose fake camera plays ``camera`` (a .y4m), as the machine's probe
    starts it (no background networking: this machine has no network)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1400,1400",
                 "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                 f"--use-file-for-fake-video-capture={camera}", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def install_probe(driver, camera_width: int) -> None:
    driver.execute_script(_PAGE_PROBE % (CODE_BITS, CODE_BLOCK, CODE_X, CODE_H, camera_width))


def start_streaming(driver) -> None:
    click(driver, "Start camera")


def click(driver, text: str, timeout: float = 30) -> None:
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


def log_rows(driver) -> list[str]:
    return driver.execute_script(
        "return [...document.querySelectorAll('#event-log [role=row]')]"
        ".filter(r => !r.querySelector('[role=columnheader]'))"
        ".map(r => r.innerText.trim()).filter(t => /[0-9]/.test(t));")




def frame_measures(driver, streamed_s: float) -> dict:
    """From the page's probe: annotated frames per second and the lag of matched frames."""
    import numpy as np

    probe = driver.execute_script("return window.__mer;")
    # each annotated frame's number, first shown, against the last time the camera showed it
    # before that (the camera loops its file, so a number comes back every loop)
    seen_in_video: dict[int, list[float]] = {}
    for code, t in probe["video"]:
        seen_in_video.setdefault(code, []).append(t)
    lags, first_shown = [], set()
    for code, t in probe["shown"]:
        if code in first_shown:
            continue
        first_shown.add(code)
        earlier = [v for v in seen_in_video.get(code, []) if v <= t]
        # a frame the page's poll missed (a busy page) would match the previous loop of the
        # file, seconds earlier: not a lag, left unmatched
        if earlier and t - max(earlier) < 5000.0:
            lags.append(t - max(earlier))
    lags = np.array(lags)
    return {"frames": probe["frames"], "annotated_fps": round(probe["frames"] / streamed_s, 1),
            "matched": int(lags.size),
            "lag_ms_median": round(float(np.median(lags)), 1) if lags.size else None,
            "lag_ms_p90": round(float(np.percentile(lags, 90)), 1) if lags.size else None}
