"""The installed environment is the one the product needs."""

def test_opencv_contrib_is_not_shadowed():
    import cv2

    # opencv-python(-headless), if pulled by another package, replaces the cv2 of
    # opencv-contrib-python and TV-L1 disappears with cv2.optflow.
    assert hasattr(cv2, "optflow"), "cv2.optflow missing: opencv-python(-headless) shadows contrib"
    assert hasattr(cv2.optflow, "DualTVL1OpticalFlow_create")


def test_mediapipe_ships_face_mesh():
    from mediapipe.python.solutions import face_mesh

    assert hasattr(face_mesh, "FaceMesh")


def test_optional_tensorrt_is_imported_lazily():
    """torch-tensorrt is an optional extra: importing the product and loading the default
    engine must not import it (it is only imported when the TensorRT backend is asked for)."""
    import subprocess
    import sys

    code = ("import sys, realtime_mer.pipeline, realtime_mer.runtime as r; "
            "r.load_engine(r.default_engine_path()); "
            "print('torch_tensorrt' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
