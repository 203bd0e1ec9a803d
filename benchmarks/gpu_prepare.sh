#!/usr/bin/env bash
# Prepares what benchmarks/gpu_check.sh needs on an air-gapped GPU machine (Python 3.12, torch
# with CUDA, no MediaPipe, PyAV or cv2.optflow, no package index). Run here, in the repository
# root, on a machine that reaches PyPI:
#
#   bash benchmarks/gpu_prepare.sh            # wheels into .whl/, real media into .gpu-media/
#
# Both folders are git-ignored (.git/info/exclude) and travel with the working tree when the
# GPU call names them in its carry list. A call carries at most 64 MiB with the working tree
# (about 15 MiB), so the wheels are put in numbered sets of at most 45 MiB (.whl/1, .whl/2, ...;
# OpenCV's 56 MB wheel in pieces): one call per set stages it (`gpu_check.sh stage N`) on the
# warm machine, and `gpu_check.sh run` joins the pieces and installs them all.
set -euo pipefail
cd "$(dirname "$0")/.."
for path in /.whl/ /.gpu-media/ /.gpu-media-root/ /gpu-check/; do
  grep -qxF "$path" .git/info/exclude 2>/dev/null || echo "$path" >> .git/info/exclude
done
download() {  # folder, then NAME==VERSION ...
  local folder=$1; shift
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$folder" "$@"
}
rm -rf .whl
# The versions the CPU install resolves to, numpy 1 for MediaPipe 0.10.21 (the GPU image has
# numpy 2, and attrs, matplotlib, jax and tqdm already).
download .whl/1 mediapipe==0.10.21 absl-py==2.5.1 sounddevice==0.5.6 cffi==2.1.1 \
  pycparser==3.12 flatbuffers==25.12.19 protobuf==4.25.9 sentencepiece==0.2.3
download .whl/2 av==18.1.0
download .whl/3 numpy==1.26.4 silero-vad==6.2.3
# OpenCV with the contrib modules (cv2.optflow: TV-L1), in two pieces
download .whl/opencv opencv-contrib-python-headless==4.11.0.86
mkdir -p .whl/4 .whl/5
wheel=$(ls .whl/opencv/*.whl)
split -n 2 -d "$wheel" ".whl/4/$(basename "$wheel").part"
mv ".whl/4/$(basename "$wheel").part01" .whl/5/
rm -r .whl/opencv
mkdir -p .gpu-media/talking .gpu-media/calibration
SHARED=${MER_SHARED:-../shared}
cp "$SHARED"/media/talking/*.mp4 .gpu-media/talking/
cp "$SHARED"/media/WolfgangLanger_Pexels.mp4 "$SHARED"/media/single_face.mp4 .gpu-media/
cp "$SHARED"/media/calibration/* .gpu-media/calibration/
du -sh .whl/* .gpu-media
