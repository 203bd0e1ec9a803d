"""Checks on a ``.pt2`` engine before torch opens it: an engine file comes from users and must not
be able to run code.

``torch.export.load`` unpickles parts of a ``.pt2`` archive when the archive asks for it: weights
and constants marked ``use_pickle`` (``torch.load(weights_only=False)``), custom and opaque
objects (``pickle.loads``), and sample inputs that ``torch.load(weights_only=True)`` refuses (it
then retries with ``weights_only=False``). Unpickling runs whatever the pickle names, and a
manifest with a matching sha256 proves nothing, since whoever supplies the engine supplies its
manifest. So every such entry is refused before loading: weights and constants must be raw
tensor payloads, the sample inputs must load with ``weights_only=True``, and the archive must be
a plain zip of reasonable size whose members stay inside it.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path, PurePosixPath

from realtime_mer.errors import EngineError

__all__ = ["check_pt2", "MAX_UNCOMPRESSED_BYTES"]

#: A deployed network here is a few MB; a GB of payload is no engine of ours (and a zip bomb
#: must not be inflated to find that out).
MAX_UNCOMPRESSED_BYTES = 1 << 30
_CONFIGS = ("data/weights/model_weights_config.json", "data/constants/model_constants_config.json")
_RAW_PREFIXES = ("weight_", "tensor_constant")


def check_pt2(path: str | Path) -> None:
    """Raise :class:`EngineError` naming the reason if ``path`` is not a ``.pt2`` archive that
    ``torch.export.load`` can open without unpickling anything."""
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise EngineError(f"{path}: not a torch.export archive ({exc})") from None
    with archive:
        infos = archive.infolist()
        total = sum(i.file_size for i in infos)
        if total > MAX_UNCOMPRESSED_BYTES:
            raise EngineError(f"{path}: the archive unpacks to {total / 2**30:.1f} GB; refused")
        for info in infos:
            name = PurePosixPath(info.filename)
            if name.is_absolute() or ".." in name.parts:
                raise EngineError(f"{path}: archive member {info.filename!r} points outside it")
        names = {i.filename for i in infos}
        configs = [n for n in names if n.endswith(_CONFIGS)]
        if not any(n.endswith(_CONFIGS[0]) for n in configs):
            raise EngineError(f"{path}: no weights configuration; not a torch.export archive "
                              "this version of the product can check")
        for name in configs:
            try:
                config = json.loads(archive.read(name)).get("config", {})
            except (ValueError, AttributeError) as exc:
                raise EngineError(f"{path}: unreadable {name} ({exc})") from None
            for fqn, meta in config.items():
                if not isinstance(meta, dict):
                    raise EngineError(f"{path}: malformed entry {fqn!r} in {name}")
                if meta.get("use_pickle"):
                    raise EngineError(f"{path}: {fqn!r} is stored as a pickle, which loading "
                                      "would execute; refused (export it again with "
                                      "`python -m training export`)")
                if not str(meta.get("path_name", "")).startswith(_RAW_PREFIXES):
                    raise EngineError(f"{path}: {fqn!r} is a custom or opaque object "
                                      f"({meta.get('path_name')!r}), which loading would "
                                      "unpickle; refused")
        for name in names:
            if PurePosixPath(name).parent.name == "sample_inputs":
                _check_weights_only(path, name, archive.read(name))


def _check_weights_only(path: Path, name: str, payload: bytes) -> None:
    """torch retries a sample-input file that weights_only loading refuses with full
    unpickling: it must load with weights_only, or the archive is refused."""
    if not payload:
        return
    import torch

    try:
        torch.load(io.BytesIO(payload), weights_only=True)
    except Exception as exc:
        raise EngineError(f"{path}: {name} holds more than tensors ({type(exc).__name__}); "
                          "loading it would unpickle arbitrary objects; refused") from None
