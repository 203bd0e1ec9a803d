"""Adapters for the raw micro-expression databases (CASME II, SAMM, SMIC-HS, CAS(ME)³ part A);
their preprocessing into a cache of network inputs is :mod:`training.data.preprocess`.

The published 3DB maps (:mod:`training.data.megc3db`) were made by someone else's code; the live
pipeline makes its maps with :func:`realtime_mer.features.flow_strain_map`. Preprocessing the raw
databases with that same function (and, with ``align=True``, the live face alignment) gives
training data with exactly the live pipeline's features. Layouts assumed: ``training/data/README.md``.

An adapter reads the annotation sheet and the folder tree and validates everything it will use
(folders, sheet columns, every referenced frame, that the onset/apex/offset images decode)
before any flow is computed, so a broken copy fails at once with one
:class:`~realtime_mer.errors.DatasetError` that names the rows and files. Emotions are mapped to
the three classes of MEGC2019 (negative / positive / surprise); the rest are dropped and counted
in :attr:`RawAdapter.report`.

"""

from __future__ import annotations

import csv
import logging
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Sequence

import cv2
import numpy as np

from realtime_mer.capture import IMAGE_SUFFIXES
from realtime_mer.errors import DatasetError

log = logging.getLogger(__name__)

__all__ = [
    "CLASS_NAMES", "EMOTION_CLASSES", "KINDS", "RAW_DATABASES", "RawSample", "RawReport",
    "RawAdapter", "Casme2Adapter", "SammAdapter", "SmicAdapter", "Casme3Adapter",
    "make_adapter", "read_sheet", "estimate_apex", "load_frame",
]

CLASS_NAMES = ("negative", "positive", "surprise")
RAW_DATABASES = ("casme2", "samm", "smic", "casme3")
KINDS = ("map28", "colour224", "stack16", "phases28")
APEX_METHODS = ("max_flow", "middle")
CACHE_VERSION = 1

# MEGC2019's composite 3-class split: each database's own emotion names, lower case. Anything
# not listed is dropped (and counted). CASME II's fear and sadness are dropped like MEGC2019
# did (too few samples; they went to "others" there). CAS(ME)³: the same principle as SAMM,
# every negative basic emotion is negative; its "others" are dropped.
EMOTION_CLASSES: dict[str, dict[str, int]] = {
    "casme2": {"disgust": 0, "repression": 0, "happiness": 1, "surprise": 2},
    "samm": {"anger": 0, "contempt": 0, "disgust": 0, "fear": 0, "sadness": 0,
             "happiness": 1, "surprise": 2},
    "smic": {"negative": 0, "positive": 1, "surprise": 2},
    "casme3": {"anger": 0, "disgust": 0, "fear": 0, "sad": 0, "sadness": 0,
               "happy": 1, "happiness": 1, "surprise": 2},
}

# Sheet columns by role; header cells are compared lower-cased with spaces/punctuation removed,
# so "OnsetFrame", "Onset Frame" and "onset_frame" are one name.
SHEET_COLUMNS: dict[str, tuple[str, ...]] = {
    "subject": ("subject",),
    "video": ("filename",),
    "onset": ("onsetframe", "onset"),
    "apex": ("apexframe", "apex"),
    "offset": ("offsetframe", "offset"),
    "emotion": ("estimatedemotion", "emotion"),
}

_MAX_PROBLEMS = 10
_MISSING = {"", "/", "-", "n/a", "na", "none", "nan"}


def _norm(name: object) -> str:
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _frame_number(path: Path) -> int | None:
    digits = re.findall(r"\d+", path.stem)
    return int(digits[-1]) if digits else None


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


