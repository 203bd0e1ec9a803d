"""The streaming pipeline: face → ring buffer → spotter → features → engine → events.

One :class:`Pipeline` object takes frames one at a time (from a file or a webcam alike) and
returns a :class:`FrameResult` per frame; an event, when the spotter closes one, is classified on
the spot from the onset and apex crops held in the ring buffer (and its offset crop, for an
engine fed both phases of the movement).
"""

from __future__ import annotations

import logging
from array import array
from collections import deque
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np

from realtime_mer.buffer import RingBuffer
from realtime_mer.capture import Frame
from realtime_mer.classifier_thread import ClassifierThread
from realtime_mer.face import (
    ALIGN_LANDMARKS, FaceAligner, FaceOptions, FaceResult, small_face_note,
    upsampling_eye_distance,
)
from realtime_mer.features import FeatureExtractor, FeatureOptions, uses_torch_flow
from realtime_mer.events import EventRecord
from realtime_mer.runtime import Backend, default_engine_path, load_engine
from realtime_mer.speech import LipMotion, SpeechOptions, in_intervals
from realtime_mer.spotting import SpotEvent, Spotter, SpotterOptions
from realtime_mer.timing import StageTimer
from realtime_mer.tracks import FaceTracker, TrackerOptions

log = logging.getLogger(__name__)


FACE_MODES = ("largest", "all")


@dataclass(frozen=True)
class PipelineOptions:
    face: FaceOptions = field(default_factory=FaceOptions)
    # "largest": the largest face in view is the subject (one track, face 1); "all": every face
    # is tracked apart (realtime_mer.tracks), each with its own ring buffer and spotter, and
    # every event says whose it is (face_id).
    faces: str = "largest"
    tracker: TrackerOptions = field(default_factory=TrackerOptions)
    spotter: SpotterOptions = field(default_factory=SpotterOptions)
    speech: SpeechOptions = field(default_factory=SpeechOptions)
    features: FeatureOptions = field(default_factory=FeatureOptions)
    engine_path: str | None = None  # None: the default engine shipped in engines/
    backend: str = "auto"
    device: str = "auto"
    # Must hold an event's onset when its offset is found: the longest event the spotter closes
    # plus its reference lag, with margin.
    buffer_seconds: float = 4.0
    # A face missing for longer than this breaks the sequence: the spotter and buffer restart,
    # so no flow is ever computed across a cut, a turned-away head or a face that left.
    face_gap_reset_ms: float = 300.0
    # A face box that jumps by more than this fraction of its width from one frame to the next
    # is another face or a camera cut (edited interviews, several people taking turns as the
    # largest face): the sequence restarts, as after a gap, instead of spotting the jump. A hard
    # cut of the whole frame (FaceOptions.cut_threshold) restarts it too.
    face_jump_reset: float = 0.5
    fps_hint: float = 30.0
    # False: events are spotted and reported without a class (no flow maps, no engine loaded),
    # for spotting alone (its benchmark, a quick look at where things move).
    classify: bool = True
    # Events waiting for background classification, at most. When the queue is full a file
    # waits for the classifier (back-pressure: nothing is lost, memory stays bounded); a live
    # source cannot wait, so with drop_when_busy the event is reported unclassified and counted.
    max_pending_events: int = 16
    drop_when_busy: bool = False
    # Classify events (TV-L1 + engine, hundreds of ms on a CPU) in a worker thread so the
    # per-frame loop never stalls (a live source would drop frames) and the flow overlaps the
    # face stage on another core; the event then arrives with a later frame, still in order
    # (one worker). analyze_video and analyze_camera turn it on; off, each event comes back
    # with the frame that closed it.
    classify_in_background: bool = False
    # The background classifier's niceness (Linux; 0 elsewhere): a live view gives frames the
    # CPU first and classifies with what is left, so the picture stays fluid on 2 cores.
    classifier_niceness: int = 0

    def __post_init__(self) -> None:
        if self.faces not in FACE_MODES:
            raise ValueError(f"faces must be one of {', '.join(FACE_MODES)}, got {self.faces!r}")


