"""Calibration of the (u, v, strain) map against the published 3DB map of the one sample whose
onset/apex frames we have (SMIC s03_s03_po_11). Prints per-channel Pearson r for the plain
recipe, each step of the fix, and the shipped defaults; writes the same table to a file.

    .venv/bin/python benchmarks/calibration.py [--out docs/calibration_table.md]

Needs ../shared (or $MER_SHARED).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from realtime_mer.features import (  # noqa: E402
    FeatureOptions, flow_strain_map, load_3db_map, normalise_minmax, published_strain,
)
from realtime_mer.flow import OpenCVTVL1, TVL1Options, optical_strain  # noqa: E402

SAMPLE = "s03_s03_po_11"


def shared_dir() -> Path:
    env = os.environ.get("MER_SHARED")
    path = Path(env) if env else REPO.parent / "shared"
    if not (path / "media" / "calibration").is_dir():
        sys.exit(f"no calibration pair under {path}; set MER_SHARED")
    return path


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def scores(m: np.ndarray, ref: np.ndarray) -> tuple[float, float, float]:
    return tuple(pearson(m[..., c], ref[..., c]) for c in range(3))


def variant(onset, apex, *, lam: float, strain: str, image_resize: int, map_resize: int,
            size: tuple[int, int] = (128, 128), presmooth: float = 0.0):
    """The recipe with one choice at a time switched, to show what each step buys.

    strain: "central@128" (np.gradient at flow size, then resized), "central@28" (np.gradient on
    the resized 28×28 flow), "sobel5@128" (the calibrated one; at ``size`` really)."""
    if presmooth:
        onset = cv2.GaussianBlur(onset, (0, 0), presmooth)
        apex = cv2.GaussianBlur(apex, (0, 0), presmooth)
    a = cv2.resize(onset, size, interpolation=image_resize)
    b = cv2.resize(apex, size, interpolation=image_resize)
    flow = OpenCVTVL1(TVL1Options(lambda_=lam)).compute(a, b)
    down = lambda x: cv2.resize(x, (28, 28), interpolation=map_resize)  # noqa: E731
    u, v = down(flow[..., 0]), down(flow[..., 1])
    if strain == "central@128":
        s = down(optical_strain(flow))
    elif strain == "central@28":
        s = optical_strain(np.stack([u, v], -1))
    else:
        s = down(published_strain(flow, 5))
    return np.stack([normalise_minmax(c) for c in (u, v, s)], -1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args()
    shared = shared_dir()
    onset = cv2.imread(str(shared / "media/calibration" / f"{SAMPLE}_onset.png"), 0)
    apex = cv2.imread(str(shared / "media/calibration" / f"{SAMPLE}_apex.png"), 0)
    ref = load_3db_map(shared / "data/megc2019_3db/flow" / f"{SAMPLE}.png")

    area, linear = cv2.INTER_AREA, cv2.INTER_LINEAR
    rows = [
        ("plain: TV-L1 (OpenCV defaults) at 128, central-diff strain at 128, area to 28",
         variant(onset, apex, lam=0.15, strain="central@128", image_resize=linear,
                 map_resize=area)),
        ("plain, linear resize to 28",
         variant(onset, apex, lam=0.15, strain="central@128", image_resize=linear,
                 map_resize=linear)),
        ("strain by central differences on the 28×28 flow",
         variant(onset, apex, lam=0.15, strain="central@28", image_resize=area,
                 map_resize=area)),
        ("strain by Sobel-5 at 128, area-averaged to 28",
         variant(onset, apex, lam=0.15, strain="sobel5@128", image_resize=area,
                 map_resize=area)),
        ("+ TV-L1 λ0.2 = shipped defaults (FeatureOptions())",
         flow_strain_map(onset, apex, FeatureOptions())),
        ("shipped, but linear instead of area resize to 28",
         variant(onset, apex, lam=0.2, strain="sobel5@128", image_resize=area,
                 map_resize=linear)),
        ("shipped + presmooth_sigma=1 (undoes the pair's GIF quantisation)",
         flow_strain_map(onset, apex, FeatureOptions(presmooth_sigma=1.0))),
        # Where the published maps were probably made: TV-L1 at the crop's own 140×170.
        ("side: TV-L1 λ0.15 at native 140×170, Sobel-5 strain, area to 28",
         variant(onset, apex, lam=0.15, strain="sobel5@128", image_resize=area,
                 map_resize=area, size=onset.shape[::-1])),
        ("side: same + presmooth σ=1",
         variant(onset, apex, lam=0.15, strain="sobel5@128", image_resize=area,
                 map_resize=area, size=onset.shape[::-1], presmooth=1.0)),
        ("side: same, λ0.2",
         variant(onset, apex, lam=0.2, strain="sobel5@128", image_resize=area,
                 map_resize=area, size=onset.shape[::-1], presmooth=1.0)),
    ]
    # The map's own u, v already predict its strain channel only partly: it is not computed
    # from the 28×28 u, v that the PNG stores.
    own = optical_strain(np.stack([ref[..., 0], ref[..., 1]], -1))

    lines = [f"calibration pair {SAMPLE}: Pearson r with the published map (n = 28×28)", "",
             "| recipe | r u | r v | r strain |", "|---|---|---|---|"]
    for name, m in rows:
        ru, rv, rs = scores(m, ref)
        lines.append(f"| {name} | {ru:.3f} | {rv:.3f} | {rs:.3f} |")
    lines += ["", f"published strain vs central-diff strain of the published u, v: "
              f"r = {pearson(own, ref[..., 2]):.3f}"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
