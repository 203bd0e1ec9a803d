"""Every face tracked apart (--faces all) on real faces: a group photo, two real talking videos
side by side, a small one-person video, a face that leaves and comes back."""

from __future__ import annotations

import csv
import json

import cv2
import numpy as np
import pytest

from realtime_mer.analysis import analyze_video
from realtime_mer.cli import main
from realtime_mer.pipeline import PipelineOptions
from realtime_mer.tracks import FaceTracker

from benchmarks.side_by_side import matched, padded, read_frames, write_lossless
from tests.realtime_mer.pinned import assert_events_pinned

SPOTTING_ONLY = PipelineOptions(classify=False)
FRAMES = 180  # of each side-by-side video: 6 s, a dozen events between the two faces
ALL_FACES = PipelineOptions(classify=False, faces="all")


def test_every_face_of_a_group_photo_gets_its_own_id(media_dir, tmp_path):
    """multi_face.jpg (five people, eyes 35-45 px apart) as a one-frame video: five faces, ids
    1-5, drawn with their ids in the annotated video and listed in the summary."""
    image = cv2.imread(str(media_dir / "multi_face.jpg"))
    video = tmp_path / "group.mp4"
    write_lossless(video, [image[:image.shape[0] // 2 * 2, :image.shape[1] // 2 * 2]])
    out = tmp_path / "out"
    assert main(["analyze", str(video), "--out", str(out), "--faces", "all", "--video",
                 "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    tracked = summary["faces"]["tracked"]
    assert [face["face_id"] for face in tracked] == [1, 2, 3, 4, 5]
    assert all(face["frames"] == 1 for face in tracked)
    assert summary["faces"]["ignored"] == {"too_small": 0, "short_lived": 0, "duplicates": 0}
    boxes = []
    with FaceTracker() as tracker:
        faces, _ = tracker.process(image, 0.0)
        boxes = [f.face.box_xyxy for f in faces]
    assert len(boxes) == 5
    # five separate people: no two boxes overlap
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert min(a[2], b[2]) <= max(a[0], b[0]) or min(a[3], b[3]) <= max(a[1], b[1])
    annotated = read_frames(out / "annotated.mp4")
    assert len(annotated) == 1
    # each face's box is drawn: the annotated frame differs from the input along every box
    for x0, y0, x1, y1 in boxes:
        edge = annotated[0][int(y0):int(y1), max(int(x0) - 1, 0):int(x0) + 2]
        assert np.abs(edge.astype(int) - image[int(y0):int(y1),
                                               max(int(x0) - 1, 0):int(x0) + 2]).mean() > 20
    assert "Faces tracked: 5" in (out / "report.html").read_text()


@pytest.fixture(scope="module")
def side_by_side(media_dir, tmp_path_factory):
    """Two real talking videos (d3, d9) side by side, and each half alone, written losslessly
    from the same pixels; the side-by-side one analysed with every face tracked, the halves
    with the largest face."""
    folder = tmp_path_factory.mktemp("side_by_side")
    left = read_frames(media_dir / "talking" / "d3.mp4", limit=FRAMES)
    right = [padded(image, 512, 512)
             for image in read_frames(media_dir / "talking" / "d9.mp4", limit=FRAMES)]
    write_lossless(folder / "left.mp4", left)
    write_lossless(folder / "right.mp4", right)
    write_lossless(folder / "both.mp4", [np.hstack([a, b]) for a, b in zip(left, right)])
    runs = {name: analyze_video(folder / f"{name}.mp4", folder / name,
                                options=ALL_FACES if name == "both" else SPOTTING_ONLY)
            for name in ("left", "right", "both")}
    return folder, runs


def test_two_people_side_by_side_get_two_tracks_with_their_own_events(side_by_side):
    folder, runs = side_by_side
    both = runs["both"]
    tracked = both.summary["faces"]["tracked"]
    assert [(f["face_id"], f["frames"]) for f in tracked] == [(1, FRAMES), (2, FRAMES)]
    # The ids stay with the people: face 1 is d3 (the larger face, left), face 2 is d9.
    with open(folder / "both" / "trace.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted({row["face_id"] for row in rows}) == ["1", "2"]
    assert len(rows) == 2 * FRAMES
    assert both.summary["faces"]["tracked"][0]["median_eye_distance_px"] > \
        both.summary["faces"]["tracked"][1]["median_eye_distance_px"]
    for face_id, half in ((1, "left"), (2, "right")):
        own = [e for e in both.events if e.face_id == face_id]
        alone = runs[half].events
        assert alone, half
        found, kept = matched(alone, own), matched(own, alone)
        print(f"face {face_id}: {found} of {len(alone)} events of its half alone found, "
              f"{kept} of {len(own)} matched (onsets within 40 ms)")
        # Each face's landmarks differ from its half's by hundredths of a pixel (the face stage
        # sees a window of the wide frame, not the half): every event must still agree.
        assert found == len(alone) and kept == len(own)
    # per face in every output: the CSV's face_id column, the report's sections
    with open(folder / "both" / "events.csv", newline="") as handle:
        assert {row["face_id"] for row in csv.DictReader(handle)} == {"1", "2"}
    page = (folder / "both" / "report.html").read_text()
    assert "Face 1: events" in page and "Face 2: events" in page


def test_every_face_gives_the_pinned_events(side_by_side):
    """Both faces' events, field for field as pinned (see tests/realtime_mer/pinned.py)."""
    _, runs = side_by_side
    assert_events_pinned("side_by_side_all_faces", runs["both"].events)
    assert_events_pinned("side_by_side_left_half", runs["left"].events)


def test_a_small_one_person_video_is_one_face(media_dir, tmp_path):
    """A real one-person video at 176x144 (QCIF, a video-call camera's size): one track, no
    spurious second face."""
    images = [cv2.resize(image, (144, 144), interpolation=cv2.INTER_AREA)
              for image in read_frames(media_dir / "talking" / "d9.mp4", limit=90)]
    canvas = [np.pad(image, ((0, 0), (16, 16), (0, 0))) for image in images]
    video = tmp_path / "qcif.mp4"
    write_lossless(video, canvas)
    result = analyze_video(video, tmp_path / "out", options=ALL_FACES)
    assert [f["face_id"] for f in result.summary["faces"]["tracked"]] == [1]
    assert result.summary["faces"]["tracked"][0]["frames"] >= 85
    assert all(e.face_id == 1 for e in result.events)


def test_a_face_that_leaves_keeps_its_id_and_a_newcomer_gets_the_next(media_dir):
    """d3 alone; d9 comes in on the right (face 2); d3 fades out for half a second (a gradual
    change, as when a person leaves, not a cut) and comes back: face 1 again, not a third
    face."""
    left = read_frames(media_dir / "talking" / "d3.mp4", limit=120)
    right = [padded(image, 512, 512) for image in read_frames(media_dir / "talking" / "d9.mp4",
                                                            limit=120)]
    blank = np.zeros_like(right[0])
    ids_per_frame = []
    with FaceTracker() as tracker:
        for i in range(120):
            # d3 fades to a plain picture by frame 70 and back from frame 85
            shown = min(max((65 - i) / 5, (i - 85) / 5, 0.0), 1.0)
            a = cv2.addWeighted(left[i], shown, np.full_like(left[i], 110), 1 - shown, 0)
            # d9 fades in over half a second, as a person who walks in (not a cut)
            b = cv2.addWeighted(right[i], min(max((i - 30) / 15, 0.0), 1.0), blank, 0, 0)
            faces, _ = tracker.process(np.hstack([a, b]), i * 1000.0 / 30)
            ids_per_frame.append({f.face_id: f.face.box_xyxy[0] < 512 for f in faces})
    assert ids_per_frame[10] == {1: True}
    assert ids_per_frame[60] == {1: True, 2: False}
    assert ids_per_frame[78] == {2: False}
    assert ids_per_frame[110] == {1: True, 2: False}
    assert set().union(*ids_per_frame) == {1, 2}


def test_faces_option_is_checked():
    with pytest.raises(ValueError, match="faces must be one of"):
        PipelineOptions(faces="every")


def test_two_people_cut_between_at_one_spot_never_share_an_id(media_dir):
    """An edited interview: d3 and d14 (two women, the same framing) alternate every second at
    the same place. Their place, size and proportions are alike, so across a hard cut a face
    gets a new id rather than another person's."""
    first = read_frames(media_dir / "talking" / "d3.mp4", limit=120)
    second = read_frames(media_dir / "talking" / "d14.mp4", limit=120)
    segments: dict[int, set[int]] = {}
    with FaceTracker() as tracker:
        for i in range(120):
            image = first[i] if (i // 30) % 2 == 0 else second[i]
            faces, _ = tracker.process(image, i * 1000.0 / 30)
            for face in faces:
                segments.setdefault(face.face_id, set()).add(i // 30)
    assert len(segments) >= 4  # each of the four shots has its own face
    assert all(len(shots) == 1 for shots in segments.values()), segments


def test_a_face_gone_for_good_frees_its_state_and_keeps_its_counts(media_dir):
    """A face that fades out and stays away longer than the tracker waits for it: its buffer
    and spotter are let go (memory does not grow with the ids of a long session) and its frames
    still count in the summary."""
    from realtime_mer.capture import Frame
    from realtime_mer.pipeline import Pipeline

    images = read_frames(media_dir / "talking" / "d3.mp4", limit=40)
    plain = np.full_like(images[0], 110)
    with Pipeline(ALL_FACES) as pipeline:
        for i in range(40 + 120):  # 40 frames of the face, then 4 s without it
            shown = min(max((35 - i) / 5, 0.0), 1.0)
            image = cv2.addWeighted(images[min(i, 39)], shown, plain, 1 - shown, 0)
            pipeline.process(Frame(t_ms=i * 1000.0 / 30, image_bgr=image, index=i))
        assert 1 not in pipeline.tracks and 1 in pipeline.retired
        tracked = pipeline.faces_summary()["tracked"]
        assert [face["face_id"] for face in tracked] == [1] and tracked[0]["frames"] >= 30