@dataclass(frozen=True)
class RawSample:
    """One annotated micro-expression.

    Frame numbers are the numbers in the frame files' names (``img46.jpg`` → 46), the numbering
    the sheets use. ``frames`` holds the paths of every frame from onset to offset (to the apex
    when the offset is not annotated, to the folder's last frame when neither is), in order,
    with their numbers in ``frame_numbers``. ``apex`` is None until estimated when the database
    has no apex annotation (SMIC) or the row lacks one; ``apex_source`` says which: "annotated",
    "max_flow", "middle".
    ``label``: 0 negative, 1 positive, 2 surprise. ``sample_id`` is unique within the database
    and safe as a file name (``<subject>_<video>``, plus ``_<onset>`` where a video holds
    several samples).
    """

    database: str
    subject: str
    video: str
    sample_id: str
    emotion: str
    label: int
    onset: int
    apex: int | None
    offset: int | None
    frames: tuple[str, ...]
    frame_numbers: tuple[int, ...]
    apex_source: str
    source: str  # where the annotation came from ("sheet.csv line 5", a folder)

    @property
    def class_name(self) -> str:
        return CLASS_NAMES[self.label]

    def path_of(self, number: int) -> str:
        try:
            return self.frames[self.frame_numbers.index(number)]
        except ValueError:
            raise KeyError(f"{self.sample_id}: frame {number} is not in the sample") from None

    @property
    def onset_path(self) -> str:
        return self.path_of(self.onset)

    @property
    def apex_path(self) -> str:
        if self.apex is None:
            raise ValueError(f"{self.sample_id}: apex not estimated yet (RawAdapter.resolve_apex)")
        return self.path_of(self.apex)

    @property
    def megc_key(self) -> tuple[str, str, str]:
        """(database, subject, video) spelt as in the MEGC2019 list / 3DB ``labels.csv``
        (SMIC subjects zero-padded there: ``s3`` → ``s03``, ``s3_po_11`` → ``s03_po_11``)."""
        subject, video = self.subject, self.video
        if self.database == "smic":
            m = re.fullmatch(r"s(\d+)", subject)
            if m:
                padded = f"s{int(m.group(1)):02d}"
                video = re.sub(rf"^{re.escape(subject)}_", f"{padded}_", video)
                subject = padded
        return self.database, subject, video


@dataclass
class RawReport:
    """What an adapter found: annotation rows read, samples kept per class, rows dropped per
    emotion (the emotion names as written), apexes to estimate, offsets missing."""

    database: str
    rows: int = 0
    kept: int = 0
    class_counts: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    apex_estimated: int = 0
    offset_missing: int = 0

    def summary(self) -> str:
        classes = ", ".join(f"{k} {v}" for k, v in self.class_counts.items())
        dropped = ", ".join(f"{k} {v}" for k, v in sorted(self.dropped.items())) or "none"
        return (f"{self.database}: {self.rows} rows, {self.kept} kept ({classes}); dropped: "
                f"{dropped}; apex to estimate: {self.apex_estimated}; "
                f"offset missing: {self.offset_missing}")


def load_frame(path: str | Path) -> np.ndarray:
    """Read a frame as uint8 BGR (greyscale files give three equal channels).
    Raises DatasetError when the file is missing or does not decode."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        what = "is missing" if not Path(path).is_file() else "cannot be read as an image"
        raise DatasetError(f"frame {path} {what}")
    return image


def read_sheet(path: str | Path, required: Iterable[str] = tuple(SHEET_COLUMNS)
               ) -> list[tuple[int, dict[str, str]]]:
    """Read an annotation sheet (CSV; .xlsx when openpyxl is installed).

    The header row is the first row (of the first 50) holding a column for every role in
    ``required`` (see :data:`SHEET_COLUMNS`), so title rows above it (SAMM's sheet has some)
    are skipped. Returns ``(line number, {role: cell text})`` per non-empty row below it.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"annotation sheet {path} is missing")
    required = tuple(required)
    suffix = path.suffix.lower()
    if suffix in (".xlsx", ".xlsm"):
        try:
            import openpyxl
        except ImportError:
            raise DatasetError(
                f"{path}: reading .xlsx needs openpyxl, which is not installed; save the "
                f"sheet as CSV (UTF-8) and pass that") from None
        try:
            book = openpyxl.load_workbook(path, read_only=True, data_only=True)
            table = [[_cell(c) for c in row] for row in book.worksheets[0].iter_rows(
                values_only=True)]
        except Exception as exc:  # any reader failure is a broken sheet
            raise DatasetError(f"{path}: cannot read the workbook ({exc})") from exc
    else:
        try:
            with path.open(newline="", encoding="utf-8-sig") as fh:
                table = [[c.strip() for c in row] for row in csv.reader(fh)]
        except UnicodeDecodeError as exc:
            raise DatasetError(f"{path}: not a UTF-8 CSV file ({exc})") from exc
        except csv.Error as exc:
            raise DatasetError(f"{path}: malformed CSV ({exc})") from exc

    for h, header in enumerate(table[:50]):
        names = [_norm(c) for c in header]
        cols: dict[str, int] = {}
        for role in required:
            for alias in SHEET_COLUMNS[role]:
                if alias in names:
                    cols[role] = names.index(alias)
                    break
        if len(cols) == len(required):
            break
    else:
        first = next((r for r in table if any(r)), [])
        names = [_norm(c) for c in first]
        missing = [" / ".join(SHEET_COLUMNS[role]) for role in required
                   if not any(a in names for a in SHEET_COLUMNS[role])]
        raise DatasetError(
            f"{path}: missing column(s) {missing} (names compared without case, spaces or "
            f"punctuation); the first row is {first}")
    rows = []
    for i, row in enumerate(table[h + 1:], start=h + 2):
        if not any(row):
            continue
        rows.append((i, {role: (row[c] if c < len(row) else "") for role, c in cols.items()}))
    if not rows:
        raise DatasetError(f"{path}: no rows below the header (line {h + 1})")
    return rows


