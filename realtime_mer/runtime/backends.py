"""Engine backends behind one interface: ONNX Runtime, torch (torch.export programs) and
TensorRT (torch-tensorrt, imported lazily). Chosen by file type and availability."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np

from realtime_mer.errors import BackendUnavailable, EngineError, InputError
from realtime_mer.input_kinds import network_inputs
from realtime_mer.runtime.manifest import Manifest, manifest_path

log = logging.getLogger(__name__)

__all__ = ["Backend", "OnnxRuntimeBackend", "TorchBackend", "TensorRTBackend", "load_engine",
           "default_engine_path", "BACKENDS"]

BACKENDS = ("auto", "onnxruntime", "torch", "tensorrt")
# The network with the best honest LOSO UF1 among those whose engine fits the repository's size
# budget, calibrated by the rule with the best mean UF1 over its protocol's seeds
# (docs/RESULTS.md; a test keeps this true).
_DEFAULT_ENGINE = "ststnet_cv6_mirror_shift2_cal_3db.onnx"


def default_engine_path() -> Path:
    """``$MER_ENGINE`` if set, else the default engine,
    ``engines/ststnet_cv6_mirror_shift2_cal_3db.onnx``: in the repository (a checkout or an
    editable install), or else the copy a wheel carries in ``realtime_mer/engines/`` (setup.py)."""
    env = os.environ.get("MER_ENGINE")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    repository, packaged = here.parents[2] / "engines", here.parents[1] / "engines"
    if not (repository / _DEFAULT_ENGINE).exists() and (packaged / _DEFAULT_ENGINE).exists():
        return packaged / _DEFAULT_ENGINE
    return repository / _DEFAULT_ENGINE


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (the manifest's ``sha256``)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class Backend:
    """A loaded engine. ``predict(maps, landmarks=None)`` takes raw (N, 3, 28, 28) float32
    (u, v, strain) maps in [0, 1] ((N, 6, 28, 28), both phases of each movement, for an engine
    whose ``manifest.phases`` is 2) (and, for engines whose input kind locates facial regions,
    their (N, 5, 2) landmarks in the maps' frame; None means the aligned-face template),
    builds the engine's input kind, applies the manifest's normalisation and returns (N, C)
    float32 probabilities summing to 1 (classes ``manifest.class_names``)."""

    name = "base"

    def __init__(self, path: Path, manifest: Manifest, device: str) -> None:
        self.path = path
        self.manifest = manifest
        self.device = device
        c = manifest.input["shape"][1]
        self._mean = np.asarray(manifest.normalization["mean"], np.float32).reshape(1, c, 1, 1)
        self._std = np.asarray(manifest.normalization["std"], np.float32).reshape(1, c, 1, 1)

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest.class_names)

    @property
    def uses_landmarks(self) -> bool:
        """Whether the input kind is built from the face's five landmarks."""
        return self.manifest.input_kind.uses_landmarks

    def _prepare(self, maps: np.ndarray, landmarks: np.ndarray | None = None) -> np.ndarray:
        x = np.asarray(maps)
        spec = self.manifest.input["shape"]
        # The manifest's input kind says how the engine's input is built from the (N, 3, H, W)
        # maps: input_kinds.network_inputs, as in training.
        kind = self.manifest.input_kind
        if x.ndim == 3:
            x = x[None]
        same_shape = kind.keeps_map_size
        expected = list(spec[1:]) if same_shape else [3]
        if x.ndim != 4 or list(x.shape[1:1 + len(expected)]) != expected:
            want = (f"(N, {spec[1]}, {spec[2]}, {spec[3]})" if same_shape
                    else "(N, 3, H, W) (u, v, strain) maps")
            raise InputError(f"engine input must be {want} {self.manifest.input['layout']}, "
                             f"got {tuple(np.shape(maps))}")
        if x.shape[0] == 0:
            raise InputError("empty batch")
        x = x.astype(np.float32, copy=False)
        if not np.isfinite(x).all():
            raise InputError("maps contain NaN or infinity")
        if not kind.is_identity:
            if landmarks is not None:
                landmarks = np.asarray(landmarks, dtype=np.float64)
                if landmarks.ndim == 2:
                    landmarks = landmarks[None]
                if landmarks.shape != (x.shape[0], 5, 2):
                    raise InputError(f"landmarks must be (N, 5, 2) for {x.shape[0]} map(s), "
                                     f"got {tuple(np.shape(landmarks))}")
            try:
                x = network_inputs(x, kind.name, None if same_shape else int(spec[-1]),
                                   landmarks=landmarks,
                                   options=self.manifest.input.get("options"))
            except ValueError as exc:
                raise InputError(f"engine input {kind!r} cannot be built: {exc}") from exc
        return np.ascontiguousarray((x - self._mean) / self._std)

    def _run(self, x: np.ndarray) -> np.ndarray:  # (N, C) network output
        raise NotImplementedError

    def predict(self, maps: np.ndarray, landmarks: np.ndarray | None = None) -> np.ndarray:
        out = np.asarray(self._run(self._prepare(maps, landmarks)), dtype=np.float32)
        if self.manifest.output.get("kind", "logits") == "logits":
            out = _softmax(out)
        return out.astype(np.float32)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path.name}, device={self.device!r})"


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, path: Path, manifest: Manifest, device: str = "auto",
                 cpu_threads: int | None = None) -> None:
        import onnxruntime as ort

        requested = device
        available = ort.get_available_providers()
        if device == "cuda" and "CUDAExecutionProvider" not in available:
            raise BackendUnavailable(
                f"device='cuda' asked for ONNX Runtime, but this onnxruntime has no "
                f"CUDAExecutionProvider (available: {available}); install onnxruntime-gpu"
            )
        if device == "auto":
            if "CUDAExecutionProvider" in available:
                device = "cuda"
            else:
                log.info("ONNX Runtime: no CUDAExecutionProvider, running on CPU")
                device = "cpu"
        providers = (["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda"
                     else ["CPUExecutionProvider"])
        super().__init__(path, manifest, device)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if cpu_threads is not None:  # else one thread per core, each spinning between runs
            opts.intra_op_num_threads = cpu_threads
            opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as exc:
            raise EngineError(f"{path}: ONNX Runtime cannot load it ({exc})") from exc
        # get_available_providers() lists what the package was built with, not a GPU that
        # works: the session says which provider it really got.
        if device == "cuda" and self.session.get_providers()[0] != "CUDAExecutionProvider":
            if requested == "cuda":
                raise BackendUnavailable(
                    f"device='cuda' asked for ONNX Runtime, but its CUDAExecutionProvider "
                    f"could not start here (session providers: {self.session.get_providers()})")
            log.info("ONNX Runtime: CUDAExecutionProvider did not start, running on CPU")
            self.device = "cpu"
        self._check_io()

    def _check_io(self) -> None:
        m = self.manifest
        ins = self.session.get_inputs()
        if len(ins) != 1:
            raise EngineError(f"{self.path}: the model has {len(ins)} inputs; expected one")
        i = ins[0]
        if i.name != m.input["name"]:
            raise EngineError(f"{self.path}: model input is named {i.name!r} but the manifest "
                              f"says {m.input['name']!r}")
        if i.type != "tensor(float)":
            raise EngineError(f"{self.path}: model input type {i.type}; manifest says float32")
        spec = m.input["shape"]
        if len(i.shape) != len(spec) or any(
            isinstance(a, int) and isinstance(b, int) and a != b for a, b in zip(i.shape, spec)
        ):
            raise EngineError(f"{self.path}: model input shape {i.shape} does not match the "
                              f"manifest's {spec}")
        out_shape = self.session.get_outputs()[0].shape
        c = len(m.class_names)
        if len(out_shape) != 2 or (isinstance(out_shape[1], int) and out_shape[1] != c):
            raise EngineError(f"{self.path}: model output shape {out_shape} does not give one "
                              f"score per class ({c} classes in the manifest)")
        self._input_name = i.name

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self._input_name: x})[0]


