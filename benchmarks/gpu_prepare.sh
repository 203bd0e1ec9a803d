#!/usr/bin/env bash
# Prepares what benchmarks/gpu_check.sh needs on an air-gapped GPU machine (Python 3.12, torch
# with CUDA, no MediaPipe, PyAV or cv2.optflow, no package index). Run here, in the repository
# root, on a machine that reaches PyPI:
#
#   bash benchmarks/gpu_prepare.sh            # wheels into .whl/, real media into .gpu-media/
#
# Both folders are git-ignored (.git/info/exclude) and travel with the working tree when the
# GPU call names them in its carry list. The wheels are split in two sets (.whl/a, .whl/b) so
# that each call stays under a 64 MiB working-tree limit: gpu_check.sh installs the set it is
# given into /tmp/mer-site, which a warm machine keeps between calls.
set -euo pipefail
cd "$(dirname "$0")/.."
for path in /.whl/ /.gpu-media/; do
  grep -qxF "$path" .git/info/exclude 2>/dev/null || echo "$path" >> .git/info/exclude
done
download() {  # folder, then NAME==VERSION ...
  local folder=$1; shift
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$folder" "$@"
}
# set a: the face tracker and the decoder, with the numpy that MediaPipe 0.10.21 is built for
download .whl/a mediapipe==0.10.21 av==14.4.0 numpy==1.26.4 absl-py==2.1.0 \
  sounddevice==0.5.1 cffi==1.17.1 pycparser==2.22 attrs==25.3.0 flatbuffers==25.2.10 \
  protobuf==4.25.8 sentencepiece==0.2.0 silero-vad==6.2.0
# set b: OpenCV with the contrib modules (cv2.optflow: TV-L1) and the project's own light needs
download .whl/b opencv-contrib-python-headless==4.11.0.86 tqdm==4.67.1
mkdir -p .gpu-media/talking .gpu-media/calibration
SHARED=${MER_SHARED:-../shared}
cp "$SHARED"/media/talking/*.mp4 .gpu-media/talking/
cp "$SHARED"/media/WolfgangLanger_Pexels.mp4 "$SHARED"/media/single_face.mp4 .gpu-media/
cp "$SHARED"/media/calibration/* .gpu-media/calibration/
du -sh .whl/a .whl/b .gpu-media
