"""Runtime: the shipped engine, its manifest checks, backends and their error paths."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from realtime_mer.errors import BackendUnavailable, EngineError, InputError
from realtime_mer.runtime import Manifest, default_engine_path, load_engine, manifest_path
from training.default_engine import ENGINE_BUDGET_BYTES

ENGINE = default_engine_path()
def _tensorrt_importable() -> bool:
    """A real import: an installed but broken torch_tensorrt (no TensorRT libraries, a torch it
    was not built for) counts as absent, and its tests skip instead of failing."""
    try:
        import tensorrt  # noqa: F401
        import torch_tensorrt  # noqa: F401
    except Exception:
        return False
    return True


HAS_TRT = _tensorrt_importable()


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.fixture(scope="module")
def engine():
    if not ENGINE.is_file():
        pytest.skip(f"{ENGINE} not built (python -m training export)")
    return load_engine(ENGINE, device="cpu")


def _copy(tmp_path: Path, name: str = "e.onnx") -> Path:
    dst = tmp_path / name
    shutil.copy(ENGINE, dst)
    shutil.copy(manifest_path(ENGINE), manifest_path(dst))
    return dst


def _rewrite_manifest(path: Path, **changes) -> None:
    d = json.loads(manifest_path(path).read_text())
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(d.get(key), dict):
            d[key] = {**d[key], **value}
        else:
            d[key] = value
    manifest_path(path).write_text(json.dumps(d))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_shipped_engine_manifest(engine):
    m = engine.manifest
    assert engine.name == "onnxruntime" and engine.device == "cpu"
    assert m.class_names == ["negative", "positive", "surprise"]
    assert m.input["shape"] == ["N", 3, 28, 28] and m.input["channels"] == ["u", "v", "strain"]
    assert m.sha256 == _sha(ENGINE)
    assert m.loso is not None and 0 < m.loso["uf1"] <= 1
    # All weights inside the one file (float32, no external data file), nothing much else.
    from training.models import create_model

    n_params = m.networks * sum(p.numel()
                                for p in create_model(m.model, **m.model_kwargs).parameters())
    assert 4 * n_params <= ENGINE.stat().st_size < 4 * n_params + 2**20


def test_predictions_equal_onnxruntime_direct(engine):
    import onnxruntime as ort

    x = np.random.default_rng(0).random((5, 3, 28, 28), dtype=np.float32)
    p = engine.predict(x)
    assert p.shape == (5, 3) and p.dtype == np.float32
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)
    sess = ort.InferenceSession(str(ENGINE), providers=["CPUExecutionProvider"])
    mean = np.array(engine.manifest.normalization["mean"], np.float32).reshape(1, 3, 1, 1)
    std = np.array(engine.manifest.normalization["std"], np.float32).reshape(1, 3, 1, 1)
    logits = sess.run(None, {"maps": (x - mean) / std})[0]
    e = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(p, e / e.sum(1, keepdims=True), atol=1e-6)
    np.testing.assert_allclose(engine.predict(x[0]), p[:1], atol=1e-6)  # single map


def test_onnx_runtime_threads_can_be_capped(engine):
    """A Ray worker given one CPU loads its engine with one ONNX Runtime thread: the same
    probabilities as the default pool's."""
    capped = load_engine(ENGINE, cpu_threads=1)
    assert capped.session.get_session_options().intra_op_num_threads == 1
    x = np.random.default_rng(1).random((8, 3, 28, 28), dtype=np.float32)
    np.testing.assert_allclose(capped.predict(x), engine.predict(x), atol=1e-6)


def test_training_maps_fit(engine, megc_dir):
    # Not a generalisation score (that is LOSO's job): the engine was trained on these maps.
    import csv

    from realtime_mer.features import load_3db_map

    rows = list(csv.DictReader((megc_dir / "labels.csv").open()))
    x = np.stack([load_3db_map(megc_dir / r["flow_file"]) for r in rows]).transpose(0, 3, 1, 2)
    y = np.array([int(r["label"]) for r in rows])
    acc = float((engine.predict(x).argmax(1) == y).mean())
    # The runtime reproduces what the exporter measured on the same maps with the eager model
    # (same preprocessing, normalisation and channel order); 1e-3 = below one sample in 442.
    assert acc == pytest.approx(engine.manifest.training["train_accuracy"], abs=1e-3)
    assert acc > 0.75  # far above chance (0.57 for always-negative): the channels are right


