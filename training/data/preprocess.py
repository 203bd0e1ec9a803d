"""Preprocessing of the raw databases into a cache of network inputs: per sample the onset and
apex (or a frame stack) through the live pipeline's own feature code, one ``.npz`` per sample
plus ``index.csv`` and ``preprocess.json`` per database; samples already cached with the same
options are skipped (resumable). The adapters that read the databases: :mod:`training.data.raw`."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np

from realtime_mer.errors import DatasetError
from training.data.raw import CACHE_VERSION, KINDS, RawAdapter, RawReport, RawSample, load_frame

log = logging.getLogger(__name__)

__all__ = ["preprocess", "PreprocessResult", "load_preprocessed", "INDEX_COLUMNS"]


@dataclass
class PreprocessResult:
    """Counts of one :func:`preprocess` run. ``failed``: (sample_id, reason) of samples left
    out (no face found on the onset frame); they are retried by the next run."""

    cache_dir: str
    index_path: str
    options_hash: str
    computed: int = 0
    cached: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)


class _Recording:
    """A flow estimator that keeps the last field it computed, so the colour-coded flow is made
    from exactly the flow behind the (u, v, strain) map without computing it twice."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.last: np.ndarray | None = None

    def compute(self, prev, nxt):
        self.last = np.asarray(self.inner.compute(prev, nxt), dtype=np.float32)
        return self.last

    def compute_batch(self, prev, nxt):
        return self.inner.compute_batch(prev, nxt)


class _Frames(Sequence):
    """Frames read (and warped into the aligned crop) only when indexed, for flow_stack."""

    def __init__(self, paths: Sequence[str], crop) -> None:
        self.paths, self.crop = list(paths), crop

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        return self.crop(load_frame(self.paths[i]))


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _write_atomic(path: Path, write: Callable[[object], None], mode: str = "wb") -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, mode, **({} if "b" in mode else {"newline": "", "encoding": "utf-8"})) as fh:
        write(fh)
    os.replace(tmp, path)