@dataclass(frozen=True)
class FaceView:
    """One tracked face's state at one frame: its id, aligned face, and spotting state (as in
    :class:`FrameResult`'s fields of the same names)."""

    face_id: int
    face: FaceResult
    signal: float | None = None
    threshold: float | None = None
    face_small: bool = False
    region_values: np.ndarray | None = None
    floors: np.ndarray | None = None
    blinking: bool = False
    speaking: bool = False
    thresholds: np.ndarray | None = None


@dataclass(frozen=True)
class FrameResult:
    """One frame's outcome. ``events``: the events whose report was completed at this frame
    (spotted, and classified unless blinks), each with its (28, 28, 3) map for display (None for
    a blink) in ``feature_maps``. ``signal``/``threshold``: the region standing highest over its
    threshold (value and threshold, % IOD); ``region_values``, ``thresholds`` and ``floors`` per region
    (order of ``SpotterOptions.regions``; the floor is the smallest movement the spotter would report there
    now, % IOD); ``blinking``: the lids are masked for a blink; ``speaking``: the person talks."""

    index: int
    t_ms: float
    face: FaceResult
    signal: float | None
    threshold: float | None
    events: tuple[EventRecord, ...] = ()
    feature_maps: tuple[np.ndarray | None, ...] = ()
    # The face in this frame is smaller than the crop (see face.upsampling_eye_distance): a live
    # view tells the user to come closer.
    face_small: bool = False
    region_values: np.ndarray | None = None
    floors: np.ndarray | None = None
    blinking: bool = False
    speaking: bool = False
    thresholds: np.ndarray | None = None  # per region, in the units of ``region_values``
    # Every face tracked in this frame, largest first (the fields above are the first one's);
    # with faces="largest", the subject alone.
    faces: tuple[FaceView, ...] = ()

    @property
    def face_id(self) -> int | None:
        """The id of the face the fields above describe (None: no face)."""
        return self.faces[0].face_id if self.faces else None

    @property
    def event(self) -> EventRecord | None:
        """The first event completed at this frame (most frames complete none or one)."""
        return self.events[0] if self.events else None

    @property
    def feature_map(self) -> np.ndarray | None:
        return self.feature_maps[0] if self.feature_maps else None


class _FaceTrack:
    """What the pipeline keeps per face: its ring buffer of crops, its spotter, its lips, and
    its counts. One for the subject with faces="largest"; one per face id with "all"."""

    def __init__(self, face_id: int, options: PipelineOptions) -> None:
        self.face_id = face_id
        self.buffer = RingBuffer(
            capacity_ms=options.buffer_seconds * 1000.0, fps_hint=options.fps_hint,
            crop_size=options.face.crop_size, n_landmarks=478)
        self.spotter = Spotter(options.spotter)
        self.lips = LipMotion(options.speech)
        self.speaking_times: deque[tuple[float, bool]] = deque(maxlen=self.buffer.capacity)
        self.last_face_ms: float | None = None
        self.last_box: tuple | None = None
        self.frames_with_face = 0
        self.sequence_restarts = 0
        # The face's size in the video, per frame with it (4 bytes each: hours fit).
        self.eye_distances = array("f")
        self.small_face_warned = False


