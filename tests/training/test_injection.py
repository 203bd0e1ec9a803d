"""The spotting benchmark's ground truth: action-unit fields of the stated size and direction on
the face's own frame, the sin² time course, and a rendered real video that keeps its frames,
timestamps and audio and carries the movement where and when the truth says."""

from __future__ import annotations

import numpy as np
import pytest

from training import injection
from training.injection import ACTION_UNITS, IRIS_LEFT, IRIS_RIGHT, au_field, temporal_profile


def _face(angle_deg: float = 0.0) -> np.ndarray:
    """478 landmarks of a made-up face (eyes 100 px apart), rotated about (200, 200); only the
    points the action units use need sensible places."""
    rng = np.random.default_rng(0)
    pts = rng.uniform(150, 250, (478, 2))
    pts[IRIS_LEFT], pts[IRIS_RIGHT] = (150, 180), (250, 180)
    pts[61], pts[291] = (165, 270), (235, 270)
    a = np.radians(angle_deg)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return (pts - 200) @ rot.T + 200


def test_action_unit_field_has_the_stated_peak_and_follows_the_head():
    field = au_field(_face(), ACTION_UNITS["AU12"], 3.0, (400, 400))
    magnitude = np.hypot(field[..., 0], field[..., 1])
    assert magnitude.max() == pytest.approx(3.0, rel=1e-3)  # 3 % of a 100 px eye distance
    # The image-left corner moves out (left) and up, the image-right one right and up.
    left, right = field[270, 165], field[270, 235]
    assert left[0] < 0 < right[0] and left[1] < 0 and right[1] < 0
    assert magnitude[100, 100] == 0.0  # nothing moves far from the anchors
    # Rolled by 30 degrees, the same AU turns with the face.
    turned = au_field(_face(30.0), ACTION_UNITS["AU12"], 3.0, (400, 400))
    corner = np.round((np.array([235, 270]) - 200) @ np.array(
        [[np.cos(np.radians(30)), np.sin(np.radians(30))],
         [-np.sin(np.radians(30)), np.cos(np.radians(30))]]) + 200).astype(int)
    v = turned[corner[1], corner[0]]
    expected = np.array([[np.cos(np.radians(30)), -np.sin(np.radians(30))],
                         [np.sin(np.radians(30)), np.cos(np.radians(30))]]) @ right
    cosine = float(v @ expected) / float(np.linalg.norm(v) * np.linalg.norm(expected))
    assert np.degrees(np.arccos(min(cosine, 1.0))) < 5


def test_temporal_profile():
    t = np.linspace(900, 1600, 71)
    s = temporal_profile(t, 1000.0, 1150.0, 1400.0)
    assert s[t <= 1000].max() == 0.0 and s[t >= 1400].max() == 0.0
    assert s.max() == pytest.approx(1.0) and t[np.argmax(s)] == pytest.approx(1150.0)
    rising, falling = s[(t > 1000) & (t <= 1150)], s[(t >= 1150) & (t < 1400)]
    assert np.all(np.diff(rising) > 0) and np.all(np.diff(falling) < 0)


def test_rendered_video_keeps_frames_time_and_audio_and_moves_where_told(media_dir, tmp_path):
    import av
    import cv2

    source = media_dir / "single_face.mp4"
    frames, times = injection.decode_frames(source)
    track = injection.track_faces(frames, times)
    assert track.found.all()
    truth = [injection.Injection(1000.0, 1200.0, 1400.0, 3.0, "AU12", "lip corners", "positive")]
    target = tmp_path / "injected.mp4"
    injection.render_video(source, target, truth, track)
    rendered, rendered_times = injection.decode_frames(target)
    assert len(rendered) == len(frames)
    np.testing.assert_allclose(rendered_times, times, atol=1e-6)
    with av.open(str(target)) as container:
        assert len(container.streams.audio) == 1
    # Away from the movement the re-encode is near-lossless; at the apex the mouth corner has
    # moved by about 3 % of the eye distance (Farnebäck between the source and the render).
    grey = lambda image: cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)  # noqa: E731
    quiet = int(np.argmin(np.abs(times - 300)))
    assert np.abs(grey(rendered[quiet]).astype(int) - grey(frames[quiet])).mean() < 1.0
    apex = int(np.argmin(np.abs(times - 1200)))
    flow = cv2.calcOpticalFlowFarneback(grey(frames[apex]), grey(rendered[apex]), None,
                                        0.5, 3, 9, 3, 5, 1.1, 0)
    iod = float(track.iod()[apex])
    for corner in (61, 291):
        x, y = np.round(track.landmarks[apex, corner] - 0.5).astype(int)
        moved = float(np.hypot(*flow[y, x])) / iod * 100
        assert 2.0 <= moved <= 4.0, (corner, moved)