def preprocess(
    adapter: RawAdapter,
    cache_dir: str | Path,
    kinds: Sequence[str] = ("map28",),
    flow: str = "opencv-tvl1",
    align: bool = True,
    *,
    features=None,
    face=None,
    stack_frames: int = 16,
    stack_size: int = 134,
    progress: Callable[[int, int, RawSample, str], None] | None = None,
) -> PreprocessResult:
    """Compute the network inputs of every sample of ``adapter`` into ``cache_dir/<database>/``.

    kinds: any of :data:`KINDS`: ``"map28"`` the (28, 28, 3) float32 (u, v, strain) map in
        [0, 1] from :func:`realtime_mer.features.flow_strain_map` (onset → apex);
        ``"colour224"`` (224, 224, 3) uint8 RGB colour-coded onset → apex flow (MJFN), made from
        the same flow field; ``"stack16"`` (stack_frames, stack_size, stack_size, 3) float32
        flow stack over onset → offset (:func:`realtime_mer.input_kinds.flow_stack`);
        ``"phases28"`` (28, 28, 6) float32, both phases of the movement as the live pipeline
        makes them for an engine of two phases (:func:`realtime_mer.features.movement_map`):
        the onset → apex map, then the apex → offset map (the sample's last frame: where no
        offset is annotated the sample ends at its apex, as for ``"stack16"``, and its second
        phase is all zeros, which at run time only a movement cut short gives).
    flow: the flow implementation by name (:func:`realtime_mer.flow.create_flow`), overriding
        ``features.flow``; ``features``: :class:`~realtime_mer.features.FeatureOptions`.
    align: find the face on the onset frame with :class:`~realtime_mer.face.FaceAligner`
        (``face``: FaceOptions) and warp onset, apex (and stack frames) with that one transform,
        so raw frames get the live pipeline's framing while the motion between them is kept
        (aligning each frame on its own would add landmark jitter of the size of the motion).
        The onset crop's landmarks are stored as ``landmarks``. False: frames used as they are.
    progress: called ``(done, total, sample, status)`` after each sample, status "computed",
        "cached" or "failed".

    Each sample goes to ``<sample_id>.npz`` (the kinds, ``label``, ``onset``/``apex``/``offset``
    (-1 = none), ``options_hash``), written atomically; a file whose hash matches the current
    options and annotation is skipped, so an interrupted run resumes. ``index.csv`` (one row per
    sample) and ``preprocess.json`` (options, hash, adapter report) are rewritten at the end.
    Validation (``adapter.samples()``) runs before any flow is computed.
    """
    from realtime_mer.features import FeatureOptions, flow_strain_map
    from realtime_mer.flow import create_flow

    kinds = tuple(dict.fromkeys(kinds))
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"unknown kind(s) {unknown}; choose from {KINDS}")
    features = replace(features or FeatureOptions(), flow=flow)
    samples = adapter.samples()  # validates everything first

    options = {
        "version": CACHE_VERSION, "database": adapter.database, "kinds": list(kinds),
        "features": asdict(features), "align": bool(align),
        "face": None, "stack": ({"frames": stack_frames, "size": stack_size}
                                if "stack16" in kinds else None),
    }
    aligner = None
    if align:
        from realtime_mer.face import FaceAligner, FaceOptions

        face = face or FaceOptions()
        options["face"] = asdict(face)
        aligner = FaceAligner(face)
    options_hash = _hash(options)

    out_dir = Path(cache_dir) / adapter.database
    out_dir.mkdir(parents=True, exist_ok=True)
    result = PreprocessResult(str(Path(cache_dir)), str(out_dir / "index.csv"), options_hash)
    kwargs = ({"options": features.tvl1} if features.flow in ("auto", "opencv-tvl1",
                                                              "torch-tvl1") else {})
    estimator = _Recording(create_flow(features.flow, **kwargs))
    index_rows = []
    try:
        for done, sample in enumerate(samples, start=1):
            key = {"options": options_hash, "onset": sample.onset, "apex": sample.apex,
                   "offset": sample.offset, "label": sample.label, "frames": len(sample.frames),
                   "apex_settings": adapter.apex_settings if sample.apex is None else None}
            sample_hash = _hash(key)
            path = out_dir / f"{sample.sample_id}.npz"
            status, reason, resolved = "computed", "", sample
            cached = _cached(path, sample_hash)
            if cached is not None:
                status = "cached"
                apex = int(cached)
                resolved = replace(sample, apex=apex if apex >= 0 else None)
            else:
                resolved = adapter.resolve_apex(sample)
                arrays, reason = _compute(resolved, kinds, features, estimator, aligner,
                                          stack_frames, stack_size, flow_strain_map)
                if arrays is None:
                    status = "failed"
                    result.failed.append((sample.sample_id, reason))
                else:
                    arrays.update(
                        label=np.int64(sample.label), onset=np.int64(sample.onset),
                        apex=np.int64(resolved.apex),
                        offset=np.int64(-1 if sample.offset is None else sample.offset),
                        options_hash=np.str_(sample_hash))
                    _write_atomic(path, lambda fh: np.savez(fh, **arrays))
            if status == "cached":
                result.cached += 1
            elif status == "computed":
                result.computed += 1
            index_rows.append({
                "database": sample.database, "subject": sample.subject, "video": sample.video,
                "sample_id": sample.sample_id, "emotion": sample.emotion,
                "label": sample.label, "class": sample.class_name, "onset": sample.onset,
                "apex": "" if resolved.apex is None else resolved.apex,
                "offset": "" if sample.offset is None else sample.offset,
                "apex_source": sample.apex_source,
                "file": path.name if status != "failed" else "", "status": status,
                "reason": reason, "hash": sample_hash,
            })
            if progress is not None:
                progress(done, len(samples), resolved, status)
    finally:
        if aligner is not None:
            aligner.close()
        if index_rows:
            _write_index(out_dir, index_rows, options, options_hash, adapter.report)
    return result


def _cached(path: Path, sample_hash: str) -> int | None:
    """The cached apex when ``path`` holds this sample made with these options, else None."""
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            if str(z["options_hash"]) == sample_hash:
                return int(z["apex"])
    except Exception:  # a damaged cache file is recomputed, not trusted
        log.warning("cache file %s is unreadable; recomputing it", path)
    return None


