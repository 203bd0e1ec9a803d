"""The pipeline across cuts: a different face (or a camera cut) restarts the sequence instead of
being spotted as a movement."""

from __future__ import annotations

import math

import pytest

from realtime_mer.capture import Frame, open_video
from realtime_mer.face import FaceOptions
from realtime_mer.pipeline import Pipeline, PipelineOptions
from realtime_mer.runtime import default_engine_path, load_engine


STEP_MS = 1000.0 / 30


def _frames(path, n):
    with open_video(path) as source:
        return [frame for _, frame in zip(range(n), source)]


def _cut_between_two_people(media_dir, n_second):
    """60 frames of one person, then ``n_second`` of another; timestamps continuous (30 fps)."""
    first = _frames(media_dir / "single_face.mp4", 60)
    second = _frames(media_dir / "WolfgangLanger_Pexels.mp4", n_second)
    return [Frame(i * STEP_MS, f.image_bgr, i) for i, f in enumerate(first + second)]


def test_cut_to_another_face_restarts_instead_of_firing(media_dir):
    """60 frames of one person, then 60 of another (a hard cut at 2 s, timestamps continuous):
    the cut restarts the spotter and no event spans it."""
    frames = _cut_between_two_people(media_dir, 60)
    engine = load_engine(default_engine_path())
    events = []
    with Pipeline(PipelineOptions(), engine=engine) as pipeline:
        for frame in frames:
            result = pipeline.process(frame)
            if result.event is not None:
                events.append(result.event)
        restarts = pipeline.sequence_restarts
        cuts = pipeline.hard_cuts
    cut_ms = 60 * STEP_MS
    assert restarts == 1 and cuts == 1
    assert not [e for e in events if e.onset_ms < cut_ms <= e.offset_ms]


@pytest.mark.parametrize("jump_guard,cut_guard", [(False, False), (True, False), (False, True)])
def test_without_the_guards_the_cut_is_seen_as_motion(media_dir, jump_guard, cut_guard):
    """The same sequence with the face-jump guard, the frame-cut guard, or both disabled. With
    both off the spotting signal, well under its threshold before the cut, crosses it at the
    cut (an event would open across two faces), which is what the guards are for; either guard
    alone restarts the sequence there instead."""
    frames = _cut_between_two_people(media_dir, 10)
    engine = load_engine(default_engine_path())
    options = PipelineOptions(
        face_jump_reset=PipelineOptions().face_jump_reset if jump_guard else 1e9,
        face=FaceOptions(cut_threshold=FaceOptions().cut_threshold if cut_guard else math.inf))
    with Pipeline(options, engine=engine) as pipeline:
        results = [pipeline.process(frame) for frame in frames]
        restarts = pipeline.sequence_restarts
    assert all(r.signal < 0.5 * r.threshold for r in results[55:60])
    crossed = any(r.threshold is not None and r.signal > r.threshold for r in results[60:63])
    assert restarts == int(jump_guard or cut_guard)
    assert crossed == (not (jump_guard or cut_guard))


def _landmark_engine(tmp_path):
    """A tiny engine whose input is AHMSA-Net's five-region crop (built from landmarks)."""
    import numpy as np

    from training.data.megc3db import Megc3DB
    from training.export import export_default
    from training.loso import LosoConfig

    rng = np.random.default_rng(0)
    n = 9
    data = Megc3DB(x=rng.random((n, 3, 28, 28), dtype=np.float32),
                   y=np.arange(n) % 3, subjects=np.array(["casme2/a"] * n),
                   databases=np.array(["casme2"] * n), videos=np.array([str(i) for i in range(n)]),
                   files=np.array([str(i) for i in range(n)]), root="synthetic",
                   landmarks=np.full((n, 5, 2), np.nan))
    cfg = LosoConfig(epochs=1, batch_size=4, select_epochs="fixed", input_kind="regions5")
    export_default(data, cfg, tmp_path / "regions.onnx", loso_results=None)
    return load_engine(tmp_path / "regions.onnx", backend="onnxruntime")


