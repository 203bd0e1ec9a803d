"""The runner's two CPU speed changes (the input bank, keeping freed heap memory) change where
memory comes from, never what is computed: each is checked bitwise against the way it replaced,
and the allocator change against what it is for (fewer page faults)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import training.loso.trainer as loso
from training.loso import LosoConfig, shift_images, train_models

from .test_loso import _synthetic

ROOT = Path(__file__).resolve().parents[2]
torch.set_num_threads(1)


def _train(data, cfg, train_sets, bank_bytes, monkeypatch):
    """Predictions at every evaluation and the final weights, with the bank on or off."""
    monkeypatch.setattr(loso, "INPUT_BANK_MAX_BYTES", bank_bytes)
    preds = []
    rows = np.stack([np.arange(len(data))] * len(train_sets))

    def hook(epoch, predict):
        preds.append(predict(rows).numpy())

    _, state = train_models(data.x, data.y, train_sets, cfg, list(range(len(train_sets))),
                            eval_hook=hook)
    return np.stack(preds), state["params"]


@pytest.mark.parametrize("options,n_models", [
    ({"shift_pixels": 2, "tta": "hflip"}, 1),       # the default engine's protocol
    ({"shift_pixels": 1, "augment": "none"}, 1),    # shifts without mirroring
    ({}, 1),                                        # mirroring only
    ({"shift_pixels": 2, "mixup_alpha": 0.4}, 2),   # a vectorised chunk, mixup after the bank
])
def test_input_bank_trains_bitwise_like_per_batch_augmentation(options, n_models, monkeypatch):
    data = _synthetic(n_subjects=4, per_subject=12)
    cfg = LosoConfig(epochs=4, batch_size=8, eval_every=2, lr=5e-3, **options)
    subjects = data.subject_list
    train_sets = [np.flatnonzero(data.subjects != subjects[f]) for f in range(n_models)]
    old_preds, old_params = _train(data, cfg, train_sets, 0, monkeypatch)
    new_preds, new_params = _train(data, cfg, train_sets, 2**30, monkeypatch)
    np.testing.assert_array_equal(new_preds, old_preds)
    for name in old_params:
        assert torch.equal(new_params[name], old_params[name]), name


def test_input_bank_rows_are_the_mirrored_and_translated_inputs():
    rng = np.random.default_rng(5)
    x = torch.from_numpy(rng.random((6, 3, 7, 9), dtype=np.float32))
    x_flip = torch.from_numpy(rng.random((6, 3, 7, 9), dtype=np.float32))
    bank = loso._InputBank.build(x, x_flip, 2, channels_last=True)
    idx = torch.tensor([[0, 5, 3, 3], [1, 2, 4, 0]])
    flip = torch.tensor([[False, True, True, False], [True, False, False, True]])
    offsets = torch.from_numpy(rng.integers(-2, 3, size=(2, 4, 2)))
    got = bank.batch(idx, flip, offsets)
    want = shift_images(torch.where(flip[..., None, None, None], x_flip[idx], x[idx]),
                        offsets, 2)
    assert got.shape == (2, 4, 3, 7, 9)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # Too large a bank is not built: the runner augments each batch instead.
    assert loso._InputBank.build(x, x_flip, 2, False) is not None
    big = torch.zeros(loso.INPUT_BANK_MAX_BYTES // (50 * 4) + 1, 1, 1, 1)
    assert loso._InputBank.build(big, big, 2, False) is None


_CHILD = textwrap.dedent("""
    import json, resource, sys
    import numpy as np, torch
    torch.set_num_threads(1)
    import training.loso.trainer as loso
    from training.allocator import keep_freed_memory
    from training.loso import LosoConfig, train_models
    loso.KEEP_FREED_MEMORY = sys.argv[1] == "keep"
    rng = np.random.default_rng(0)
    x = rng.random((96, 3, 28, 28), dtype=np.float32)
    y = np.arange(96) % 3
    cfg = LosoConfig(epochs=int(sys.argv[2]), batch_size=64, eval_every=1)
    preds = []
    faults = []
    def hook(epoch, predict):
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
        preds.append(predict(np.arange(96)[None]).numpy().tolist())
    train_models(x, y, [np.arange(96)], cfg, [0], eval_hook=hook)
    print(json.dumps({"kept": keep_freed_memory() if loso.KEEP_FREED_MEMORY else False,
                      "preds": preds, "faults_after_warmup": faults[-1] - faults[1]}))
""")


def _child(mode: str, epochs: int) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, mode, str(epochs)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # two LOSO folds in fresh processes, about 20 s
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_keeping_freed_memory_changes_page_faults_not_results():
    """Fresh processes (the setting is process-wide and one-way). Each training step of an
    STSTNet at batch 64 allocates about 40 MB of activations and gradients; with glibc's
    default policy part of it comes back as fresh pages every step, kept memory is reused.
    How much the default policy faults varies from process to process (its dynamic mmap and
    trim thresholds depend on the heap's layout: 4,700 to 65,000 faults measured for the
    run below, kept memory 800 to 2,400), so three processes of each are summed."""
    epochs = 12
    default = [_child("default", epochs) for _ in range(3)]
    kept = [_child("keep", epochs) for _ in range(3)]
    assert all(k["kept"] is True for k in kept)
    for run in default + kept:
        assert run["preds"] == default[0]["preds"]  # bitwise: the same floats, as JSON
    # Page faults of epochs 3..12 (10 epochs of 2 steps), summed over the three processes:
    # the default policy's are at least 3x those of kept memory (about 15x typically).
    faults_default = sum(r["faults_after_warmup"] for r in default)
    faults_kept = sum(r["faults_after_warmup"] for r in kept)
    assert faults_default > 3 * max(faults_kept, 1), (faults_default, faults_kept)


def test_only_networks_measured_faster_keep_freed_memory():
    from training.loso import keeps_freed_memory
    from training.models import create_model

    assert keeps_freed_memory(create_model("ststnet"), "cpu")
    assert not keeps_freed_memory(create_model("ststnet"), "cuda")
    # AHMSA-Net measured slower with it (0.85x), MJFN unchanged (1.01x): they keep glibc's policy.
    assert not keeps_freed_memory(create_model("ahmsa"), "cpu")
    assert not keeps_freed_memory(create_model("mjfn"), "cpu")
