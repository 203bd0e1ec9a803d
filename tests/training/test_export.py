"""Full-data training: the nested epoch selection applied to all subjects, and the export's
refusal of LOSO results made with another schedule or epoch selection rule."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from realtime_mer.input_kinds import INPUT_OPTIONS
from training.data.megc3db import Megc3DB
from training.export import check_loso_results, export_default, fit_full, save_weights
from training.loso import LosoConfig, inner_groups, select_epochs_full

torch.set_num_threads(1)


def _noisy(n_subjects: int = 6, per_subject: int = 9, seed: int = 1) -> Megc3DB:
    """Weakly separable maps, so the inner scores differ between candidate epochs."""
    rng = np.random.default_rng(seed)
    n = n_subjects * per_subject
    y = np.tile(np.arange(3), n // 3 + 1)[:n].astype(np.int64)
    x = rng.random((n, 3, 28, 28), dtype=np.float32)
    for i, c in enumerate(y):
        x[i, c] += 0.03
    return Megc3DB(x=x, y=y, subjects=np.repeat([f"casme2/s{i}" for i in range(n_subjects)],
                                                per_subject),
                   databases=np.array(["casme2"] * n),
                   videos=np.array([f"v{i}" for i in range(n)]),
                   files=np.array([f"f{i}.png" for i in range(n)]), root="synthetic")


NESTED = LosoConfig(epochs=8, batch_size=8, eval_every=2, lr=5e-3, select_epochs="nested",
                    inner_folds=3)


def test_full_data_nested_selection_picks_argmax_of_inner_scores():
    data = _noisy()
    sel = select_epochs_full(data, NESTED)
    assert sel["candidate_epochs"] == [2, 4, 6, 8]
    assert len(sel["inner_uf1"]) == len(sel["inner_uar"]) == 4
    assert sel["chosen_epochs"] in sel["candidate_epochs"]
    assert sel["chosen_epochs"] == sel["candidate_epochs"][int(np.argmax(sel["inner_uf1"]))]
    # The grouping is the inner-CV rule of the LOSO evaluation, over all subjects.
    assert sel["inner_groups"] == inner_groups(data.subject_list, 3)
    assert sorted(sum(sel["inner_groups"], [])) == sorted(data.subject_list)
    # Seeds follow the LOSO inner rule with the full model's key (= number of subjects).
    assert sel["inner_seed_ids"] == [10_000 + 6 * 3 + g for g in range(3)]
    assert "earliest on ties" in sel["rule"]
    assert select_epochs_full(data, NESTED)["inner_uf1"] == sel["inner_uf1"]  # deterministic


def test_fit_full_trains_for_the_chosen_count():
    data = _noisy()
    msgs: list[str] = []
    model, sel = fit_full(data, NESTED, progress=msgs.append)
    e = sel["chosen_epochs"]
    assert any(f"chosen {e} epochs" in m for m in msgs)
    full = [m for m in msgs if m.startswith("full training")]
    assert full and all(f"/{e} " in m for m in full) and f"epoch {e}/{e}" in full[-1]
    msgs.clear()
    _, none = fit_full(data, LosoConfig(epochs=3, batch_size=8, lr=5e-3), progress=msgs.append)
    assert none is None and "epoch 3/3" in msgs[-1]


def test_too_few_subjects_for_inner_groups():
    with pytest.raises(ValueError, match="inner groups"):
        select_epochs_full(_noisy(n_subjects=2), NESTED)


def _results(cfg: LosoConfig) -> dict:
    return {"config": cfg.to_dict(), "uf1": 0.7, "uar": 0.71, "accuracy": 0.72,
            "complete": True, "dataset": {"n_subjects": 6},
            "leaky_best_epoch": {"uf1": 0.8, "uar": 0.81},
            **({"nested_selection": {"median_epochs": 4.0, "fixed_final_epoch_same_run":
                                     {"uf1": 0.68, "uar": 0.69, "accuracy": 0.7}}}
               if cfg.select_epochs == "nested" else {})}


def test_loso_results_with_other_selection_refused(tmp_path):
    fixed = LosoConfig(epochs=8, batch_size=8, eval_every=2, lr=5e-3)
    check_loso_results(_results(NESTED), NESTED)
    check_loso_results(_results(fixed), fixed)
    # Old fixed results files have no select_epochs/inner_folds; eval_every is irrelevant.
    old = _results(fixed)
    for k in ("select_epochs", "inner_folds"):
        old["config"].pop(k)
    old["config"]["eval_every"] = 5
    check_loso_results(old, fixed)
    with pytest.raises(ValueError, match="select_epochs"):
        check_loso_results(_results(fixed), NESTED)
    with pytest.raises(ValueError, match="select_epochs"):
        check_loso_results(_results(NESTED), fixed)
    other_inner = dataclasses.replace(NESTED, inner_folds=4)
    with pytest.raises(ValueError, match="inner_folds"):
        check_loso_results(_results(other_inner), NESTED)
    with pytest.raises(ValueError, match="epochs"):
        check_loso_results(_results(dataclasses.replace(NESTED, epochs=10)), NESTED)
    # export_default refuses before it trains anything.
    path = tmp_path / "loso_fixed.json"
    path.write_text(json.dumps(_results(fixed)))
    with pytest.raises(ValueError, match="another configuration or epoch selection"):
        export_default(_noisy(), NESTED, tmp_path / "e.onnx", loso_results=path)
    assert not (tmp_path / "e.onnx").exists()


def test_export_nested_manifest(tmp_path):
    data = _noisy()
    cfg = LosoConfig(epochs=4, batch_size=8, eval_every=2, lr=5e-3, select_epochs="nested",
                     inner_folds=3)
    res = tmp_path / "loso_nested.json"
    res.write_text(json.dumps(_results(cfg)))
    m = export_default(data, cfg, tmp_path / "e.onnx", loso_results=res)
    sched = m["training"]["schedule"]
    sel = sched["epoch_selection"]
    assert sel["mode"] == "nested" and sched["select_epochs"] == "nested"
    assert sched["epochs_trained"] == sel["chosen_epochs"] in sel["candidate_epochs"]
    assert len(sel["inner_uf1"]) == len(sel["candidate_epochs"])
    loso = m["loso"]
    assert loso["uf1"] == 0.7 and loso["fixed_schedule_uf1"] == 0.68
    assert loso["fixed_schedule_uar"] == 0.69 and "after" in loso["note"]
    assert "LEAKY" in loso["leaky_warning"] and loso["leaky_best_epoch_uf1"] == 0.8
    assert m["export_check"]["min_cosine"] >= 0.99 and m["export_check"]["argmax_equal"]


def test_manifest_of_a_run_with_outer_models_stopped_at_their_chosen_epoch(tmp_path):
    """Such a run measured no LEAKY and no fixed-schedule figure: the manifest's LOSO block
    quotes its honest scores and leaves those out instead of failing or inventing them."""
    from training.export import _loso_block

    r = _results(NESTED)
    del r["leaky_best_epoch"], r["nested_selection"]["fixed_final_epoch_same_run"]
    loso = _loso_block(r, NESTED, tmp_path / "loso.json")
    assert (loso["uf1"], loso["uar"]) == (0.7, 0.71)
    assert not any(k.startswith(("leaky", "fixed_schedule")) for k in loso)
    full = _loso_block(_results(NESTED), NESTED, tmp_path / "loso.json")
    assert full["leaky_best_epoch_uf1"] == 0.8 and full["fixed_schedule_uf1"] == 0.68


def test_cv_ensemble_engine_is_the_mean_of_its_members_and_quotes_the_ensemble_score(tmp_path):
    from realtime_mer.runtime import load_engine
    from training.export import train_full
    from training.loso import inner_jobs, run_loso, train_models

    data = _noisy()
    cfg = dataclasses.replace(NESTED, epochs=4)
    res = run_loso(data, cfg, tmp_path / "run", results_path=tmp_path / "loso.json")
    m = export_default(data, cfg, tmp_path / "cv.onnx", loso_results=tmp_path / "loso.json",
                       ensemble=True)
    assert m["training"]["ensemble"]["members"] == cfg.inner_folds + 1
    assert m["loso"]["uf1"] == res["nested_cv_ensemble"]["uf1"]
    assert m["loso"]["single_model_uf1"] == res["uf1"]
    assert "CV ensemble" in m["loso"]["protocol"]
    # The members rebuilt independently from their documented seeds and training sets.
    epochs = m["training"]["schedule"]["epochs_trained"]
    members = [train_full(data, cfg, epochs=epochs)]
    key = len(data.subject_list)
    for _, g, train, _ in inner_jobs(data, cfg, key, []):
        (inner,), _ = train_models(data.x, data.y, [train],
                                   dataclasses.replace(cfg, epochs=epochs),
                                   [10_000 + key * cfg.inner_folds + g])
        members.append(inner)
    x = torch.as_tensor((data.x - 0.5) / 0.5)
    with torch.no_grad():
        want = torch.stack([torch.softmax(mm(x), -1) for mm in members]).mean(0).numpy()
    got = load_engine(tmp_path / "cv.onnx", backend="onnxruntime").predict(data.x)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_cv_ensemble_needs_nested_selection_and_an_ensemble_score(tmp_path):
    fixed = LosoConfig(epochs=2, batch_size=8, lr=5e-3)
    with pytest.raises(ValueError, match="--select-epochs nested"):
        export_default(_noisy(), fixed, tmp_path / "e.onnx", loso_results=None, ensemble=True)
    path = tmp_path / "old.json"
    path.write_text(json.dumps(_results(NESTED)))  # no nested_cv_ensemble
    with pytest.raises(ValueError, match="no nested_cv_ensemble"):
        export_default(_noisy(), NESTED, tmp_path / "e.onnx", loso_results=path, ensemble=True)
    assert not (tmp_path / "e.onnx").exists()


def test_colour_input_engine_is_fed_like_training(tmp_path):
    """An engine trained on the colour-coded image (MJFN) declares its input kind; the runtime,
    given the plain (u, v, strain) maps, builds the same input as training did."""
    from realtime_mer.errors import InputError
    from realtime_mer.runtime import load_engine
    from training.loso import model_inputs

    data = _noisy(n_subjects=3, per_subject=3)
    cfg = LosoConfig(model="mjfn", model_kwargs={"input_size": 112}, input_kind="colour",
                     input_size=112, epochs=1, batch_size=4, select_epochs="fixed")
    m = export_default(data, cfg, tmp_path / "mjfn.onnx", loso_results=None)
    assert m["input"]["kind"] == "colour" and m["input"]["shape"] == ["N", 3, 112, 112]
    engine = load_engine(tmp_path / "mjfn.onnx", backend="onnxruntime")
    got = engine.predict(data.x)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "mjfn.onnx"), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {"maps": model_inputs(data.x, cfg).numpy()})[0]
    ref = torch.softmax(torch.as_tensor(logits), -1).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5)
    with pytest.raises(InputError, match=r"\(N, 3, H, W\) \(u, v, strain\) maps"):
        engine.predict(np.zeros((1, 2, 28, 28), np.float32))


@pytest.mark.parametrize("kind,size,options", [("regions5", None, {}),
                                                 ("mcnet", 28, {"use_omam": False})])
def test_landmark_input_engine_is_fed_like_training(tmp_path, kind, size, options):
    """An engine whose input is built from landmarks (AHMSA-Net's regions, MCNet's AU
    weighting) records its kind and options; the runtime, given maps and landmarks, builds the
    same input as training, and without landmarks uses the aligned-face template."""
    import onnxruntime as ort

    from realtime_mer.errors import InputError
    from realtime_mer.face import CANONICAL_POINTS_28
    from realtime_mer.runtime import load_engine
    from training.loso import model_inputs

    data = _noisy(n_subjects=3, per_subject=3)
    rng = np.random.default_rng(0)
    pts = CANONICAL_POINTS_28[None] + rng.normal(0, 1.5, (len(data), 5, 2))
    data = dataclasses.replace(data, landmarks=pts)
    cfg = LosoConfig(epochs=1, batch_size=4, select_epochs="fixed", input_kind=kind,
                     input_size=size, input_options=options)
    m = export_default(data, cfg, tmp_path / "e.onnx", loso_results=None)
    assert m["input"]["kind"] == kind
    assert m["input"].get("options", {}) == {**INPUT_OPTIONS[kind], **options}
    assert "landmarks" in m["input"]
    engine = load_engine(tmp_path / "e.onnx", backend="onnxruntime")
    assert engine.uses_landmarks
    sess = ort.InferenceSession(str(tmp_path / "e.onnx"), providers=["CPUExecutionProvider"])

    def reference(landmarks):
        logits = sess.run(None, {"maps": model_inputs(data.x, cfg, landmarks).numpy()})[0]
        return torch.softmax(torch.as_tensor(logits), -1).numpy()

    np.testing.assert_allclose(engine.predict(data.x, pts), reference(pts), atol=1e-5)
    template = np.broadcast_to(CANONICAL_POINTS_28, pts.shape)
    np.testing.assert_allclose(engine.predict(data.x), reference(template), atol=1e-5)
    assert np.abs(reference(pts) - reference(template)).max() > 1e-4  # the points matter
    with pytest.raises(InputError, match=r"\(N, 5, 2\)"):
        engine.predict(data.x, pts[:2])


def test_default_loso_results_is_the_file_of_the_same_schedule(tmp_path):
    from training.__main__ import default_loso_results

    fixed = dataclasses.replace(NESTED, select_epochs="fixed")
    for name, cfg in (("a_nested.json", NESTED), ("b_fixed.json", fixed)):
        (tmp_path / name).write_text(json.dumps({**_results(cfg), "complete": True}))
    (tmp_path / "c_partial.json").write_text(json.dumps(
        {**_results(dataclasses.replace(fixed, lr=0.1)), "complete": False}))
    (tmp_path / "d_bench.json").write_text(json.dumps({"rows": []}))
    assert default_loso_results(NESTED, tmp_path).name == "a_nested.json"
    assert default_loso_results(fixed, tmp_path).name == "b_fixed.json"
    assert default_loso_results(dataclasses.replace(fixed, lr=0.1), tmp_path) is None
    assert default_loso_results(dataclasses.replace(fixed, model="ahmsa"), tmp_path) is None
    # An ensemble engine needs a run that scored the CV ensemble.
    assert default_loso_results(NESTED, tmp_path, ensemble=True) is None
    (tmp_path / "e_nested_ens.json").write_text(json.dumps(
        {**_results(NESTED), "nested_cv_ensemble": {"uf1": 0.72, "uar": 0.73}}))
    assert default_loso_results(NESTED, tmp_path, ensemble=True).name == "e_nested_ens.json"
    # A calibrated engine quotes a `training calibrate` file, kept in calibration/.
    assert default_loso_results(NESTED, tmp_path, ensemble=True, calibrated="prior") is None
    (tmp_path / "calibration").mkdir()
    (tmp_path / "calibration" / "f_cal.json").write_text(json.dumps(
        {**_results(NESTED), "complete": True, "calibration": {},
         "nested_cv_ensemble": {"uf1": 0.74, "uar": 0.75}}))
    assert default_loso_results(NESTED, tmp_path, ensemble=True,
                                calibrated="prior").name == "f_cal.json"
    # A class-bias file (another rule) is never quoted by a class-prior engine.
    (tmp_path / "calibration" / "a_bias.json").write_text(json.dumps(
        {**_results(NESTED), "complete": True, "calibration": {"kind": "bias"},
         "nested_cv_ensemble": {"uf1": 0.76, "uar": 0.75}}))
    assert default_loso_results(NESTED, tmp_path, ensemble=True,
                                calibrated="prior").name == "f_cal.json"
    assert default_loso_results(NESTED, tmp_path, ensemble=True).name == "e_nested_ens.json"
    # A class-bias engine quotes a class-bias file, kept in calibration_bias/.
    assert default_loso_results(NESTED, tmp_path, ensemble=True, calibrated="bias") is None
    (tmp_path / "calibration_bias").mkdir()
    (tmp_path / "calibration" / "a_bias.json").rename(tmp_path / "calibration_bias" / "a.json")
    assert default_loso_results(NESTED, tmp_path, ensemble=True,
                                calibrated="bias").name == "a.json"


def test_train_and_export_refuse_bad_input_before_any_work(tmp_path, capsys):
    """Unknown networks or options, and weights files that are missing, foreign or trained
    with another schedule: exit 2 with a message, before the data is read or an engine is
    written."""
    from training.__main__ import main
    from training.export import save_weights
    from training.models import create_model

    absent = str(tmp_path / "no_data")
    out = tmp_path / "e.onnx"

    def refused(argv: list[str], message: str) -> None:
        assert main(argv) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()

    refused(["train", "--data", absent, "--model", "nosuch", "--out", str(tmp_path / "w.pt")],
            "unknown model 'nosuch'")
    refused(["export", "--data", absent, "--model-kwargs", '{"nope": 1}', "--out", str(out)],
            "does not take the options {'nope': 1}")
    refused(["export", "--data", absent, "--weights", str(tmp_path / "absent.pt"),
             "--out", str(out)], "no such weights file")
    (tmp_path / "foreign.pt").write_bytes(b"not a torch file")
    refused(["export", "--data", absent, "--weights", str(tmp_path / "foreign.pt"),
             "--out", str(out)], "not a weights file written by")
    fixed = LosoConfig(epochs=4, batch_size=8, eval_every=2, lr=5e-3)
    save_weights(create_model("ststnet"), fixed, tmp_path / "w.pt")
    # The weights are an STSTNet: exporting them as AHMSA-Net (which would also name the
    # engine after it) is refused; options left at their defaults are taken from the file.
    refused(["export", "--data", absent, "--weights", str(tmp_path / "w.pt"), "--model",
             "ahmsa", "--out", str(out)], "model: command line 'ahmsa', weights 'ststnet'")
    # --calibrate alone is the class-prior rule; an unknown rule is refused by the parser.
    from training.__main__ import build_parser
    assert build_parser().parse_args(["export", "--calibrate"]).calibrate == "prior"
    assert build_parser().parse_args(["export", "--calibrate", "bias"]).calibrate == "bias"
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["export", "--calibrate", "tau"])
    assert exit_info.value.code == 2 and "invalid choice: 'tau'" in capsys.readouterr().err


def test_export_refuses_a_missing_results_file_and_unfit_input_before_training(tmp_path):
    from realtime_mer.errors import DatasetError

    fixed = LosoConfig(epochs=4, batch_size=8, eval_every=2, lr=5e-3)
    with pytest.raises(ValueError, match="no such file"):
        export_default(_noisy(), fixed, tmp_path / "e.onnx",
                       loso_results=tmp_path / "typo.json")
    with pytest.raises(DatasetError, match="landmarks5.csv"):
        fit_full(_noisy(), dataclasses.replace(fixed, input_kind="regions5"))
    assert not (tmp_path / "e.onnx").exists()


def test_a_failed_export_keeps_the_trained_weights(tmp_path, monkeypatch):
    """Training is not lost when the ONNX step fails: the weights are saved beside the engine
    path, and exporting them with --weights gives the engine of that very model."""
    import training.export as ex

    fixed = LosoConfig(epochs=2, batch_size=8, eval_every=2, lr=5e-3)
    out = tmp_path / "e.onnx"

    def broken_export(*args, **kwargs):
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(ex, "export_onnx", broken_export)
    with pytest.raises(ex.ExportError, match="weights are kept in .*e.weights.pt"):
        export_default(_noisy(), fixed, out)
    assert not out.exists()
    monkeypatch.undo()
    kept, kept_cfg = ex.load_weights(tmp_path / "e.weights.pt")
    assert kept_cfg == fixed
    m = export_default(_noisy(), fixed, out, weights=tmp_path / "e.weights.pt")
    x = ex.model_inputs(_noisy().x, fixed, None).numpy()
    check = ex.check_export(kept, out, x)
    assert check["min_cosine"] >= 0.99 and check["argmax_equal"]
    assert m["training"]["schedule"]["epochs_trained"] == 2


def test_pt2_engine_for_the_torch_and_tensorrt_backends_matches_the_onnx_one(tmp_path):
    """``--out NAME.pt2`` writes a torch.export program with its manifest; the torch backend
    (and TensorRT's, which compiles the same program) gives what the ONNX engine of the same
    weights gives."""
    from realtime_mer.runtime import load_engine
    from training.export import save_weights, train_full

    data = _noisy()
    fixed = LosoConfig(epochs=2, batch_size=8, eval_every=2, lr=5e-3)
    save_weights(train_full(data, fixed), fixed, tmp_path / "w.pt")
    m = export_default(data, fixed, tmp_path / "e.pt2", weights=tmp_path / "w.pt")
    assert m["format"] == "torch_export" and "onnx" not in m["versions"]
    assert m["export_check"]["min_cosine"] >= 0.99 and m["export_check"]["argmax_equal"]
    export_default(data, fixed, tmp_path / "e.onnx", weights=tmp_path / "w.pt")
    program = load_engine(tmp_path / "e.pt2", device="cpu")
    onnx_engine = load_engine(tmp_path / "e.onnx", device="cpu")
    assert program.name == "torch" and onnx_engine.name == "onnxruntime"
    np.testing.assert_allclose(program.predict(data.x), onnx_engine.predict(data.x), atol=1e-5)
    for name in ("e.engine", "e.ens"):
        with pytest.raises(ValueError, match="export writes .onnx or .pt2"):
            export_default(data, fixed, tmp_path / name, weights=tmp_path / "w.pt")


def test_cli_exports_a_weights_file_reading_it_once(tmp_path, megc_dir, monkeypatch):
    """`export --weights` end to end on the real maps: the engine holds those weights, its
    manifest their schedule, and the file is read once (it can be tens of MB)."""
    import training.export as ex
    from training.__main__ import main
    from training.models import create_model

    fixed = LosoConfig(epochs=3, batch_size=8, eval_every=3, lr=5e-3)
    torch.manual_seed(0)
    model = create_model("ststnet").eval()
    save_weights(model, fixed, tmp_path / "w.pt")
    reads = []
    real_load = torch.load
    monkeypatch.setattr(ex.torch, "load", lambda *a, **k: reads.append(a[0]) or real_load(*a, **k))
    out = tmp_path / "e.onnx"
    assert main(["export", "--data", str(megc_dir), "--weights", str(tmp_path / "w.pt"),
                 "--loso-results", "", "--out", str(out)]) == 0
    assert reads == [tmp_path / "w.pt"]
    manifest = json.loads((tmp_path / "e.onnx.json").read_text())
    assert manifest["training"]["schedule"]["epochs_trained"] == 3
    assert manifest["training"]["schedule"]["lr"] == fixed.lr
    x = np.random.default_rng(0).random((4, 3, 28, 28), dtype=np.float32)
    check = ex.check_export(model, out, x)
    assert check["min_cosine"] >= 0.99 and check["argmax_equal"]


def test_mirror_tta_engine_predicts_like_the_loso_scoring(tmp_path):
    """An engine exported with tta=hflip computes in its graph what LOSO scored: the mean
    probability of the maps and of their mirror image, fed the runtime's normal input, with a
    normalisation whose mean is not 0.5 (so u's mirror offset is not zero)."""
    from realtime_mer.runtime import load_engine
    from training.loso import hflip_maps, predict_probs

    data = _noisy()
    cfg = LosoConfig(epochs=2, batch_size=8, lr=5e-3, tta="hflip", mean=(0.4, 0.5, 0.6),
                     std=(0.3, 0.5, 0.4))
    weights = tmp_path / "w.pt"
    model = fit_full(data, cfg)[0]
    save_weights(model, cfg, weights)
    m = export_default(data, cfg, tmp_path / "tta.onnx", weights=weights)
    assert m["training"]["schedule"]["tta"] == "hflip"
    engine = load_engine(tmp_path / "tta.onnx", backend="onnxruntime")
    want = predict_probs(model, data.x, cfg)
    np.testing.assert_allclose(engine.predict(data.x), want, atol=1e-5)
    mirrored = hflip_maps(torch.as_tensor(data.x)).numpy()
    np.testing.assert_allclose(engine.predict(mirrored), want, atol=1e-5)
    plain = predict_probs(model, data.x, dataclasses.replace(cfg, tta="none"))
    assert np.abs(plain - want).max() > 1e-4


def test_mirror_tta_export_of_a_rebuilt_input_is_refused_before_training(tmp_path):
    cfg = LosoConfig(model="mjfn", model_kwargs={"input_size": 112}, input_kind="colour",
                     input_size=112, epochs=1, batch_size=4, tta="hflip")
    with pytest.raises(ValueError, match="map28 engines only"):
        export_default(_noisy(), cfg, tmp_path / "e.onnx", loso_results=None)
    assert not (tmp_path / "e.onnx").exists()


def test_shift_tta_export_is_refused_before_training(tmp_path):
    """Engines do not build the test-time translations in, so an export quoting them would
    predict otherwise than its LOSO scores: refused before any training."""
    cfg = LosoConfig(epochs=1, batch_size=4, tta="hflip", tta_shift=1)
    with pytest.raises(ValueError, match="--tta-shift 1"):
        export_default(_noisy(), cfg, tmp_path / "e.onnx", loso_results=None)
    assert not (tmp_path / "e.onnx").exists()


def test_every_shipped_engine_and_recipe_has_the_name_its_schedule_gives():
    """`training export` names an engine by its manifest's schedule; a shipped file (or a
    recipe in engines/recipes) under another name, or two schedules mapped to one name, would
    let an export overwrite it."""
    from training.__main__ import REPO_ROOT
    from training.calibrate import calibration_kind
    from training.export import engine_file_name

    fields = {f.name for f in dataclasses.fields(LosoConfig)}
    names = {}
    for manifest in sorted([*(REPO_ROOT / "engines").glob("*.onnx.json"),
                            *(REPO_ROOT / "engines" / "recipes").glob("*.onnx.json")]):
        training = json.loads(manifest.read_text())["training"]
        cfg = LosoConfig.from_dict({k: v for k, v in training["schedule"].items()
                                    if k in fields})
        names[manifest.name.removesuffix(".json")] = engine_file_name(
            cfg, ensemble="ensemble" in training,
            calibrate=calibration_kind(training) if "calibration" in training else None)
    assert {"ststnet_cv6_mirror_shift2_cal_3db.onnx",  # the default engine
            "ststnet_cv6_mirror_shift2_calbias_3db.onnx"} <= set(names)
    assert all(file == name for file, name in names.items()), names
    base = dataclasses.replace(LosoConfig(), tta="hflip")
    assert engine_file_name(dataclasses.replace(base, shift_pixels=3)) == \
        "ststnet_mirror_shift3_3db.onnx"
    assert engine_file_name(dataclasses.replace(base, inner_folds=3), ensemble=True) == \
        "ststnet_cv4_mirror_3db.onnx"


def test_calibrated_engine_shifts_the_ensemble_by_what_its_inner_cv_chose(tmp_path):
    """--calibrate prior / bias: the tau or the class biases chosen on the full-data
    selection's inner validation predictions (training subjects only), applied inside the
    engine to the final probabilities; the manifest quotes a `training calibrate` results file
    of the same rule and refuses an uncalibrated one or one of the other rule."""
    from realtime_mer.runtime import load_engine
    from training.calibrate import (TAUS, calibrate_run, choose_bias, choose_tau, offset_shift,
                                    prior_shift)
    from training.export import calibration_of, engine_file_name
    from training.loso import run_loso

    data = _noisy()
    cfg = dataclasses.replace(NESTED, epochs=4)
    sel = select_epochs_full(data, cfg)
    val_idx, val_probs = sel["inner_val"]
    assert sorted(val_idx.tolist()) == list(range(len(data)))  # every sample once
    cal = calibration_of(data, val_idx, val_probs)
    counts = np.bincount(data.y, minlength=3)
    assert cal["tau"] == choose_tau(val_probs, data.y[val_idx], counts)[0] and cal["tau"] in TAUS
    np.testing.assert_allclose(cal["offsets"], cal["tau"] * np.log(counts / counts.sum()),
                               atol=1e-8)

    run_loso(data, cfg, tmp_path / "run", results_path=tmp_path / "loso.json")
    with pytest.raises(ValueError, match="loso.json is not calibrated"):
        export_default(data, cfg, tmp_path / "e.onnx", loso_results=tmp_path / "loso.json",
                       ensemble=True, calibrate="prior")
    (tmp_path / "cal.json").write_text(json.dumps(calibrate_run(tmp_path / "run",
                                                                tmp_path / "loso.json")))
    # A class-bias file is not the engine's rule.
    (tmp_path / "bias.json").write_text(json.dumps(calibrate_run(
        tmp_path / "run", tmp_path / "loso.json", rule="bias")))
    with pytest.raises(ValueError, match="calibrated by the bias rule .* the prior rule"):
        export_default(data, cfg, tmp_path / "e.onnx", loso_results=tmp_path / "bias.json",
                       ensemble=True, calibrate="prior")
    with pytest.raises(ValueError, match="calibrated by the prior rule .* the bias rule"):
        export_default(data, cfg, tmp_path / "e.onnx", loso_results=tmp_path / "cal.json",
                       ensemble=True, calibrate="bias")
    with pytest.raises(ValueError, match="unknown calibration rule 'tau'"):
        export_default(data, cfg, tmp_path / "e.onnx", loso_results=None, calibrate="tau")
    with pytest.raises(ValueError, match="calibrated by the prior rule .* not calibrated"):
        export_default(data, cfg, tmp_path / "e.onnx", loso_results=tmp_path / "cal.json",
                       ensemble=True)
    m = export_default(data, cfg, tmp_path / "cal.onnx", loso_results=tmp_path / "cal.json",
                       ensemble=True, calibrate="prior")
    assert m["training"]["calibration"]["tau"] == cal["tau"]
    # Recorded once: the epoch selection holds the selection only.
    assert not {"calibration", "ensemble"} & set(m["training"]["schedule"]["epoch_selection"])
    assert "calibrat" in m["loso"]["calibration"]
    assert m["loso"]["uf1"] == json.loads((tmp_path / "cal.json").read_text())[
        "nested_cv_ensemble"]["uf1"]
    plain = export_default(data, cfg, tmp_path / "plain.onnx",
                           loso_results=tmp_path / "loso.json", ensemble=True)
    assert "calibration" not in plain["training"]
    got = load_engine(tmp_path / "cal.onnx", backend="onnxruntime").predict(data.x)
    base = load_engine(tmp_path / "plain.onnx", backend="onnxruntime").predict(data.x)
    np.testing.assert_allclose(got, prior_shift(base, counts, cal["tau"]), atol=1e-5)
    assert engine_file_name(cfg, ensemble=True, calibrate="prior") == "ststnet_cv4_cal_3db.onnx"

    # The class-bias rule: the biases of choose_bias on the same inner predictions.
    offsets = choose_bias(val_probs, data.y[val_idx])[0]
    mb = export_default(data, cfg, tmp_path / "bias.onnx", loso_results=tmp_path / "bias.json",
                        ensemble=True, calibrate="bias")
    assert mb["training"]["calibration"]["kind"] == "bias"
    np.testing.assert_allclose(mb["training"]["calibration"]["offsets"], offsets, atol=1e-8)
    assert mb["loso"]["uf1"] == json.loads((tmp_path / "bias.json").read_text())[
        "nested_cv_ensemble"]["uf1"]
    assert "median_bias" in mb["loso"] and "median_tau" not in mb["loso"]
    got = load_engine(tmp_path / "bias.onnx", backend="onnxruntime").predict(data.x)
    np.testing.assert_allclose(got, offset_shift(base, offsets), atol=1e-5)
    assert engine_file_name(cfg, ensemble=True, calibrate="bias") == \
        "ststnet_cv4_calbias_3db.onnx"
    with pytest.raises(ValueError, match="--select-epochs nested"):
        export_default(data, dataclasses.replace(cfg, select_epochs="fixed"),
                       tmp_path / "f.onnx", loso_results=None, calibrate="prior")


def test_the_mirrored_calibrated_ensemble_as_pt2_moves_whole_to_another_device(tmp_path):
    """The default engine's kind (CV ensemble, mirror average in the graph, class-prior
    calibration) exported as a .pt2 program loads (its mirror normalisation and calibration are
    buffers, not pickled constants), and the runtime's device move takes every tensor along.
    CPU → meta here (every tensor on meta, and the program runs there); on CUDA where there is
    one, the same scores as on the CPU."""
    from realtime_mer.runtime import load_engine
    from realtime_mer.runtime.backends import _load_exported, exported_on
    from training.calibrate import calibrate_run
    from training.loso import run_loso

    data = _noisy()
    cfg = dataclasses.replace(NESTED, epochs=4, tta="hflip", mean=(0.4, 0.5, 0.6),
                              std=(0.3, 0.5, 0.4))
    run_loso(data, cfg, tmp_path / "run", results_path=tmp_path / "loso.json")
    (tmp_path / "cal.json").write_text(json.dumps(calibrate_run(tmp_path / "run",
                                                                tmp_path / "loso.json")))
    manifest = export_default(data, cfg, tmp_path / "default.pt2",
                              loso_results=tmp_path / "cal.json", ensemble=True,
                              calibrate="prior")
    assert manifest["training"]["schedule"]["tta"] == "hflip"
    assert "calibration" in manifest["training"]
    # loadable at all: nothing in it is pickled (a tensor made inside forward would be lifted
    # out as a pickled constant, and the runtime would refuse the file)
    program = _load_exported(tmp_path / "default.pt2")
    buffers = {name for name, _ in program.module().named_buffers()}
    assert any(name.endswith("mean_map") for name in buffers)
    assert any(name.endswith("offsets") for name in buffers)
    moved = exported_on(program, "meta")
    assert all(t.device.type == "meta" for t in moved.constants.values())
    assert all(p.device.type == "meta" for p in moved.module().parameters())
    x = torch.as_tensor(data.x[:4])
    assert moved.module()(x.to("meta")).shape == (4, 3)
    if torch.cuda.is_available():
        on_gpu = load_engine(tmp_path / "default.pt2", backend="torch", device="cuda")
        on_cpu = load_engine(tmp_path / "default.pt2", backend="torch", device="cpu")
        np.testing.assert_allclose(on_gpu.predict(data.x), on_cpu.predict(data.x), atol=1e-4)