def _torch_device(device: str, what: str) -> str:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable(f"device='cuda' asked for {what}, but torch sees no CUDA device")
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        log.info("%s: no CUDA device, running on CPU", what)
        return "cpu"
    if device not in ("cpu", "cuda"):
        raise EngineError(f"unknown device {device!r}; choose auto, cpu or cuda")
    return device


def _load_exported(path: Path):
    import torch

    from realtime_mer.runtime.safe_archive import check_pt2

    check_pt2(path)  # before torch opens it: nothing in an engine file may run as code
    try:
        return torch.export.load(str(path))
    except Exception as exc:
        raise EngineError(f"{path}: not a loadable torch.export program ({exc})") from exc


def exported_on(program, device: str):
    """The program with every tensor it holds on ``device``: its parameters and buffers, and
    also the constants ``torch.export`` lifts out of the graph (the mirror average's flip
    indices, a calibration's offsets), which ``.module().to(device)`` leaves on the CPU."""
    from torch.export.passes import move_to_device_pass

    return move_to_device_pass(program, device)


class TorchBackend(Backend):
    """A ``torch.export`` program (``.pt2``, saved with ``torch.export.save``)."""

    name = "torch"

    def __init__(self, path: Path, manifest: Manifest, device: str = "auto") -> None:
        import torch

        device = _torch_device(device, "the torch backend")
        super().__init__(path, manifest, device)
        self.module = exported_on(_load_exported(path), device).module()
        self._torch = torch
        self._probe()

    def _probe(self) -> None:
        spec = self.manifest.input["shape"]
        x = np.zeros([2, *spec[1:]], np.float32)
        try:
            out = self._run(x)
        except Exception as exc:
            raise EngineError(f"{self.path}: the program does not accept the manifest's input "
                              f"spec {spec} ({exc})") from exc
        if out.shape != (2, len(self.manifest.class_names)):
            raise EngineError(f"{self.path}: output shape {out.shape} for 2 inputs; expected "
                              f"(2, {len(self.manifest.class_names)})")

    def _run(self, x: np.ndarray) -> np.ndarray:
        with self._torch.no_grad():
            out = self.module(self._torch.from_numpy(x).to(self.device))
        return out.float().cpu().numpy()


