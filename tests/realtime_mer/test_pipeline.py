"""The pipeline across cuts: a different face (or a camera cut) restarts the sequence instead of
being spotted as a movement."""

from __future__ import annotations

from realtime_mer.capture import Frame, open_video
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
    cut_ms = 60 * STEP_MS
    assert restarts == 1
    assert not [e for e in events if e.onset_ms < cut_ms <= e.offset_ms]


def test_without_the_guard_the_cut_is_seen_as_motion(media_dir):
    """The same sequence with the jump guard disabled: the spotting signal, well under its
    threshold before the cut, crosses it at the cut (an event would open across two faces),
    which is what the guard is for."""
    frames = _cut_between_two_people(media_dir, 10)
    engine = load_engine(default_engine_path())
    results = []
    with Pipeline(PipelineOptions(face_jump_reset=1e9), engine=engine) as pipeline:
        results = [pipeline.process(frame) for frame in frames]
        assert pipeline.sequence_restarts == 0
    assert all(r.signal < 0.5 * r.threshold for r in results[55:60])
    assert any(r.signal > r.threshold for r in results[60:63])
