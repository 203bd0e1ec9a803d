"""The event record: one spotted expression or blink as the product reports it, with its times,
frames, class and probabilities, regions and size. The pipeline makes them; the report, the demo
and the batch index read them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["EventRecord"]


@dataclass(frozen=True)
class EventRecord:
    """One spotted expression, as reported. Times in milliseconds from the first frame."""

    onset_ms: float
    apex_ms: float
    offset_ms: float
    duration_ms: float
    kind: str  # "micro" (≤ 0.5 s and ≤ 5 % of the eye distance), "macro", or "blink"
    label: str  # class name with the highest probability ("" for a blink)
    confidence: float  # that probability
    probabilities: dict[str, float]
    peak: float  # the main region's spotting value at the apex (% of the eye distance)
    threshold: float  # that region's threshold when the event was found
    onset_frame: int
    apex_frame: int
    offset_frame: int
    source: str = ""
    regions: list[str] = field(default_factory=list)  # the regions that moved, main one first
    amplitude_pct: float = 0.0  # the movement's size, % of the eye distance
    floor_pct: float = 0.0  # the smallest movement the spotter could report there and then
    truncated: bool = False  # the input (or the face) ended while the event was open
    speech: bool = False  # the person was talking during the event
    # The event's number in its run (1, 2, ...). events.jsonl gets a line the moment an event is
    # spotted (classified False, no class yet) and a second line with the same event_id when its
    # class is known: readers keep the last line of each event_id (read_events does).
    event_id: int = 0
    classified: bool = True
    # Whose face moved: the face's id for the whole input (1 when only the subject is tracked).
    face_id: int = 1

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
