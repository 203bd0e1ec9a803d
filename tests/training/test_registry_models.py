"""Registry behaviour and the same battery for every registered model: shape, gradients,
deterministic eval, ONNX and torch.export round trips (cosine >= 0.99, equal argmax)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.models import create_model, list_models, register_model
from training.models.registry import _REGISTRY

torch.set_num_threads(1)


def test_registry_refuses_duplicates_and_lists():
    assert "ststnet" in list_models()
    with pytest.raises(ValueError, match="already registered"):
        register_model("ststnet")(torch.nn.Identity)


def test_unknown_model_lists_known():
    with pytest.raises(KeyError, match="ststnet"):
        create_model("no-such-model")


def test_register_new_name():
    try:
        register_model("_tmp_test_model")(lambda **kw: torch.nn.Linear(2, 2))
        assert isinstance(create_model("_tmp_test_model"), torch.nn.Linear)
    finally:
        _REGISTRY.pop("_tmp_test_model", None)


def _cos_argmax(a: np.ndarray, b: np.ndarray) -> tuple[float, bool]:
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(cos.min()), bool((a.argmax(1) == b.argmax(1)).all())


# One sample's input shape per registered model (the papers' inputs, realtime_mer.input_kinds).
INPUT_SHAPES = {
    "ststnet": (3, 28, 28),
    "ahmsa": (3, 28, 28),
    "mjfn": (3, 224, 224),
    "mcnet": (3, 224, 224),
    "ms3d_resnet50": (3, 16, 134, 134),
}
# Big networks take minutes for the full battery on a small CPU: run them with `-m slow`.
FAST_PARAM_LIMIT = 1_000_000


def _model_params():
    out = []
    for name in list_models():
        if name.startswith("_"):
            continue
        n = sum(p.numel() for p in create_model(name).parameters())
        marks = [pytest.mark.slow] if n > FAST_PARAM_LIMIT else []
        out.append(pytest.param(name, marks=marks, id=name))
    return out


@pytest.fixture(params=_model_params())
def model(request):
    if request.param not in INPUT_SHAPES:
        pytest.skip(f"no input shape known for model {request.param!r}; add it to INPUT_SHAPES")
    torch.manual_seed(0)
    m = create_model(request.param)
    m.sample_shape = INPUT_SHAPES[request.param]
    # A few training steps so BatchNorm statistics are not the identity.
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    for _ in range(2):
        loss = m(_x(m, 4)).logsumexp(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


def _x(m, n: int) -> torch.Tensor:
    return torch.rand(n, *m.sample_shape)


def test_output_shape(model):
    assert model(_x(model, 3)).shape == (3, 3)
    bad = torch.rand(3, *model.sample_shape[:-2], 9, 9)
    with pytest.raises((ValueError, RuntimeError)):
        model(bad)


def test_every_parameter_gets_gradient(model):
    model.train()
    model.zero_grad()
    model(_x(model, 4)).pow(2).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    model.eval()


def test_deterministic_eval(model):
    x = _x(model, 3)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        assert torch.allclose(model(x[:1]), model(x)[:1], atol=1e-6)


def test_onnx_roundtrip(model, tmp_path):
    from training.export import check_export, export_onnx

    path = tmp_path / "m.onnx"
    export_onnx(model, path, example=_x(model, 2))
    x = np.random.default_rng(0).random((3, *model.sample_shape), dtype=np.float32) * 2 - 1
    res = check_export(model, path, x)
    assert res["min_cosine"] >= 0.99 and res["argmax_equal"]
    res1 = check_export(model, path, x[:1])  # dynamic batch axis
    assert res1["argmax_equal"]


def test_torch_export_roundtrip(model, tmp_path):
    batch = torch.export.Dim("batch", min=1, max=1024)
    ep = torch.export.export(model, (_x(model, 2),), dynamic_shapes=({0: batch},))
    path = tmp_path / "m.pt2"
    torch.export.save(ep, str(path))
    loaded = torch.export.load(str(path)).module()
    x = _x(model, 3)
    with torch.no_grad():
        cos, same = _cos_argmax(model(x).numpy(), loaded(x).numpy())
    assert cos >= 0.99 and same


def test_each_network_is_fed_its_declared_input_without_being_told():
    """`python -m training loso --model NAME` alone: the network's declared input kind and size
    (and its own size option) are used, and the network accepts what that input gives on maps
    and their five landmarks; a network that takes no maps says so."""
    from realtime_mer.face import CANONICAL_POINTS_28
    from training.__main__ import _config, build_parser
    from training.loso import build_network, model_inputs

    expected = {"ststnet": ("map28", None), "ahmsa": ("map28", None), "mjfn": ("colour", 224),
                "mcnet": ("mcnet", 224)}
    maps = np.random.default_rng(0).random((2, 3, 28, 28)).astype(np.float32)
    landmarks = np.repeat(CANONICAL_POINTS_28[None], 2, axis=0)
    for name, (kind, size) in expected.items():
        cfg = _config(build_parser().parse_args(["loso", "--model", name]))
        assert (cfg.input_kind, cfg.input_size) == (kind, size), name
        model = build_network(cfg.model, cfg.model_kwargs).eval()
        with torch.no_grad():
            out = model(model_inputs(maps, cfg, landmarks))
        assert tuple(out.shape) == (2, 3), name
    assert _config(build_parser().parse_args(["loso", "--model", "mjfn"])).model_kwargs == \
        {"input_size": 224}
    given = _config(build_parser().parse_args(["loso", "--model", "mjfn", "--input-size", "112"]))
    assert (given.input_size, given.model_kwargs) == (112, {"input_size": 112})
    with pytest.raises(ValueError, match="not fed the 3DB maps"):
        _config(build_parser().parse_args(["loso", "--model", "ms3d_resnet50"]))