def _int_or_none(text: str) -> int | None:
    """Frame number cell: None when blank or a placeholder ("/"), ValueError when not a number."""
    text = text.strip()
    if text.lower() in _MISSING:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(repr(text)) from None
    if not value.is_integer() or value < 0:
        raise ValueError(repr(text))
    return int(value)


def _estimator(flow: object):
    from realtime_mer.flow import create_flow

    return create_flow(flow) if isinstance(flow, str) else flow


def estimate_apex(frames: Sequence[np.ndarray | str | Path], method: str = "max_flow",
                  flow: object = "dis", size: int = 128) -> int:
    """Index into ``frames`` (onset first) of the apex.

    ``"max_flow"``: the frame whose flow from the onset frame has the largest mean magnitude
    (frames greyscaled and resized to ``size``² first; ``flow`` a
    :func:`realtime_mer.flow.create_flow` name or an estimator; DIS by default, a few ms per
    pair). ``"middle"``: the middle frame. Frames are arrays or paths.
    """
    if method not in APEX_METHODS:
        raise ValueError(f"apex method must be one of {APEX_METHODS}; got {method!r}")
    n = len(frames)
    if n < 2:
        raise ValueError(f"need at least 2 frames to find an apex; got {n}")
    if method == "middle":
        return n // 2

    def grey(f) -> np.ndarray:
        img = load_frame(f) if isinstance(f, (str, Path)) else np.asarray(f)
        if img.ndim == 3:
            img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
        return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)

    estimator = _estimator(flow)
    onset = grey(frames[0])
    scores = [0.0]
    for f in frames[1:]:
        uv = np.asarray(estimator.compute(onset, grey(f)), dtype=np.float32)
        scores.append(float(np.sqrt((uv * uv).sum(axis=-1)).mean()))
    return int(np.argmax(scores))


