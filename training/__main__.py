"""``python -m training COMMAND``: LOSO evaluation, full-data training, ONNX export and the
rebuilding of engines that are not shipped, the default-engine rule, raw-database preprocessing
and clip-level training; the commands that score finished runs (ensemble, compare, window,
calibrate) are in :mod:`training.results_commands`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from training import REPO_ROOT, results_commands


def default_data_dir(name: str = "megc2019_3db") -> Path:
    env = os.environ.get("MER_SHARED")
    base = Path(env) if env else REPO_ROOT.parent / "shared"
    return base / "data" / name


def _add_schedule(p: argparse.ArgumentParser) -> None:
    from training.loso import LosoConfig
    from training.loso.config import MAP_SETS

    d = LosoConfig()
    g = p.add_argument_group("schedule (the same for every fold and for export)")
    g.add_argument("--model", default=d.model, help="registered model name (default %(default)s)")
    g.add_argument("--model-kwargs", default="{}", help="JSON dict of model keyword arguments")
    g.add_argument("--epochs", type=int, default=d.epochs,
                   help="epochs trained (fixed) or the longest candidate (nested); "
                        "default %(default)s")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="default %(default)s")
    g.add_argument("--optimizer", default=d.optimizer, choices=("adam", "adamw", "sgd"))
    g.add_argument("--lr", type=float, default=d.lr, help="default %(default)s")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help="default %(default)s")
    g.add_argument("--no-class-balance", action="store_true",
                   help="plain cross-entropy instead of inverse-frequency class weights")
    g.add_argument("--augment", default=d.augment, choices=("none", "hflip"),
                   help="hflip: mirror and u -> 1 - u with probability 0.5 (default)")
    g.add_argument("--mixup", type=float, default=d.mixup_alpha, metavar="ALPHA",
                   help="mixup: train on mixtures of sample pairs and of their losses, mixing "
                        "weight ~ Beta(ALPHA, ALPHA) per sample; 0 (default) is off")
    g.add_argument("--label-smoothing", type=float, default=d.label_smoothing, metavar="EPS",
                   help="train against (1 - EPS) * the one-hot label + EPS / classes on every "
                        "class; 0 (default) is off")
    g.add_argument("--shift", type=int, default=d.shift_pixels, metavar="PIXELS",
                   help="random translation of each training input by up to PIXELS along each "
                        "axis (edges repeated); 0 (default) is off")
    g.add_argument("--tta", default=d.tta, choices=("none", "hflip"),
                   help="test-time augmentation: hflip averages the predictions of the maps "
                        "and of their mirror image, in LOSO scoring and in the exported engine "
                        "(map28 engines); default %(default)s")
    g.add_argument("--tta-shift", type=int, default=d.tta_shift, metavar="PIXELS",
                   help="test-time translation: also average the predictions over every "
                        "offset of up to PIXELS along each axis (edges repeated), in LOSO "
                        "scoring; 0 (default) is off")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--eval-every", type=int, default=d.eval_every,
                   help="epochs between evaluations (the LEAKY best-epoch number; the "
                        "candidates of --select-epochs nested)")
    g.add_argument("--select-epochs", default="nested", choices=("fixed", "nested"),
                   help="how the epoch count is set. nested (default, the product's protocol): "
                        "an inner subject-wise CV over the training subjects only (per LOSO "
                        "fold: the fold's training subjects; train/export: all subjects) picks "
                        "it among --eval-every, 2*--eval-every, ..., --epochs by pooled inner "
                        "UF1, earliest on ties. fixed: --epochs, chosen a priori")
    g.add_argument("--inner-folds", type=int, default=d.inner_folds,
                   help="inner groups of the nested selection (default %(default)s)")
    g.add_argument("--input-kind", default=None,
                   choices=("map28", "regions5", "colour", "mcnet"),
                   help="what the network is fed, built from the (u, v, strain) maps: map28 "
                        "(the maps), regions5 (AHMSA-Net's five-region recombination, from "
                        "landmarks5.csv), colour (the colour-coded flow image) or mcnet "
                        "(MCNet's magnified, AU-weighted colour image, from landmarks5.csv); "
                        "the runtime builds the same. Default: the network's own (map28 for "
                        "ststnet and ahmsa, colour for mjfn, mcnet for mcnet)")
    g.add_argument("--input-size", type=int, default=None,
                   help="side of the colour image (default: the network's own, 224 for mjfn "
                        "and mcnet); a network with a size option (mjfn's input_size) is "
                        "built for it")
    g.add_argument("--input-options", default="{}",
                   help='JSON dict of the input kind\'s switches, e.g. mcnet: '
                        '\'{"use_omam": false, "use_oaum": true, "alpha": 2.0}\'')
    g.add_argument("--maps", default=d.maps, choices=MAP_SETS,
                   help="the preprocessing trained on: 3db (the maps the live pipeline "
                        "reproduces, the default), causalnet (CausalNet's whole-sequence "
                        "base maps of the same samples, from --causalnet-data) or live (the "
                        "live pipeline's own maps of the raw databases, computed by "
                        "`preprocess` into --cache); map28 only")
    g.add_argument("--other-maps-share", type=float, default=d.other_maps_share, metavar="P",
                   help="share of training draws that take the sample's other preprocessing "
                        "(0, the default: --maps alone; 0.5: each draw either set at random)")
    g.add_argument("--phases", type=int, default=d.phases, choices=(1, 2),
                   help="phases of the movement fed to the network: 1 (onset→apex, the "
                        "default) or 2 (also apex→offset, stacked as channels 3-5, the network "
                        "built with in_channels 6); 2 needs --maps causalnet or --maps live "
                        "(the 3DB maps have no second phase); its engine is fed both phases "
                        "of each event by the live pipeline, made its own way")


def _add_data_and_device(sp) -> None:
    """Where the 3DB maps are, and what trains on them."""
    sp.add_argument("--data", default=str(default_data_dir()),
                    help="3DB folder with labels.csv and flow/ (default %(default)s)")
    sp.add_argument("--causalnet-data", default=str(default_data_dir("megc2019_3db_causalnet")),
                    help="CausalNet's maps of the same samples (flow/{stem}.png, _1, _2, _3; "
                         "default %(default)s), read with --maps causalnet, "
                         "--other-maps-share or --score-other-maps")
    sp.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    sp.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (0: torch's default)")


def _add_common(sp) -> None:
    """The options of the commands that train on the 3DB maps: data, device, threads and the
    LOSO schedule."""
    _add_data_and_device(sp)
    sp.add_argument("--cache", help="with --maps live: the folder `python -m training "
                                    "preprocess` wrote (kinds map28, or phases28 for --phases 2)")
    sp.add_argument("--databases", help="with --maps live: comma list of the databases in "
                                        "--cache to use (default all)")
    _add_schedule(sp)


def _databases(args) -> list[str] | None:
    names = [d.strip() for d in (args.databases or "").split(",") if d.strip()]
    return names or None


def _json_object(text: str, option: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{option} is not valid JSON ({exc}): {text!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{option} must be a JSON object such as '{{\"key\": 1}}', got {text!r}")
    return value


def _model_input(args) -> tuple[str, int | None, dict]:
    """The input kind and size the command line asks for, the network's declared ones where
    it is silent, and the network's options with its size option set to that size (unless
    given)."""
    from training.models import model_input

    kwargs = _json_object(args.model_kwargs, "--model-kwargs")
    try:
        declared = model_input(args.model)
    except KeyError as exc:  # an unknown name: the message lists the known ones
        raise ValueError(exc.args[0]) from None
    kind = args.input_kind or declared.kind
    if kind is None:
        raise ValueError(f"network {args.model!r} is not fed the 3DB maps (see "
                         "`python -m training fit-clips`); give --input-kind to try it on them")
    size = args.input_size
    if size is None and declared.size_kwarg and declared.size_kwarg in kwargs:
        size = kwargs[declared.size_kwarg]  # the network built for a size is fed that size
    if size is None and kind == declared.kind:
        size = declared.size
    if declared.size_kwarg and size is not None:
        kwargs.setdefault(declared.size_kwarg, size)
    return kind, size, kwargs


def _config(args):
    from training.loso import LosoConfig, build_network

    input_kind, input_size, model_kwargs = _model_input(args)
    if args.phases != 1 and "in_channels" not in model_kwargs:  # (u, v, strain) per phase
        model_kwargs = {**model_kwargs, "in_channels": 3 * args.phases}
    cfg = LosoConfig(
        model=args.model, model_kwargs=model_kwargs,
        epochs=args.epochs,
        batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
        weight_decay=args.weight_decay, class_balanced=not args.no_class_balance,
        augment=args.augment, mixup_alpha=args.mixup,
        label_smoothing=args.label_smoothing, shift_pixels=args.shift, tta=args.tta,
        tta_shift=args.tta_shift,
        seed=args.seed,
        eval_every=args.eval_every,
        select_epochs=args.select_epochs, inner_folds=args.inner_folds,
        input_kind=input_kind, input_size=input_size,
        input_options=_json_object(args.input_options, "--input-options"),
        maps=args.maps, other_maps_share=args.other_maps_share, phases=args.phases,
    )
    build_network(cfg.model, cfg.model_kwargs)  # a bad name or option fails before data is read
    return cfg


def _setup(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but CUDA is not available")


def _parse_folds(text: str | None) -> list[int] | None:
    """--folds: N (the first N folds) or a comma list of fold indices; None: all folds."""
    if not text:
        return None
    is_list = "," in text  # "5," is the one fold 5; "5" the first five folds
    parts = [p.strip() for p in text.split(",") if p.strip() or not is_list]
    if not parts or not all(p.isdigit() for p in parts):
        raise ValueError(f"--folds takes N or a comma list of fold indices such as 0,5,12 "
                         f"(one fold: 5,); got {text!r}")
    if is_list:
        return sorted({int(p) for p in parts})
    if int(parts[0]) < 1:
        raise ValueError("--folds N needs N >= 1")
    return list(range(int(parts[0])))


def cmd_loso(args) -> int:
    from training.data.megc3db import load_for_schedule
    from training.loso import run_loso

    _setup(args)
    cfg = _config(args)  # a schedule that does not fit fails before the data is read
    if args.outer_epochs == "chosen" and cfg.select_epochs != "nested":
        raise ValueError("--outer-epochs chosen needs --select-epochs nested (the outer models "
                         "stop at the epoch their fold's nested selection chose)")
    folds = _parse_folds(args.folds)
    data = load_for_schedule(args.data, args.causalnet_data, cfg.maps, cfg.other_maps_share,
                             cfg.input_kind, score_other_maps=args.score_other_maps,
                             phases=cfg.phases,
                             cache=args.cache, databases=_databases(args))
    run_dir = args.run_dir or (f"runs/loso_{cfg.model}_e{cfg.epochs}_s{cfg.seed}"
                               + ("_nested" if cfg.select_epochs == "nested" else ""))
    print(f"LOSO {cfg.model}: {len(data.primary_rows)} samples, {len(data.subject_list)} "
          f"subjects, run dir {run_dir}", flush=True)
    t0 = time.time()
    res = run_loso(data, cfg, run_dir, folds=folds, chunk_size=args.chunk_size,
                   device=args.device, checkpoint_every=args.checkpoint_every,
                   results_path=args.out, progress=lambda m: print(m, flush=True),
                   invocation={"command": "python -m training " + " ".join(sys.argv[1:])},
                   workers=args.workers, outer_epochs=args.outer_epochs)
    print(f"honest  UF1 {res['uf1']:.4f}  UAR {res['uar']:.4f}  "
          f"({res['folds_run']} folds, {time.time() - t0:.0f} s this session)")
    if "nested_cv_ensemble" in res:
        ens = res["nested_cv_ensemble"]
        print(f"honest  CV ensemble ({ens['n_models']} models per fold)  UF1 {ens['uf1']:.4f}  "
              f"UAR {ens['uar']:.4f}")
    lk = res.get("leaky_best_epoch")
    if lk is not None:  # not measured when the outer models stop at their chosen epoch
        print(f"LEAKY best-epoch-per-subject  UF1 {lk['uf1']:.4f}  UAR {lk['uar']:.4f}")
    for db, r in res["per_database"].items():
        print(f"  {db:<7} UF1 {r['uf1']:.4f}  UAR {r['uar']:.4f}  n={r['n']}")
    other = res.get("other_maps")
    if other is not None:
        print(f"on the {other['maps']} maps of the same subjects: UF1 {other['uf1']:.4f}  "
              f"UAR {other['uar']:.4f}"
              + (f"; CV ensemble UF1 {other['nested_cv_ensemble']['uf1']:.4f}"
                 if "nested_cv_ensemble" in other else ""))
    print(f"results: {Path(run_dir) / 'results.json'}" + (f" and {args.out}" if args.out else ""))
    return 0


def _add_loso_parser(sub) -> None:
    sp = sub.add_parser("loso", help="leave-one-subject-out evaluation with pooled UF1/UAR",
                        description="Run (or resume) LOSO. Prints progress per fold; writes "
                                    "RUN_DIR/results.json (and --out).")
    _add_common(sp)
    sp.add_argument("--run-dir", help="per-fold state, for resume (default runs/loso_...)")
    sp.add_argument("--out", help="also write the results JSON here")
    sp.add_argument("--folds", help="N (first N folds) or a comma list of fold indices "
                                    "(one fold: 'I,')")
    sp.add_argument("--chunk-size", type=int, default=68,
                    help="folds trained together as one vectorised ensemble (default 68)")
    sp.add_argument("--workers", type=int, default=1,
                    help="CPU worker processes sharing the folds, each with THREADS/WORKERS "
                         "torch threads (default 1). On a CPU, small networks train fastest "
                         "with --workers 2 --chunk-size 1 (experiments/results/loso_bench.md)")
    sp.add_argument("--checkpoint-every", type=int, default=25,
                    help="epochs between resume checkpoints (default 25)")
    sp.add_argument("--outer-epochs", default="all", choices=("all", "chosen"),
                    help="all (default): the outer models train the whole schedule, so the "
                         "results carry the LEAKY best-epoch and fixed-schedule figures beside "
                         "the honest one. chosen (with --select-epochs nested): the nested "
                         "selection runs first and each outer model stops at its fold's chosen "
                         "epoch: the same honest scores and CV ensemble, faster, without those "
                         "two figures")
    sp.add_argument("--score-other-maps", action="store_true",
                    help="also score every held-out subject on the other preprocessing of its "
                         "samples (the results' other_maps block: how far the networks carry "
                         "over to maps made another way)")
    sp.set_defaults(func=cmd_loso)


def cmd_train(args) -> int:
    from training.data.megc3db import load_for_schedule
    from training.export import fit_full, save_weights

    _setup(args)
    cfg = _config(args)  # a schedule that does not fit fails before the data is read
    data = load_for_schedule(args.data, args.causalnet_data, cfg.maps, cfg.other_maps_share,
                             cfg.input_kind, phases=cfg.phases,
                             cache=args.cache, databases=_databases(args))
    model, selection = fit_full(data, cfg, device=args.device,
                                progress=lambda m: print(m, flush=True))
    save_weights(model, cfg, args.out, selection)
    trained = selection["chosen_epochs"] if selection else cfg.epochs
    print(f"weights: {args.out} ({trained} epochs, {cfg.select_epochs} epoch count)")
    return 0


def _add_train_parser(sub) -> None:
    sp = sub.add_parser("train", help="train on all samples with the LOSO schedule (epoch "
                                      "count by --select-epochs, default nested)")
    _add_common(sp)
    sp.add_argument("--out", required=True, help="weights file (.pt, state dict of tensors)")
    sp.set_defaults(func=cmd_train)


# Where the results of each calibration rule are kept under experiments/results.
CALIBRATION_FOLDERS = {"prior": "calibration", "bias": "calibration_bias"}


def default_loso_results(cfg, results_dir: Path | None = None,
                         ensemble: bool = False, calibrated: str | None = None) -> Path | None:
    """The complete LOSO results file in experiments/results made with exactly this schedule and
    epoch selection (the one a manifest may quote; for an ensemble, one that scored the CV
    ensemble; calibrated "prior" or "bias": a ``training calibrate`` file of that rule in
    experiments/results/calibration or calibration_bias), or None."""
    from training.calibrate import calibration_kind
    from training.export import check_loso_results

    if cfg.maps == "live":
        return None  # runs on a user's cache are not in the repository: quote what is given
    folder = results_dir or REPO_ROOT / "experiments" / "results"
    if calibrated is not None:
        folder = folder / CALIBRATION_FOLDERS[calibrated]
    for path in sorted(folder.glob("*.json")):
        try:
            doc = json.loads(path.read_text())
            # Only a file of the engine's own rule is quoted (none for an uncalibrated one).
            if not (doc.get("complete") and "uf1" in doc) or calibration_kind(doc) != calibrated:
                continue
            if ensemble and "nested_cv_ensemble" not in doc:
                continue
            check_loso_results(doc, cfg, str(path))
        except (ValueError, TypeError, KeyError):
            continue
        return path
    return None


def _schedule_of_weights(args, cli_cfg):
    """With --weights the schedule is the one the weights were trained with (it names the
    engine and finds the LOSO results to quote); a schedule option given on the command line
    that contradicts it is refused rather than silently ignored. Returns the schedule and the
    weights file, read once."""
    import dataclasses

    from training.export import read_weights

    weights = read_weights(args.weights)
    file_cfg = weights.config
    default_cfg = _config(build_parser().parse_args(["export"]))
    conflicts = [f"{f.name}: command line {getattr(cli_cfg, f.name)!r}, weights "
                 f"{getattr(file_cfg, f.name)!r}"
                 for f in dataclasses.fields(cli_cfg)
                 if getattr(cli_cfg, f.name) != getattr(default_cfg, f.name)
                 and getattr(cli_cfg, f.name) != getattr(file_cfg, f.name)]
    if conflicts:
        raise ValueError(f"{args.weights} was trained with another schedule ("
                         + "; ".join(conflicts) + "); drop those options or train again")
    return file_cfg, weights


def cmd_export(args) -> int:
    from training.data.megc3db import load_for_schedule
    from training.export import engine_file_name, export_default

    _setup(args)
    cfg = _config(args)  # a schedule that does not fit fails before the data is read
    weights = None
    if args.weights:
        cfg, weights = _schedule_of_weights(args, cfg)
    data = load_for_schedule(args.data, args.causalnet_data, cfg.maps, cfg.other_maps_share,
                             cfg.input_kind, phases=cfg.phases,
                             cache=args.cache, databases=_databases(args))
    loso_results = (args.loso_results if args.loso_results is not None
                    else default_loso_results(cfg, ensemble=args.ensemble,
                                              calibrated=args.calibrate))
    if loso_results is None:
        print("note: no complete LOSO results file in experiments/results matches this schedule; the "
              "manifest will quote no LOSO score (run `python -m training loso` first)",
              file=sys.stderr)
    out = args.out or str(REPO_ROOT / "engines" / engine_file_name(
        cfg, ensemble=args.ensemble, calibrate=args.calibrate))
    info = export_default(data, cfg, out, loso_results=loso_results,
                          weights=weights, device=args.device, ensemble=args.ensemble,
                          calibrate=args.calibrate,
                          progress=lambda m: print(m, flush=True))
    print(json.dumps(info, indent=1))
    return 0


def _add_export_parser(sub) -> None:
    sp = sub.add_parser("export", help="train on all samples (or load --weights) and export "
                                       "ONNX + manifest")
    _add_common(sp)
    sp.add_argument("--out", default=None,
                    help="engine path (default engines/<model>_3db.onnx, "
                         "engines/<model>_cv<k+1>_3db.onnx with --ensemble, then _mirror with "
                         "--tta hflip, _shiftK with --shift K, _cal with --calibrate (prior), "
                         "_calbias with --calibrate bias, _2phases with --phases 2, before "
                         "the maps learned: _3db, _causalnet or _live, with _mixed for "
                         "--other-maps-share); a name ending in "
                         ".pt2 writes a torch.export program instead of ONNX (the engine of "
                         "the torch and TensorRT backends); the manifest is written beside it "
                         "as <out>.json")
    sp.add_argument("--ensemble", action="store_true",
                    help="export the CV ensemble (nested only): the full model and the inner "
                         "models of its epoch selection, probabilities averaged; quotes the "
                         "LOSO run's nested_cv_ensemble score")
    sp.add_argument("--calibrate", nargs="?", const="prior", default=None,
                    choices=("prior", "bias"), metavar="RULE",
                    help="calibration inside the engine (nested only), chosen by the inner CV "
                         "on all subjects: prior (the default when RULE is left out; tau of "
                         "the class-prior shift) or bias (a bias per class); quotes a "
                         "`training calibrate` results file of that rule (default: the one of "
                         "this schedule in experiments/results/calibration, or calibration_bias for "
                         "bias)")
    sp.add_argument("--loso-results", default=None,
                    help="LOSO results file (same schedule and epoch selection; refused "
                         "otherwise) whose honest UF1/UAR go into the manifest (default: the "
                         "complete one in experiments/results made with this schedule); '' for none")
    sp.add_argument("--weights", help="weights from `train` instead of training again")
    sp.set_defaults(func=cmd_export)


def cmd_rebuild_engine(args) -> int:
    from training.engine_recipes import rebuild, recipe, recipes

    _setup(args)
    if args.list or not args.names:
        for item in recipes():
            cfg, uf1 = item.config, (item.manifest.get("loso") or {}).get("uf1")
            print(f"{item.name}: {cfg.model}, "
                  + (f"CV ensemble of {cfg.inner_folds + 1}" if item.ensemble else "one network")
                  + (", mirrored" if cfg.tta == "hflip" else "")
                  + (f", shifts of {cfg.shift_pixels} px" if cfg.shift_pixels else "")
                  + (f", {item.calibration} calibration" if item.calibration else "")
                  + ("" if uf1 is None else f"; honest LOSO UF1 {uf1:.4f}"))
        return 0
    chosen = [recipe(name) for name in args.names]  # an unknown name fails before training
    for item in chosen:
        out = Path(args.out_dir) / item.name
        print(f"rebuilding {item.name} → {out}", flush=True)
        done = rebuild(item, out, Path(args.data), device=args.device,
                       progress=lambda m: print(f"  {m}", flush=True),
                       causalnet_dir=Path(args.causalnet_data))
        if done.identical:
            print(f"{out}: identical to the recorded engine")
        else:
            recorded = done.recorded_train_accuracy
            print(f"{out}: not byte for byte the recorded engine (this torch, CPU or thread "
                  f"count rounds differently); training accuracy {done.train_accuracy:.4f}, "
                  + ("recorded none" if recorded is None else f"recorded {recorded:.4f}"))
    return 0


def _add_rebuild_engine_parser(sub) -> None:
    sp = sub.add_parser("rebuild-engine", help="train and export again an engine that is not "
                                               "shipped, from its recipe in engines/recipes",
                        description="engines/ ships the default engine and one single network; "
                                    "every other engine exported before keeps its manifest in "
                                    "engines/recipes/, which records all that export needs. "
                                    "This trains and exports it again and says whether the "
                                    "file is byte for byte the recorded one. Without a name: "
                                    "the recipes there are.")
    sp.add_argument("names", nargs="*", metavar="NAME",
                    help="engine names, e.g. ststnet_cv6_3db (see --list)")
    sp.add_argument("--list", action="store_true", help="list the recipes and stop")
    sp.add_argument("--out-dir", default=str(REPO_ROOT / "engines"),
                    help="where the engines and their manifests go (default engines/)")
    _add_data_and_device(sp)
    sp.set_defaults(func=cmd_rebuild_engine)


def cmd_default_engine(args) -> int:
    from training.default_engine import choose_default_engine, describe

    choice = choose_default_engine(args.results)
    print(json.dumps(choice.to_json(), indent=2) if args.json else describe(choice))
    return 0


def _add_default_engine_parser(sub) -> None:
    sp = sub.add_parser("default-engine", help="which engine the registered rule makes the "
                                               "default, from the LOSO results files",
                        description="Apply the rule that picks the shipped default engine "
                                    "(training/default_engine.py) to the LOSO results files: "
                                    "the best honest UF1 among engines under the size budget "
                                    "picks the protocol, the mean over its seeds picks the "
                                    "calibration.")
    sp.add_argument("--results", type=Path, default=REPO_ROOT / "experiments" / "results",
                    help="the results folder (default experiments/results)")
    sp.add_argument("--json", action="store_true", help="the whole choice as JSON")
    sp.set_defaults(func=cmd_default_engine)


def cmd_preprocess(args) -> int:
    from training.data.preprocess import preprocess
    from training.data.raw import make_adapter

    adapter = make_adapter(args.database, args.root, args.sheet, smic_apex=args.smic_apex)
    res = preprocess(adapter, args.cache, kinds=args.kinds.split(","), flow=args.flow,
                     align=not args.no_align,
                     progress=lambda i, n, s, st: print(f"[{i}/{n}] {s.sample_id} {st}",
                                                        flush=True))
    print(adapter.report.summary())
    print(f"{res.computed} computed, {res.cached} cached, {len(res.failed)} failed; "
          f"index {res.index_path}")
    for sample_id, reason in res.failed:
        print(f"  failed {sample_id}: {reason}")
    return 0


def _add_preprocess_parser(sub) -> None:
    sp = sub.add_parser("preprocess", help="raw database (frames + annotation sheet) -> cached "
                                           "network inputs (training/data/README.md)")
    sp.add_argument("--database", required=True, choices=("casme2", "samm", "smic", "casme3"))
    sp.add_argument("--root", required=True, help="the database's frame folder")
    sp.add_argument("--sheet", help="annotation sheet, CSV (or .xlsx with openpyxl); not SMIC")
    sp.add_argument("--cache", required=True, help="cache folder (resumable)")
    sp.add_argument("--kinds", default="map28", help="comma list of map28, colour224, stack16, phases28 (both phases of "
                         "each movement, for `loso --maps live --phases 2`)")
    sp.add_argument("--flow", default="opencv-tvl1",
                    help="flow implementation: opencv-tvl1, torch-tvl1, dis, auto")
    sp.add_argument("--no-align", action="store_true",
                    help="use frames as they are (already cropped faces)")
    sp.add_argument("--smic-apex", default="max_flow", choices=("max_flow", "middle"))
    sp.set_defaults(func=cmd_preprocess)


def cmd_fit_clips(args) -> int:
    import torch

    from training.clips import fit_clips
    from training.data.preprocess import load_preprocessed
    from training.loso import build_network

    if args.threads:
        torch.set_num_threads(args.threads)
    model_kwargs = _json_object(args.model_kwargs, "--model-kwargs")
    build_network(args.model, model_kwargs)  # before the cache is read
    data = load_preprocessed(args.cache, args.databases.split(",") if args.databases else None,
                             kind="stack16")
    print(f"{len(data)} clips {tuple(data.x.shape[1:])}, classes {list(data.class_counts())}",
          flush=True)
    out = fit_clips(data.x, data.y, model=args.model, model_kwargs=model_kwargs,
                    steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                    progress=lambda m: print(m, flush=True))
    out["cache"] = str(args.cache)
    print(f"loss {out['losses'][0]:.4f} -> {out['losses'][-1]:.4f}; training accuracy "
          f"{out['train_accuracy_before']:.2f} -> {out['train_accuracy_after']:.2f}; "
          f"{out['wall_s']:.0f} s")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


def _add_fit_clips_parser(sub) -> None:
    sp = sub.add_parser("fit-clips", help="fit the 3D network on the flow clips of a "
                                          "preprocessed raw database (--kinds stack16)",
                        description="Full-data fit (no held-out subject) of a clip network on "
                                    "cached stack16 clips: shows that it trains and converges "
                                    "(training/clips.py).")
    sp.add_argument("--cache", required=True, help="cache folder written by preprocess")
    sp.add_argument("--databases", help="comma list of databases in the cache (default all)")
    sp.add_argument("--model", default="ms3d_resnet50")
    sp.add_argument("--model-kwargs", default="{}", help="JSON dict of model keyword arguments")
    sp.add_argument("--steps", type=int, default=30)
    sp.add_argument("--batch-size", type=int, default=4)
    sp.add_argument("--lr", type=float, default=1e-4)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--threads", type=int, default=0)
    sp.add_argument("--out", help="write the loss curve and accuracies here (JSON)")
    sp.set_defaults(func=cmd_fit_clips)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training",
        description="Train and evaluate micro-expression networks on the 3DB flow maps "
                    "(leave-one-subject-out), train the default model on all data and export "
                    "it to an ONNX engine with its manifest.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    _add_loso_parser(sub)
    _add_train_parser(sub)
    _add_export_parser(sub)
    _add_rebuild_engine_parser(sub)
    results_commands.add_parsers(sub)
    _add_default_engine_parser(sub)
    _add_preprocess_parser(sub)
    _add_fit_clips_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from realtime_mer.errors import MerError, Terminated, sigterm_as_interrupt
    from training.export import ExportError
    from training.loso import LosoWorkerError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    previous = sigterm_as_interrupt()  # SIGTERM stops the work as Ctrl+C does, workers too
    try:
        return args.func(args)
    except MerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except ValueError as exc:  # a configuration that does not fit (resume, results, ...)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (LosoWorkerError, ExportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as stop:
        stopped = "terminated (SIGTERM)" if isinstance(stop, Terminated) else "interrupted"
        if args.func is cmd_loso:
            print(f"{stopped}: finished folds and checkpoints are kept; rerun the same "
                  "command to resume", file=sys.stderr)
        elif args.func is cmd_preprocess:
            print(f"{stopped}: the samples already in the cache are kept; rerun the same "
                  "command to resume", file=sys.stderr)
        else:
            print(f"{stopped}: nothing was written (this command does not resume)",
                  file=sys.stderr)
        return 143 if isinstance(stop, Terminated) else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
