"""The MEGC2019 composite ("3DB") set of published 28×28 (u, v, strain) flow maps.

The folder holds ``labels.csv`` (database, subject, video, label, class, flow_file) and
``flow/*.png``, and may hold ``landmarks5.csv`` (five facial points per sample in the maps'
28×28 frame, for the input kinds that locate facial regions). Everything is validated before any array is built, so a broken copy fails with
one clear :class:`~realtime_mer.errors.DatasetError` instead of a shape error deep in training.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from realtime_mer.errors import DatasetError

CLASS_NAMES = ("negative", "positive", "surprise")
DATABASES = ("smic", "casme2", "samm")
REQUIRED_COLUMNS = ("database", "subject", "video", "label", "class", "flow_file")
# The published set: checked by default so a partial copy is not silently trained on.
EXPECTED_SAMPLES = 442
EXPECTED_SUBJECTS = 68
EXPECTED_CLASS_COUNTS = (250, 109, 83)


def _load_map(path: Path) -> np.ndarray:
    # The same reader as the live pipeline's features (a design rule): one definition of the
    # channel order and scaling.
    from realtime_mer.features import load_3db_map

    return load_3db_map(path)


@dataclass(frozen=True)
class Megc3DB:
    """Arrays of the whole set, in ``labels.csv`` order.

    x: (N, 3, 28, 28) float32 in [0, 1], channels (u, v, strain); y: (N,) int64 in {0, 1, 2};
    subjects: (N,) str, made unique across databases as ``"<database>/<subject>"``;
    databases: (N,) str in :data:`DATABASES`; videos: (N,) str; files: (N,) str (absolute paths);
    landmarks: (N, 5, 2) float64 (x, y) in the maps' frame from ``landmarks5.csv``, NaN where
    no face was found, or None when the folder has no such file.
    """

    x: np.ndarray
    y: np.ndarray
    subjects: np.ndarray
    databases: np.ndarray
    videos: np.ndarray
    files: np.ndarray
    root: str
    landmarks: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def subject_list(self) -> list[str]:
        """Unique subjects in first-appearance order (the LOSO fold order)."""
        seen: dict[str, None] = {}
        for s in self.subjects:
            seen.setdefault(str(s), None)
        return list(seen)

    def class_counts(self) -> tuple[int, ...]:
        return tuple(int(c) for c in np.bincount(self.y, minlength=len(CLASS_NAMES)))


LANDMARKS_FILE = "landmarks5.csv"
_LANDMARK_COLUMNS = tuple(f"{p}_{a}" for p in ("eye_image_left", "eye_image_right", "nose_tip",
                                                "mouth_image_left", "mouth_image_right")
                          for a in ("x", "y"))


def _read_landmarks(path: Path, rows: list[dict[str, str]]) -> np.ndarray | None:
    """(N, 5, 2) points in ``labels.csv`` order from ``landmarks5.csv`` (None if absent); a row
    with found=0 gives NaN. Every labelled sample must have exactly one row."""
    if not path.is_file():
        return None
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            header = reader.fieldnames or []
            missing = [c for c in ("subject", "video", "found", *_LANDMARK_COLUMNS)
                       if c not in header]
            if missing:
                raise DatasetError(f"{path}: missing column(s) {missing}")
            table: dict[tuple[str, str], np.ndarray] = {}
            for i, r in enumerate(reader, start=2):
                key = (r["subject"].strip(), r["video"].strip())
                if key in table:
                    raise DatasetError(f"{path} line {i}: {key} listed twice")
                if r["found"].strip() == "0":
                    table[key] = np.full((5, 2), np.nan)
                    continue
                try:
                    table[key] = np.array([float(r[c]) for c in _LANDMARK_COLUMNS]).reshape(5, 2)
                except ValueError as exc:
                    raise DatasetError(f"{path} line {i}: {exc}") from exc
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{path}: not a readable UTF-8 CSV file ({exc})") from exc
    keys = [(r["subject"].strip(), r["video"].strip()) for r in rows]
    absent = [k for k in keys if k not in table]
    if absent:
        raise DatasetError(f"{path}: no row for {len(absent)} labelled sample(s), e.g. "
                           f"{absent[:3]}; rows must match labels.csv one to one")
    extra = sorted(set(table) - set(keys))
    if extra:  # points of another dataset version would silently misplace the regions
        raise DatasetError(f"{path}: {len(extra)} row(s) for samples that labels.csv does not "
                           f"list, e.g. {extra[:3]}; rows must match labels.csv one to one")
    return np.stack([table[k] for k in keys])


def _read_rows(labels: Path) -> list[dict[str, str]]:
    try:
        with labels.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            header = reader.fieldnames or []
            missing = [c for c in REQUIRED_COLUMNS if c not in header]
            if missing:
                raise DatasetError(f"{labels}: missing column(s) {missing}; found {header}")
            rows = list(reader)
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{labels}: not a UTF-8 CSV file ({exc})") from exc
    except csv.Error as exc:
        raise DatasetError(f"{labels}: malformed CSV ({exc})") from exc
    if not rows:
        raise DatasetError(f"{labels}: no rows")
    return rows


def load_megc3db(root: str | Path, *, check_counts: bool = True) -> Megc3DB:
    """Validate and load the 3DB folder ``root`` (the one holding ``labels.csv`` and ``flow/``).

    Raises DatasetError when the folder, the label file or an image is missing or unreadable,
    when rows and images do not match one to one, when a label is not 0/1/2 or disagrees with
    its class name, and (``check_counts``) when the totals differ from the published 442 samples,
    68 subjects and 250/109/83 classes.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"3DB folder {root} does not exist (expected labels.csv and flow/)")
    labels = root / "labels.csv"
    if not labels.is_file():
        raise DatasetError(f"{labels} is missing")
    rows = _read_rows(labels)

    problems: list[str] = []
    seen_files: set[str] = set()
    for i, row in enumerate(rows, start=2):  # line 1 is the header
        where = f"{labels.name} line {i}"
        for col in REQUIRED_COLUMNS:
            if not (row.get(col) or "").strip():
                problems.append(f"{where}: empty {col!r}")
        label = (row.get("label") or "").strip()
        if label not in ("0", "1", "2"):
            problems.append(f"{where}: label {label!r} is not 0, 1 or 2")
        elif (row.get("class") or "").strip() != CLASS_NAMES[int(label)]:
            problems.append(
                f"{where}: class {row.get('class')!r} disagrees with label {label} "
                f"({CLASS_NAMES[int(label)]!r})"
            )
        db = (row.get("database") or "").strip()
        if db not in DATABASES:
            problems.append(f"{where}: database {db!r} is not one of {DATABASES}")
        rel = (row.get("flow_file") or "").strip()
        if rel in seen_files:
            problems.append(f"{where}: flow_file {rel!r} listed twice")
        seen_files.add(rel)
        if rel and not (root / rel).is_file():
            problems.append(f"{where}: image {root / rel} is missing")
        if len(problems) >= 10:
            break
    if problems:
        raise DatasetError(f"3DB folder {root} is inconsistent:\n  " + "\n  ".join(problems))

    flow_dir = root / "flow"
    if flow_dir.is_dir():
        listed = {str((root / r["flow_file"].strip()).resolve()) for r in rows}
        unlisted = sorted(
            p.name for p in flow_dir.glob("*.png") if str(p.resolve()) not in listed
        )
        if unlisted:
            raise DatasetError(
                f"{flow_dir} has {len(unlisted)} image(s) with no row in {labels.name} "
                f"(e.g. {unlisted[:3]}); rows and images must match one to one"
            )

    maps = []
    for row in rows:
        path = root / row["flow_file"].strip()
        try:
            m = _load_map(path)
        except DatasetError:
            raise
        except Exception as exc:  # a reader failure of any kind is a broken dataset file
            raise DatasetError(f"image {path} cannot be read: {exc}") from exc
        m = np.asarray(m)
        if m.shape != (28, 28, 3):
            raise DatasetError(f"image {path} has shape {m.shape}; expected (28, 28, 3)")
        maps.append(m)

    landmarks = _read_landmarks(root / LANDMARKS_FILE, rows)
    x = np.ascontiguousarray(np.stack(maps).transpose(0, 3, 1, 2), dtype=np.float32)
    y = np.array([int(r["label"]) for r in rows], dtype=np.int64)
    dbs = np.array([r["database"].strip() for r in rows])
    subjects = np.array([f"{r['database'].strip()}/{r['subject'].strip()}" for r in rows])
    data = Megc3DB(
        x=x, y=y, subjects=subjects, databases=dbs,
        videos=np.array([r["video"].strip() for r in rows]),
        files=np.array([str(root / r["flow_file"].strip()) for r in rows]),
        root=str(root), landmarks=landmarks,
    )
    if check_counts:
        n_subj = len(data.subject_list)
        counts = data.class_counts()
        if (len(data), n_subj, counts) != (EXPECTED_SAMPLES, EXPECTED_SUBJECTS,
                                           EXPECTED_CLASS_COUNTS):
            raise DatasetError(
                f"3DB folder {root}: {len(data)} samples, {n_subj} subjects, classes {counts}; "
                f"the published set has {EXPECTED_SAMPLES}, {EXPECTED_SUBJECTS}, "
                f"{EXPECTED_CLASS_COUNTS} (pass check_counts=False for a subset)"
            )
    return data
