"""Capture stage: video files (PyAV) and folders of frame images as a stream of ``Frame`` (live
cameras: :mod:`realtime_mer.camera`).

Timestamps are presentation times from the container (``pts * time_base``) or the capture clock,
never ``index / fps``: phone videos and webcams have variable frame rates, and the spotter's
windows are in milliseconds.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import cv2
import numpy as np

from realtime_mer.errors import InputError

log = logging.getLogger(__name__)

__all__ = [
    "Frame", "CaptureOptions", "VideoInfo", "VideoFileSource", "ImageSequenceSource",
    "open_video", "probe_video", "downscale",
]

# FFmpeg happily "opens" some non-video files: still images through its image demuxers, and any
# byte soup through the text-art demuxers (bin/tty/xbin/...), which decode to a picture of text.
_IMAGE_FORMAT_SUFFIX = "_pipe"
_IMAGE_FORMATS = {"image2", "image2pipe"}
_TEXT_ART_FORMATS = {"bin", "tty", "xbin", "adf", "idf"}
_TEXT_ART_CODECS = {"ansi", "bintext", "xbin", "idf"}


@dataclass(frozen=True)
class Frame:
    """One decoded picture. ``t_ms`` is relative to the source's first frame (files) or to
    ``start()`` (cameras); ``index`` counts frames produced by the source, dropped ones included,
    so a gap in ``index`` means frames were dropped."""

    t_ms: float
    image_bgr: np.ndarray
    index: int


@dataclass(frozen=True)
class CaptureOptions:
    """``max_side``: frames whose longer side exceeds it are downscaled (aspect kept), a guard
    against 4K input costing the face stage 10x more for no gain. ``queue_size``: frames a live
    source holds for a slow consumer before dropping the oldest. ``start_ms`` / ``end_ms``
    (files only): read only the frames whose time lies in [start_ms, end_ms] (None: to the
    end); the file is entered by a seek, and times and frame indices stay the file's own."""

    max_side: int | None = None
    queue_size: int = 8
    start_ms: float = 0.0
    end_ms: float | None = None
    #: frame rate of a folder of images (a dataset's frames): they carry no timestamps
    image_fps: float | None = None

    def __post_init__(self) -> None:
        if self.max_side is not None and self.max_side < 16:
            raise ValueError(f"max_side must be None or >= 16, got {self.max_side}")
        if self.queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {self.queue_size}")
        if not (math.isfinite(self.start_ms) and self.start_ms >= 0):
            raise ValueError(f"start_ms must be >= 0, got {self.start_ms}")
        if self.end_ms is not None and not self.end_ms > self.start_ms:
            raise ValueError(f"end_ms must be after start_ms ({self.start_ms}), got {self.end_ms}")
        if self.image_fps is not None and not (math.isfinite(self.image_fps)
                                               and self.image_fps > 0):
            raise ValueError(f"image_fps must be > 0, got {self.image_fps}")


@dataclass(frozen=True)
class VideoInfo:
    """What the container declares. ``width``/``height`` are the stored size before rotation and
    ``max_side``; ``n_frames_declared`` is 0 where the container does not say;
    ``variable_frame_rate`` is a hint from the header (average rate differs from the base rate),
    the frames' own timestamps are authoritative either way."""

    path: str
    width: int
    height: int
    fps_nominal: float
    n_frames_declared: int
    duration_ms: float
    variable_frame_rate: bool
    codec: str


def _scaled_size(width: int, height: int, max_side: int | None) -> tuple[int, int] | None:
    if max_side is None or max(width, height) <= max_side:
        return None
    scale = max_side / max(width, height)
    # Even sizes keep chroma-subsampled pixel formats happy in swscale.
    new_w = max(2, int(round(width * scale / 2)) * 2)
    new_h = max(2, int(round(height * scale / 2)) * 2)
    return new_w, new_h


