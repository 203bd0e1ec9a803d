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
from typing import Sequence

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

    x: (N, 3, 28, 28) float32 in [0, 1], channels (u, v, strain) (two phases of each movement:
    (N, 6, 28, 28), :func:`load_phases`); y: (N,) int64 in {0, 1, 2};
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
    # With two preprocessings of the same samples (:func:`with_other_maps`): each row's map
    # set, the first ``n_primary`` rows those of the set trained on, the rest the same samples
    # in the same order as the other set makes them. None: one set, every row primary.
    maps: np.ndarray | None = None
    n_primary: int | None = None

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def primary_rows(self) -> np.ndarray:
        """The rows networks train and choose on (all of them with one map set)."""
        return np.arange(len(self) if self.n_primary is None else self.n_primary)

    @property
    def is_primary(self) -> np.ndarray:
        return np.arange(len(self)) < (len(self) if self.n_primary is None else self.n_primary)

    @property
    def subject_list(self) -> list[str]:
        """Unique subjects in first-appearance order (the LOSO fold order)."""
        seen: dict[str, None] = {}
        for s in self.subjects:
            seen.setdefault(str(s), None)
        return list(seen)

    def class_counts(self) -> tuple[int, ...]:
        """Per class, over the samples (the primary rows: each sample once)."""
        y = self.y[self.primary_rows]
        return tuple(int(c) for c in np.bincount(y, minlength=len(CLASS_NAMES)))

    def fingerprint(self) -> str:
        """sha256 of the inputs, labels and subjects: which data a run was made on, where the
        folder alone does not say it (a cache of maps recomputed with other options)."""
        import hashlib

        h = hashlib.sha256(np.ascontiguousarray(self.x, np.float32).tobytes())
        h.update(np.ascontiguousarray(self.y, np.int64).tobytes())
        h.update("\n".join(map(str, self.subjects)).encode())
        return h.hexdigest()


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


#: The map sets a LOSO run can train on: ``3db`` (the STSTNet preprocessing the live pipeline
#: reproduces, ``data/megc2019_3db``) and ``causalnet`` (CausalNet's whole-sequence maps of the
#: same samples, ``data/megc2019_3db_causalnet``; see training/data/README.md).
MAP_SETS = ("3db", "causalnet")
#: CausalNet's four maps per sample: the base map and three more, ``{stem}_1.png`` ...
CAUSALNET_SUFFIXES = ("", "_1", "_2", "_3")


def load_causalnet_maps(root: str | Path, reference: Megc3DB,
                        suffixes: tuple[str, ...] = CAUSALNET_SUFFIXES) -> np.ndarray:
    """CausalNet's maps of ``reference``'s samples, in its order: (N, len(suffixes), 3, 28,
    28) float32 in [0, 1], channels (u, v, strain) read as the 3DB maps are. ``root`` holds
    ``flow/{stem}{suffix}.png`` with the stems of the 3DB ``flow_file`` names. Raises
    DatasetError when a sample lacks a map, a map is unreadable or not 28×28×3, or the folder
    holds maps of samples ``reference`` does not list."""
    root = Path(root)
    flow = root / "flow"
    if not flow.is_dir():
        raise DatasetError(f"CausalNet map folder {flow} does not exist")
    stems = [Path(str(f)).stem for f in reference.files[reference.primary_rows]]
    wanted = {f"{stem}{suffix}.png" for stem in stems for suffix in CAUSALNET_SUFFIXES}
    present = {p.name for p in flow.glob("*.png")}
    missing = sorted(wanted - present)
    if missing:
        raise DatasetError(f"{flow}: {len(missing)} map(s) of labelled samples missing, e.g. "
                           f"{missing[:3]}")
    extra = sorted(present - wanted)
    if extra:
        raise DatasetError(f"{flow}: {len(extra)} map(s) of samples labels.csv does not list, "
                           f"e.g. {extra[:3]}")
    out = np.empty((len(stems), len(suffixes), 3, 28, 28), np.float32)
    for i, stem in enumerate(stems):
        for j, suffix in enumerate(suffixes):
            path = flow / f"{stem}{suffix}.png"
            try:
                m = np.asarray(_load_map(path))
            except Exception as exc:
                raise DatasetError(f"image {path} cannot be read: {exc}") from exc
            if m.shape != (28, 28, 3):
                raise DatasetError(f"image {path} has shape {m.shape}; expected (28, 28, 3)")
            out[i, j] = m.transpose(2, 0, 1)
    return out