PRECISIONS = ("fp32", "fp16")


def tensorrt_cache_dir() -> Path:
    """Where compiled TensorRT programs are kept: ``$MER_CACHE_DIR/tensorrt``, else
    ``$XDG_CACHE_HOME/realtime-mer/tensorrt`` (``~/.cache/...``). A private folder of the user,
    not the engine's: a TensorRT plan can carry plugin code, so one is only ever loaded from a
    place that only this user's runs have written to."""
    base = os.environ.get("MER_CACHE_DIR")
    if base:
        return Path(base) / "tensorrt"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "realtime-mer" / "tensorrt"


def tensorrt_cache_path(engine: Path, engine_sha256: str, gpu: str, versions: dict[str, str],
                        precision: str) -> Path:
    """The compiled program for this engine, GPU, software versions and precision: any change
    of them names another file, so a stale program is never loaded (it is compiled again)."""
    import json

    key = hashlib.sha256(json.dumps([engine_sha256, gpu, sorted(versions.items()), precision])
                         .encode()).hexdigest()[:20]
    return tensorrt_cache_dir() / f"{Path(engine).stem}-{precision}-{key}.ep"


class TensorRTBackend(TorchBackend):
    """torch-tensorrt compilation of a ``torch.export`` program, on CUDA only. The compiled
    program is saved (``torch_tensorrt.save``) in :func:`tensorrt_cache_dir`, keyed by the
    engine's hash, the GPU and the torch, torch-tensorrt and TensorRT versions, and loaded from
    there on the next run instead of compiling again (minutes → seconds). ``precision="fp16"``
    lets TensorRT run layers in half precision."""

    name = "tensorrt"

    def __init__(self, path: Path, manifest: Manifest, device: str = "auto",
                 precision: str = "fp32") -> None:
        import torch

        if device == "cpu":
            raise BackendUnavailable("TensorRT runs on CUDA only; device='cpu' was asked")
        if precision not in PRECISIONS:
            raise EngineError(f"unknown precision {precision!r}; choose fp32 or fp16")
        try:
            import tensorrt
            import torch_tensorrt  # optional dependency, imported only here
        except Exception as exc:
            raise BackendUnavailable(f"torch_tensorrt cannot be imported ({exc}); install "
                                     "realtime-mer[tensorrt]") from exc
        if not torch.cuda.is_available():
            raise BackendUnavailable("TensorRT needs a CUDA device; torch sees none")
        Backend.__init__(self, path, manifest, "cuda")
        self._torch = torch
        self.precision = precision
        versions = {"torch": torch.__version__, "torch_tensorrt": torch_tensorrt.__version__,
                    "tensorrt": tensorrt.__version__}
        gpu = f"{torch.cuda.get_device_name()} sm{''.join(map(str, torch.cuda.get_device_capability()))}"
        self.cache_path = tensorrt_cache_path(path, manifest.sha256, gpu, versions, precision)
        self.from_cache = False
        if self.cache_path.is_file():
            try:
                self.module = _load_exported(self.cache_path).module()
                self._probe()
                self.from_cache = True
                log.info("TensorRT program loaded from %s", self.cache_path)
                return
            except (EngineError, InputError) as exc:
                log.warning("compiled TensorRT program %s not usable (%s); compiling again",
                            self.cache_path, exc)
        spec = manifest.input["shape"]
        ep = exported_on(_load_exported(path), "cuda")
        precisions = {torch.float32} | ({torch.float16} if precision == "fp16" else set())
        try:
            inputs = [torch_tensorrt.Input(min_shape=[1, *spec[1:]], opt_shape=[8, *spec[1:]],
                                           max_shape=[256, *spec[1:]], dtype=torch.float32)]
            self.module = torch_tensorrt.dynamo.compile(ep, inputs=inputs,
                                                        enabled_precisions=precisions)
        except Exception as exc:
            raise EngineError(f"{path}: TensorRT compilation failed ({exc})") from exc
        self._probe()
        self._save(torch_tensorrt, spec)

    def _save(self, torch_tensorrt, spec) -> None:
        """Keep the compiled program for the next run (atomically: a run stopped while saving
        leaves no half-written program to be loaded later). A failure costs only the reuse."""
        example = self._torch.zeros([2, *spec[1:]], device="cuda")
        partial = self.cache_path.with_name(self.cache_path.name + f".{os.getpid()}.part")
        try:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            torch_tensorrt.save(self.module, str(partial), output_format="exported_program",
                                arg_inputs=[example])
            os.replace(partial, self.cache_path)
            log.info("TensorRT program saved to %s", self.cache_path)
        except Exception as exc:
            partial.unlink(missing_ok=True)
            log.warning("could not keep the compiled TensorRT program (%s); the next run "
                        "compiles again", exc)


