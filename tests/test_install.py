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


def test_a_wheel_carries_the_default_engine_and_finds_it_without_the_repository(tmp_path):
    """`pip install .` (not editable) installs a wheel: it must hold the default engine, byte
    for byte, and the installed package must find and load it with no repository beside it."""
    import hashlib
    import importlib.util
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    import pytest

    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("building a wheel without isolation needs setuptools in this environment")
    from realtime_mer.runtime import default_engine_path

    import shutil

    repository_engine = default_engine_path()
    # Built from a copy of what a source distribution holds, so the build's scratch folder
    # stays out of the working tree.
    root, source = Path(__file__).resolve().parents[1], tmp_path / "source"
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("realtime_mer", "training"):
        shutil.copytree(root / name, source / name, ignore=skip)
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copyfile(root / name, source / name)
    (source / "engines").mkdir()
    for name in (repository_engine.name, repository_engine.name + ".json"):
        shutil.copyfile(repository_engine.parent / name, source / "engines" / name)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
         "-q", "-w", str(tmp_path / "wheel")],
        capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "wheel").glob("realtime_mer-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        engines = sorted(n for n in archive.namelist() if n.startswith("realtime_mer/engines/"))
        assert engines == [f"realtime_mer/engines/{repository_engine.name}",
                           f"realtime_mer/engines/{repository_engine.name}.json"]
        for name in engines:
            packaged = archive.read(name)
            original = (repository_engine.parent / Path(name).name).read_bytes()
            assert hashlib.sha256(packaged).digest() == hashlib.sha256(original).digest(), name
        archive.extractall(tmp_path / "site")
    code = ("import realtime_mer.runtime as r; p = r.default_engine_path(); "
            "e = r.load_engine(p); print(p); print(e.manifest.sha256)")
    env = {k: v for k, v in __import__("os").environ.items() if k != "MER_ENGINE"}
    env["PYTHONPATH"] = str(tmp_path / "site")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=tmp_path, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    path, sha = run.stdout.split()
    assert Path(path) == tmp_path / "site" / "realtime_mer" / "engines" / repository_engine.name
    assert sha == hashlib.sha256(repository_engine.read_bytes()).hexdigest()
