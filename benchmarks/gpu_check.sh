#!/usr/bin/env bash
# The GPU path, checked in one command (at most 8 minutes on an H100): the GPU tests, the flow
# benchmark at batch 1/16/64, per-event features on the GPU, `mer analyze --flow auto` on the
# real videos (frames/s, per-event ms); the .pt2 device move runs within the tests.
#
# On the GPU machine, in the repository root, after benchmarks/gpu_prepare.sh was run where
# there is a package index (its wheels and media travel in .whl/N and .gpu-media/):
#
#   bash benchmarks/gpu_check.sh stage 1       # one call per wheel set, carrying .whl/1, then
#   ...                                        # .whl/2 ... .whl/5, on the same warm machine
#   bash benchmarks/gpu_check.sh run [OUT]     # carrying .gpu-media: installs what was staged,
#                                              # then checks; results in OUT
#
# A machine with a package index can instead `pip install -e .` and go straight to `run`.
set -uo pipefail
cd "$(dirname "$0")/.."
SITE=/tmp/mer-site
STAGED=/tmp/mer-wheels
step=${1:-run}
if [ "$step" = stage ]; then
  set -e
  mkdir -p "$STAGED"
  cp ".whl/${2:?which wheel set: 1, 2, ...}"/* "$STAGED"/
  echo "staged set $2: $(ls "$STAGED" | wc -l) files in $STAGED"
  exit 0
fi
if [ -d "$STAGED" ] && [ ! -d "$SITE" ]; then
  set -e
  for first in "$STAGED"/*.part00; do  # a wheel carried in pieces
    [ -e "$first" ] || continue
    cat "${first%.part00}".part* > "${first%.part00}" && rm "${first%.part00}".part*
  done
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$STAGED"/*.whl
  set +e
fi
OUT=${2:-${OUT:-gpu-check}}
mkdir -p "$OUT"
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ -d .gpu-media ]; then
  export MER_SHARED="$PWD/.gpu-media-root"
  mkdir -p "$MER_SHARED" && ln -sfn "$PWD/.gpu-media" "$MER_SHARED/media"
fi
export MER_CACHE_DIR="$OUT/cache"
start=$(date +%s)
section() { echo; echo "## $1 ($(( $(date +%s) - start )) s)"; }
{
  section "machine"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, numpy, cv2; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available()); print('numpy', numpy.__version__, 'cv2', cv2.__version__, 'optflow', hasattr(cv2, 'optflow'))"

  section "GPU tests"
  # -m "not slow" includes the gpu-marked tests; test_runtime's .pt2 device move runs its CUDA
  # branch (the mirrored, calibrated program's lifted constants) where CUDA is present
  # -o addopts= : the project's options spread tests over workers (pytest-xdist), which the
  # GPU machine does not need and its wheels do not carry
  timeout 240 python3 -m pytest -q -p no:cacheprovider -o addopts= -m "not slow" --timeout 200 \
    tests/realtime_mer/test_torch_tvl1.py tests/realtime_mer/test_runtime.py \
    tests/realtime_mer/test_features.py

  section "flow: pairs/s at batch 1, 16, 64"
  timeout 120 python3 benchmarks/flow.py --sizes 128 --batches 1 16 64 --devices cuda \
    --repeats 3 --out "$OUT/flow_bench.json"

  section "per-event features: GPU against the CPU"
  timeout 90 python3 benchmarks/event_features.py --devices cuda --batches 1 16 \
    --out "$OUT/event_features.json"

  section "mer analyze --flow auto on the real videos"
  for video in .gpu-media/talking/d3.mp4 .gpu-media/talking/d9.mp4 \
               .gpu-media/WolfgangLanger_Pexels.mp4; do
    [ -f "$video" ] || continue
    name=$(basename "$video" .mp4)
    /usr/bin/time -f "$name: %e s wall" timeout 90 python3 -m realtime_mer.cli analyze "$video" \
      --out "$OUT/analyze-$name" --flow auto --device auto
    python3 - "$OUT/analyze-$name/summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
features = s["timings_ms"].get("features", {})
print(json.dumps({"frames": s["frames"]["processed"],
                  "frames_per_s": round(s["throughput"]["frames_per_s"], 1),
                  "events": s["events"]["total"], "classified": s["events"]["total"]
                  - s["events"]["unclassified"] - s["events"]["blinks"],
                  "features_ms_median": features.get("median_ms")}))
PY
  done

  section "done"
} 2>&1 | tee "$OUT/gpu_check.log"