class Pipeline:
    """Wires the stages. ``process(frame)`` per frame; ``timer`` holds per-stage milliseconds."""

    def __init__(self, options: PipelineOptions = PipelineOptions(),
                 engine: Backend | None = None, source_name: str = "") -> None:
        self.options = options
        self.engine = engine if engine is not None or not options.classify else load_engine(
            options.engine_path or default_engine_path(), backend=options.backend,
            device=options.device)
        self.class_names = list(self.engine.manifest.class_names) if self.engine else []
        # An engine fed both phases of a movement also gets the apex→offset map of each event.
        self._phases = self.engine.manifest.phases if self.engine is not None else 1
        self.source_name = source_name
        self.timer = StageTimer(synchronize=_synchronizer(self.engine))
        self.aligner = FaceAligner(options.face)
        self.tracker = FaceTracker(options.face, options.tracker) if options.faces == "all" \
            else None
        self._features = FeatureExtractor(options.features)
        # Events waiting together go through a PyTorch flow as one batch (OpenCV's takes pairs
        # one by one, so batching would change nothing there).
        self._batch_flow = uses_torch_flow(options.features)
        if self.engine is not None and self._batch_flow:
            self.warm_up()  # compile now, not at the first event of a live stream
        self.tracks: dict[int, _FaceTrack] = {}
        #: Faces the tracker has let go of, by id: their counts and size (their state is freed).
        self.retired: dict[int, dict] = {}
        if self.tracker is None:
            self.tracks[1] = _FaceTrack(1, options)
        # (t_ms, frame index) of recent frames, bounded like the ring buffer, to report events'
        # frame numbers as well as their times.
        self._recent_frames: deque[tuple[float, int]] = deque(maxlen=self.buffer_capacity)
        self._executor = ClassifierThread(options.classifier_niceness) \
            if options.classify_in_background else None
        self._abandoned = False
        self._pending: deque[tuple[Future, _EventJob]] = deque()
        self._ready: list[tuple[EventRecord, np.ndarray | None]] = []
        #: Called with each event the moment the spotter closes it, before its classification
        #: (label ""; ``classified`` False), so a writer can put it on disk at once.
        self.on_spotted: Callable[[EventRecord], None] | None = None
        self.events_spotted = 0
        #: Events a live source reported unclassified because the classifier was busy.
        self.classification_drops = 0
        #: Voiced stretches of the input's audio (ms), set by the caller when it has them
        #: (speech.voice_intervals); None: no audio, the lips decide alone.
        self.voice: list[tuple[float, float]] | None = None
        self.frames_seen = 0
        self.frames_with_face = 0
        self.frames_with_several_faces = 0
        self.hard_cuts = 0
        self._small_face_px = upsampling_eye_distance(options.face)

    #: frames with a face after which a small face is reported (once), so a live user hears
    #: it early; the summary's figure covers the whole run
    small_face_check_frames = 30

    @property
    def buffer_capacity(self) -> int:
        """Frames each face's ring buffer holds (sized from the input's frame rate)."""
        return RingBuffer.slots_for(self.options.buffer_seconds * 1000.0, self.options.fps_hint)

    @property
    def sequence_restarts(self) -> int:
        return sum(track.sequence_restarts for track in self.tracks.values()) + \
            sum(counts["sequence_restarts"] for counts in self.retired.values())

    # -- per frame ---------------------------------------------------------------------------
    def process(self, frame: Frame) -> FrameResult:
        self.frames_seen += 1
        self._recent_frames.append((frame.t_ms, frame.index))
        with self.timer.stage("face"):
            if self.tracker is None:
                face = self.aligner.process(frame.image_bgr, frame.t_ms)
                found, cut = ([(1, face)] if face.found else []), face.cut
                n_faces = face.n_faces
            else:
                tracked, cut = self.tracker.process(frame.image_bgr, frame.t_ms)
                found = [(t.face_id, t.face) for t in tracked]
                n_faces = len(found)
                face = found[0][1] if found else FaceResult(found=False, n_faces=0, cut=cut)
                for face_id in self.tracker.forgotten:
                    self._retire(face_id)
        if n_faces > 1:
            self.frames_with_several_faces += 1
        if cut:  # a new shot: no flow across it, even of the same face from another camera
            self.hard_cuts += 1
            for track in self.tracks.values():
                self._restart_sequence(track)
                track.last_face_ms = None
        if found:
            self.frames_with_face += 1
        seen = {face_id for face_id, _ in found}
        for track in self.tracks.values():
            if track.face_id not in seen:
                self._maybe_restart(track, frame.t_ms)
        views = []
        for face_id, face_result in found:
            track = self.tracks.get(face_id)
            if track is None:
                track = self.tracks[face_id] = _FaceTrack(face_id, self.options)
            views.append(self._process_face(track, frame, face_result))
        done = self._collect()
        if not views:
            return FrameResult(frame.index, frame.t_ms, face, None, None,
                               tuple(record for record, _ in done), tuple(m for _, m in done))
        first = views[0]
        return FrameResult(
            frame.index, frame.t_ms, first.face, first.signal, first.threshold,
            tuple(record for record, _ in done), tuple(m for _, m in done),
            face_small=first.face_small, region_values=first.region_values,
            floors=first.floors, blinking=first.blinking, speaking=first.speaking,
            thresholds=first.thresholds, faces=tuple(views))

    def _retire(self, face_id: int) -> None:
        """A face the tracker will not see again: its open events are closed and reported,
        and its buffer and spotter freed; its counts stay for the summary."""
        track = self.tracks.pop(face_id, None)
        if track is None:
            return
        self._restart_sequence(track)
        self.retired[face_id] = {"frames": track.frames_with_face,
                                 "sequence_restarts": track.sequence_restarts,
                                 **self._face_size(track)}

    def _process_face(self, track: _FaceTrack, frame: Frame, face: FaceResult) -> FaceView:
        track.frames_with_face += 1
        self._note_face_size(track, face.eye_distance_px)
        if track.last_face_ms is not None and (
                frame.t_ms - track.last_face_ms > self.options.face_gap_reset_ms
                or _jumped(track.last_box, face.box_xyxy, self.options.face_jump_reset)):
            self._restart_sequence(track)
        track.last_face_ms = frame.t_ms
        track.last_box = face.box_xyxy

        with self.timer.stage("buffer"):
            track.buffer.push(frame.t_ms, face.crop, face.landmarks, face.transform)
        with self.timer.stage("spotting"):
            spots = track.spotter.push(frame.t_ms, face.crop, face.landmarks)
            # The lips' opening is vertical: the crop's eye distance without its stretch.
            speaking = track.lips.push(frame.t_ms, face.landmarks, self.options.spotter.iod_px)
            if self.voice:  # a voice in the recording: the subject talks where it is heard
                speaking = speaking and in_intervals(frame.t_ms, self.voice)
            track.speaking_times.append((frame.t_ms, speaking))
        self._dispatch(track, spots)
        spotter = track.spotter
        return FaceView(
            track.face_id, face, spotter.signal, spotter.threshold,
            face_small=face.eye_distance_px is not None
            and face.eye_distance_px < self._small_face_px,
            region_values=None if spotter.region_values is None
            else spotter.region_values.copy(),
            floors=spotter.floors.copy(), thresholds=spotter.thresholds,
            blinking=bool(spotter.blinking), speaking=bool(speaking))

    def _dispatch(self, track: _FaceTrack, spots: list[SpotEvent]) -> None:
        """Hand the spotted events to classification (blinks need none), in order: inline, or
        queued to the worker thread with the blinks, so reports keep the spotter's order."""
        for spot in spots:
            job = self._event_job(track, spot)
            if self.on_spotted is not None:
                self.on_spotted(self._unclassified(job)[0])
            work = self._classify if spot.kind != "blink" and self.engine is not None \
                else self._unclassified
            if self._executor is None:
                self._ready.append(work(job))
                continue
            busy = [f for f, _ in self._pending if not f.done()]
            if len(busy) >= self.options.max_pending_events and work is self._classify:
                if self.options.drop_when_busy:
                    self.classification_drops += 1
                    log.warning("classifier busy: event at %.2f s reported unclassified",
                                job.spot.onset_ms / 1000)
                    work = self._unclassified
                else:
                    busy[0].result()  # back-pressure: a file waits for its classifier
            batch = self._classify_batch if work is self._classify and self._batch_flow else None
            self._pending.append((self._executor.submit(work, job, batch), job))

    def _collect(self) -> list[tuple[EventRecord, np.ndarray | None]]:
        """The reports completed so far, in order (a background job still running holds back
        the ones after it)."""
        done, self._ready = self._ready, []
        while self._pending and self._pending[0][0].done():
            done.append(self._pending.popleft()[0].result())
        return done

    def _note_face_size(self, track: _FaceTrack, eye_distance_px: float | None) -> None:
        if eye_distance_px is None:
            return
        track.eye_distances.append(eye_distance_px)
        if len(track.eye_distances) == self.small_face_check_frames:
            self._warn_if_small([track])

    def warn_if_small_face(self) -> None:
        """Log (once per face) that a face is small for the crop, if it is. Called after the
        first frames with a face, and by the caller at the end of a run shorter than that."""
        self._warn_if_small(self._reported_tracks())

    def _warn_if_small(self, tracks: list[_FaceTrack]) -> None:
        """One line for the faces among ``tracks`` that are small and not yet reported."""
        small = [(t, self._face_size(t)) for t in tracks if not t.small_face_warned]
        small = [(t, size) for t, size in small if size["small"]]
        if not small:
            return
        for track, _ in small:
            track.small_face_warned = True
        whose = ""
        if self.tracker is not None:
            ids = ", ".join(str(t.face_id) for t, _ in small)
            whose = f"face{'s' if len(small) > 1 else ''} {ids}: "
        size = min((size for _, size in small), key=lambda s: s["median_eye_distance_px"])
        log.warning("%s%s%s; a closer or higher-resolution camera (or a larger --max-side) "
                    "helps", f"{self.source_name}: " if self.source_name else "", whose,
                    small_face_note(size["median_eye_distance_px"],
                                    size["upsampling_eye_distance_px"]))

    def face_size(self) -> dict:
        """The subject's size over the frames so far: median and 10th percentile of the eye
        distance (frame px, as analysed), the size below which the crop enlarges the face,
        whether the median is below it (``small``), and how many faces were tracked at once.
        With faces="all", the largest of the faces followed (each face's own is in
        :meth:`faces_summary`)."""
        sizes = [self._face_size(t) for t in self._reported_tracks()] + \
            [{k: v for k, v in counts.items() if k not in ("frames", "sequence_restarts")}
             for face_id, counts in self.retired.items()
             if face_id not in self.short_lived_faces()]
        known = [s for s in sizes if s["median_eye_distance_px"] is not None]
        size = max(known, key=lambda s: s["median_eye_distance_px"]) if known else \
            self._face_size(None)
        return {**size, "max_faces": self.options.face.max_faces if self.tracker is None
                else self.options.tracker.max_faces}

    def _face_size(self, track: _FaceTrack | None) -> dict:
        limit = self._small_face_px
        if track is None or not track.eye_distances:
            return {"median_eye_distance_px": None, "p10_eye_distance_px": None,
                    "upsampling_eye_distance_px": limit, "small": False}
        values = np.frombuffer(track.eye_distances, dtype=np.float32)
        median = float(np.median(values))
        return {"median_eye_distance_px": median,
                "p10_eye_distance_px": float(np.percentile(values, 10)),
                "upsampling_eye_distance_px": limit, "small": median < limit}

    def _reported_tracks(self) -> list[_FaceTrack]:
        """The faces still followed that the results speak of: all but the short-lived
        (spurious) tracks and a subject never seen."""
        short = self.tracker.short_lived() if self.tracker is not None else set()
        return [t for face_id, t in sorted(self.tracks.items())
                if face_id not in short and t.frames_with_face > 0]

    def faces_summary(self) -> dict:
        """Per face followed (id order): frames with it, first and last time seen (ms), its
        size, sequence restarts; and the faces ignored (too small, short-lived, duplicates)."""
        stats = self.tracker.stats if self.tracker is not None else None
        short = self.short_lived_faces()
        entries = {face_id: dict(counts) for face_id, counts in self.retired.items()
                   if face_id not in short and counts["frames"] > 0}
        for track in self._reported_tracks():
            entries[track.face_id] = {"frames": track.frames_with_face,
                                      "sequence_restarts": track.sequence_restarts,
                                      **self._face_size(track)}
        faces = []
        for face_id, entry in sorted(entries.items()):
            entry = {"face_id": face_id, **entry}
            if stats is not None:
                entry.update(first_ms=stats.first_ms.get(face_id),
                             last_ms=stats.last_ms.get(face_id))
            faces.append(entry)
        ignored = {"too_small": stats.ignored_small if stats else 0,
                   "short_lived": len(self.tracker.short_lived()) if self.tracker else 0,
                   "duplicates": stats.duplicates if stats else 0}
        return {"mode": self.options.faces, "tracked": faces, "ignored": ignored}

    def short_lived_faces(self) -> set[int]:
        """Ids of tracks too short-lived to be faces (always empty with faces="largest")."""
        return self.tracker.short_lived() if self.tracker is not None else set()

    def finish(self) -> list[tuple[EventRecord, np.ndarray | None]]:
        """End of the input: the events still open are closed there (marked truncated) and
        reported, and the events still being classified in the background are waited for."""
        for track in self.tracks.values():
            if len(track.buffer):
                self._dispatch(track, track.spotter.finish())
        done = self._collect()
        done.extend(future.result() for future, _ in self._pending)
        self._pending.clear()
        return done

    def abandon(self) -> list[tuple[EventRecord, np.ndarray | None]]:
        """Stop now (Ctrl+C, SIGTERM): events not classified yet are reported unclassified, the
        one the classifier is working on included (its flow can take a second or two on a busy
        CPU; the worker is a daemon thread, so it does not hold the process either). Events
        still open are not closed: an interrupted run reports what the spotter had finished."""
        done = self._collect()
        self._abandoned = True
        for future, job in self._pending:
            if future.done() and not future.cancelled():
                done.append(future.result())
            else:
                future.cancel()
                done.append(self._unclassified(job))
        self._pending.clear()
        return done

    def run(self, frames: Iterable[Frame]) -> Iterator[FrameResult]:
        for frame in frames:
            yield self.process(frame)

    def warm_up(self) -> None:
        """One onset/apex pair through the feature stage: a compiled flow compiles, and the
        flow's memory is taken, before the first event rather than at it."""
        with self.timer.stage("warm-up"):
            self._features.warm_up()

    def reset(self) -> None:
        """Start again as if new (a live view's Reset): what is waiting for classification is
        dropped, not waited for, and the event being classified now is not reported."""
        for future, _ in self._pending:
            future.cancel()
        self._pending.clear()
        self.aligner.reset()
        if self.tracker is not None:
            self.tracker.reset()
            self.tracks.clear()
            self.retired.clear()
        else:
            self.tracks[1] = _FaceTrack(1, self.options)
        self._recent_frames.clear()
        self.timer.reset()
        self.frames_seen = self.frames_with_face = self.frames_with_several_faces = 0
        self.hard_cuts = 0

    def close(self) -> None:
        if self._executor is not None:
            # After abandon() the worker may still be inside a flow nobody waits for.
            self._executor.shutdown(join=not self._abandoned)
        self.aligner.close()
        if self.tracker is not None:
            self.tracker.close()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------------
    def _maybe_restart(self, track: _FaceTrack, t_ms: float) -> None:
        if track.last_face_ms is not None and \
                t_ms - track.last_face_ms > self.options.face_gap_reset_ms:
            self._restart_sequence(track)
            track.last_face_ms = None

    def _restart_sequence(self, track: _FaceTrack) -> None:
        if len(track.buffer):
            track.sequence_restarts += 1
            # Events still open end where the face was last seen (truncated), reported, not lost.
            self._dispatch(track, track.spotter.finish())
        track.spotter.reset()
        track.lips.reset()
        track.buffer.reset()

    def _event_job(self, track: _FaceTrack, spot: SpotEvent) -> _EventJob:
        """What classifying an event needs, copied out of the ring buffer (whose slots the next
        frames overwrite)."""
        buffer = track.buffer
        onset = buffer.get(_clamp(spot.onset_ms, buffer))
        apex = buffer.get(_clamp(spot.apex_ms, buffer))
        offset_t = _clamp(spot.offset_ms, buffer)
        self.events_spotted += 1
        blink = spot.kind == "blink"  # reported as it is: no map, so no crops to keep
        offset_crop = None if blink or self._phases == 1 else \
            _under_transform(buffer.get(offset_t), onset.transform)
        return _EventJob(self.events_spotted, spot, None if blink else onset.crop.copy(),
                         None if blink else _under_transform(apex, onset.transform),
                         self._frame_index(onset.t_ms), self._frame_index(apex.t_ms),
                         self._frame_index(offset_t), self._map_landmarks(apex.landmarks),
                         _spoken(track, spot.onset_ms, spot.offset_ms), track.face_id,
                         offset_crop)

    def _classify(self, job: _EventJob, feature_map: np.ndarray | None = None
                  ) -> tuple[EventRecord, np.ndarray]:
        if feature_map is None:
            with self.timer.stage("features"):
                # as a batch: an event's two phases go through a PyTorch flow together
                feature_map = self._features.process_batch([job.crops])[0]
        with self.timer.stage("engine"):
            landmarks = None if job.apex_landmarks5 is None else job.apex_landmarks5[None]
            probabilities = self.engine.predict(
                feature_map.transpose(2, 0, 1)[None].astype(np.float32), landmarks)[0]
        feature_map = feature_map[..., :3]  # what is shown and saved: the onset→apex map
        best = int(np.argmax(probabilities))
        record = self._record(job, label=self.class_names[best],
                              confidence=float(probabilities[best]),
                              probabilities={n: float(p) for n, p in zip(self.class_names,
                                                                         probabilities)})
        log.debug("event %s", record)
        return record, feature_map

    def _classify_batch(self, jobs: list[_EventJob]) -> list[tuple[EventRecord, np.ndarray]]:
        """Events that waited together: their pairs through the flow as one batch."""
        start = time.perf_counter()
        maps = self._features.process_batch([job.crops for job in jobs])
        per_event_ms = (time.perf_counter() - start) * 1000.0 / len(jobs)
        for _ in jobs:
            self.timer.add("features", per_event_ms)
        return [self._classify(job, feature_map) for job, feature_map in zip(jobs, maps)]

    def _unclassified(self, job: _EventJob) -> tuple[EventRecord, None]:
        # A blink has no class to wait for: its record is final.
        return self._record(job, label="", confidence=0.0, probabilities={},
                            classified=job.spot.kind == "blink"), None

    def _record(self, job: _EventJob, classified: bool = True, **classification) -> EventRecord:
        spot = job.spot
        return EventRecord(
            event_id=job.event_id, classified=classified,
            onset_ms=float(spot.onset_ms), apex_ms=float(spot.apex_ms),
            offset_ms=float(spot.offset_ms), duration_ms=float(spot.offset_ms - spot.onset_ms),
            kind=spot.kind, **classification,
            peak=float(spot.peak), threshold=float(spot.threshold),
            onset_frame=job.onset_frame, apex_frame=job.apex_frame,
            offset_frame=job.offset_frame, source=self.source_name,
            regions=list(spot.regions), amplitude_pct=float(spot.amplitude_pct),
            floor_pct=float(spot.floor_pct), truncated=bool(spot.truncated), speech=job.speech,
            face_id=job.face_id)

    def _map_landmarks(self, landmarks: np.ndarray) -> np.ndarray | None:
        """The apex's five alignment points (eyes, nose tip, mouth corners) in the feature
        map's frame, for engines whose input locates facial regions (None: not needed, or
        unknown, and the engine then uses the aligned-face template)."""
        if not getattr(self.engine, "uses_landmarks", False) or landmarks is None \
                or len(landmarks) <= max(ALIGN_LANDMARKS):
            return None
        pts = np.asarray(landmarks, np.float64)[list(ALIGN_LANDMARKS)]
        if not np.isfinite(pts).all():
            return None
        # Crop pixels (centres at integers) → the maps' "normalised × size" frame.
        return (pts + 0.5) * (self._features.options.map_size / self.options.face.crop_size)

    def _frame_index(self, t_ms: float) -> int:
        """Index of the recent frame nearest ``t_ms`` (-1 if none is remembered)."""
        if not self._recent_frames:
            return -1
        times = np.fromiter((t for t, _ in self._recent_frames), float)
        return self._recent_frames[int(np.argmin(np.abs(times - t_ms)))][1]