def test_events_give_the_engine_the_apex_landmarks_in_the_map_frame(media_dir, tmp_path):
    """For an engine that locates facial regions, the apex frame's five alignment points are
    passed in the 28x28 map's frame: on a real aligned face they sit within a pixel or two of
    the 3DB template the crops are aligned to; a plain engine gets none."""
    import cv2
    import numpy as np

    from realtime_mer.face import ALIGN_LANDMARKS, CANONICAL_POINTS_28, canonical_points

    image = cv2.imread(str(media_dir / "single_face.jpg"))
    with Pipeline(PipelineOptions(), engine=_landmark_engine(tmp_path)) as pipeline:
        face = pipeline.aligner.process(image, 0.0)
        assert face.found
        pts = pipeline._map_landmarks(face.landmarks)
        assert pts.shape == (5, 2)
        # The alignment anchors the eye corners and the nose; the irises and the mouth follow
        # this face (a smile widens the mouth), which is why the apex's own points are passed
        # and not the template.
        assert np.abs(pts[:2] - CANONICAL_POINTS_28[:2]).max() < 2.0
        assert np.abs(pts - CANONICAL_POINTS_28).max() < 3.5
        # Exactly the template where the crop's points are exactly the template's.
        exact = np.zeros((478, 2), np.float32)
        exact[list(ALIGN_LANDMARKS)] = canonical_points(pipeline.options.face.crop_size)
        np.testing.assert_allclose(pipeline._map_landmarks(exact), CANONICAL_POINTS_28,
                                   atol=1e-4)
        assert pipeline._map_landmarks(np.full((478, 2), np.nan, np.float32)) is None
    with Pipeline(PipelineOptions(), engine=load_engine(default_engine_path())) as pipeline:
        assert pipeline._map_landmarks(face.landmarks) is None


def _with_gap(media_dir, n_blank):
    """40 frames of a face, ``n_blank`` black frames (the face gone), 20 more frames of the same
    face; 30 fps timestamps throughout."""
    import numpy as np

    real = _frames(media_dir / "single_face.mp4", 60)
    blank = np.zeros_like(real[0].image_bgr)
    images = [f.image_bgr for f in real[:40]] + [blank] * n_blank + \
        [f.image_bgr for f in real[40:]]
    return [Frame(i * STEP_MS, image, i) for i, image in enumerate(images)]


def test_a_short_face_gap_keeps_the_sequence_and_a_long_one_restarts_it(media_dir):
    """face_gap_reset_ms (300 ms) is the boundary: a face missing for 233 ms (6 frames at
    30 fps) is the same sequence; missing for 433 ms (12 frames) restarts the spotter and
    buffer, so no flow is computed across the gap. Black frames are also a hard cut of the
    whole picture, so the gap rule is seen alone with the cut guard off; with it on, even the
    short blackout restarts the sequence (once: the buffer is empty when the face returns)."""
    engine = load_engine(default_engine_path())
    for n_blank, cut_guard, restarts in ((6, False, 0), (12, False, 1), (6, True, 1)):
        options = PipelineOptions(face=FaceOptions(
            cut_threshold=FaceOptions().cut_threshold if cut_guard else math.inf))
        gap_ms = (n_blank + 1) * STEP_MS
        with Pipeline(options, engine=engine) as pipeline:
            for frame in _with_gap(media_dir, n_blank):
                pipeline.process(frame)
            assert (gap_ms > options.face_gap_reset_ms or cut_guard) == bool(restarts)
            assert pipeline.sequence_restarts == restarts, (n_blank, cut_guard)
            assert pipeline.hard_cuts == (2 if cut_guard else 0)
            assert pipeline.frames_with_face == 60
            assert pipeline.frames_seen == 60 + n_blank


def test_frames_with_several_faces_are_counted(media_dir):
    import cv2

    import numpy as np

    engine = load_engine(default_engine_path())
    # The part of the group photo whose four faces are large enough to detect (test_face).
    several = np.ascontiguousarray(cv2.imread(str(media_dir / "multi_face.jpg"))[100:600, 250:950])
    alone = np.zeros_like(several)
    alone[100:400, 200:500] = cv2.resize(cv2.imread(str(media_dir / "single_face.jpg")),
                                         (300, 300))
    with Pipeline(PipelineOptions(), engine=engine) as pipeline:
        # Both directions of a hard cut: the tracker restarts at each (test_face), so a lone
        # face after the group counts as one face, not as the group's lingering regions.
        for i, image in enumerate([alone, several, several, several, alone, alone]):
            pipeline.process(Frame(i * STEP_MS, image, i))
        assert pipeline.frames_with_several_faces == 3
        assert pipeline.frames_with_face == 6
        assert pipeline.hard_cuts == 2
        pipeline.reset()  # a new session: the counters start again
        assert (pipeline.frames_seen, pipeline.frames_with_several_faces,
                pipeline.hard_cuts) == (0, 0, 0)
        pipeline.process(Frame(10 * STEP_MS, alone, 0))  # the first frame is never a cut
        assert pipeline.hard_cuts == 0 and pipeline.frames_with_face == 1