def downscale(image: np.ndarray, max_side: int | None) -> np.ndarray:
    """``image`` resized (INTER_AREA) so that its longer side is at most ``max_side``; as it is
    when it already fits or ``max_side`` is None or 0."""
    size = _scaled_size(image.shape[1], image.shape[0], max_side)
    if size is None:
        return image
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def _check_path(path: str | os.PathLike) -> str:
    text = os.fspath(path)
    if "://" in text:
        return text  # a stream URL: FFmpeg decides
    p = Path(text)
    if not p.exists():
        raise InputError(f"video file not found: {text}")
    if p.is_dir():
        raise InputError(f"expected a video file, got a directory: {text}")
    if not p.is_file():
        raise InputError(f"not a regular file (device, pipe or socket?): {text}")
    if p.stat().st_size == 0:
        raise InputError(f"video file is empty (0 bytes): {text}")
    return text


def _open_container(path: str):
    import av  # deferred: importing PyAV costs time that webcam-only users need not pay

    try:
        container = av.open(path, mode="r", timeout=10.0)
    except av.error.FFmpegError as exc:
        raise InputError(f"cannot open {path} as a video: {_ffmpeg_reason(exc)}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot open {path} as a video: {exc}") from None
    try:
        stream = _video_stream(container, path)
    except BaseException:
        container.close()
        raise
    return container, stream


def _ffmpeg_reason(exc: Exception) -> str:
    reason = getattr(exc, "strerror", None) or str(exc)
    return reason.split(":")[0].strip() if reason else type(exc).__name__


def _video_stream(container, path: str):
    fmt = container.format.name
    if fmt in _IMAGE_FORMATS or fmt.endswith(_IMAGE_FORMAT_SUFFIX):
        raise InputError(
            f"{path} is a still image ({fmt.replace(_IMAGE_FORMAT_SUFFIX, '')}), not a video; "
            "give a video file or a camera"
        )
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        raise InputError(f"{path} has no video stream (streams: {', '.join(kinds)})")
    stream = container.streams.video[0]
    codec = stream.codec_context.name
    if fmt in _TEXT_ART_FORMATS or codec in _TEXT_ART_CODECS:
        raise InputError(
            f"{path} is not a video file (FFmpeg recognised it only as text/{fmt} data)")
    if not stream.codec_context.width or not stream.codec_context.height:
        raise InputError(f"{path}: the video stream has no picture size; the file is damaged")
    return stream


def _info_from(container, stream, path: str) -> VideoInfo:
    avg = float(stream.average_rate) if stream.average_rate else 0.0
    base = float(stream.guessed_rate) if stream.guessed_rate else 0.0
    fps = avg or base
    if stream.duration is not None and stream.time_base is not None:
        duration_ms = float(stream.duration * stream.time_base) * 1000.0
    elif container.duration is not None:
        duration_ms = container.duration / 1000.0  # AV_TIME_BASE is microseconds
    else:
        duration_ms = float("nan")
    vfr = bool(avg and base and abs(avg - base) / base > 0.01)
    return VideoInfo(
        path=path,
        width=int(stream.codec_context.width),
        height=int(stream.codec_context.height),
        fps_nominal=fps,
        n_frames_declared=int(stream.frames or 0),
        duration_ms=duration_ms,
        variable_frame_rate=vfr,
        codec=stream.codec_context.name,
    )


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Read the container header only. Raises ``InputError`` for anything that is not a video."""
    text = _check_path(path)
    container, stream = _open_container(text)
    try:
        return _info_from(container, stream, text)
    finally:
        container.close()


def open_video(path: str | os.PathLike, options: CaptureOptions | None = None
               ) -> "VideoFileSource | ImageSequenceSource":
    """Open a video file, or a folder of frame images (``options.image_fps`` gives its rate),
    for iteration. The first frame is decoded here, so an input that opens but cannot be
    decoded fails now with ``InputError`` rather than mid-pipeline."""
    options = options or CaptureOptions()
    if Path(os.fspath(path)).is_dir():
        return ImageSequenceSource(path, options)
    return VideoFileSource(path, options)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


def _natural_key(path: Path) -> list:
    """img2 before img10: runs of digits compare as numbers (CASME II names its frames
    img1.jpg ... img100.jpg, without zero padding)."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part.lower())
            for part in re.split(r"(\d+)", path.name) if part]


