"""LOSO training speed: folds one at a time, as one vectorised ensemble, or in worker processes.

    python benchmarks/loso.py [--models ststnet ahmsa mjfn] [--folds 8] [--epochs 2]
                              [--repeats 3] [--threads 2] [--device cpu] [--shift 0]
                              [--tta none]
                              [--out experiments/results/loso_bench.json]

For each network, the first ``--folds`` LOSO folds of the real 3DB data (their real training
sets) are trained with the runner's own ``train_models`` in several ways, side by side in one
run:

- **sequential**: one fold after another (``--chunk-size 1`` of ``python -m training loso``),
  in the image layout the runner gives the network on this device (channels-last for the
  networks that declare ``channels_last_on_cpu``, ``training.loso.trains_channels_last``);
- **sequential, other layout**: the same in the other layout, so the table shows what
  channels-last gains or costs each network on a CPU (likewise **workers, other layout**
  beside the workers, the way full CPU runs are made);
- **parallel**: all of them at once, one ``torch.func`` vectorised ensemble (the default,
  ``--chunk-size 68``);
- **workers**: the folds shared round robin by ``--threads`` spawned processes of one thread
  each, every process training its folds one at a time (``--workers 2 --chunk-size 1``). Its
  time is the slowest process's sum of timed epochs (they run side by side).

- **workers, without the CPU memory changes**: the workers way in processes that train as the
  runner did before two changes that alter where memory comes from, not what is computed
  (``training.allocator.keep_freed_memory``, and batches taken from a prebuilt input bank,
  ``training.loso.trainer._InputBank``): what the two gain, side by side. Only the networks that
  declare it keep freed memory (``training.loso.keeps_freed_memory``), and the setting stays
  in a process once made: worker pools are fresh per network, but the sequential ways of a
  network timed after the STSTNet-sized one in the same run keep freed memory too.

``--shift`` and ``--tta`` train with random translation and predict with mirroring, as the
default engine's protocol does (``--shift 2 --tta hflip``).

Each way trains ``--epochs`` + 1 epochs; the first epoch is a warm-up (allocation, input
building) and the time of the remaining ones is taken from the runner's per-epoch callback.
Every time is the median of ``--repeats`` runs, and the two ways alternate within a repeat so
that a noisy shared machine hurts both alike. The table gives seconds per fold-epoch, the
parallel speed-up, and the projected wall time of a full 68-fold LOSO run of the network's
documented schedule (``EPOCHS`` below) at the parallel rate (a linear projection: a chunk of 68
folds is assumed to cost 68/``--folds`` times a chunk of ``--folds``).

Prints a markdown table and writes the same rows to ``--out`` (JSON) and ``--out`` with ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.data import load_megc3db  # noqa: E402
from training.loso import trainer as loso  # noqa: E402
from training.loso import LosoConfig, train_models, trains_channels_last  # noqa: E402
from training.models import create_model  # noqa: E402

# name -> (model kwargs, input kind, input size, epochs of its LOSO schedule in experiments/LOG.md)
NETWORKS = {
    "ststnet": ({}, "map28", None, 300),
    "ahmsa": ({}, "map28", None, 40),
    "mjfn": ({"input_size": 112}, "colour", 112, 40),
    "mcnet": ({}, "mcnet", 112, 40),
}


WAYS = ("seq", "seq_other", "par", "workers", "workers_other", "workers_plain")


def _default_data() -> Path:
    env = os.environ.get("MER_SHARED")
    base = Path(env) if env else ROOT.parent / "shared"
    return base / "data" / "megc2019_3db"


def time_epochs(data, train_sets, fold_ids, cfg: LosoConfig, device: str,
                channels_last: bool | None = None) -> float:
    """Seconds for epochs 2..cfg.epochs of one ``train_models`` call (epoch 1 is warm-up);
    ``channels_last`` as in ``train_models`` (None: the runner's choice)."""
    marks: dict[int, float] = {}

    def on_epoch(epoch: int) -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        marks[epoch] = time.perf_counter()

    train_models(data.x, data.y, train_sets, cfg, fold_ids, device=device, on_epoch=on_epoch,
                 landmarks=data.landmarks, channels_last=channels_last)
    return marks[cfg.epochs] - marks[1]


def _config(name: str, epochs: int, augment: dict | None = None) -> LosoConfig:
    kwargs, kind, size, _ = NETWORKS[name]
    return LosoConfig(model=name, model_kwargs=kwargs, input_kind=kind, input_size=size,
                      epochs=epochs + 1, eval_every=10_000, **(augment or {}))


def _plain_runner() -> None:
    """Pool initializer: this process trains as the runner did before its two CPU changes
    (glibc's default allocation policy, and each batch augmented as it is drawn instead of
    taken from the input bank); they change where memory comes from, not the results."""
    loso.KEEP_FREED_MEMORY = False
    loso.INPUT_BANK_MAX_BYTES = 0


def _worker_sum(name: str, data_dir: str, fold_ids: list[int], epochs: int,
                channels_last: bool | None = None, augment: dict | None = None) -> float:
    """In a worker process: one thread, the given folds one after another."""
    torch.set_num_threads(1)
    data = load_megc3db(data_dir)
    cfg = _config(name, epochs, augment)
    return sum(time_epochs(data, [np.flatnonzero(data.subjects != data.subject_list[f])], [f],
                           cfg, "cpu", channels_last) for f in fold_ids)


def bench_network(name: str, data, folds: int, epochs: int, repeats: int, device: str,
                  workers: int = 0, pool=None, plain_pool=None,
                  augment: dict | None = None, only: list[str] | None = None) -> dict:
    _, kind, size, schedule_epochs = NETWORKS[name]
    cfg = _config(name, epochs, augment)
    subjects = data.subject_list
    fold_ids = list(range(folds))
    train_sets = [np.flatnonzero(data.subjects != subjects[f]) for f in fold_ids]
    times: dict[str, list[float]] = {"seq": [], "seq_other": [], "par": [], "workers": [],
                                     "workers_other": [], "workers_plain": []}
    # The runner's layout for this network, and the other one (compared on a CPU only).
    runner_cl = trains_channels_last(create_model(name, **cfg.model_kwargs), device)
    other = device == "cpu"
    ways = (["seq"] + (["seq_other"] if other else []) + ["par"]
            + (["workers"] if pool is not None else [])
            + (["workers_other"] if pool is not None and other else [])
            + (["workers_plain"] if plain_pool is not None else []))
    if only:
        ways = [w for w in ways if w in only]
        if not ways:
            raise ValueError(f"none of the ways {only} can run here (CPU with --threads > 1 "
                             "for the worker ways)")
    for r in range(repeats):
        order = ways[r % len(ways):] + ways[:r % len(ways)]  # rotate: noise hits all alike
        for way in order:
            layout = (not runner_cl) if way.endswith("_other") else None
            if way in ("seq", "seq_other"):
                t = sum(time_epochs(data, [tr], [f], cfg, device, layout)
                        for tr, f in zip(train_sets, fold_ids))
            elif way == "par":
                t = time_epochs(data, train_sets, fold_ids, cfg, device)
            else:
                shares = [fold_ids[w::workers] for w in range(workers)]
                runner = plain_pool if way == "workers_plain" else pool
                t = max(runner.starmap(_worker_sum, [(name, str(data.root), s, epochs, layout,
                                                      augment) for s in shares]))
            times[way].append(t)
            print(f"  {name} repeat {r + 1}/{repeats} {way}: {t:.1f} s", flush=True)
    fold_epochs = folds * epochs
    nan = float("nan")
    s_seq = statistics.median(times["seq"]) / fold_epochs if times["seq"] else nan
    s_par = statistics.median(times["par"]) / fold_epochs if times["par"] else nan
    seq, par = times["seq"], times["par"]
    extra = {"runner_channels_last": runner_cl, "ways": ways}

    def cl_speedup(runner_s: float, other_s: float) -> float:  # default layout / channels-last
        return round(other_s / runner_s if runner_cl else runner_s / other_s, 2)

    if times["seq_other"]:
        s_o = statistics.median(times["seq_other"]) / fold_epochs
        extra.update({"seq_other_layout_s_per_fold_epoch": round(s_o, 4),
                      "channels_last_speedup": cl_speedup(s_seq, s_o),
                      "seq_other_layout_runs_s": [round(t, 2) for t in times["seq_other"]]})
    if times["workers"]:
        s_w = statistics.median(times["workers"]) / fold_epochs
        extra.update({"workers": workers, "workers_s_per_fold_epoch": round(s_w, 4),
                 "workers_speedup": round(s_seq / s_w, 2),
                 "projected_full_loso_min_workers": round(s_w * 68 * schedule_epochs / 60, 1),
                 "workers_runs_s": [round(t, 2) for t in times["workers"]]})
    if times["workers_other"]:
        s_wo = statistics.median(times["workers_other"]) / fold_epochs
        extra.update({"workers_other_layout_s_per_fold_epoch": round(s_wo, 4),
                      "workers_channels_last_speedup": cl_speedup(s_w, s_wo),
                      "workers_other_layout_runs_s": [round(t, 2)
                                                      for t in times["workers_other"]]})
    if times["workers_plain"]:
        s_wp = statistics.median(times["workers_plain"]) / fold_epochs
        extra.update({"workers_plain_runner_s_per_fold_epoch": round(s_wp, 4),
                      "runner_cpu_changes_speedup": round(s_wp / s_w, 2),
                      "projected_full_loso_min_workers_plain":
                          round(s_wp * 68 * schedule_epochs / 60, 1),
                      "workers_plain_runner_runs_s": [round(t, 2)
                                                      for t in times["workers_plain"]]})
    return {
        "network": name, "input": f"{kind}{'' if size is None else f' {size}'}",
        "augment": {"augment": cfg.augment, "shift_pixels": cfg.shift_pixels, "tta": cfg.tta},
        "folds": folds, "epochs_timed": epochs, "repeats": repeats,
        "seq_s_per_fold_epoch": round(s_seq, 4), "par_s_per_fold_epoch": round(s_par, 4),
        "speedup": round(s_seq / s_par, 2),
        "schedule_epochs": schedule_epochs,
        "projected_full_loso_min_parallel": round(s_par * 68 * schedule_epochs / 60, 1),
        "projected_full_loso_min_sequential": round(s_seq * 68 * schedule_epochs / 60, 1),
        "seq_runs_s": [round(t, 2) for t in seq], "par_runs_s": [round(t, 2) for t in par],
        **extra,
    }


def _ratio(value: float | None, note: str = "") -> str:
    """" (1.23x, note)" beside a time; the ratio left out where its reference way (the
    sequential one) was not timed."""
    inner = ([f"{value:.2f}x"] if value is not None else []) + ([note] if note else [])
    return f" ({', '.join(inner)})" if inner else ""


def _minutes(value: float | None) -> str:
    return "| - " if value is None else f"| {value:.0f} min "


def _no_nan(row: dict) -> dict:
    """NaN (a way not timed) as None, so the JSON file stays standard JSON."""
    return {k: (None if isinstance(v, float) and v != v else v) for k, v in row.items()}


def markdown(rows: list[dict], env: dict) -> str:
    lines = [
        f"LOSO training speed, {env['device']} ({env['threads']} threads, {env['machine']}), "
        f"torch {env['torch']}; medians of the repeats; s per fold-epoch = wall time / "
        "(folds x epochs timed).",
        "",
        "| network | runner's layout | input | folds | s/fold-epoch: sequential | other layout "
        "(channels-last speed-up) | vectorised (speed-up) | worker processes (speed-up) "
        "| workers, other layout (channels-last speed-up) "
        "| workers, runner without its CPU memory changes (their speed-up) | schedule "
        "| projected 68-fold run: sequential | vectorised | workers |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        w = r.get("workers_s_per_fold_epoch")
        c = r.get("seq_other_layout_s_per_fold_epoch")
        wc = r.get("workers_other_layout_s_per_fold_epoch")
        wp = r.get("workers_plain_runner_s_per_fold_epoch")
        layout = "channels-last" if r.get("runner_channels_last") else "default"
        procs = f"{r.get('workers')} procs"
        lines.append(
            f"| {r['network']} | {layout} | {r['input']} | {r['folds']} "
            + (f"| {r['seq_s_per_fold_epoch']:.3f} " if r["seq_s_per_fold_epoch"] else "| - ")
            + (f"| {c:.3f} ({r['channels_last_speedup']:.2f}x) " if c else "| - ")
            + (f"| {r['par_s_per_fold_epoch']:.3f} ({r['speedup']:.2f}x) "
               if r["par_s_per_fold_epoch"] and r["speedup"] else "| - ")
            + (f"| {w:.3f}{_ratio(r.get('workers_speedup'), procs)} " if w else "| - ")
            + (f"| {wc:.3f} ({r['workers_channels_last_speedup']:.2f}x) " if wc else "| - ")
            + (f"| {wp:.3f} ({r['runner_cpu_changes_speedup']:.2f}x) " if wp else "| - ")
            + f"| {r['schedule_epochs']} ep "
            + _minutes(r["projected_full_loso_min_sequential"])
            + _minutes(r["projected_full_loso_min_parallel"])
            + (f"| {r['projected_full_loso_min_workers']:.0f} min |" if w else "| - |"))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["ststnet", "ahmsa", "mjfn"],
                   choices=sorted(NETWORKS))
    p.add_argument("--data", type=Path, default=_default_data())
    p.add_argument("--folds", type=int, default=8)
    p.add_argument("--epochs", type=int, default=2, help="epochs timed (after one warm-up)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--shift", type=int, default=0,
                   help="random translation in training (--shift of training loso)")
    p.add_argument("--tta", default="none", choices=("none", "hflip"),
                   help="test-time mirroring (--tta of training loso)")
    p.add_argument("--ways", nargs="+", choices=WAYS, default=None,
                   help="time only these ways (default: all that can run here)")
    p.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "loso_bench.json")
    args = p.parse_args(argv)
    if args.folds < 2 or args.epochs < 1 or args.repeats < 1:
        p.error("--folds must be >= 2, --epochs and --repeats >= 1")
    for way, ref in (("seq_other", "seq"), ("workers_other", "workers"),
                     ("workers_plain", "workers")):
        if args.ways and way in args.ways and ref not in args.ways:
            p.error(f"--ways {way} is timed as a ratio to {ref}: add {ref}")
    if not (args.data / "labels.csv").is_file():
        print(f"error: no 3DB data at {args.data} (set --data or MER_SHARED)", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    data = load_megc3db(args.data)
    env = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "CPU",
           "threads": args.threads, "machine": platform.machine(), "torch": torch.__version__,
           "cpu_count": os.cpu_count()}
    augment = {"shift_pixels": args.shift, "tta": args.tta}
    rows = []
    for name in args.models:
        # Fresh worker pools per network: a process that trained a network which keeps freed
        # memory (training.loso.keeps_freed_memory) keeps that setting for good.
        pool = plain_pool = None
        if args.device == "cpu" and args.threads > 1:
            import multiprocessing

            ctx = multiprocessing.get_context("spawn")
            pool = ctx.Pool(args.threads)
            plain_pool = ctx.Pool(args.threads, initializer=_plain_runner)
        try:
            rows.append(_no_nan(bench_network(name, data, args.folds, args.epochs, args.repeats,
                                              args.device, workers=args.threads, pool=pool,
                                              plain_pool=plain_pool, augment=augment,
                                              only=args.ways)))
        finally:
            for p_ in (pool, plain_pool):
                if p_ is not None:
                    p_.close()
                    p_.join()
    md = markdown(rows, env)
    print(md)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"environment": env, "rows": rows}, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
