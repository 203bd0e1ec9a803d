"""Capture stage on real media: container timestamps, variable frame rate, downscaling, bad
input, truncated files, and the live-camera thread (driven by a real video as its "camera")."""

from __future__ import annotations

import fractions
import time
import wave

import av
import cv2
import numpy as np
import pytest

from realtime_mer.camera import WebcamSource
from realtime_mer.capture import CaptureOptions, Frame, open_video, probe_video
from realtime_mer.errors import InputError

pytestmark = pytest.mark.timeout(60)

WOLFGANG_FRAMES = 472
WOLFGANG_STEP_MS = 1000.0 / (24000 / 1001)


@pytest.fixture(scope="module")
def wolfgang(media_dir):
    return media_dir / "WolfgangLanger_Pexels.mp4"


@pytest.fixture(scope="module")
def wolfgang_frames(wolfgang) -> list[Frame]:
    with open_video(wolfgang) as source:
        frames = list(source)
        assert not source.errors and not source.truncated
    return frames


def test_wolfgang_timestamps_come_from_the_container(wolfgang_frames):
    frames = wolfgang_frames
    assert len(frames) == WOLFGANG_FRAMES
    assert frames[0].t_ms == 0.0
    assert [f.index for f in frames] == list(range(WOLFGANG_FRAMES))
    assert frames[0].image_bgr.shape == (360, 640, 3) and frames[0].image_bgr.dtype == np.uint8
    steps = np.diff([f.t_ms for f in frames])
    assert (steps > 0).all()
    assert abs(np.median(steps) - WOLFGANG_STEP_MS) < 0.5
    # index/fps would put the last frame at 471 * 41.708; pts must agree here (constant rate)
    assert abs(frames[-1].t_ms - 471 * WOLFGANG_STEP_MS) < 1.0


def test_probe_reports_the_header(wolfgang, media_dir):
    info = probe_video(wolfgang)
    assert (info.width, info.height) == (640, 360)
    assert info.n_frames_declared == WOLFGANG_FRAMES
    assert abs(info.fps_nominal - 23.976) < 0.01
    assert abs(info.duration_ms - 19685) < 50
    assert info.codec == "h264" and not info.variable_frame_rate
    vfr = probe_video(media_dir / "face_noface.mov")
    assert vfr.variable_frame_rate and vfr.codec == "hevc" and (vfr.width, vfr.height) == (960, 540)


def _write_vfr(path, frames_bgr, pts_ms):
    container = av.open(str(path), "w")
    stream = container.add_stream("libx264", rate=30)
    h, w = frames_bgr[0].shape[:2]
    stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
    stream.codec_context.time_base = fractions.Fraction(1, 1000)
    for image, pts in zip(frames_bgr, pts_ms):
        frame = av.VideoFrame.from_ndarray(image, format="bgr24")
        frame.pts, frame.time_base = pts, fractions.Fraction(1, 1000)
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()


def test_variable_frame_rate_gives_back_the_written_pts(media_dir, tmp_path):
    cap = cv2.VideoCapture(str(media_dir / "single_face.mp4"))
    images = []
    while len(images) < 12:
        ok, image = cap.read()
        assert ok
        images.append(image)
    cap.release()
    # irregular gaps like a phone camera under changing light: 8 ms to 200 ms
    pts = [0, 33, 41, 108, 140, 340, 373, 381, 414, 447, 600, 633]
    path = tmp_path / "vfr.mp4"
    _write_vfr(path, images, pts)
    with open_video(path) as source:
        frames = list(source)
    assert [f.t_ms for f in frames] == pytest.approx(pts, abs=1e-6)
    assert source.frames_decoded == len(pts) and not source.errors
    # the content survived too (lossy codec: close, not equal)
    assert np.abs(frames[5].image_bgr.astype(int) - images[5]).mean() < 8


def test_max_side_downscales_keeping_aspect(media_dir):
    with open_video(media_dir / "face_noface.mov", CaptureOptions(max_side=480)) as source:
        first = next(source)
    assert first.image_bgr.shape == (270, 480, 3)
    with open_video(media_dir / "single_face.mp4", CaptureOptions(max_side=1000)) as source:
        assert next(source).image_bgr.shape == (360, 640, 3)  # already small: untouched