def test_bad_input(engine):
    with pytest.raises(InputError):
        engine.predict(np.zeros((2, 28, 28, 3), np.float32))
    with pytest.raises(InputError):
        engine.predict(np.full((1, 3, 28, 28), np.nan, np.float32))


def test_missing_engine_and_manifest(tmp_path):
    with pytest.raises(EngineError, match="missing"):
        load_engine(tmp_path / "nope.onnx")
    if not ENGINE.is_file():
        pytest.skip("no shipped engine")
    dst = tmp_path / "e.onnx"
    shutil.copy(ENGINE, dst)
    with pytest.raises(EngineError, match="manifest"):
        load_engine(dst)


def test_hash_mismatch(tmp_path):
    if not ENGINE.is_file():
        pytest.skip("no shipped engine")
    dst = _copy(tmp_path)
    with dst.open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(EngineError, match="sha256"):
        load_engine(dst)


def test_corrupt_onnx_with_matching_hash(tmp_path):
    if not ENGINE.is_file():
        pytest.skip("no shipped engine")
    dst = _copy(tmp_path)
    dst.write_bytes(b"this is not an onnx model" * 10)
    _rewrite_manifest(dst, sha256=_sha(dst))
    with pytest.raises(EngineError, match="cannot load"):
        load_engine(dst)


@pytest.mark.parametrize("change,msg", [
    ({"input": {"shape": ["N", 3, 32, 32]}}, "shape"),
    ({"input": {"name": "x"}}, "named"),
    ({"class_names": ["a", "b"]}, "per class"),
    ({"input": {"channels": ["u", "v"]}}, "channel"),
    ({"normalization": {"mean": [0.5], "std": [0.5]}}, "normalization"),
    ({"format": "torch_export"}, "format"),
    ({"input": {"kind": "stack16"}}, "unknown input kind"),
    ({"input": {"kind": "mcnet", "options": {"gain": 2}}}, "no option"),
    ({"input": {"kind": "mcnet", "options": {"use_omam": "no"}}}, "must be a true/false"),
    # six channels are both phases of a movement, named so, and only as the maps themselves
    ({"input": {"shape": ["N", 6, 28, 28], "channels": list("uvsabc")}}, "both phases"),
    ({"input": {"shape": ["N", 6, 28, 28], "kind": "colour",
                "channels": ["u", "v", "strain", "u_apex_offset", "v_apex_offset",
                             "strain_apex_offset"]}}, "both phases"),
])
def test_manifest_mismatch(tmp_path, change, msg):
    if not ENGINE.is_file():
        pytest.skip("no shipped engine")
    dst = _copy(tmp_path)
    _rewrite_manifest(dst, **change)
    with pytest.raises(EngineError, match=msg):
        load_engine(dst)


def test_manifest_not_json(tmp_path):
    if not ENGINE.is_file():
        pytest.skip("no shipped engine")
    dst = _copy(tmp_path)
    manifest_path(dst).write_text("{ nope")
    with pytest.raises(EngineError, match="JSON"):
        load_engine(dst)


def test_manifest_roundtrip():
    if not ENGINE.is_file():
        pytest.skip("no shipped engine")
    m = Manifest.load(manifest_path(ENGINE))
    assert Manifest.from_json(m.to_json()) == m
    # The default is a CV ensemble: the full-data model plus one per inner group.
    assert m.networks == m.training["schedule"]["inner_folds"] + 1 > 1
    single = Manifest.load(manifest_path(ENGINE.parent / "ststnet_mirror_3db.onnx"))
    assert single.networks == 1


def test_default_engine_path_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MER_ENGINE", str(tmp_path / "x.onnx"))
    assert default_engine_path() == tmp_path / "x.onnx"
    monkeypatch.delenv("MER_ENGINE")
    assert default_engine_path().name == "ststnet_cv6_mirror_shift2_cal_3db.onnx"
    assert default_engine_path().parent.name == "engines"


@pytest.fixture(scope="module")
def pt2_engine(tmp_path_factory, engine):
    """A torch.export program of an STSTNet with the shipped engine's manifest fields."""
    import torch

    from realtime_mer.runtime import sha256_file
    from training.models import create_model

    torch.manual_seed(0)
    model = create_model("ststnet").eval()
    batch = torch.export.Dim("batch", min=1, max=1024)
    ep = torch.export.export(model, (torch.rand(2, 3, 28, 28),), dynamic_shapes=({0: batch},))
    path = tmp_path_factory.mktemp("pt2") / "m.pt2"
    torch.export.save(ep, str(path))
    d = engine.manifest.to_dict()
    d.update(format="torch_export", sha256=sha256_file(path))
    Manifest.from_dict(d).save(manifest_path(path))
    return path, model