def _first_seconds_of_wolfgang(media_dir, engine):
    """The pipeline over the first 6.5 s of Wolfgang's video (three expressions and two
    blinks): each frame's aligned crop and transform by frame index, the frames' times, and
    the (event, feature map) of every event that is not a blink."""
    import numpy as np

    from realtime_mer.capture import CaptureOptions

    crops, transforms, times, events = {}, {}, {}, []
    with open_video(media_dir / "WolfgangLanger_Pexels.mp4", CaptureOptions(end_ms=6500.0)) \
            as source, \
            Pipeline(PipelineOptions(), engine=engine) as pipeline:
        for frame in source:
            result = pipeline.process(frame)
            times[frame.index] = frame.t_ms
            if result.face.found:
                crops[frame.index] = result.face.crop.copy()
                transforms[frame.index] = result.face.transform.astype(np.float64)
            events.extend((event, feature_map) for event, feature_map
                          in zip(result.events, result.feature_maps) if event.kind != "blink")
    assert events
    return crops, transforms, times, events


def _recut(crops, transforms, frame, under):
    """Frame ``frame``'s crop re-cut with frame ``under``'s transform, as the pipeline compares
    an event's frames (independently of its ring buffer)."""
    import numpy as np

    from realtime_mer.buffer import StoredFrame
    from realtime_mer.pipeline import _under_transform

    stored = StoredFrame(crops[frame], np.zeros((478, 2)), 0.0, transforms[frame])
    return _under_transform(stored, transforms[under])


def test_an_event_is_classified_from_its_own_onset_and_apex_frames(media_dir):
    """Independently of the ring buffer: each event's map is the feature extractor's map of
    the aligned crops of the frames nearest its onset and apex (which are the frames it names),
    and its probabilities are the engine's for that map."""
    import numpy as np

    from realtime_mer.features import FeatureExtractor

    engine = load_engine(default_engine_path())
    crops, transforms, times, events = _first_seconds_of_wolfgang(media_dir, engine)
    extractor = FeatureExtractor(PipelineOptions().features)
    frame_ids = np.array(sorted(crops))
    frame_t = np.array([times[i] for i in frame_ids])
    for event, feature_map in events:
        for t_ms, named in ((event.onset_ms, event.onset_frame), (event.apex_ms, event.apex_frame)):
            assert named == frame_ids[np.argmin(np.abs(frame_t - t_ms))]
        # The pair is compared under one transform, the onset's: the apex crop re-cut with it.
        onset, apex = event.onset_frame, event.apex_frame
        want = extractor.process(crops[onset], _recut(crops, transforms, apex, onset))
        np.testing.assert_allclose(feature_map, want, atol=1e-6)
        probs = engine.predict(want.transpose(2, 0, 1)[None].astype(np.float32))[0]
        np.testing.assert_allclose([event.probabilities[c] for c in engine.class_names], probs,
                                   atol=1e-6)


def test_an_engine_of_both_phases_is_fed_each_events_apex_to_offset_map(media_dir, megc_dir,
                                                                        tmp_path):
    """A real engine trained on both phases of each movement (CausalNet's maps of the 442
    samples, three epochs) in the live path: each event's six channels are its onset→apex and
    apex→offset maps, made from its own frames under the onset's transform; the event shows
    the onset→apex map, and its class is the engine's on all six channels."""
    import numpy as np

    from realtime_mer.features import FeatureExtractor
    from training.data.megc3db import load_phases
    from training.export import export_default
    from training.loso import LosoConfig

    data = load_phases(megc_dir, megc_dir.parent / "megc2019_3db_causalnet")
    cfg = LosoConfig(epochs=3, select_epochs="fixed", maps="causalnet", phases=2,
                     model_kwargs={"in_channels": 6})
    export_default(data, cfg, tmp_path / "phases.onnx")
    engine = load_engine(tmp_path / "phases.onnx", backend="onnxruntime")
    crops, transforms, _, events = _first_seconds_of_wolfgang(media_dir, engine)
    extractor = FeatureExtractor(PipelineOptions().features)
    for event, feature_map in events:
        onset, apex, offset = event.onset_frame, event.apex_frame, event.offset_frame
        assert onset < apex < offset
        want = extractor.process(crops[onset], _recut(crops, transforms, apex, onset),
                                 _recut(crops, transforms, offset, onset))
        assert want.shape == (28, 28, 6) and np.abs(want[..., 3:]).max() > 0
        np.testing.assert_allclose(feature_map, want[..., :3], atol=1e-6)
        probs = engine.predict(want.transpose(2, 0, 1)[None].astype(np.float32))[0]
        np.testing.assert_allclose([event.probabilities[c] for c in engine.class_names], probs,
                                   atol=1e-6)


