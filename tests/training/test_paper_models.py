"""The same battery for every network of the four papers: output shape, every parameter receives
a gradient, deterministic eval, ONNX and torch.export round-trips (cosine >= 0.99, equal argmax,
before and after save/load). The 3D network runs thin and on a short clip by default; its
full-size check is marked slow."""

from __future__ import annotations

import pytest
import torch

from training.models import create_model, list_models

COSINE_MIN = 0.99

# (id, registered name, kwargs, input shape). Paper input sizes wherever affordable on a CPU.
FULL_BATTERY = [
    ("mcnet", "mcnet", {}, (2, 3, 224, 224)),
    ("mjfn-softmax", "mjfn", {"fusion": "softmax"}, (2, 3, 224, 224)),
    ("mjfn-average", "mjfn", {"fusion": "average"}, (2, 3, 224, 224)),
    ("mjfn-backbone", "mjfn", {"fusion": "backbone"}, (2, 3, 224, 224)),
    ("ahmsa", "ahmsa", {}, (2, 3, 28, 28)),
    ("ms3d_resnet50-thin", "ms3d_resnet50", {"width": 8}, (2, 3, 8, 64, 64)),
]
# Ablation switches: shape and gradients only (the exported graph is the default's, minus parts).
ABLATIONS = [
    ("mcnet-nokan", "mcnet", {"use_kan": False}, (2, 3, 224, 224)),
    ("mcnet-norkcb", "mcnet", {"use_rkcb": False}, (2, 3, 224, 224)),
    ("mcnet-nomccfm", "mcnet", {"use_mccfm": False}, (2, 3, 224, 224)),
    ("mcnet-none", "mcnet", {"use_kan": False, "use_rkcb": False, "use_mccfm": False},
     (2, 3, 224, 224)),
    ("ms3d-thin-mean-noattn", "ms3d_resnet50",
     {"width": 8, "select": "mean", "use_attention": False, "use_multiscale": False},
     (2, 3, 8, 64, 64)),
    ("ahmsa-patch4", "ahmsa", {"patch_size": 4}, (2, 3, 28, 28)),
]
PAPER_MODELS = {"mcnet", "ms3d_resnet50", "mjfn", "ahmsa"}
# The export round trips; the 3D network's (22 s) only when asked (-m slow): it has no engine,
# the 3DB maps having no frame sequences, and its shapes and gradients are tested by default.
EXPORT_BATTERY = [pytest.param(case, id=case[0], marks=pytest.mark.slow)
                  if case[1] == "ms3d_resnet50" else pytest.param(case, id=case[0])
                  for case in FULL_BATTERY]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _build(name, kwargs, seed=0):
    torch.manual_seed(seed)
    return create_model(name, **kwargs)


def _input(shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g)


def _all_outputs(model, x):
    """forward plus every head's logits where the model has several heads."""
    outs = [model(x)]
    if hasattr(model, "forward_heads"):
        outs += list(model.forward_heads(x))
    return outs


def _assert_close(reference: torch.Tensor, got, what: str) -> None:
    got = torch.as_tensor(got).to(reference.dtype)
    assert got.shape == reference.shape, (
        f"{what}: shape {tuple(got.shape)} vs {tuple(reference.shape)}")
    cos = torch.nn.functional.cosine_similarity(reference.flatten(1), got.flatten(1), dim=1)
    assert (cos >= COSINE_MIN).all(), f"{what}: cosine {cos.tolist()} < {COSINE_MIN}"
    assert torch.equal(reference.argmax(1), got.argmax(1)), f"{what}: argmax differs"


def test_all_paper_models_registered():
    assert PAPER_MODELS <= set(list_models())


def _check_shape_and_grad(name, kwargs, shape):
    model = _build(name, kwargs).train()
    x = _input(shape)
    outs = _all_outputs(model, x)
    for out in outs:
        assert out.shape == (shape[0], 3)
        assert torch.isfinite(out).all()
    target = torch.tensor([0, 2])
    loss = sum(torch.nn.functional.cross_entropy(o, target) for o in outs)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients: {bad}"
    zero = [n for n, p in model.named_parameters() if not p.grad.abs().sum() > 0]
    assert not zero, f"all-zero gradients: {zero}"