@dataclass(frozen=True)
class _EventJob:
    event_id: int
    spot: SpotEvent
    onset_crop: np.ndarray | None
    apex_crop: np.ndarray | None
    onset_frame: int
    apex_frame: int
    offset_frame: int
    apex_landmarks5: np.ndarray | None = None
    speech: bool = False
    face_id: int = 1
    offset_crop: np.ndarray | None = None  # only for an engine fed both phases

    @property
    def crops(self) -> tuple[np.ndarray, ...]:
        """What the feature stage makes the engine's input of: (onset, apex), or (onset, apex,
        offset) for an engine fed both phases of the movement."""
        if self.offset_crop is None:
            return self.onset_crop, self.apex_crop
        return self.onset_crop, self.apex_crop, self.offset_crop


def _under_transform(frame, transform: np.ndarray | None) -> np.ndarray:
    """``frame``'s crop as if cut with ``transform`` (another frame's): an onset/apex pair is
    compared under one transform, the onset's. Each frame's own fit moves a little with the
    expression (MediaPipe's eye corners and nose shift by ~1 % of the eye distance under a 3 %
    smile), and a pair cut with two fits would lose that much of the movement. The crop is
    re-cut from the stored one (crop → frame → the other crop: a shift of a pixel or so)."""
    import cv2

    own = frame.transform
    if transform is None or own is None or not (np.isfinite(own).all()
                                                and np.isfinite(transform).all()):
        return frame.crop.copy()
    back = cv2.invertAffineTransform(own.astype(np.float64))
    m = transform[:, :2].astype(np.float64) @ back[:, :2]
    t = transform[:, :2].astype(np.float64) @ back[:, 2] + transform[:, 2]
    size = frame.crop.shape[1], frame.crop.shape[0]
    return cv2.warpAffine(frame.crop, np.hstack([m, t[:, None]]), size, flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE)