def test_reset_drops_the_events_waiting_for_classification_without_waiting(media_dir):
    """A live view's Reset: the events queued for the background classifier are dropped at once
    (not classified first, which takes most of a second each on this CPU), and none of them is
    reported after the reset."""
    import time

    engine = load_engine(default_engine_path())
    options = PipelineOptions(classify_in_background=True)
    with Pipeline(options, engine=engine) as pipeline:
        with open_video(media_dir / "talking" / "d9.mp4") as source:
            for frame in source:
                pipeline.process(frame)
                if len(pipeline._pending) >= 2:
                    break
        assert len(pipeline._pending) >= 2, "the clip gave fewer than two events to classify"
        start = time.perf_counter()
        pipeline.reset()
        assert time.perf_counter() - start < 0.1
        assert pipeline.finish() == []


def test_jobs_waiting_together_are_classified_as_one_batch_in_order():
    """The classifier takes the batchable jobs queued behind a busy one together (a GPU flow
    computes a batch in about the time of one pair); a job without a batch function is not
    mixed in; results come back to each job's own future, in order."""
    import threading

    from realtime_mer.classifier_thread import ClassifierThread

    gate, started, batches = threading.Event(), threading.Event(), []

    def one(job):
        started.set()
        gate.wait(5)
        return job * 10

    class Batcher:  # the pipeline submits a bound method: a new object at every access
        def many(self, jobs):
            batches.append(list(jobs))
            return [job * 10 for job in jobs]

    batcher = Batcher()

    classifier = ClassifierThread()
    futures = [classifier.submit(one, 0)]  # keeps the worker busy until the gate opens
    assert started.wait(5)
    futures += [classifier.submit(one, job, batcher.many) for job in (1, 2, 3)]
    futures += [classifier.submit(lambda job: job * 10, 4)]  # not batchable
    futures += [classifier.submit(one, job, batcher.many) for job in (5, 6)]
    futures[2].cancel()  # a dropped event (Reset) is skipped, not computed
    gate.set()
    results = [None if f.cancelled() else f.result(timeout=10) for f in futures]
    classifier.shutdown()
    assert results == [0, 10, None, 30, 40, 50, 60]
    assert batches == [[1, 3], [5, 6]]


def test_the_library_iterator_gives_the_events_analyze_video_writes(media_dir, tmp_path):
    """`analyze(path)` yields, in order, the events that `analyze_video` reports for the same
    video (the first 4 s of a real talking clip: blinks and classified expressions), writes
    nothing, and stops cleanly when the caller stops reading."""
    from realtime_mer.analysis import analyze, analyze_video
    from realtime_mer.capture import CaptureOptions

    segment = CaptureOptions(end_ms=4000.0)
    path = media_dir / "talking" / "d9.mp4"
    engine = load_engine(default_engine_path())
    events, facts = analyze(path, capture=segment, engine=engine)
    assert (facts.width, facts.height, facts.fps_nominal) == (512, 480, 30.0)
    got = [(e.onset_frame, e.apex_frame, e.kind, e.label, round(e.confidence, 6))
           for e in events]
    written = analyze_video(path, tmp_path / "out", capture=segment, engine=engine).events
    assert got == [(e.onset_frame, e.apex_frame, e.kind, e.label, round(e.confidence, 6))
                   for e in written]
    assert any(label for *_, label, _ in got)  # classified expressions, not blinks alone
    events, _ = analyze(path, capture=segment, engine=engine)
    next(events)
    events.close()  # stopping early closes the video and the pipeline without an error