def test_torch_backend_matches_eager(pt2_engine):
    import torch

    path, model = pt2_engine
    b = load_engine(path, backend="torch", device="cpu")
    assert b.name == "torch" and b.device == "cpu"
    x = np.random.default_rng(1).random((4, 3, 28, 28), dtype=np.float32)
    with torch.no_grad():
        ref = torch.softmax(model(torch.from_numpy((x - 0.5) / 0.5)), 1).numpy()
    np.testing.assert_allclose(b.predict(x), ref, atol=1e-5)
    auto = load_engine(path, device="auto")  # falls back to torch where TensorRT is absent
    assert auto.name in ("torch", "tensorrt")
    with pytest.raises(EngineError, match="ONNX Runtime"):
        load_engine(path, backend="onnxruntime")


def test_torch_backend_spec_mismatch(pt2_engine, tmp_path):
    path, _ = pt2_engine
    dst = tmp_path / "m.pt2"
    shutil.copy(path, dst)
    shutil.copy(manifest_path(path), manifest_path(dst))
    _rewrite_manifest(dst, input={"shape": ["N", 3, 32, 32]})
    with pytest.raises(EngineError, match="input spec"):
        load_engine(dst, backend="torch", device="cpu")


@pytest.mark.skipif(HAS_TRT, reason="torch_tensorrt is installed; the unavailable path is moot")
def test_tensorrt_explicit_unavailable(pt2_engine):
    path, _ = pt2_engine
    with pytest.raises(BackendUnavailable, match="torch_tensorrt"):
        load_engine(path, backend="tensorrt")


def test_auto_falls_back_to_torch_when_tensorrt_cannot_compile(pt2_engine, monkeypatch, caplog):
    """Under backend="auto" any TensorRT failure (here: a compilation error, simulated because
    TensorRT cannot run on this machine) costs the speed-up, not the run."""
    import realtime_mer.runtime.backends as backends

    class FailingTensorRT:
        def __init__(self, path, manifest, device, precision="fp32"):
            raise EngineError(f"{path}: TensorRT compilation failed (unsupported operator)")

    monkeypatch.setattr(backends, "TensorRTBackend", FailingTensorRT)
    path, _ = pt2_engine
    with caplog.at_level("WARNING", logger="realtime_mer"):
        b = load_engine(path, device="auto")
    assert b.name == "torch"
    assert "compilation failed" in caplog.text
    with pytest.raises(EngineError, match="compilation failed"):  # explicit: no fallback
        load_engine(path, backend="tensorrt")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TRT, reason="torch_tensorrt is not importable")
def test_tensorrt_backend(pt2_engine):
    if not _cuda():
        pytest.skip("no CUDA device")
    path, model = pt2_engine
    b = load_engine(path, backend="tensorrt", device="cuda")
    x = np.random.default_rng(2).random((3, 3, 28, 28), dtype=np.float32)
    ref = load_engine(path, backend="torch", device="cpu").predict(x)
    got = b.predict(x)
    cos = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
    assert cos.min() >= 0.99 and (ref.argmax(1) == got.argmax(1)).all()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TRT, reason="torch_tensorrt is not importable")
def test_tensorrt_keeps_its_compiled_program_and_fp16_agrees(pt2_engine, tmp_path, monkeypatch):
    """The first load compiles and saves; the second loads the saved program (no compile) and
    gives the same scores; fp16 agrees with the engine by cosine >= 0.99 and argmax."""
    if not _cuda():
        pytest.skip("no CUDA device")
    monkeypatch.setenv("MER_CACHE_DIR", str(tmp_path))
    path, _ = pt2_engine
    x = np.random.default_rng(3).random((8, 3, 28, 28), dtype=np.float32)
    first = load_engine(path, backend="tensorrt", device="cuda")
    again = load_engine(path, backend="tensorrt", device="cuda")
    assert not first.from_cache and again.from_cache and again.cache_path.is_file()
    np.testing.assert_allclose(again.predict(x), first.predict(x), atol=1e-5)
    ref = load_engine(path, backend="torch", device="cpu").predict(x)
    half = load_engine(path, backend="tensorrt", device="cuda", precision="fp16").predict(x)
    cos = (ref * half).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(half, axis=1)
    assert cos.min() >= 0.99 and (ref.argmax(1) == half.argmax(1)).all()


