"""Writers consume a run: a writer of one's own gets every frame and event, and nothing else is
written; the standard set writes the product's files."""

from __future__ import annotations

import pytest

from realtime_mer.analysis import analyze_video
from realtime_mer.pipeline import PipelineOptions
from realtime_mer.report import OUTPUT_FILES
from realtime_mer.writers import FinishedRun, RunWriter, report_writers


class Recorder(RunWriter):
    def __init__(self) -> None:
        self.frames: list[int] = []
        self.spotted_ids: list[int] = []
        self.events = []
        self.closed = 0
        self.finished: FinishedRun | None = None

    def spotted(self, event) -> None:
        self.spotted_ids.append(event.event_id)

    def event(self, event, feature_map) -> None:
        self.events.append(event)

    def frame(self, frame, result) -> None:
        self.frames.append(frame.index)

    def close(self) -> list[str]:
        self.closed += 1
        return ["a problem this writer met"]

    def finish(self, run: FinishedRun) -> None:
        self.finished = run


def test_a_writer_of_ones_own_gets_the_whole_run_and_nothing_is_written(media_dir, tmp_path,
                                                                        monkeypatch):
    monkeypatch.chdir(tmp_path)
    recorder = Recorder()
    result = analyze_video(media_dir / "WolfgangLanger_Pexels.mp4", writers=[recorder],
                           options=PipelineOptions(classify=False))
    assert list(tmp_path.iterdir()) == [] and result.out_dir is None
    assert recorder.frames == list(range(result.summary["frames"]["processed"]))
    assert recorder.events == result.events and result.events
    # every event but a blink is spotted before it is finished
    assert set(recorder.spotted_ids) >= {e.event_id for e in result.events}
    assert recorder.closed == 1
    # what a writer's close reports is a problem of the run, in the summary too
    assert "a problem this writer met" in result.problems
    assert recorder.finished.summary is result.summary
    assert recorder.finished.events == result.events
    assert not result.complete


def test_the_standard_writers_write_the_product_files(media_dir, tmp_path):
    writers = report_writers(tmp_path, regions=PipelineOptions().spotter.region_names)
    analyze_video(media_dir / "single_face.mp4", writers=writers,
                  options=PipelineOptions(classify=False))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(OUTPUT_FILES)


def test_no_folder_and_no_writers_is_refused(media_dir):
    with pytest.raises(ValueError, match="out_dir"):
        analyze_video(media_dir / "single_face.mp4")


def test_writers_of_ones_own_are_closed_when_the_input_is_not_a_video(tmp_path):
    from realtime_mer.errors import InputError

    recorder = Recorder()
    bad = tmp_path / "notes.mp4"
    bad.write_text("not a video")
    with pytest.raises(InputError):
        analyze_video(bad, writers=[recorder])
    assert recorder.closed == 1 and recorder.frames == []
    with pytest.raises(ValueError, match="AnnotatedVideo"):
        analyze_video(bad, writers=[Recorder()], annotated_video=True)


def test_an_annotated_video_that_cannot_be_written_is_a_problem_and_is_no_longer_timed(
        media_dir, tmp_path):
    from realtime_mer.capture import open_video
    from realtime_mer.pipeline import Pipeline
    from realtime_mer.writers import AnnotatedVideo

    video = AnnotatedVideo(tmp_path / "no such folder", fps_hint=30.0, face_ids=False)
    assert video.timing_stage == "annotate"
    with Pipeline(PipelineOptions(classify=False)) as pipeline, \
            open_video(media_dir / "single_face.mp4") as frames:
        for frame in frames:  # the file opens with the encoder's first packet: it fails then
            video.frame(frame, pipeline.process(frame))
    # given up: no "annotate" time in the summary for frames it no longer writes
    assert video.timing_stage is None
    problems = video.close()
    assert len(problems) == 1 and "could not write annotated.mp4" in problems[0]