class RawAdapter:
    """Base of the database adapters. ``samples()`` validates and returns the kept samples
    (cached after the first call); ``report`` says what was kept and dropped;
    ``resolve_apex(sample)`` fills in an apex the annotation lacks.

    apex: how a missing apex is estimated (``"max_flow"`` or ``"middle"``), with the flow
    ``apex_flow`` at ``apex_size``² (see :func:`estimate_apex`).
    check_images: decode each sample's onset, apex and offset frames during validation.
    """

    database = ""

    def __init__(self, root: str | Path, *, apex: str = "max_flow", apex_flow: str = "dis",
                 apex_size: int = 128, check_images: bool = True) -> None:
        if apex not in APEX_METHODS:
            raise ValueError(f"apex method must be one of {APEX_METHODS}; got {apex!r}")
        self.root = Path(root)
        self.apex_method = apex
        self.apex_flow = apex_flow
        self.apex_size = apex_size
        self.check_images = check_images
        self.report = RawReport(self.database)
        self._samples: list[RawSample] | None = None
        self._folders: dict[Path, dict[int, Path]] = {}

    @property
    def apex_settings(self) -> dict:
        """What an estimated apex depends on (part of the cache key)."""
        return {"method": self.apex_method, "flow": self.apex_flow, "size": self.apex_size}

    def samples(self) -> list[RawSample]:
        if self._samples is None:
            if not self.root.is_dir():
                raise DatasetError(f"{self.database} folder {self.root} does not exist")
            self.report = RawReport(self.database)
            problems: list[str] = []
            found = self._collect(problems)
            if not problems and not found:
                problems.append("no samples of the three classes were found")
            if not problems and self.check_images:
                for s in found:
                    for number in {s.onset, s.apex, s.offset} - {None}:
                        path = s.path_of(number)
                        if cv2.imread(path, cv2.IMREAD_COLOR) is None:
                            problems.append(f"{s.source}: frame {path} cannot be read as an "
                                            f"image")
                    if len(problems) >= _MAX_PROBLEMS:
                        break
            if problems:
                raise DatasetError(f"{self.database} at {self.root} is inconsistent:\n  "
                                   + "\n  ".join(problems[:_MAX_PROBLEMS]))
            self._samples = _unique_ids(found)
            counts = Counter(s.label for s in self._samples)
            self.report.kept = len(self._samples)
            self.report.class_counts = {c: counts.get(i, 0) for i, c in enumerate(CLASS_NAMES)}
            self.report.apex_estimated = sum(s.apex is None for s in self._samples)
            log.info("%s", self.report.summary())
        return list(self._samples)

    def __len__(self) -> int:
        return len(self.samples())

    def __iter__(self):
        return iter(self.samples())

    def resolve_apex(self, sample: RawSample) -> RawSample:
        """The sample with its apex estimated (unchanged when annotated)."""
        if sample.apex is not None:
            return sample
        i = estimate_apex(sample.frames, self.apex_method, self.apex_flow, self.apex_size)
        return replace(sample, apex=sample.frame_numbers[i])

    # --- helpers for subclasses
    def _collect(self, problems: list[str]) -> list[RawSample]:
        raise NotImplementedError

    def _folder(self, folder: Path) -> dict[int, Path]:
        """Frame number → path of the images in ``folder`` (DatasetError on a repeated
        number)."""
        index = self._folders.get(folder)
        if index is None:
            index = {}
            for p in sorted(folder.iterdir()):
                if p.suffix.lower() not in IMAGE_SUFFIXES or not p.is_file():
                    continue
                n = _frame_number(p)
                if n is None:
                    continue
                if n in index:
                    raise DatasetError(f"{folder}: {index[n].name} and {p.name} both have "
                                       f"frame number {n}")
                index[n] = p
            self._folders[folder] = index
        return index

    def _map_emotion(self, emotion: str) -> int | None:
        label = EMOTION_CLASSES[self.database].get(emotion.strip().lower())
        if label is None:
            key = emotion.strip() or "(blank)"
            self.report.dropped[key] = self.report.dropped.get(key, 0) + 1
        return label


def _unique_ids(samples: list[RawSample]) -> list[RawSample]:
    base = Counter(f"{s.subject}_{s.video}" for s in samples)
    out = []
    for s in samples:
        sid = f"{s.subject}_{s.video}"
        if base[sid] > 1:
            sid = f"{sid}_{s.onset}"
        out.append(replace(s, sample_id=_safe(sid)))
    ids = Counter(s.sample_id for s in out)
    dup = [s for s in out if ids[s.sample_id] > 1]
    if dup:
        raise DatasetError(f"{dup[0].database}: sample {dup[0].sample_id} is annotated twice "
                           f"({', '.join(s.source for s in dup[:4])})")
    return out