def _compute(sample: RawSample, kinds, features, estimator, aligner, stack_frames, stack_size,
             flow_strain_map) -> tuple[dict | None, str]:
    onset = load_frame(sample.onset_path)
    apex = load_frame(sample.apex_path)
    arrays: dict[str, np.ndarray] = {}
    if aligner is not None:
        aligner.reset()  # a new video: detect from scratch
        found = aligner.process(onset, 0.0)
        if not found.found:
            return None, f"no face found on the onset frame {sample.onset_path}"
        size = aligner.options.crop_size
        transform = found.transform.astype(np.float64)

        def crop(img: np.ndarray) -> np.ndarray:
            if img.ndim == 3:
                img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
            return cv2.warpAffine(img, transform, (size, size), flags=cv2.INTER_LINEAR,
                                  borderMode=cv2.BORDER_REPLICATE)
        arrays["landmarks"] = found.landmarks.astype(np.float32)
    else:
        def crop(img: np.ndarray) -> np.ndarray:
            return img

    onset_c, apex_c = crop(onset), crop(apex)
    if "map28" in kinds or "colour224" in kinds or "phases28" in kinds:
        m = flow_strain_map(onset_c, apex_c, features, flow=estimator)
        if "map28" in kinds:
            arrays["map28"] = m.astype(np.float32)
        if "colour224" in kinds:
            from realtime_mer.input_kinds import colour_coded_flow

            uv = estimator.last
            arrays["colour224"] = colour_coded_flow(uv[..., 0], uv[..., 1], 224)
        if "phases28" in kinds:
            # movement_map's two phases, the first one reused (features.movement_map is the
            # same two calls)
            # the sample's last frame: its offset, or its apex where none is annotated
            offset_c = crop(load_frame(sample.frames[-1]))
            back = flow_strain_map(apex_c, offset_c, features, flow=estimator)
            arrays["phases28"] = np.concatenate([m, back], axis=-1).astype(np.float32)
    if "stack16" in kinds:
        from realtime_mer.input_kinds import flow_stack

        paths = sample.frames
        if sample.offset is None:  # the annotated span ends at the apex then
            paths = paths[: sample.frame_numbers.index(sample.apex) + 1]
        arrays["stack16"] = flow_stack(_Frames(paths, crop), n=stack_frames, size=stack_size,
                                       flow=estimator.inner).astype(np.float32)
    return arrays, ""


INDEX_COLUMNS = ("database", "subject", "video", "sample_id", "emotion", "label", "class",
                 "onset", "apex", "offset", "apex_source", "file", "status", "reason", "hash")


def _write_index(out_dir: Path, rows, options, options_hash, report: RawReport) -> None:
    def write_csv(fh):
        w = csv.DictWriter(fh, fieldnames=INDEX_COLUMNS)
        w.writeheader()
        w.writerows(rows)

    _write_atomic(out_dir / "index.csv", write_csv, "w")
    meta = {"options": options, "options_hash": options_hash, "report": asdict(report),
            "status": dict(Counter(r["status"] for r in rows))}
    _write_atomic(out_dir / "preprocess.json",
                  lambda fh: fh.write(json.dumps(meta, indent=1, default=str)), "w")


def load_preprocessed(cache_dir: str | Path, databases: Sequence[str] | None = None,
                      kind: str = "map28"):
    """The cached inputs of every database under ``cache_dir`` (or ``databases``) as a
    :class:`~training.data.megc3db.Megc3DB` (subjects ``"<database>/<subject>"``). ``kind``:
    ``"map28"`` gives x (N, 3, 28, 28) float32, ready for the LOSO runner (``"phases28"``: both
    phases, (N, 6, 28, 28)); ``"stack16"`` the 3D network's clips, x (N, 3, T, H, W) float32
    (:func:`~realtime_mer.input_kinds.clip_layout`). Samples that failed are left out. Raises
    DatasetError when there is no index or a listed file is missing or lacks ``kind``."""
    from realtime_mer.input_kinds import clip_layout
    from training.data.megc3db import Megc3DB

    if kind not in ("map28", "phases28", "stack16"):
        raise ValueError(f"kind must be 'map28', 'phases28' or 'stack16', got {kind!r}")

    cache_dir = Path(cache_dir)
    if databases is None:
        indexes = sorted(cache_dir.glob("*/index.csv"))
    else:
        indexes = [cache_dir / d / "index.csv" for d in databases]
    if not indexes:
        raise DatasetError(f"{cache_dir}: no <database>/index.csv (run preprocess first)")
    maps, rows = [], []
    for index in indexes:
        if not index.is_file():
            raise DatasetError(f"{index} is missing (run preprocess first)")
        with index.open(newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                if row["status"] == "failed":
                    continue
                path = index.parent / row["file"]
                try:
                    with np.load(path) as z:
                        maps.append(np.asarray(z[kind], dtype=np.float32))
                except FileNotFoundError:
                    raise DatasetError(f"{index}: {path} is missing") from None
                except KeyError:
                    raise DatasetError(f"{path} has no {kind} (preprocess with kinds including "
                                       f"'{kind}')") from None
                rows.append((row, str(path)))
    if not rows:
        raise DatasetError(f"{cache_dir}: no preprocessed samples")
    return Megc3DB(
        x=(np.stack([clip_layout(m) for m in maps]) if kind == "stack16"
           else np.ascontiguousarray(np.stack(maps).transpose(0, 3, 1, 2))),
        y=np.array([int(r["label"]) for r, _ in rows], dtype=np.int64),
        subjects=np.array([f"{r['database']}/{r['subject']}" for r, _ in rows]),
        databases=np.array([r["database"] for r, _ in rows]),
        videos=np.array([r["video"] for r, _ in rows]),
        files=np.array([p for _, p in rows]),
        root=str(cache_dir),
    )
