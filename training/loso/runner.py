"""The LOSO run: folds in chunks or worker processes, resumable from the run directory."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import json
import os
import signal
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from training.data.megc3db import Megc3DB
from training.loso.config import LosoConfig, LosoWorkerError, OUTER_EPOCHS, RESULTS_FORMAT
from training.loso.nested import _nested_todo, select_epochs_nested
from training.loso.provenance import _add_elapsed, _atomic_write_json, _time_left
from training.loso.results import _collect
from training.loso.trainer import _check_training_sets, _rows, check_model, train_models
from training.loso.views import predict_probs

log = logging.getLogger(__name__)


def run_loso(
    data: Megc3DB,
    cfg: LosoConfig,
    run_dir: str | Path,
    *,
    folds: list[int] | None = None,
    chunk_size: int = 68,
    device: str = "cpu",
    checkpoint_every: int = 25,
    results_path: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
    invocation: dict | None = None,
    workers: int = 1,
    outer_epochs: str = "all",
) -> dict:
    """Run (or resume) LOSO over ``data``'s subjects and return the results dict.

    folds: indices into ``data.subject_list`` to run (default: all; a subset gives a partial,
    clearly marked result). chunk_size: folds trained together. workers: CPU worker processes
    that share the folds (and their nested epoch selection), each with
    ``torch.get_num_threads() // workers`` threads; they print their own progress. The results
    are also written to ``run_dir/results.json`` and, if given, ``results_path``.
    outer_epochs: "all" (the outer models train the whole schedule) or "chosen" (a nested run's
    outer models stop at their fold's chosen epoch; the module docstring says what is lost).
    """
    say = progress or (lambda msg: log.info(msg))
    run_dir = Path(run_dir)
    subjects = data.subject_list
    all_folds = list(range(len(subjects)))
    folds = all_folds if folds is None else sorted(set(int(f) for f in folds))
    bad = [f for f in folds if f < 0 or f >= len(subjects)]
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (f", ... ({len(bad)} in all)" if len(bad) > 5 else "")
        raise ValueError(f"fold index(es) {shown} outside 0..{len(subjects) - 1}: the dataset has "
                         f"{len(subjects)} folds, one per subject")
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    if workers < 1:
        raise ValueError("workers must be >= 1")
    if outer_epochs not in OUTER_EPOCHS:
        raise ValueError(f"outer_epochs {outer_epochs!r} is not one of {', '.join(OUTER_EPOCHS)}")
    if outer_epochs == "chosen" and cfg.select_epochs != "nested":
        raise ValueError("outer models can stop at their chosen epoch only when the epochs are "
                         "chosen (select_epochs nested)")
    if workers > 1 and not str(device).startswith("cpu"):
        raise ValueError("worker processes are for CPU runs; on a GPU the folds of a chunk "
                         "already train at once (use --chunk-size)")

    # Checked before the run directory records the configuration, so a fixed command reruns.
    _check_training_sets(data, folds)
    check_model(data, cfg)
    config_doc = {"config": cfg.to_dict(), "n_samples": len(data), "subjects": subjects,
                  "format": RESULTS_FORMAT,
                  # the live maps come from a cache whose options the folder does not show
                  **({"data_sha256": data.fingerprint()} if cfg.maps == "live" else {}),
                  # recorded only when not the default, so older run directories still resume;
                  # folds trained to their chosen epoch cannot serve a run that needs them all
                  **({"outer_epochs": outer_epochs} if outer_epochs != "all" else {})}
    run_dir.mkdir(parents=True, exist_ok=True)  # only now: bad input leaves no directory behind
    cfg_path = run_dir / "config.json"
    if cfg_path.exists():
        old = json.loads(cfg_path.read_text())
        if isinstance(old.get("config"), dict):
            # A run directory written before a schedule field existed holds that field's
            # default implicitly: it resumes under the code that added it.
            try:
                old["config"] = LosoConfig.from_dict(old["config"]).to_dict()
            except (TypeError, ValueError):
                pass  # unreadable: reported as a different configuration below
        if old != config_doc:
            raise ValueError(
                f"{run_dir} holds a run with a different configuration or data "
                f"({cfg_path}); use a new --run-dir or delete it"
            )
    else:
        _atomic_write_json(cfg_path, config_doc)

    pending = [f for f in folds if not (run_dir / f"fold_{f:02d}.json").exists()]
    _remove_finished_checkpoints(run_dir, say)
    if len(pending) < len(folds):
        say(f"resuming: {len(folds) - len(pending)} of {len(folds)} folds already done")
    t0 = time.perf_counter()
    try:
        nested = None
        if workers > 1:
            _run_workers(data, cfg, run_dir, folds, pending, workers=workers,
                         chunk_size=chunk_size, device=device,
                         checkpoint_every=checkpoint_every, say=say, outer_epochs=outer_epochs)
        else:
            if outer_epochs == "chosen":  # the outer models need their folds' choices
                nested = select_epochs_nested(data, cfg, run_dir, folds, chunk_size=chunk_size,
                                              device=device, progress=say)
            _train_outer_folds(data, cfg, run_dir, pending, chunk_size=chunk_size,
                               device=device, checkpoint_every=checkpoint_every, say=say,
                               stop_at=None if nested is None else nested["chosen"])
        if cfg.select_epochs == "nested" and nested is None:
            nested = select_epochs_nested(data, cfg, run_dir, folds, chunk_size=chunk_size,
                                          device=device, progress=say)
    finally:
        # Wall-clock time of all training sessions of this run directory (an interrupted
        # session counts too: its time was spent).
        _add_elapsed(run_dir, time.perf_counter() - t0)
    info = {"device": str(device), "chunk_size": chunk_size, "workers": workers,
            **(invocation or {})}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name()
    return _collect(data, cfg, run_dir, folds, results_path, info, nested, outer_epochs)


def _remove_finished_checkpoints(run_dir: Path, say: Callable[[str], None]) -> None:
    """Delete checkpoints whose folds all have their fold files: a run interrupted between
    writing a chunk's fold files and deleting its checkpoint strands it (nothing would ever
    read it again, and a large network's checkpoint is tens of MB)."""
    for ckpt in sorted(run_dir.glob("chunk_*.pt")):
        try:
            fold_ids = torch.load(ckpt, map_location="cpu", weights_only=True)["fold_ids"]
        except Exception:  # unreadable: its chunk, if still pending, says so and restarts
            continue
        if all((run_dir / f"fold_{int(f):02d}.json").exists() for f in fold_ids):
            ckpt.unlink(missing_ok=True)
            say(f"removed {ckpt.name}: its folds are finished")


def _run_workers(data: Megc3DB, cfg: LosoConfig, run_dir: Path, folds: list[int],
                 pending: list[int], *, workers: int, chunk_size: int, device: str,
                 checkpoint_every: int, say: Callable[[str], None],
                 outer_epochs: str = "all") -> None:
    """Share the folds round robin among ``workers`` spawned processes. Each trains its
    pending outer folds, then (nested) selects its folds' epochs (the other way round with
    ``outer_epochs="chosen"``); everything lands in the run directory as per-fold files, so the
    parent only collects, and a rerun resumes."""
    import multiprocessing

    nested_todo = (_nested_todo(run_dir, folds) if cfg.select_epochs == "nested" else [])
    threads = max(1, torch.get_num_threads() // workers)
    shares = []
    for w in range(workers):
        mine = set(folds[w::workers])
        outer = [f for f in pending if f in mine]
        inner = [f for f in nested_todo if f in mine]
        if outer or inner:
            shares.append((outer, inner))
    if not shares:
        return
    ctx = multiprocessing.get_context("spawn")  # fork after torch init is unsafe
    # daemon: whatever way the parent exits, multiprocessing terminates them at its exit
    # instead of waiting for them to finish their folds
    procs = [ctx.Process(target=_worker_main, name=f"loso-worker-{i}", daemon=True,
                         args=(i, data, cfg, str(run_dir), outer, inner, chunk_size, device,
                               checkpoint_every, threads, outer_epochs))
             for i, (outer, inner) in enumerate(shares)]
    say(f"{len(procs)} worker processes, {threads} torch thread(s) each")
    try:
        with _stops_deferred():
            for p in procs:
                p.start()
        for p in procs:
            p.join()
    except BaseException:
        started = [p for p in procs if p.pid is not None]
        for p in started:
            p.terminate()
        for p in started:
            p.join()
        raise
    failed = [p.name for p in procs if p.exitcode != 0]
    if failed:
        raise LosoWorkerError(f"{', '.join(failed)} failed (the error is printed above); the "
                           f"folds finished so far are kept in {run_dir}: rerun the same "
                           "command to resume")


@contextlib.contextmanager
def _stops_deferred():
    """Hold SIGTERM and Ctrl+C while the workers are started, then act on them. A worker is
    handed the data through a pipe as it starts; a stop raised in the middle of that write
    would cut the data short, and the worker, not yet known to the parent (it has no pid to
    stop), would die on a truncated pickle with a traceback. Held, the stop comes once every
    worker is started, and the handler in place before (an exception) stops them all. Signals
    are only handled in the main thread: elsewhere nothing is held."""
    held: list[int] = []
    stops = (signal.SIGTERM, signal.SIGINT)
    try:
        previous = {s: signal.signal(s, lambda signum, frame: held.append(signum))
                    for s in stops}
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for s, handler in previous.items():
            # None: a handler set outside Python, which cannot be put back; the default then
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
    if held:
        signal.raise_signal(held[0])


def _worker_main(worker: int, data: Megc3DB, cfg: LosoConfig, run_dir: str, outer: list[int],
                 inner: list[int], chunk_size: int, device: str, checkpoint_every: int,
                 threads: int, outer_epochs: str = "all") -> None:
    import sys

    torch.set_num_threads(threads)

    def say(msg: str) -> None:
        print(f"[worker {worker}] {msg}", flush=True)

    _exit_with_parent(say)
    try:
        if outer_epochs == "chosen":
            # The outer models need their folds' choices: this worker's share is made first
            # (its folds already chosen are only read back).
            chosen = select_epochs_nested(data, cfg, Path(run_dir), sorted({*outer, *inner}),
                                          chunk_size=chunk_size, device=device,
                                          progress=say)["chosen"]
            _train_outer_folds(data, cfg, Path(run_dir), outer, chunk_size=chunk_size,
                               device=device, checkpoint_every=checkpoint_every, say=say,
                               stop_at=chosen)
        else:
            _train_outer_folds(data, cfg, Path(run_dir), outer, chunk_size=chunk_size,
                               device=device, checkpoint_every=checkpoint_every, say=say)
            if inner:
                select_epochs_nested(data, cfg, Path(run_dir), inner, chunk_size=chunk_size,
                                     device=device, progress=say)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # the parent reports which worker failed and how to resume
        say(f"error: {type(exc).__name__}: {exc}")
        raise


def _exit_with_parent(say: Callable[[str], None]) -> None:
    """Stop this worker when the process that started it is gone. A parent stopped by Ctrl+C,
    SIGTERM or an error terminates its workers itself; one that is killed (SIGKILL, the OOM
    killer) cannot, and its workers would go on training for nobody, holding every core. What
    they finished is on disk (fold files, checkpoints): a rerun resumes from it."""
    import multiprocessing
    import os
    import threading

    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        parent.join()  # returns when the parent's end of the pipe closes: it has exited
        try:  # (its output may have gone with it: a broken pipe must not keep this alive)
            say("the parent process is gone: stopping (finished folds and checkpoints are kept)")
        finally:
            os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _train_outer_folds(data: Megc3DB, cfg: LosoConfig, run_dir: Path, pending: list[int], *,
                       chunk_size: int, device: str, checkpoint_every: int,
                       say: Callable[[str], None],
                       stop_at: dict[str, int] | None = None) -> None:
    """Train and score the outer folds ``pending`` (``chunk_size`` at a time), writing
    ``fold_XX.json`` for each and resuming a chunk from its checkpoint. ``stop_at``: each
    fold's chosen epoch (``select_epochs_nested(...)["chosen"]``) for outer models that stop
    there (``outer_epochs="chosen"``): a chunk trains to its folds' largest, and each fold is
    scored at its own."""
    subjects = data.subject_list
    test_idx = {f: np.flatnonzero(data.subjects == subjects[f]) for f in pending}
    fold_file = lambda f: run_dir / f"fold_{f:02d}.json"  # noqa: E731
    session_t0 = time.perf_counter()

    for c0 in range(0, len(pending), chunk_size):
        chunk = pending[c0:c0 + chunk_size]
        chunk_cfg = (dataclasses.replace(cfg, epochs=max(stop_at[str(f)] for f in chunk))
                     if stop_at else cfg)
        ckpt_path = run_dir / f"chunk_{chunk[0]:02d}_{chunk[-1]:02d}.pt"
        state = None
        if ckpt_path.exists():
            try:
                state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
            except Exception as exc:  # a damaged checkpoint costs its chunk, not the run
                say(f"folds {chunk[0]}..{chunk[-1]}: checkpoint {ckpt_path.name} is unreadable "
                    f"({type(exc).__name__}); training the chunk from the start")
                state = {}
            if state.get("fold_ids") != chunk:
                state = None
            else:
                say(f"folds {chunk[0]}..{chunk[-1]}: resuming from epoch {state['epoch']}")
        history: dict[int, list] = {f: [] for f in chunk}
        if state is not None:
            history = {int(k): v for k, v in json.loads(state.pop("history_json")).items()}
        timing = {"t0": time.perf_counter(),
                  "prior_s": float(state["elapsed_s"]) if state is not None else 0.0}

        # Each model sees only its own test subject, padded to a common length (cheap: the
        # leaky bookkeeping must not cost as much as training).
        width = max(len(test_idx[f]) for f in chunk)
        padded = np.stack([np.resize(test_idx[f], width) for f in chunk])

        def eval_hook(epoch: int, predict) -> None:
            probs = predict(padded, cfg.tta_shift)  # (M, T, C); test subjects only
            for j, f in enumerate(chunk):
                p = probs[j, :len(test_idx[f])]
                # (counted on the map set trained on; the other set's rows are scored apart)
                right = (p.argmax(-1).numpy() == data.y[test_idx[f]]) \
                    & data.is_primary[test_idx[f]]
                history[f].append({"epoch": epoch,
                                   "pred": p.argmax(-1).tolist(),
                                   "probs": np.round(p.numpy(), 6).tolist(),
                                   "correct": int(right.sum())})

        def save(snap: dict) -> None:
            snap["history_json"] = json.dumps(history)
            snap["elapsed_s"] = timing["prior_s"] + time.perf_counter() - timing["t0"]
            tmp = ckpt_path.with_suffix(".tmp")
            torch.save(snap, tmp)
            os.replace(tmp, ckpt_path)

        def on_epoch(epoch: int) -> None:
            last = chunk_cfg.epochs
            if epoch == 1 or epoch % max(1, cfg.epochs // 10) == 0 or epoch == last:
                el = timing["prior_s"] + time.perf_counter() - timing["t0"]
                say(f"folds {chunk[0]}..{chunk[-1]} ({len(chunk)}): epoch {epoch}/{last}"
                    f"  {el:.0f} s")

        train_sets = [np.setdiff1d(data.primary_rows, test_idx[f]) for f in chunk]
        models, _ = train_models(
            data.x, data.y, train_sets, chunk_cfg, chunk, device=device, eval_hook=eval_hook,
            state=state, checkpoint=save, checkpoint_every=checkpoint_every, on_epoch=on_epoch,
            landmarks=data.landmarks, other_offset=data.n_primary,
        )
        elapsed = timing["prior_s"] + time.perf_counter() - timing["t0"]
        for f, m in zip(chunk, models):
            if stop_at:
                # scored at its own chosen epoch (a chunk trains to its folds' largest)
                entry = next(h for h in history[f] if h["epoch"] == stop_at[str(f)])
                p = np.asarray(entry["probs"], dtype=np.float32)
            else:
                p = predict_probs(m, data.x[test_idx[f]], cfg,
                                  _rows(data.landmarks, test_idx[f]))
            _atomic_write_json(fold_file(f), {
                "fold": f, "subject": subjects[f], "indices": test_idx[f].tolist(),
                "probs": p.tolist(), "pred": p.argmax(-1).tolist(),
                "history": history[f],
                "chunk": [chunk[0], chunk[-1]], "chunk_wall_s": elapsed,
                "trained_epochs": chunk_cfg.epochs,
            })
            acc = float((p.argmax(-1) == data.y[test_idx[f]]).mean())
            say(f"fold {f:2d} {subjects[f]:<16} n={len(test_idx[f]):2d} acc={acc:.2f}")
        ckpt_path.unlink(missing_ok=True)
        done = c0 + len(chunk)
        say(f"{done}/{len(pending)} folds done"
            + _time_left(time.perf_counter() - session_t0, done, len(pending)))
