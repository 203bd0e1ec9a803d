"""The commands that score finished LOSO runs without training: ``ensemble`` (the mean
probability of several runs), ``compare`` (paired comparison with a subject bootstrap),
``compare-seeds`` (its mean over seeds, paired by seed), ``window`` (averaging checkpoints
around each fold's nested choice) and ``calibrate`` (class calibration chosen by the inner CV).
Each adds its own parser; ``python -m training`` lists them."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["add_parsers"]


def add_parsers(sub) -> None:
    _add_ensemble_parser(sub)
    _add_compare_parser(sub)
    _add_compare_seeds_parser(sub)
    _add_window_parser(sub)
    _add_calibrate_parser(sub)


def _add_nested_run_args(sp) -> None:
    """The two arguments that name a finished nested run (post-hoc commands)."""
    sp.add_argument("--run-dir", required=True, help="the nested run's --run-dir")
    sp.add_argument("--results", required=True, help="that run's results JSON (its --out)")


def _print_databases_and_write(res: dict, out: str | None) -> None:
    """The per-database lines of a pooled LOSO score, and its results JSON to ``out``."""
    for db, r in res["per_database"].items():
        print(f"  {db:<7} UF1 {r['uf1']:.4f}  UAR {r['uar']:.4f}  n={r['n']}")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(res, indent=1) + "\n")
        print(f"results: {out}")


def cmd_ensemble(args) -> int:
    from training.ensemble import SOURCES, EnsembleError, loso_ensemble

    members = []
    for spec in args.members:
        path, _, source = spec.partition(":")
        source = source or "final"
        if source not in SOURCES:
            raise EnsembleError(f"{spec}: source {source!r} is not one of {', '.join(SOURCES)}")
        members.append((path, source))
    res = loso_ensemble(members)
    for m in res["members"]:
        print(f"  member {m['model']:<8} {m['source']:<11} UF1 {m['uf1']:.4f}  UAR "
              f"{m['uar']:.4f}  {m['results']}")
    print(f"ensemble of {len(members)} (mean probability)  UF1 {res['uf1']:.4f}  "
          f"UAR {res['uar']:.4f}")
    _print_databases_and_write(res, args.out)
    if args.engine_out:
        from training.ensemble import write_ensemble_engine

        if not args.engines:
            raise EnsembleError("--engine-out needs --engines (one exported engine per member)")
        manifest = write_ensemble_engine(res, args.engines, args.engine_out, args.out)
        print(f"ensemble engine: {args.engine_out} (+ .json manifest, sha256 "
              f"{manifest['sha256'][:16]}…)")
    return 0


def _add_ensemble_parser(sub) -> None:
    sp = sub.add_parser("ensemble", help="LOSO score of the mean probability of several "
                                         "networks' LOSO runs (no fitting)",
                        description="Average the pooled LOSO probabilities of complete runs "
                                    "over the same samples and score them once "
                                    "(training/ensemble.py). Each member is a results file, "
                                    "optionally suffixed :cv_ensemble to take its nested CV "
                                    "ensemble's probabilities instead of its final ones.")
    sp.add_argument("members", nargs="+", metavar="RESULTS[:SOURCE]",
                    help="LOSO results JSON; SOURCE final (default) or cv_ensemble")
    sp.add_argument("--out", help="write the ensemble's results JSON here")
    sp.add_argument("--engines", nargs="+", metavar="ENGINE",
                    help="one exported engine per member, in the members' order; each "
                         "manifest must quote its member's LOSO run")
    sp.add_argument("--engine-out", metavar="NAME.ens",
                    help="write an ensemble engine (member list + manifest with the "
                         "ensemble's LOSO score) that mer --engine loads")
    sp.set_defaults(func=cmd_ensemble)


def cmd_compare(args) -> int:
    from training.compare import load_results, paired_comparison

    reference = load_results(args.reference)
    rows = []
    print(f"reference: {args.reference}"
          + (f" (database {args.database} only)" if args.database else ""))
    print(f"{'variant':<48} {'n':>4} {'ref UF1':>8} {'UF1':>7} {'dUF1':>7} "
          f"{'95% CI (subjects)':>18} {'dUAR':>7}")
    for path in args.variants:
        r = paired_comparison(reference, load_results(path), n_boot=args.bootstrap,
                              seed=args.seed, database=args.database)
        rows.append({"results": str(path), **r})
        lo, hi = r["ci95_delta_uf1"]
        print(f"{Path(path).name:<48} {r['n']:>4} {r['reference']['uf1']:>8.4f} "
              f"{r['variant']['uf1']:>7.4f} {r['delta_uf1']:>+7.4f} "
              f"{f'[{lo:+.3f}, {hi:+.3f}]':>18} {r['delta_uar']:>+7.4f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"reference": str(args.reference),
                                              "database": args.database or "all",
                                              "comparisons": rows}, indent=1) + "\n")
        print(f"comparison: {args.out}")
    return 0


def cmd_compare_seeds(args) -> int:
    from training.compare import CompareError, load_results, paired_seeds_comparison

    if len(args.reference) != len(args.variant):
        raise CompareError(f"{len(args.reference)} reference run(s) for {len(args.variant)} "
                           "variant run(s): give one of each per seed, in the same order")
    pairs = [(load_results(r), load_results(v)) for r, v in zip(args.reference, args.variant)]
    r = paired_seeds_comparison(pairs, n_boot=args.bootstrap, seed=args.seed)
    print(f"{'reference':<54} {'variant':<46} {'ref UF1':>8} {'UF1':>7} {'dUF1':>7}")
    for ref, var, row in zip(args.reference, args.variant, r["per_seed"]):
        print(f"{Path(ref).name:<54} {Path(var).name:<46} {row['reference']:>8.4f} "
              f"{row['variant']:>7.4f} {row['delta_uf1']:>+7.4f}")
    lo, hi = r["ci95_mean_delta_uf1"]
    print(f"mean of {r['seeds']} seeds ({r['n']} samples each): reference "
          f"{r['reference_mean_uf1']:.4f}, variant {r['variant_mean_uf1']:.4f}, dUF1 "
          f"{r['mean_delta_uf1']:+.4f} [{lo:+.3f}, {hi:+.3f}] (95 % subject bootstrap, one "
          f"draw for all seeds); the seeds' differences spread by sd {r['sd_delta_uf1']:.4f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"references": [str(p) for p in args.reference],
                                              "variants": [str(p) for p in args.variant],
                                              **r}, indent=1) + "\n")
        print(f"comparison: {args.out}")
    return 0


def _add_compare_seeds_parser(sub) -> None:
    sp = sub.add_parser("compare-seeds", help="the mean UF1 difference of a variant over "
                                              "seeds, paired by seed, with a subject bootstrap",
                        description="Each seed's variant run is scored against the same "
                                    "seed's reference run; the differences are averaged over "
                                    "seeds, and one subject bootstrap (the same subjects drawn "
                                    "for every seed) gives the mean's interval "
                                    "(training/compare.py).")
    sp.add_argument("--reference", nargs="+", required=True,
                    help="the reference's results per seed (the forms of `compare`, e.g. "
                         "RESULTS:cv_ensemble)")
    sp.add_argument("--variant", nargs="+", required=True,
                    help="the variant's results per seed, in the same seed order")
    sp.add_argument("--bootstrap", type=int, default=2000, help="subject bootstrap draws")
    sp.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    sp.add_argument("--out", help="write the comparison here (JSON)")
    sp.set_defaults(func=cmd_compare_seeds)


def _add_compare_parser(sub) -> None:
    sp = sub.add_parser("compare", help="paired comparison of LOSO runs on the folds they "
                                        "share (ablations), with a subject bootstrap",
                        description="Score each variant and the reference on the variant's "
                                    "test samples (a --folds subset or all) and bootstrap the "
                                    "UF1 difference over subjects (training/compare.py).")
    sp.add_argument("reference", help="LOSO results JSON of the reference (e.g. the full "
                                      "model); RESULTS:cv_ensemble takes a nested run's CV "
                                      "ensemble, and an `ensemble --out` file works too")
    sp.add_argument("variants", nargs="+", help="LOSO results JSON of each variant (same forms)")
    sp.add_argument("--bootstrap", type=int, default=2000, help="subject bootstrap draws")
    sp.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    sp.add_argument("--database", choices=("casme2", "smic", "samm"),
                    help="compare on this database's samples only (subjects bootstrapped "
                         "within it)")
    sp.add_argument("--out", help="write the comparisons here (JSON)")
    sp.set_defaults(func=cmd_compare)


def cmd_window(args) -> int:
    from training.window import checkpoint_window

    res = checkpoint_window(args.run_dir, args.results, args.width)
    n = [len(e) for e in res["window"]["epochs_per_subject"].values()]
    print(f"single model (the nested choice)  UF1 {res['single_model']['uf1']:.4f}  "
          f"UAR {res['single_model']['uar']:.4f}")
    print(f"checkpoint window ±{args.width} epochs ({min(n)}-{max(n)} checkpoints per fold)  "
          f"UF1 {res['uf1']:.4f}  UAR {res['uar']:.4f}")
    _print_databases_and_write(res, args.out)
    return 0


def _add_window_parser(sub) -> None:
    sp = sub.add_parser("window", help="LOSO score of averaging each fold's checkpoints around "
                                       "its nested epoch choice (no training)",
                        description="Per fold of a nested run, the mean probability of the "
                                    "outer model at the evaluation epochs within --width "
                                    "epochs of its nested choice, pooled and scored once "
                                    "(training/window.py). Reads the run directory's fold "
                                    "files; the results file must be the same run's.")
    _add_nested_run_args(sp)
    sp.add_argument("--width", type=int, default=20,
                    help="epochs on each side of the nested choice (default %(default)s: the "
                         "two evaluation epochs on each side at --eval-every 10)")
    sp.add_argument("--out", help="write the window's results JSON here (reads like a LOSO "
                                  "results file for compare and ensemble)")
    sp.set_defaults(func=cmd_window)


def cmd_calibrate(args) -> int:
    from training.calibrate import calibrate_run

    res = calibrate_run(args.run_dir, args.results, rule=args.rule)
    cal = res["calibration"]
    print(f"uncalibrated: single model UF1 {cal['uncalibrated']['single']['uf1']:.4f}, "
          f"CV ensemble UF1 {cal['uncalibrated']['cv_ensemble']['uf1']:.4f}")
    if args.rule == "prior":
        taus = list(cal["tau_per_subject"].values())
        print(f"tau chosen by the inner CV: median {cal['median_tau']:.1f} "
              f"(range {min(taus):.1f}-{max(taus):.1f} over {len(taus)} folds)")
    else:
        import numpy as np

        biases = np.array(list(cal["bias_per_subject"].values()))
        names = res["class_names"]
        print("biases chosen by the inner CV over "
              f"{len(biases)} folds: " + ", ".join(
                  f"{names[c]} median {np.median(biases[:, c]):+.1f} "
                  f"(range {biases[:, c].min():+.1f} to {biases[:, c].max():+.1f})"
                  for c in range(1, biases.shape[1])))
    print(f"calibrated CV ensemble  UF1 {res['nested_cv_ensemble']['uf1']:.4f}  "
          f"UAR {res['nested_cv_ensemble']['uar']:.4f}")
    print(f"calibrated single model  UF1 {res['uf1']:.4f}  UAR {res['uar']:.4f}")
    _print_databases_and_write(res, args.out)
    return 0


def _add_calibrate_parser(sub) -> None:
    sp = sub.add_parser("calibrate", help="class-prior calibration of a nested run, its "
                                          "strength chosen by the inner CV (no training)",
                        description="Per fold of a nested run, shift the test probabilities "
                                    "by tau * log(training class frequencies), tau chosen "
                                    "by the pooled UF1 of the fold's inner validation "
                                    "predictions (training/calibrate.py). Needs a run whose "
                                    "nested selection kept its validation probabilities.")
    _add_nested_run_args(sp)
    sp.add_argument("--rule", default="prior", choices=("prior", "bias"),
                    help="prior: shift by tau * log(training class frequencies), one tau per "
                         "fold (the default engine's rule); bias: a free bias per class after "
                         "the first, chosen on the same inner predictions")
    sp.add_argument("--out", help="write the calibrated results JSON here (reads like a LOSO "
                                  "results file for compare and ensemble; :cv_ensemble too)")
    sp.set_defaults(func=cmd_calibrate)