def with_other_maps(data: Megc3DB, other_x: np.ndarray, primary: str, other: str) -> Megc3DB:
    """``data`` (one map set, named ``primary``) with a second preprocessing of the same
    samples, ``other_x`` (N, 3, 28, 28) in the same order, appended as rows N..2N-1 of the same
    subjects, labels and databases: the networks train on the first N rows (and, with a LOSO
    run's ``other_maps_share``, on the other copy of a sample in that share of draws), and
    every held-out subject is scored on both."""
    if data.maps is not None:
        raise ValueError("the data already holds two map sets")
    n = len(data)
    if other_x.shape != data.x.shape:
        raise ValueError(f"other maps have shape {other_x.shape}; expected {data.x.shape}")

    def twice(a):
        return None if a is None else np.concatenate([a, a])

    return Megc3DB(
        x=np.ascontiguousarray(np.concatenate([data.x, other_x]), dtype=np.float32),
        y=twice(data.y), subjects=twice(data.subjects), databases=twice(data.databases),
        videos=twice(data.videos), files=twice(data.files), root=data.root,
        # The landmarks locate regions in the 3DB maps only: the other set has none.
        landmarks=None,
        maps=np.array([primary] * n + [other] * n), n_primary=n)


def load_map_sets(root_3db: str | Path, root_causalnet: str | Path | None,
                  primary: str = "3db") -> Megc3DB:
    """The 3DB samples with the map set ``primary`` (one of :data:`MAP_SETS`) as the rows
    trained on and, when ``root_causalnet`` is given, the other set as the rows scored beside
    them (:func:`with_other_maps`); the CausalNet set's base maps stand for each sample."""
    if primary not in MAP_SETS:
        raise ValueError(f"map set {primary!r} is not one of {', '.join(MAP_SETS)}")
    ours = load_megc3db(root_3db)
    if root_causalnet is None:
        if primary != "3db":
            raise ValueError("the CausalNet maps need their folder")
        return ours
    theirs = load_causalnet_maps(root_causalnet, ours, suffixes=("",))[:, 0]
    if primary == "3db":
        return with_other_maps(ours, theirs, "3db", "causalnet")
    swapped = Megc3DB(x=theirs, y=ours.y, subjects=ours.subjects, databases=ours.databases,
                      videos=ours.videos, files=ours.files, root=str(root_causalnet))
    return with_other_maps(swapped, ours.x, "causalnet", "3db")


def load_phases(root_3db: str | Path, root_causalnet: str | Path) -> Megc3DB:
    """The 3DB samples with CausalNet's maps of both phases of each movement: x (N, 6, 28, 28),
    the onset→apex map (u, v, strain) then the apex→offset map (``_1``). One set only: the
    3DB preprocessing has no second phase to score on."""
    ours = load_megc3db(root_3db)
    phases = load_causalnet_maps(root_causalnet, ours, suffixes=("", "_1"))
    return Megc3DB(x=np.ascontiguousarray(phases.reshape(len(ours), 6, 28, 28)), y=ours.y,
                   subjects=ours.subjects, databases=ours.databases, videos=ours.videos,
                   files=ours.files, root=str(root_causalnet))


def load_for_schedule(root_3db: str | Path, root_causalnet: str | Path, maps: str,
                      other_maps_share: float, input_kind: str = "map28",
                      score_other_maps: bool = False, phases: int = 1,
                      cache: str | Path | None = None,
                      databases: Sequence[str] | None = None) -> Megc3DB:
    """The samples a schedule trains on: the 3DB maps alone, or, when it trains on CausalNet's
    maps, draws from both sets, or is to be scored on the other set too, both sets with
    ``maps`` first (:func:`load_map_sets`); with ``phases`` 2, CausalNet's maps of both phases
    (:func:`load_phases`). ``maps`` "live": the live pipeline's maps of the raw databases in
    ``cache`` (``databases`` of them, default all), written by ``python -m training preprocess``
    with kind map28 (one phase) or phases28 (two)."""
    if maps == "live":
        if cache is None:
            raise ValueError("--maps live trains on the maps `python -m training preprocess` "
                             "computed from the raw databases: give its --cache folder")
        if other_maps_share or score_other_maps:
            raise ValueError("the live pipeline's maps of the raw databases have no other "
                             "preprocessing to draw from or to score on")
        from training.data.preprocess import load_preprocessed

        return load_preprocessed(cache, databases, "phases28" if phases == 2 else "map28")
    if cache is not None or databases:
        raise ValueError(f"--cache and --databases are read with --maps live only (this "
                         f"schedule trains on the {maps} maps)")
    if phases == 2:
        if maps != "causalnet" or other_maps_share or score_other_maps:
            raise ValueError("two phases exist in CausalNet's maps and the live pipeline's "
                             "only: they train with --maps causalnet or --maps live, without "
                             "the other set")
        return load_phases(root_3db, root_causalnet)
    both = maps != "3db" or bool(other_maps_share) or score_other_maps
    if both and input_kind != "map28":
        raise ValueError(f"input kind {input_kind!r} is built from the 3DB maps' facial "
                         "points; a run on two map sets feeds the maps as they are (map28)")
    return load_map_sets(root_3db, root_causalnet if both else None, maps)