def engine_format(path: Path) -> str:
    """The engine format a file name stands for (the manifest must say the same)."""
    s = path.suffix.lower()
    if s == ".onnx":
        return "onnx"
    if s in (".pt2", ".ep"):
        return "torch_export"
    if s == ".ens":
        return "ensemble"
    raise EngineError(f"{path}: unknown engine type {s!r} (expected .onnx, .pt2 or .ens)")


def _load_ensemble(path: Path, manifest: Manifest, backend: str, device: str,
                   cpu_threads: int | None = None):
    """Every member of an ensemble file, each verified against its own manifest and against
    the hash the ensemble recorded (its LOSO score was measured with exactly those)."""
    from realtime_mer.runtime.ensemble import ENSEMBLE_SUFFIX, EnsembleBackend, read_members

    members = []
    folder = path.parent.resolve()
    for entry in read_members(path):
        member_path = path.parent / entry["file"]
        # Members live beside the ensemble: a list naming other files of the machine
        # (absolute paths, "..") is not one of ours.
        if folder not in member_path.resolve().parents:
            raise EngineError(f"{path}: member {entry['file']!r} is outside the ensemble's "
                              "folder; refused")
        if member_path.suffix.lower() == ENSEMBLE_SUFFIX:
            raise EngineError(f"{path}: member {entry['file']} is itself an ensemble")
        try:
            engine = load_engine(member_path, backend, device, cpu_threads=cpu_threads)
        except EngineError as exc:
            raise EngineError(f"{path}: member {entry['file']}: {exc}") from exc
        if engine.manifest.sha256 != entry["sha256"]:
            raise EngineError(f"{path}: member {entry['file']} is not the engine the ensemble "
                              f"was built with (sha256 {engine.manifest.sha256[:16]}…, recorded "
                              f"{entry['sha256'][:16]}…)")
        members.append(engine)
    return EnsembleBackend(path, manifest, members)


