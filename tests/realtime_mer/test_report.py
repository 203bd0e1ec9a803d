"""Report writers: events.jsonl's two lines per event and how readers join them, spreadsheet-safe
CSV cells, and reports that are whole or absent."""

from __future__ import annotations

import csv

import pytest

from realtime_mer.report import (EventRecord, EventWriter, _atomic, read_events, write_csv,
                                 write_html)


def _event(event_id: int, classified: bool = True, source: str = "a.mp4") -> EventRecord:
    return EventRecord(onset_ms=100.0 * event_id, apex_ms=100.0 * event_id + 50,
                       offset_ms=100.0 * event_id + 90, duration_ms=90.0, kind="micro",
                       label="positive" if classified else "", confidence=0.9 if classified else 0,
                       probabilities={"positive": 0.9, "negative": 0.1} if classified else {},
                       peak=1.0, threshold=0.5, onset_frame=1, apex_frame=2, offset_frame=3,
                       source=source, event_id=event_id, classified=classified)


def test_readers_keep_the_last_line_of_each_event(tmp_path):
    path = tmp_path / "events.jsonl"
    with EventWriter(path) as writer:
        writer.write(_event(1, classified=False))   # spotted
        writer.write(_event(2, classified=False))   # spotted, never classified (interrupted)
        writer.write(_event(1))                     # classified
    with open(path, "a", encoding="utf-8") as handle:
        handle.write('{"onset_ms": 1')              # a line torn by a kill
    events = read_events(path)
    assert [(e.event_id, e.classified, e.label) for e in events] == [(1, True, "positive"),
                                                                     (2, False, "")]


def test_csv_cells_never_become_formulas(tmp_path):
    path = tmp_path / "events.csv"
    write_csv(path, [_event(1, source="=HYPERLINK(\"http://x\")"), _event(2, source="-2+3")],
              ["negative", "positive"])
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert rows[0]["source"] == "'=HYPERLINK(\"http://x\")" and rows[1]["source"] == "'-2+3"
    assert float(rows[0]["onset_ms"]) == 100.0  # numbers stay numbers


def test_a_report_is_whole_or_absent(tmp_path):
    target = tmp_path / "report.html"
    target.write_text("the earlier, whole report")
    with pytest.raises(OSError):
        with _atomic(target) as tmp:
            tmp.write_text("half a rep")
            raise OSError(28, "No space left on device")
    assert target.read_text() == "the earlier, whole report"
    assert list(tmp_path.iterdir()) == [target]  # no temporary file left behind
    write_html(target, {"events": {"micro": 1}}, [_event(1)])
    assert target.read_text().rstrip().endswith("</html>")