class _SheetAdapter(RawAdapter):
    """Databases with a coding sheet: subject, filename, onset/apex/offset frame, emotion."""

    def __init__(self, root: str | Path, sheet: str | Path, **kwargs) -> None:
        super().__init__(root, **kwargs)
        self.sheet = Path(sheet)

    def _subject_folder(self, subject: str) -> str:
        raise NotImplementedError

    def _video_folder(self, subject_dir: Path, video: str) -> Path:
        return subject_dir / video

    def _collect(self, problems: list[str]) -> list[RawSample]:
        rows = read_sheet(self.sheet)
        self.report.rows = len(rows)
        out = []
        for line, row in rows:
            if len(problems) >= _MAX_PROBLEMS:
                break
            where = f"{self.sheet.name} line {line}"
            label = self._map_emotion(row["emotion"])
            if label is None:
                continue
            subject_cell, video = row["subject"].strip(), row["video"].strip()
            if not subject_cell or not video:
                problems.append(f"{where}: empty subject or filename")
                continue
            try:
                subject = self._subject_folder(subject_cell)
            except ValueError:
                problems.append(f"{where}: subject {subject_cell!r} is not a subject id")
                continue
            numbers: dict[str, int | None] = {}
            for role in ("onset", "apex", "offset"):
                try:
                    numbers[role] = _int_or_none(row[role])
                except ValueError as exc:
                    problems.append(f"{where}: {role} frame {exc} is not a whole number >= 0")
            if len(numbers) < 3:
                continue
            onset, apex, offset = numbers["onset"], numbers["apex"], numbers["offset"]
            if onset is None:
                problems.append(f"{where}: no onset frame")
                continue
            if offset is not None and offset < onset and offset == 0:
                offset = None  # CASME II writes 0 for an offset it did not code
            if offset is None:
                self.report.offset_missing += 1
            if apex is not None and not onset <= apex <= (offset if offset is not None
                                                          else apex):
                problems.append(f"{where}: frames out of order (onset {onset}, apex {apex}, "
                                f"offset {offset})")
                continue
            if offset is not None and offset < onset:
                problems.append(f"{where}: offset {offset} before onset {onset}")
                continue
            folder = self._video_folder(self.root / subject, video)
            if not folder.is_dir():
                problems.append(f"{where}: video folder {folder} does not exist")
                continue
            sample = self._sample(folder, subject, video, row["emotion"].strip(), label,
                                  onset, apex, offset, where, problems)
            if sample is not None:
                out.append(sample)
        return out

    def _sample(self, folder: Path, subject: str, video: str, emotion: str, label: int,
                onset: int, apex: int | None, offset: int | None, where: str,
                problems: list[str]) -> RawSample | None:
        index = self._folder(folder)
        absent = [n for n in (onset, apex, offset) if n is not None and n not in index]
        if absent:
            problems.append(f"{where}: frame(s) {absent} not in {folder} "
                            f"(it holds {len(index)} numbered images)")
            return None
        last = offset if offset is not None else (apex if apex is not None
                                                  else max(index))
        numbers = tuple(n for n in sorted(index) if onset <= n <= last)
        if apex is None and len(numbers) < 2:
            problems.append(f"{where}: no apex annotated and fewer than 2 frames from the "
                            f"onset {onset} in {folder} to estimate one")
            return None
        return RawSample(
            database=self.database, subject=subject, video=video, sample_id="",
            emotion=emotion, label=label, onset=onset, apex=apex, offset=offset,
            frames=tuple(str(index[n]) for n in numbers), frame_numbers=numbers,
            apex_source="annotated" if apex is not None else self.apex_method, source=where)


class Casme2Adapter(_SheetAdapter):
    """CASME II: ``ROOT/sub01/EP02_01f/img46.jpg`` (the cropped release's ``reg_img46.jpg``
    works too: frame numbers are the last number in a name); sheet columns Subject (1, 01 or
    sub01), Filename, OnsetFrame, ApexFrame, OffsetFrame, Estimated Emotion. An apex of "/" is
    estimated, an offset of 0 is taken as not coded."""

    database = "casme2"

    def _subject_folder(self, subject: str) -> str:
        if subject.lower().startswith("sub"):
            return subject
        return f"sub{int(float(subject)):02d}"


class SammAdapter(_SheetAdapter):
    """SAMM: ``ROOT/006/006_1_2/006_05562.jpg``; sheet columns Subject (6 or 006), Filename,
    Onset Frame, Apex Frame, Offset Frame, Estimated Emotion (title rows above the header are
    skipped)."""

    database = "samm"

    def _subject_folder(self, subject: str) -> str:
        return f"{int(float(subject)):03d}"