def _spoken(track: _FaceTrack, onset_ms: float, offset_ms: float) -> bool:
    """Whether the face's person was talking at any frame of [onset, offset]."""
    return any(speaking and onset_ms <= t <= offset_ms for t, speaking in track.speaking_times)


def _jumped(previous, current, fraction: float) -> bool:
    """True when the face box moved or resized by more than ``fraction`` of its width."""
    if previous is None or current is None:
        return False
    px0, py0, px1, py1 = previous
    cx0, cy0, cx1, cy1 = current
    width = max(px1 - px0, 1.0)
    shift = np.hypot((cx0 + cx1 - px0 - px1) / 2, (cy0 + cy1 - py0 - py1) / 2)
    resize = abs((cx1 - cx0) - width)
    return shift > fraction * width or resize > fraction * width


def _clamp(t_ms: float, buffer: RingBuffer) -> float:
    """Events can start before the oldest crop still held (a long macro-expression): use the
    oldest one rather than fail."""
    return float(min(max(t_ms, buffer.oldest_ms), buffer.newest_ms))


def _synchronizer(engine: Backend):
    # Only torch runs CUDA work asynchronously; ONNX Runtime's run() returns when it is done.
    # An ensemble is synchronised when one of its members runs torch on CUDA.
    if any(str(getattr(m, "device", "cpu")).startswith("cuda")
           and getattr(m, "name", "") in ("torch", "tensorrt")
           for m in getattr(engine, "members", [engine])):
        import torch

        return torch.cuda.synchronize
    return None