class ImageSequenceSource:
    """Iterator of ``Frame`` over a folder of frame images, as micro-expression databases store
    their recordings: the files in natural order, ``t_ms = index * 1000 / image_fps``. An image
    that cannot be read, or whose size differs from the first, is skipped and recorded in
    ``errors`` (like a damaged packet of a video); the others go on. Same interface as
    :class:`VideoFileSource` (``info``, ``errors``, ``truncated``, ``frames_expected``)."""

    def __init__(self, folder: str | os.PathLike, options: CaptureOptions | None = None) -> None:
        self.options = options or CaptureOptions()
        self.path = os.fspath(folder)
        fps = self.options.image_fps
        if fps is None:
            raise InputError(f"{self.path} is a folder: give the frame rate of its images with "
                             "--fps (200 for CASME II and SAMM, 100 for SMIC-HS)")
        files = sorted((p for p in Path(self.path).iterdir()
                        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES), key=_natural_key)
        if not files:
            raise InputError(f"{self.path} holds no frame images "
                             f"({', '.join(IMAGE_SUFFIXES)})")
        self._step_ms = 1000.0 / fps
        first = cv2.imread(str(files[0]), cv2.IMREAD_COLOR)
        if first is None:
            raise InputError(f"cannot read the first frame image {files[0]}")
        self._size = first.shape[:2]
        self.errors: list[str] = []
        self.truncated = False
        lo = math.ceil(self.options.start_ms / self._step_ms - 1e-9)
        hi = len(files) - 1 if self.options.end_ms is None else \
            min(len(files) - 1, math.floor(self.options.end_ms / self._step_ms + 1e-9))
        if lo > len(files) - 1:
            raise InputError(f"--start {self.options.start_ms / 1000:.2f} s is past the end of "
                             f"{self.path} ({len(files)} frames at {fps:g} fps)")
        self._files = files
        self._next_index = lo
        self._last_index = hi
        self.frames_expected = hi - lo + 1
        self.frames_decoded = 0
        self.info = VideoInfo(path=self.path, width=int(first.shape[1]),
                              height=int(first.shape[0]), fps_nominal=float(fps),
                              n_frames_declared=len(files),
                              duration_ms=len(files) * self._step_ms,
                              variable_frame_rate=False, codec="images")

    def __iter__(self) -> Iterator[Frame]:
        return self

    def __next__(self) -> Frame:
        while self._next_index <= self._last_index:
            index = self._next_index
            self._next_index += 1
            path = self._files[index]
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is None:
                self._skip(f"frame image {path.name} cannot be read; skipped")
                continue
            if image.shape[:2] != self._size:
                self._skip(f"frame image {path.name} is {image.shape[1]}x{image.shape[0]}, not "
                           f"{self._size[1]}x{self._size[0]} like the first; skipped")
                continue
            self.frames_decoded += 1
            return Frame(t_ms=index * self._step_ms,
                         image_bgr=downscale(image, self.options.max_side), index=index)
        raise StopIteration

    def _skip(self, message: str) -> None:
        log.warning("%s: %s", self.path, message)
        self.errors.append(message)

    def close(self) -> None:
        self._next_index = self._last_index + 1

    def __enter__(self) -> "ImageSequenceSource":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# More refused packets in a row than this is a broken stream, not a damaged spot: stop there.
MAX_BAD_PACKETS_IN_A_ROW = 25