def _bad_inputs(media_dir, tmp_path):
    rng = np.random.default_rng(0)
    random_bin = tmp_path / "random.bin"
    # .bin of this size makes FFmpeg pick its text-art demuxer, which "decodes" any bytes
    random_bin.write_bytes(rng.integers(0, 256, 200_000, dtype=np.uint8).tobytes())
    random_mp4 = tmp_path / "random.mp4"
    random_mp4.write_bytes(rng.integers(0, 256, 100_000, dtype=np.uint8).tobytes())
    text = tmp_path / "notes.mp4"
    text.write_text("interview notes\nnot a video\n" * 50)
    text_txt = tmp_path / "notes.txt"  # FFmpeg's tty demuxer claims .txt files
    text_txt.write_text("interview notes\nnot a video\n" * 50)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    audio = tmp_path / "speech.wav"
    with wave.open(str(audio), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((rng.standard_normal(16000) * 1000).astype("<i2").tobytes())
    return {
        "missing": (tmp_path / "nope.mp4", "not found"),
        # open_video reads a folder as frame images, which need --fps; probe_video wants a file
        "directory": (tmp_path, "directory|folder: give the frame rate"),
        "empty": (empty, "empty"),
        "random bytes .bin": (random_bin, "not a video"),
        "random bytes .mp4": (random_mp4, "cannot open|not a video"),
        "text": (text, "cannot open"),
        "text .txt": (text_txt, "not a video"),
        "jpeg": (media_dir / "single_face.jpg", "still image"),
        "png": (media_dir / "calibration" / "s03_s03_po_11_onset.png", "still image"),
        "audio only": (audio, "no video stream"),
    }


@pytest.mark.timeout(120)  # a guard against a hang (speed is the benchmarks' business)
def test_bad_inputs_raise_input_error_without_hanging(media_dir, tmp_path):
    for name, (path, message) in _bad_inputs(media_dir, tmp_path).items():
        for opener in (open_video, probe_video):
            with pytest.raises(InputError, match=message) as caught:
                opener(path)
            text = str(caught.value)
            assert "\n" not in text and str(path.name) in text, (name, text)
            assert caught.value.__cause__ is None  # no FFmpeg traceback chained for the CLI


@pytest.mark.timeout(120)
def test_truncated_file_keeps_frames_before_the_damage(wolfgang, wolfgang_frames, tmp_path):
    data = wolfgang.read_bytes()
    path = tmp_path / "truncated.mp4"
    path.write_bytes(data[: int(len(data) * 0.6)])
    with open_video(path) as source:
        frames = list(source)
    assert 50 < len(frames) < WOLFGANG_FRAMES
    assert source.truncated and source.errors and "truncated" in source.errors[0]
    assert source.frames_decoded == len(frames)
    full = wolfgang_frames[: len(frames)]
    assert [f.t_ms for f in frames] == [f.t_ms for f in full]
    for k in (0, len(frames) // 2, len(frames) - 1):
        assert np.abs(frames[k].image_bgr.astype(int) - full[k].image_bgr).mean() < 1.0


def test_a_damaged_spot_costs_its_packets_not_the_rest_of_the_video(wolfgang, wolfgang_frames,
                                                                     tmp_path):
    """20 KB of garbage in the middle of a real recording: the decoder refuses a few packets.
    Those are skipped and decoding goes on (container.decode() would stop for good there,
    after 226 of 472 frames; packet by packet 466 are kept); the frames kept carry the
    original timestamps."""
    data = bytearray(wolfgang.read_bytes())
    at = len(data) // 2
    data[at:at + 20_000] = np.random.default_rng(0).integers(0, 256, 20_000,
                                                            dtype=np.uint8).tobytes()
    path = tmp_path / "damaged.mp4"
    path.write_bytes(bytes(data))
    with open_video(path) as source:
        frames = list(source)
    assert source.packets_skipped > 0
    assert any("damaged packet" in e for e in source.errors) and not source.truncated
    assert len(frames) >= 0.95 * WOLFGANG_FRAMES
    original = {f.t_ms for f in wolfgang_frames}
    assert {f.t_ms for f in frames} <= original
    assert frames[-1].t_ms == wolfgang_frames[-1].t_ms  # decoded to the very end
    # Well before the damage the pictures are the original ones.
    for k in (0, 100):
        assert np.abs(frames[k].image_bgr.astype(int) - wolfgang_frames[k].image_bgr).mean() < 1.0


def test_file_cut_before_its_first_frame_is_an_input_error(wolfgang, tmp_path):
    path = tmp_path / "header_only.mp4"
    path.write_bytes(wolfgang.read_bytes()[:12_000])  # the index, and almost no picture data
    with pytest.raises(InputError):
        open_video(path)


# -- live source ------------------------------------------------------------------------------

class _SlowCapture:
    """A real video capture whose read() takes a while, like a 20 fps camera."""

    def __init__(self, path, delay_s):
        self.cap, self.delay_s = cv2.VideoCapture(str(path)), delay_s

    def read(self):
        time.sleep(self.delay_s)
        return self.cap.read()

    def isOpened(self):
        return self.cap.isOpened()

    def release(self):
        self.cap.release()


def test_a_segment_is_the_same_frames_as_decoding_from_the_start(media_dir):
    """--start/--end seek to the keyframe before the start and drop what precedes it: the
    frames delivered are exactly those of a full decode whose time lies in the range, with the
    file's own indices and times, and ending at --end is not mistaken for truncation."""
    path = media_dir / "WolfgangLanger_Pexels.mp4"
    with open_video(path) as source:
        full = [f for f in source if 5000.0 <= f.t_ms <= 9000.0]
    with open_video(path, CaptureOptions(start_ms=5000.0, end_ms=9000.0)) as source:
        expected = source.frames_expected
        segment = list(source)
        assert not source.truncated and source.errors == []
    assert [f.index for f in segment] == [f.index for f in full]
    assert full[0].index > 100  # the seek skipped the first keyframe interval
    np.testing.assert_allclose([f.t_ms for f in segment], [f.t_ms for f in full], atol=1e-9)
    assert all(np.array_equal(a.image_bgr, b.image_bgr) for a, b in zip(segment, full))
    assert abs(expected - len(segment)) <= 1
    with open_video(path, CaptureOptions(start_ms=15000.0)) as source:
        tail = list(source)
        assert not source.truncated and source.errors == []
    assert tail[-1].index == 471 and tail[0].t_ms >= 15000.0


def test_a_segment_that_starts_after_the_end_is_an_input_error(media_dir):
    with pytest.raises(InputError, match="past the end"):
        open_video(media_dir / "single_face.mp4", CaptureOptions(start_ms=60_000.0))
    with pytest.raises(ValueError, match="end_ms must be after start_ms"):
        CaptureOptions(start_ms=2000.0, end_ms=1000.0)


def _frame_folder(media_dir, folder, names):
    """Frames of single_face.mp4 written as PNG under ``names`` (in the video's order)."""
    folder.mkdir()
    with open_video(media_dir / "single_face.mp4") as source:
        frames = [f.image_bgr for f in source][:len(names)]
    for name, image in zip(names, frames):
        cv2.imwrite(str(folder / name), image)
    return frames


def test_a_folder_of_frames_plays_in_natural_order_at_its_rate(media_dir, tmp_path):
    """CASME II names frames img1 ... img100 without padding: img10 comes after img9, not after
    img1. Times are index / fps; a file that is not an image is ignored."""
    names = [f"img{i}.png" for i in range(1, 13)]
    frames = _frame_folder(media_dir, tmp_path / "clip", names)
    (tmp_path / "clip" / "notes.txt").write_text("not a frame")
    with open_video(tmp_path / "clip", CaptureOptions(image_fps=200.0)) as source:
        assert source.info.fps_nominal == 200.0 and source.info.n_frames_declared == 12
        got = list(source)
        assert source.errors == [] and source.frames_expected == 12
    assert [f.index for f in got] == list(range(12))
    np.testing.assert_allclose([f.t_ms for f in got], np.arange(12) * 5.0)
    assert all(np.array_equal(a.image_bgr, b) for a, b in zip(got, frames))
    with open_video(tmp_path / "clip", CaptureOptions(image_fps=200.0, start_ms=20.0,
                                                      end_ms=40.0)) as source:
        assert [f.index for f in source] == [4, 5, 6, 7, 8]


def test_a_folder_with_a_bad_frame_skips_it_and_says_so(media_dir, tmp_path):
    names = [f"{i:03d}.png" for i in range(1, 7)]
    _frame_folder(media_dir, tmp_path / "clip", names)
    (tmp_path / "clip" / "003.png").write_bytes(b"not a png")
    small = cv2.resize(cv2.imread(str(tmp_path / "clip" / "005.png")), (320, 180))
    cv2.imwrite(str(tmp_path / "clip" / "005.png"), small)
    with open_video(tmp_path / "clip", CaptureOptions(image_fps=100.0)) as source:
        got = [f.index for f in source]
        errors = source.errors
    assert got == [0, 1, 3, 5]
    assert len(errors) == 2 and "003.png cannot be read" in errors[0] and "005.png" in errors[1]


def test_a_folder_needs_a_frame_rate_and_frames(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="--fps"):
        open_video(tmp_path / "empty")
    with pytest.raises(InputError, match="no frame images"):
        open_video(tmp_path / "empty", CaptureOptions(image_fps=200.0))


def test_webcam_drops_oldest_for_a_slow_consumer_then_reports_disconnect(media_dir):
    source = WebcamSource(cv2.VideoCapture(str(media_dir / "single_face.mp4")),
                          CaptureOptions(queue_size=4))
    got = []
    with source:
        with pytest.raises(InputError, match="camera disconnected"):
            for _ in range(200):
                frame = source.read(timeout_s=5.0)
                assert frame is not None
                got.append(frame)
                time.sleep(0.02)  # slower than decoding: the queue overflows
    assert source.frames_captured == 72
    assert source.dropped > 0
    assert len(got) + source.dropped == 72
    indices = [f.index for f in got]
    assert indices == sorted(indices) and indices[-1] == 71  # the newest frames survive
    assert sum(b - a - 1 for a, b in zip(indices, indices[1:])) + indices[0] == source.dropped
    times = [f.t_ms for f in got]
    assert all(b > a for a, b in zip(times, times[1:]))
    assert got[0].image_bgr.shape == (360, 640, 3)
    assert not source.running


def test_webcam_keeps_everything_for_a_fast_consumer_and_downscales(media_dir):
    options = CaptureOptions(queue_size=8, max_side=320)
    with WebcamSource(_SlowCapture(media_dir / "single_face.mp4", 0.003), options) as source:
        got = list(source)  # iteration ends quietly at disconnect
    assert len(got) == 72 and source.dropped == 0
    assert got[0].image_bgr.shape == (180, 320, 3)
    steps = np.diff([f.t_ms for f in got])
    assert (steps > 0).all() and np.median(steps) >= 2.5  # capture clock, not a made-up rate


def test_webcam_read_times_out_with_none(media_dir):
    with WebcamSource(_SlowCapture(media_dir / "single_face.mp4", 0.5)) as source:
        start = time.monotonic()
        assert source.read(timeout_s=0.05) is None
        assert time.monotonic() - start < 0.4
    assert source.read(timeout_s=0.05) is None  # stopped: no frame, no error


def test_video_file_path_plays_at_its_own_timestamps_and_ends_cleanly(media_dir):
    """A file given by path plays like a camera: each frame arrives no earlier than its time in
    the file (72 frames at 30 fps: 2.37 s), t_ms is the file's clock, and its end is ``ended``,
    not a disconnection."""
    start = time.monotonic()
    with WebcamSource(str(media_dir / "single_face.mp4"), CaptureOptions(queue_size=100)) as source:
        assert source.paced
        got = list(source)
        arrival = time.monotonic() - start
        assert source.ended
        assert source.read(timeout_s=0.1) is None  # the end is not an error
    assert [f.index for f in got] == list(range(72)) and source.dropped == 0
    np.testing.assert_allclose([f.t_ms for f in got], np.arange(72) * 1000.0 / 30.0, atol=0.5)
    assert arrival >= 71 / 30.0 - 0.05


def test_webcam_that_cannot_open_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="cannot open camera"):
        WebcamSource(cv2.VideoCapture(str(tmp_path / "no_camera.mp4"))).start()


def test_phone_rotation_metadata_is_applied_like_opencv_does(media_dir, tmp_path):
    cap = cv2.VideoCapture(str(media_dir / "single_face.mp4"))
    images = [cap.read()[1] for _ in range(3)]
    cap.release()
    path = tmp_path / "portrait.mp4"
    container = av.open(str(path), "w")
    stream = container.add_stream("libx264", rate=30)
    stream.width, stream.height, stream.pix_fmt = 640, 360, "yuv420p"
    stream.set_display_rotation(90)  # a phone held upright
    for image in images:
        for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="bgr24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    with open_video(path) as source:
        ours = next(source).image_bgr
    reference = cv2.VideoCapture(str(path))
    reference.set(cv2.CAP_PROP_ORIENTATION_AUTO, 1)
    ok, theirs = reference.read()
    reference.release()
    assert ok and ours.shape == theirs.shape == (640, 360, 3)
    np.testing.assert_array_equal(ours, theirs)
