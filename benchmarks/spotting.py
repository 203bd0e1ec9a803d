"""Spotting benchmark on real video with known movements (MEGC rule, IoU >= 0.5).

    python benchmarks/spotting.py [--cache runs/spotting] [--out docs/SPOTTING.md] [--rebuild]

1. Builds the benchmark media once into --cache (training/injection.py): each real face video of
   ../shared/media (six talking-head clips, single_face.mp4, WolfgangLanger_Pexels.mp4) and
   still-face clips made from real photos gets AU-shaped micro-movements (brows, lids, upper lip,
   lip corners; 1, 2, 3 % of the eye distance; 200-500 ms) rendered in at known times, two
   schedules (seeds) per clip, encoded near-losslessly with the original audio. The originals
   are also re-encoded at crf 14 for the robustness check.
2. Runs the product's face stage and spotter (no classification) over every clip.
3. Scores: precision / recall / F1 (one-to-one matches with IoU >= 0.5, counts pooled), recall
   per amplitude, region and context (still / calm / speaking), the spotter's detection floor
   against what it found, micro events per minute and blinks on the untouched originals, and
   the events of each original against its crf-14 re-encode.

Clips are split in two: the spotter's settings were chosen on the "tune" clips only; the table
reports the "held-out" clips apart, and the requirement rows use those.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from training import injection  # noqa: E402

AUS = tuple(injection.ACTION_UNITS)
AMPLITUDES = (1.0, 2.0, 3.0)
SEEDS = (0, 1)


@dataclass(frozen=True)
class Clip:
    name: str
    source: str          # path under shared/media, or "photo:<path>[:<face index>]"
    context: str         # "still" | "calm" | "talking" | "acting": what the person does
    split: str           # "tune" | "held-out"


#: The clips and which ones the spotter's settings may be chosen on. Contexts from watching the
#: clips (../shared/README.md): d9 is a calm speaker, d0 smiles and glances without speaking.
CLIPS = (
    Clip("d3", "talking/d3.mp4", "talking", "tune"),
    Clip("d9", "talking/d9.mp4", "talking", "tune"),
    Clip("d14", "talking/d14.mp4", "acting", "tune"),
    Clip("still_single", "photo:single_face.jpg", "still", "tune"),
    Clip("still_casme2", "photo:casme2_frames/001.jpg", "still", "tune"),
    Clip("d0", "talking/d0.mp4", "calm", "held-out"),
    Clip("d6", "talking/d6.mp4", "acting", "held-out"),
    Clip("d13", "talking/d13.mp4", "talking", "held-out"),
    Clip("single_face", "single_face.mp4", "calm", "held-out"),
    Clip("wolfgang", "WolfgangLanger_Pexels.mp4", "acting", "held-out"),
    *(Clip(f"still_multi{k}", f"photo:multi_face.jpg:{k}", "still", "held-out")
      for k in range(5)),
    Clip("still_calibration", "photo:calibration/s03_s03_po_11_onset.png", "still", "held-out"),
)


def shared_media() -> Path:
    media = Path(os.environ.get("MER_SHARED", REPO.parent / "shared")) / "media"
    if not media.is_dir():
        sys.exit(f"the spotting benchmark needs the real videos in {media} (set MER_SHARED)")
    return media


# -- building the media ---------------------------------------------------------------------------

def _photo_faces(path: Path) -> list[np.ndarray]:
    """Each face of a photo cut out with a margin (largest first for one-face photos)."""
    import cv2
    import mediapipe as mp

    image = cv2.imread(str(path))
    if image.ndim == 2 or image.shape[2] == 1:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    h, w = image.shape[:2]
    # The full-range detector: Face Mesh's own detector misses the smaller faces of a group.
    with mp.solutions.face_detection.FaceDetection(model_selection=1,
                                                   min_detection_confidence=0.5) as detector:
        found = detector.process(cv2.cvtColor(image, cv2.COLOR_BGR2RGB)).detections or []
    boxes = []
    for face in found:
        b = face.location_data.relative_bounding_box
        boxes.append((b.xmin * w, b.ymin * h, (b.xmin + b.width) * w, (b.ymin + b.height) * h))
    boxes.sort(key=lambda b: b[0])  # left to right: a stable face index
    out = []
    for x0, y0, x1, y1 in boxes:
        m = 0.6 * max(x1 - x0, y1 - y0)
        cx0, cy0 = int(max(0, x0 - m)), int(max(0, y0 - m))
        cx1, cy1 = int(min(w, x1 + m)), int(min(h, y1 + m))
        crop = image[cy0:cy1, cx0:cx1]
        out.append(crop[: crop.shape[0] // 4 * 4, : crop.shape[1] // 4 * 4])
    return out


def still_video(photo: np.ndarray, target: Path, seconds: float = 10.0, fps: int = 30,
                seed: int = 0) -> None:
    """A still face as a camera would film it: the photo with fresh sensor noise (σ 1.5 grey
    levels) in every frame and a slow sub-pixel sway (≤ 0.4 px), H.264 crf 10. Faces smaller
    than 200 px are enlarged to that so that the whole face stage sees a webcam-sized face."""
    import av
    import cv2

    rng = np.random.default_rng(seed)
    scale = max(1.0, 360.0 / max(photo.shape[:2]))
    if scale > 1:
        photo = cv2.resize(photo, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
        photo = photo[: photo.shape[0] // 4 * 4, : photo.shape[1] // 4 * 4]
    h, w = photo.shape[:2]
    with av.open(str(target), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": "10", "preset": "medium"}
        for i in range(int(seconds * fps)):
            t = i / fps
            m = np.float32([[1, 0, 0.4 * np.sin(2 * np.pi * t / 7.0)],
                            [0, 1, 0.3 * np.sin(2 * np.pi * t / 5.3 + 1.0)]])
            frame = cv2.warpAffine(photo.astype(np.float32), m, (w, h),
                                   flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT)
            frame = np.clip(frame + rng.normal(0, 1.5, frame.shape), 0, 255).astype(np.uint8)
            video_frame = av.VideoFrame.from_ndarray(frame, format="bgr24")
            video_frame.pts = i
            for packet in stream.encode(video_frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def source_video(clip: Clip, media: Path, cache: Path) -> Path:
    if not clip.source.startswith("photo:"):
        return media / clip.source
    target = cache / f"{clip.name}.orig.mp4"
    if not target.exists():
        _, rel, *index = clip.source.split(":")
        faces = _photo_faces(media / rel)
        if not faces:  # a tight face crop (the databases' frames): give it a margin
            import cv2

            image = cv2.imread(str(media / rel))
            m = image.shape[0] // 3
            padded = cv2.copyMakeBorder(image, m, m, m, m, cv2.BORDER_REPLICATE)
            faces = [padded[: padded.shape[0] // 4 * 4, : padded.shape[1] // 4 * 4]]
        face = faces[int(index[0])] if index else max(faces, key=lambda f: f.size)
        still_video(face, target, seed=sum(map(ord, clip.name)))
    return target


def build(cache: Path, clips=CLIPS, seeds=SEEDS, log=print) -> None:
    """Every clip's injected variants (``<clip>.s<seed>.mp4`` + ``.json`` truth) and the crf-14
    re-encode of its original (``<clip>.crf14.mp4``), each made once."""
    media = shared_media()
    cache.mkdir(parents=True, exist_ok=True)
    for clip in clips:
        source = source_video(clip, media, cache)
        track_path = cache / f"{clip.name}.track.npz"
        if track_path.exists():
            data = np.load(track_path)
            track = injection.FaceTrack(data["times"], data["landmarks"])
        else:
            frames, times = injection.decode_frames(source)
            track = injection.track_faces(frames, times)
            np.savez_compressed(track_path, times=track.times_ms, landmarks=track.landmarks)
        for seed in seeds:
            target = cache / f"{clip.name}.s{seed}.mp4"
            truth = target.with_suffix(".json")
            if target.exists() and truth.exists():
                continue
            rng = np.random.default_rng(1000 * seed + sum(map(ord, clip.name)))
            start = 1200.0 if track.times_ms[-1] < 4000 else 1500.0
            plan = injection.plan_injections(track, rng, aus=AUS, amplitudes=AMPLITUDES,
                                             start_ms=start)
            t0 = time.perf_counter()
            injection.render_video(source, target, plan, track)
            injection.write_truth(truth, clip.name, plan, {"source": str(source), "seed": seed,
                                                          "context": clip.context,
                                                          "split": clip.split})
            log(f"built {target.name}: {len(plan)} movements ({time.perf_counter() - t0:.0f} s)")
        reencoded = cache / f"{clip.name}.crf14.mp4"
        if not reencoded.exists():
            injection.reencode(source, reencoded, crf=14)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=REPO / "runs" / "spotting")
    parser.add_argument("--build-only", action="store_true")
    args = parser.parse_args(argv)
    build(args.cache)
    return 0


if __name__ == "__main__":
    sys.exit(main())