class Casme3Adapter(_SheetAdapter):
    """CAS(ME)³ part A: ``ROOT/spNO.1/a/color/123.jpg`` (``ROOT`` is the folder holding the
    ``spNO.*`` folders; a video folder without ``color/`` holding the frames itself works too);
    sheet columns Subject (spNO.1 or 1), Filename (a, b, ...), Onset, Apex, Offset, emotion
    (the ``..._ME_label_JpgIndex`` sheet, frame numbers = jpg index). A video may hold several
    samples; their ids get ``_<onset>`` appended."""

    database = "casme3"

    def _subject_folder(self, subject: str) -> str:
        if re.fullmatch(r"\d+(\.0)?", subject):
            return f"spNO.{int(float(subject))}"
        return subject

    def _video_folder(self, subject_dir: Path, video: str) -> Path:
        colour = subject_dir / video / "color"
        return colour if colour.is_dir() else subject_dir / video


class SmicAdapter(RawAdapter):
    """SMIC-HS: ``ROOT/HS/s1/micro/negative/s1_ne_01/image0123456.bmp`` (``ROOT`` may also be
    the ``HS`` folder itself). No sheet: the class is the emotion folder (negative, positive,
    surprise), the clip folder spans onset → offset (first and last frame), and there is no apex
    annotation: it is estimated by ``smic_apex`` (``"max_flow"``: largest mean flow magnitude
    from the onset, with ``apex_flow``; ``"middle"``: middle frame)."""

    database = "smic"

    def __init__(self, root: str | Path, *, smic_apex: str = "max_flow", **kwargs) -> None:
        kwargs.setdefault("apex", smic_apex)
        super().__init__(root, **kwargs)

    def _hs(self) -> Path:
        if (self.root / "HS").is_dir():
            return self.root / "HS"
        if any(self.root.glob("s*/micro")):
            return self.root
        raise DatasetError(f"smic folder {self.root} has no HS/ folder (expected "
                           f"HS/s1/micro/negative/s1_ne_01/image*.bmp)")

    def _collect(self, problems: list[str]) -> list[RawSample]:
        hs = self._hs()
        out = []
        subjects = sorted((p for p in hs.iterdir() if p.is_dir() and (p / "micro").is_dir()),
                          key=lambda p: (_frame_number(p) or 0, p.name))
        for subj in subjects:
            for emo_dir in sorted(p for p in (subj / "micro").iterdir() if p.is_dir()):
                for clip in sorted(p for p in emo_dir.iterdir() if p.is_dir()):
                    if len(problems) >= _MAX_PROBLEMS:
                        return out
                    self.report.rows += 1
                    label = self._map_emotion(emo_dir.name)
                    if label is None:
                        continue
                    index = self._folder(clip)
                    if len(index) < 2:
                        problems.append(f"{clip}: {len(index)} numbered image(s); a clip "
                                        f"needs onset and offset frames")
                        continue
                    numbers = tuple(sorted(index))
                    out.append(RawSample(
                        database="smic", subject=subj.name, video=clip.name, sample_id="",
                        emotion=emo_dir.name, label=label, onset=numbers[0], apex=None,
                        offset=numbers[-1], frames=tuple(str(index[n]) for n in numbers),
                        frame_numbers=numbers, apex_source=self.apex_method,
                        source=str(clip)))
        return out


def make_adapter(database: str, root: str | Path, sheet: str | Path | None = None,
                 **kwargs) -> RawAdapter:
    """Adapter by database name (:data:`RAW_DATABASES`); ``sheet`` is required except for
    SMIC. kwargs: see :class:`RawAdapter` (``smic_apex`` for SMIC)."""
    if database == "smic":
        return SmicAdapter(root, **kwargs)
    kwargs.pop("smic_apex", None)
    classes = {"casme2": Casme2Adapter, "samm": SammAdapter, "casme3": Casme3Adapter}
    if database not in classes:
        raise ValueError(f"unknown database {database!r}; choose from {RAW_DATABASES}")
    if sheet is None:
        raise DatasetError(f"{database} needs its annotation sheet (--sheet)")
    return classes[database](root, sheet, **kwargs)


# ----------------------------------------------------------------------------- preprocessing