def test_tensorrt_programs_are_kept_per_engine_gpu_versions_and_precision(tmp_path, monkeypatch):
    """The cache names a different file for any change that makes a compiled program stale,
    and lives in the user's cache folder, never beside the engine."""
    from realtime_mer.runtime.backends import tensorrt_cache_dir, tensorrt_cache_path

    monkeypatch.setenv("MER_CACHE_DIR", str(tmp_path / "cache"))
    versions = {"torch": "2.13.0", "torch_tensorrt": "2.13.0", "tensorrt": "10.9"}
    engine = tmp_path / "models" / "net.pt2"
    base = tensorrt_cache_path(engine, "a" * 64, "NVIDIA H100 sm90", versions, "fp32")
    assert base.parent == tensorrt_cache_dir() == tmp_path / "cache" / "tensorrt"
    assert base == tensorrt_cache_path(engine, "a" * 64, "NVIDIA H100 sm90", versions, "fp32")
    others = {
        tensorrt_cache_path(engine, "b" * 64, "NVIDIA H100 sm90", versions, "fp32"),
        tensorrt_cache_path(engine, "a" * 64, "NVIDIA H200 sm90", versions, "fp32"),
        tensorrt_cache_path(engine, "a" * 64, "NVIDIA H100 sm90",
                            {**versions, "tensorrt": "10.10"}, "fp32"),
        tensorrt_cache_path(engine, "a" * 64, "NVIDIA H100 sm90", versions, "fp16"),
    }
    assert base not in others and len(others) == 4
    monkeypatch.delenv("MER_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tensorrt_cache_dir() == tmp_path / "xdg" / "realtime-mer" / "tensorrt"


def test_explicit_cuda_without_cuda(pt2_engine):
    if _cuda():
        pytest.skip("a CUDA device is present")
    with pytest.raises(BackendUnavailable):
        load_engine(ENGINE, device="cuda")
    path, _ = pt2_engine
    with pytest.raises(BackendUnavailable):
        load_engine(path, backend="torch", device="cuda")


def test_unknown_backend_and_device():
    with pytest.raises(EngineError):
        load_engine(ENGINE, backend="tflite")
    with pytest.raises(EngineError):
        load_engine(ENGINE, device="tpu")


def test_default_engine_is_the_one_the_registered_rule_chooses(engine):
    """`python -m training default-engine` applies the rule (training/default_engine.py) to the
    results files; the shipped engine is its choice: the protocol of the best honest LOSO
    among engines under the budget, with the calibration of the best mean over the seeds, and
    its manifest quotes that calibration's run of the engine's own seed."""
    import subprocess
    import sys

    from training.calibrate import calibration_kind

    root = Path(__file__).resolve().parents[2]
    run = subprocess.run([sys.executable, "-m", "training", "default-engine", "--json"],
                         cwd=root, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    choice = json.loads(run.stdout)
    assert choice["too_big"]  # AHMSA-Net (25.8 MB) is over the budget, so the rule had work
    m = engine.manifest
    seed = m.training["schedule"]["seed"]
    assert m.model == choice["model"]
    assert m.networks == choice["networks"]
    applied = m.training.get("calibration")
    assert (None if applied is None else calibration_kind(m.training)) == choice["calibration"]
    quoted = [n for n in choice["files"][str(seed)] if m.loso["results_file"].endswith(n)]
    assert quoted, (m.loso["results_file"], choice["files"][str(seed)])
    assert m.loso["uf1"] == pytest.approx(choice["scores"][str(seed)], abs=1e-9)
    schedule, protocol = m.training["schedule"], choice["protocol"]
    shared = (schedule.keys() & protocol.keys()) - {"seed"}
    assert len(shared) >= 10 and all(schedule[k] == protocol[k] for k in shared), \
        {k: (schedule[k], protocol[k]) for k in shared if schedule[k] != protocol[k]}
    assert ENGINE.stat().st_size <= ENGINE_BUDGET_BYTES


# -- engines from users never run code ------------------------------------------------------------

_EXPLOIT = '''
import os, pickle, sys
class Payload:
    def __reduce__(self):
        return (os.system, ("touch " + sys.argv[1],))
sys.stdout.buffer.write(pickle.dumps(Payload(), protocol=2))
'''


def _craft(pt2: Path, target: Path, marker: Path, where: str) -> None:
    """A copy of a real .pt2 whose ``where`` ("weight": a weight marked use_pickle; "sample
    inputs") is a pickle that creates ``marker`` when unpickled."""
    import subprocess
    import sys
    import zipfile

    evil = subprocess.run([sys.executable, "-c", _EXPLOIT, str(marker)], capture_output=True,
                          check=True).stdout
    with zipfile.ZipFile(pt2) as src, zipfile.ZipFile(target, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if where == "weight" and info.filename.endswith("model_weights_config.json"):
                config = json.loads(data)
                first = next(iter(config["config"].values()))
                first["use_pickle"] = True
                evil_name = first["path_name"]
                data = json.dumps(config).encode()
            if where == "sample inputs" and "/sample_inputs/" in info.filename:
                data = evil
            dst.writestr(info, data)
    if where == "weight":  # the payload of the weight now marked as a pickle
        with zipfile.ZipFile(target) as z:
            items = [(i, z.read(i.filename)) for i in z.infolist()]
        with zipfile.ZipFile(target, "w") as z:
            for info, data in items:
                z.writestr(info, evil if info.filename.endswith("/" + evil_name) else data)


@pytest.mark.parametrize("where", ["weight", "sample inputs"])
def test_a_crafted_pt2_is_refused_before_it_can_run_code(pt2_engine, tmp_path, where):
    """A .pt2 whose archive asks torch to unpickle (a weight marked use_pickle, or sample inputs
    that only full unpickling reads) runs code in torch.export.load: shown here in a separate
    process. The product refuses it, with a manifest whose sha256 matches (whoever supplies an
    engine supplies its manifest), before torch opens it: no code runs."""
    import subprocess
    import sys

    path, _ = pt2_engine
    evil, marker = tmp_path / "evil.pt2", tmp_path / "pwned"
    _craft(path, evil, marker, where)
    d = json.loads(manifest_path(path).read_text())
    d["sha256"] = _sha(evil)
    manifest_path(evil).write_text(json.dumps(d))
    # The danger is real: plain torch.export.load runs the payload.
    subprocess.run([sys.executable, "-c", f"import torch; torch.export.load({str(evil)!r})"],
                   capture_output=True)
    assert marker.exists(), "the crafted archive should run code in torch.export.load"
    marker.unlink()
    with pytest.raises(EngineError, match="pickle|unpickl"):
        load_engine(evil, backend="torch", device="cpu")
    assert not marker.exists()


def test_ensemble_members_must_live_beside_it(tmp_path):
    from realtime_mer.runtime.ensemble import COMBINE_RULE

    ens = tmp_path / "e.ens"
    ens.write_text(json.dumps({"combine": COMBINE_RULE, "members": [
        {"file": "../outside.onnx", "sha256": "0" * 64},
        {"file": "/etc/passwd", "sha256": "0" * 64}]}))
    from realtime_mer.runtime.backends import _load_ensemble

    with pytest.raises(EngineError, match="outside the ensemble's folder"):
        _load_ensemble(ens, None, "auto", "cpu")


def test_a_pt2_program_moves_whole_to_the_device_with_its_lifted_constants(tmp_path):
    """A network whose forward uses a constant tensor (as the mirrored, calibrated default
    does: flip indices, calibration offsets) is exported with that constant lifted out of the
    graph. `.module().to(device)` leaves it behind; exported_on moves it too. Checked from CPU
    to the meta device here (no GPU needed), and run on CUDA where there is one."""
    import torch

    from realtime_mer.runtime.backends import exported_on

    class Calibrated(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(12, 3)

        def forward(self, x):
            mirrored = torch.flip(x, dims=[-1])
            offsets = torch.tensor([0.1, -0.2, 0.3])  # becomes a lifted constant
            return (self.fc(x.flatten(1)) + self.fc(mirrored.flatten(1))) / 2 + offsets

    model = Calibrated().eval()

    def export():
        return torch.export.export(model, (torch.rand(2, 3, 4),))

    program = export()
    assert program.constants, "the offsets should be a lifted constant"
    assert all(t.device.type == "cpu" for t in program.constants.values())
    plain = program.module().to("meta")
    moved = exported_on(export(), "meta")
    assert all(t.device.type == "meta" for t in moved.constants.values())
    assert all(p.device.type == "meta" for p in moved.module().parameters())
    with pytest.raises(Exception):  # the left-behind CPU constant meets meta tensors
        plain(torch.rand(2, 3, 4, device="meta"))
    assert moved.module()(torch.rand(2, 3, 4, device="meta")).shape == (2, 3)
    if _cuda():
        on_gpu = exported_on(export(), "cuda").module()
        x = torch.rand(2, 3, 4)
        np.testing.assert_allclose(on_gpu(x.cuda()).cpu().numpy(),
                                   program.module()(x).detach().numpy(), atol=1e-5)