def load_engine(path: str | Path | None = None, backend: str = "auto",
                device: str = "auto", precision: str = "fp32",
                cpu_threads: int | None = None) -> Backend:
    """Load an engine and verify it against its manifest (``<path>.json``).

    backend: "auto" (by file type: .onnx → ONNX Runtime; .pt2 → TensorRT where torch_tensorrt
    and CUDA are present, else torch; .ens → an ensemble whose members load with the same
    backend and device), "onnxruntime", "torch" or "tensorrt". device: "auto",
    "cpu" or "cuda". precision: "fp32" or "fp16" (TensorRT only; other backends run the
    engine as it is). cpu_threads: ONNX Runtime's threads on the CPU (None: one per core; a
    worker given one CPU passes 1). "auto" falls back with a logged reason; an explicit request
    that cannot be met raises BackendUnavailable. Missing/corrupt files, hash or input-spec
    mismatch raise EngineError.
    """
    path = Path(path) if path is not None else default_engine_path()
    if backend not in BACKENDS:
        raise EngineError(f"unknown backend {backend!r}; choose from {BACKENDS}")
    if device not in ("auto", "cpu", "cuda"):
        raise EngineError(f"unknown device {device!r}; choose auto, cpu or cuda")
    if not path.is_file():
        raise EngineError(f"engine file {path} is missing")
    manifest = Manifest.load(manifest_path(path))
    fmt = engine_format(path)
    if manifest.format != fmt:
        raise EngineError(f"{path}: manifest says format {manifest.format!r}, file is {fmt!r}")
    digest = sha256_file(path)
    if digest != manifest.sha256:
        raise EngineError(f"{path}: sha256 {digest[:16]}… does not match the manifest's "
                          f"{manifest.sha256[:16]}… (engine and manifest are out of step)")

    if fmt == "ensemble":
        return _load_ensemble(path, manifest, backend, device, cpu_threads)
    if fmt == "onnx":
        if backend not in ("auto", "onnxruntime"):
            raise BackendUnavailable(f"backend {backend!r} cannot run an ONNX file here; "
                                     "use onnxruntime or export a .pt2 program")
        return OnnxRuntimeBackend(path, manifest, device, cpu_threads)
    if backend == "onnxruntime":
        raise EngineError(f"{path}: ONNX Runtime cannot run a torch.export program")
    if backend == "tensorrt":
        return TensorRTBackend(path, manifest, device, precision)
    if backend == "auto" and device != "cpu":
        try:
            return TensorRTBackend(path, manifest, device, precision)
        except EngineError as exc:  # not installed, no CUDA, or a program it cannot compile
            log.warning("TensorRT not used (%s); falling back to the torch backend", exc)
    return TorchBackend(path, manifest, device)