@pytest.mark.parametrize("case", FULL_BATTERY + ABLATIONS, ids=lambda c: c[0])
def test_shape_and_every_parameter_gets_gradient(case):
    _, name, kwargs, shape = case
    _check_shape_and_grad(name, kwargs, shape)


@pytest.mark.parametrize("case", FULL_BATTERY, ids=lambda c: c[0])
def test_eval_is_deterministic(case):
    _, name, kwargs, shape = case
    model = _build(name, kwargs).eval()
    x = _input(shape)
    with torch.no_grad():
        a, b = model(x), model(x)
    assert a.shape == (shape[0], 3)
    assert torch.equal(a, b)


@pytest.mark.parametrize("case", EXPORT_BATTERY)
def test_onnx_round_trip(case, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    _, name, kwargs, shape = case
    model = _build(name, kwargs).eval()
    x = _input(shape)
    with torch.no_grad():
        reference = model(x)
    program = torch.onnx.export(model, (x,), dynamo=True, input_names=["input"],
                                output_names=["logits"], verbose=False)
    _assert_close(reference, program(x)[0], f"{name} ONNX program before save")
    path = tmp_path / f"{name}.onnx"
    program.save(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    _assert_close(reference, got, f"{name} ONNX after save/load (onnxruntime)")


@pytest.mark.parametrize("case", EXPORT_BATTERY)
def test_torch_export_round_trip(case, tmp_path):
    _, name, kwargs, shape = case
    model = _build(name, kwargs).eval()
    x = _input(shape)
    with torch.no_grad():
        reference = model(x)
        program = torch.export.export(model, (x,))
        _assert_close(reference, program.module()(x), f"{name} torch.export before save")
        path = tmp_path / f"{name}.pt2"
        torch.export.save(program, str(path))
        loaded = torch.export.load(str(path))
        _assert_close(reference, loaded.module()(x), f"{name} torch.export after save/load")


def test_mjfn_fusions_are_the_papers_formulas():
    model = _build("mjfn", {"fusion": "softmax"}).eval()
    x = _input((2, 3, 224, 224))
    with torch.no_grad():
        heads = model.forward_heads(x)
        z = sum(torch.softmax(h, -1) for h in heads)
        assert torch.allclose(model(x), z, atol=1e-6)
        model.fusion = "average"
        assert torch.allclose(model(x).exp(), z / 4, atol=1e-6)


def test_ms3d_confidence_selection_picks_a_head():
    model = _build("ms3d_resnet50", {"width": 8}).eval()
    x = _input((3, 3, 8, 64, 64))
    with torch.no_grad():
        heads = torch.stack(model.forward_heads(x), 1)
        out = model(x)
    best = torch.softmax(heads, -1).amax(-1).argmax(1)
    assert torch.allclose(out, heads[torch.arange(3), best])


def test_wrong_input_shapes_raise():
    with pytest.raises(ValueError):
        _build("mjfn", {})(torch.zeros(1, 3, 128, 128))
    with pytest.raises(ValueError):
        _build("ahmsa", {})(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError):
        _build("ms3d_resnet50", {"width": 8})(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError):
        create_model("mjfn", fusion="max")


@pytest.mark.slow
def test_ms3d_resnet50_full_size(tmp_path):
    """The paper's network at its input size, 16×134×134: shape, gradients, export."""
    case = ("ms3d_resnet50", {}, (2, 3, 16, 134, 134))
    _check_shape_and_grad(*case)
    model = _build("ms3d_resnet50", {}).eval()
    x = _input((1, 3, 16, 134, 134))
    with torch.no_grad():
        reference = model(x)
        program = torch.export.export(model, (x,))
        path = tmp_path / "ms3d.pt2"
        torch.export.save(program, str(path))
        _assert_close(reference, torch.export.load(str(path)).module()(x), "full-size export")