class VideoFileSource:
    """Iterator of ``Frame`` over a video file, decoded with PyAV.

    A packet the decoder refuses (a damaged spot in a long recording) is skipped and counted,
    and decoding goes on after it. Damage that ends the stream (a truncated download, a run of
    refused packets) ends the iteration instead of raising: the frames before it are still
    worth analysing. What happened is kept in ``errors`` (and ``truncated`` for an early end,
    ``packets_skipped`` for skipped packets).
    """

    def __init__(self, path: str | os.PathLike, options: CaptureOptions | None = None) -> None:
        self.options = options or CaptureOptions()
        self.path = _check_path(path)
        self.errors: list[str] = []
        self.truncated = False
        self.frames_decoded = 0
        self.packets_skipped = 0
        self._container, self._stream = _open_container(self.path)
        self.info = _info_from(self._container, self._stream, self.path)
        # Frame-level threading is what makes 1080p decode keep up on few cores.
        self._stream.thread_type = "AUTO"
        self._frames = self._decode_packets()
        self._t0_s: float | None = None
        self._last_t_ms: float | None = None
        self._step_ms = 1000.0 / self.info.fps_nominal if self.info.fps_nominal > 0 else 40.0
        self._done = False
        self._warned_no_pts = False
        try:
            first = next(self._frames)
        except StopIteration:
            self.close()
            raise InputError(f"{self.path} contains no decodable video frames") from None
        except Exception as exc:  # noqa: BLE001 - any decoder failure before frame 1 is bad input
            self.close()
            raise InputError(f"cannot decode {self.path}: {_ffmpeg_reason(exc)}") from None
        self._pending = first
        self._ended_at_range = False
        #: frames this source will deliver, if the container says (for progress bars)
        self.frames_expected = self.info.n_frames_declared or None
        if self.options.start_ms > 0:
            self._enter_at(first, self.options.start_ms)
        if self.options.end_ms is not None and self.info.fps_nominal > 0:
            span = self.options.end_ms - max(self.options.start_ms, 0.0)
            in_range = int(span / 1000.0 * self.info.fps_nominal) + 1
            self.frames_expected = min(in_range, self.frames_expected or in_range)

    def _enter_at(self, first, start_ms: float) -> None:
        """Seek to the keyframe at or before ``start_ms`` so decoding starts there, and count the
        frames before ``start_ms`` from the packets alone (no decoding), so that frame indices
        stay the file's. Frames between the keyframe and ``start_ms`` are decoded and skipped."""
        import av

        duration = self.info.duration_ms
        if math.isfinite(duration) and start_ms >= duration:  # before scanning the whole file
            self.close()
            raise InputError(f"--start {start_ms / 1000:.2f} s is past the end of {self.path} "
                             f"({duration / 1000:.2f} s)")
        self._t0_s = float(first.pts * first.time_base) if first.pts is not None else 0.0
        base = self._stream.time_base
        before, keyframe = 0, None
        try:
            self._container.seek(0, stream=self._stream, backward=True)
            for packet in self._container.demux(self._stream):
                if packet.pts is None:
                    continue
                t_ms = (float(packet.pts * base) - self._t0_s) * 1000.0
                if t_ms < start_ms:
                    before += 1
                    if packet.is_keyframe:
                        keyframe = packet.pts
                elif t_ms > start_ms + 10_000.0:
                    break  # decode order strays from display order by a few frames only
            if keyframe is None:
                keyframe = first.pts
            self._container.seek(keyframe, stream=self._stream, backward=True)
        except av.error.FFmpegError as exc:
            self.close()
            raise InputError(f"cannot seek to {start_ms / 1000:.2f} s in {self.path}: "
                             f"{_ffmpeg_reason(exc)}") from None
        self._frames = self._decode_packets()
        self._pending = None
        self.frames_decoded = before
        if self.frames_expected:
            self.frames_expected = max(self.frames_expected - before, 0) or None

    def _decode_packets(self):
        """The stream's frames, packet by packet. ``container.decode()`` is one generator that
        is dead after its first decoder error, so one corrupt packet would cost every frame
        after it (246 of 472 frames of the test recording); here that packet alone is lost."""
        import av

        in_a_row = 0
        for packet in self._container.demux(self._stream):
            try:
                frames = packet.decode()
            except av.error.InvalidDataError:
                self.packets_skipped += 1
                in_a_row += 1
                if in_a_row >= MAX_BAD_PACKETS_IN_A_ROW:
                    raise
                continue
            in_a_row = 0
            yield from frames

    # -- iteration -------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Frame]:
        return self

    def __next__(self) -> Frame:
        while True:
            if self._done:
                raise StopIteration
            if self._pending is not None:
                av_frame, self._pending = self._pending, None
            else:
                av_frame = self._next_av_frame()
                if av_frame is None:
                    self._finish()
                    raise StopIteration
            t_ms = self._timestamp_ms(av_frame)
            if t_ms < self.options.start_ms:
                continue  # decoded from the keyframe before the range, not part of it
            if self.options.end_ms is not None and t_ms > self.options.end_ms:
                self._ended_at_range = True
                self._finish()
                raise StopIteration
            return self._to_frame(av_frame, t_ms)

    def _next_av_frame(self):
        import av

        try:
            return next(self._frames)
        except StopIteration:
            return None
        except (av.error.FFmpegError, EOFError, OSError) as exc:
            self._record(
                f"decoding stopped after frame {self.frames_decoded}: {_ffmpeg_reason(exc)}")
            return None

    def _to_frame(self, av_frame, t_ms: float) -> Frame:
        size = _scaled_size(av_frame.width, av_frame.height, self.options.max_side)
        if size is None:
            image = av_frame.to_ndarray(format="bgr24")
        else:
            # swscale does colour conversion and area scaling in one pass.
            image = av_frame.to_ndarray(format="bgr24", width=size[0], height=size[1],
                                        interpolation="AREA")
        rotation = int(getattr(av_frame, "rotation", 0) or 0)
        if rotation % 360:
            # The display matrix says how a phone was held; faces lie sideways without it.
            image = np.ascontiguousarray(np.rot90(image, k=(rotation // 90) % 4))
        frame = Frame(t_ms=t_ms, image_bgr=image, index=self.frames_decoded)
        self.frames_decoded += 1
        return frame

    def _timestamp_ms(self, av_frame) -> float:
        if av_frame.pts is None or av_frame.time_base is None:
            # Rare (raw elementary streams): fall back to the nominal step rather than fail.
            t = 0.0 if self._last_t_ms is None else self._last_t_ms + self._step_ms
            if not self._warned_no_pts:
                self._warned_no_pts = True
                log.warning("%s: frames carry no timestamps; using the nominal rate", self.path)
        else:
            t_s = float(av_frame.pts * av_frame.time_base)
            if self._t0_s is None:
                self._t0_s = t_s
            t = (t_s - self._t0_s) * 1000.0
        if self._last_t_ms is not None and t <= self._last_t_ms:
            # Broken muxers repeat or reorder pts; downstream windows need strictly rising time.
            log.debug("%s: non-increasing pts at frame %d", self.path, self.frames_decoded)
            t = self._last_t_ms + 1e-3
        self._last_t_ms = t
        return t

    def _finish(self) -> None:
        declared = self.info.n_frames_declared
        duration = self.info.duration_ms
        if self.packets_skipped:
            lost = f"; {declared - self.frames_decoded} of {declared} declared frames lost" \
                if declared > self.frames_decoded else ""
            message = (f"{self.packets_skipped} damaged packet(s) skipped, decoding went on "
                       f"after them{lost}")
            log.warning("%s: %s", self.path, message)
            self.errors.append(message)
        if not self.truncated and not self._ended_at_range and declared \
                and self.frames_decoded < declared:
            # Containers like MP4 index every frame up front; when the bytes behind the index
            # are missing the demuxer simply reports end of file, so compare with the index.
            last = self._last_t_ms or 0.0
            if math.isnan(duration) or last + 2 * self._step_ms < duration:
                self._record(
                    f"stream ended after {self.frames_decoded} of {declared} declared frames "
                    f"({last / 1000:.2f} s of {duration / 1000:.2f} s); the file looks truncated"
                )
        self.close()

    def _record(self, message: str) -> None:
        log.warning("%s: %s", self.path, message)
        self.errors.append(message)
        self.truncated = True

    # -- lifetime --------------------------------------------------------------------------
    def close(self) -> None:
        self._done = True
        self._pending = None
        container, self._container = getattr(self, "_container", None), None
        if container is not None:
            container.close()

    def __enter__(self) -> "VideoFileSource":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
