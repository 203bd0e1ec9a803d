"""The installed environment is the one the product needs."""

import pytest


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


def _pip_resolve(tmp_path, *requirements, no_deps=False):
    """What pip would install for ``requirements`` in an empty environment (``--dry-run
    --report``: metadata only, nothing installed) → {name: (version, requires_dist)}; skips
    when the package index cannot be reached."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    report = tmp_path / "report.json"
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet",
               "--ignore-installed", "--report", str(report), *requirements]
    if no_deps:
        command.insert(4, "--no-deps")
    run = subprocess.run(command, capture_output=True, text=True, timeout=600,
                         cwd=Path(__file__).resolve().parents[1])
    if run.returncode != 0:
        if "Could not fetch URL" in run.stderr or "NewConnectionError" in run.stderr:
            pytest.skip("the package index cannot be reached")
        raise AssertionError(run.stderr[-3000:])
    return {item["metadata"]["name"].lower().replace("_", "-"):
            (item["metadata"]["version"], item["metadata"].get("requires_dist", []))
            for item in json.loads(report.read_text())["install"]}


def test_the_tensorrt_extra_takes_the_torch_tensorrt_built_for_the_readmes_torch(tmp_path):
    """The `tensorrt` extra pins torch-tensorrt 2.13.*, and that release requires the torch the
    README installs (2.13): pip keeps that torch instead of replacing it (an unpinned extra
    picked torch-tensorrt 2.14 and upgraded torch). Its TensorRT libraries are stubs that
    download from NVIDIA at install time, so only torch-tensorrt itself is resolved here."""
    import tomllib
    from pathlib import Path

    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml")
                              .read_text())
    extra = [Requirement(r) for r in pyproject["project"]["optional-dependencies"]["tensorrt"]]
    trt = next(r for r in extra if r.name == "torch-tensorrt")
    resolved = _pip_resolve(tmp_path, str(trt), no_deps=True)
    version, requires = resolved["torch-tensorrt"]
    assert version.startswith("2.13.")
    torch_range = next(Requirement(r).specifier for r in requires
                       if Requirement(r).name == "torch")
    assert "2.13.0" in torch_range and "2.14.0" not in torch_range
    assert SpecifierSet(str(next(r for r in extra if r.name == "torch").specifier)) \
        .contains("2.13.0")


@pytest.mark.slow
def test_the_readme_install_resolves_to_numpy_1_and_opencv_4_11(tmp_path):
    """The README's install (`torch==2.13.0 -e .[test]`) resolves without trying the
    OpenCV releases that need numpy 2 (capped below 4.12): MediaPipe's numpy 1, OpenCV contrib
    4.11, the CPU torch asked for, and one ONNX Runtime package (not also onnxruntime-gpu)."""
    resolved = _pip_resolve(tmp_path, "torch==2.13.0", "-e", ".[test]")
    assert resolved["numpy"][0].startswith("1.")
    assert resolved["opencv-contrib-python"][0].startswith("4.11.")
    assert resolved["torch"][0].startswith("2.13.0")
    assert "onnxruntime" in resolved and "onnxruntime-gpu" not in resolved
    assert not {"opencv-python", "opencv-python-headless"} & set(resolved)
