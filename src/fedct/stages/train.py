"""``fedct train``: one Bayesian U-Net per site, and the pooled model on all training sites.

Inputs: the cohort (``cohort.csv``, ``spec.json``, ``labels.json``, prepared ``cases/``).
Output: one folder per model, ``MODELS_DIR/<site>`` (``pooled`` for the pooled model), with
``model.safetensors`` and ``model_card.json`` (weights, architecture and card, so MC dropout works
after loading), ``reference.json`` (mean structure volumes of the training set, for
label-free volume checks), ``history.csv`` (at every validation pass: training loss,
validation loss and Dice per structure), ``curves.png`` and ``metrics.json`` (with
``best_step``, ``cap`` and ``cap_hit``); and ``MODELS_DIR/convergence.json``: every model's
best step and cap, and ``cap_hit_fraction``.

The models train in ``train.workers`` processes at once, longest first (the pooled model
has a cap of ``train.steps`` x its sites). On the CPU each process gets an equal share of
the threads: a 3D U-Net of the demo's size uses two cores poorly from one process (one
step on 2 threads takes about 0.7x the time of one thread), so two trainings of one
thread each finish sooner than the same trainings one after the other
(``benchmarks/train_parallel.py``: x1.27 for two 400-step models on 2 cores). The number
of threads per process changes the float rounding of convolutions, so a model is
reproducible for a given machine, ``train.workers`` and number of models (threads per
process: the cores over the processes that run), as every CPU result is for a given
number of cores; ``train.workers`` is therefore treated like the machine (not a DVC
param).

A checkpoint in ``checkpoint_dir`` lets a killed run resume; it is only reused when params,
training data and training code are the same. The checkpoints of finished models stay
until every model of the run has finished (a rerun after one model failed then restores
the others instead of training them again) and are deleted when all have: a finished
run's weights must not come back when DVC reruns the stage under the same params.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from tqdm import tqdm

from fedct import procs
from fedct.config import TrainParams, to_dict
from fedct.data.cases import (
    POOLED,
    case_path,
    cohort_labels,
    load_case,
    read_cohort,
    read_spec,
    training_cases,
)
from fedct.devices import pick_device, runtime
from fedct.errors import FedctError
from fedct.model.factory import model_arch
from fedct.model.io import WEIGHTS_FILE, save_model
from fedct.training.curves import plot_curves
from fedct.training.loop import fingerprint, reference_volumes, train_model


def pooled_params(params: TrainParams, cases) -> TrainParams:
    """Matched epochs: the pooled model's step cap is ``train.steps`` times the number of
    pooled sites, so it sees each training case as often as a local model sees its own
    (and as a federated client does over all rounds) instead of a quarter as often."""
    n_sites = max(1, int(cases["site"].nunique()))
    return dataclasses.replace(params, steps=params.steps * n_sites,
                               schedule_steps=params.schedule_steps * n_sites)


def checkpoint_path(checkpoint_dir: Path, site: str) -> Path:
    return Path(checkpoint_dir) / site / "checkpoint.pt"


def run(params: TrainParams, site: str, cohort_dir: Path, out_dir: Path,
        checkpoint_dir: Path | None = None, *, keep_checkpoint: bool = False,
        position: int | None = None) -> dict:
    """Train the model of ``site`` (a site letter or ``pooled``) into ``out_dir``; log to
    MLflow. ``keep_checkpoint``: leave the finished run's checkpoint (``run_sites`` deletes
    it once every model has finished); ``position``: the progress bar's line."""
    from fedct import tracking

    cohort_dir, out_dir = Path(cohort_dir), Path(out_dir)
    cohort = read_cohort(cohort_dir)
    labels = cohort_labels(cohort_dir)
    spec = read_spec(cohort_dir)
    # Pooled: centralised training on the sites that train local models (train.sites),
    # the same data the federated models of those sites see.
    pooled_sites = [s for s in params.sites if s != POOLED]
    cases = training_cases(cohort, site, pooled_sites)
    if site == POOLED:
        params = pooled_params(params, cases)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [case_path(cohort_dir, k) for k in cases["series_key"]]
    loaded = [load_case(f) for f in tqdm(files, desc=f"train {site}: load",
                                         position=position)]
    train = [c for c, s in zip(loaded, cases["split"], strict=True) if s == "train"]
    val = [c for c, s in zip(loaded, cases["split"], strict=True) if s == "val"]
    fp = fingerprint(params, site, files)
    ckpt = checkpoint_path(checkpoint_dir, site) if checkpoint_dir else None
    spacing = tuple(spec["spacing_mm"])
    name = f"fedct-{POOLED}" if site == POOLED else f"fedct-local-{site}"
    # What the weights' rounding depends on (threads: this process's share of the cores).
    where = runtime(pick_device(params.device), params.amp)
    with tracking.start_run("train", run_name=f"train-{site}",
                            tags={"fedct.site": site}) as mlrun:
        mlrun.log_params({**to_dict(params), "site": site, "n_train": len(train),
                          "n_val": len(val),
                          **{f"runtime.{k}": v for k, v in where.items()}})
        mlrun.log_dataset(cases, name=f"cohort-{site}", source=str(cohort_dir / "cohort.csv"),
                          context="training")
        model, history = train_model(
            params, labels, train, val, ckpt, fp,
            on_check=lambda row: mlrun.log_metrics(
                {k: v for k, v in row.items() if k != "step"}, step=int(row["step"])),
            desc=f"train {site}: steps", position=position)
        reference = reference_volumes([c["label"][0] for c in train], spacing, labels)
        (out_dir / "reference.json").write_text(json.dumps(
            {"structures": list(labels.structures.values()), "volume_ml": reference}, indent=1))
        save_model(model, out_dir / WEIGHTS_FILE, model_arch(params, labels),
                   {"site": site, "labels": labels.to_json(), "preprocessing": spec,
                    "reference_ml": reference, "fingerprint": fp,
                    "n_train": len(train), "n_val": len(val), "training": to_dict(params),
                    "runtime": where})
        history.to_csv(out_dir / "history.csv", index=False)
        plot_curves(history, out_dir / "curves.png", name, labels)
        # The kept weights: best validation loss, or the last step without validation.
        best = history.loc[history["val_loss"].idxmin()] if "val_loss" in history else None
        metrics = {"final_loss": float(history["loss"].iloc[-1]), "n_train": len(train),
                   "n_val": len(val), "steps": int(history["step"].iloc[-1]),
                   "best_step": int((best if best is not None else history.iloc[-1])["step"]),
                   "best_val_loss": float(best["val_loss"]) if best is not None else float("nan"),
                   "best_val_dice": float(best["val_dice_mean"]) if best is not None
                   else float("nan"),
                   # Convergence (issue 23): the cap binds when training ran to it without
                   # a validation plateau stopping it first.
                   "cap": params.steps,
                   "cap_hit": bool(int(history["step"].iloc[-1]) >= params.steps)}
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
        mlrun.log_metrics(metrics)
        mlrun.log_artifact(out_dir / "curves.png")
        mlrun.log_artifact(out_dir / "history.csv")
        mlrun.log_artifact(out_dir / "model_card.json")
        tracking.log_fedct_model(mlrun, out_dir, registered_name=name)
    # The checkpoint serves a killed run only: a finished one must not come back when DVC
    # reruns this stage (changed code or cases under the same params).
    if ckpt is not None and not keep_checkpoint:
        ckpt.unlink(missing_ok=True)
    return metrics


_SLOT: int | None = None  # a worker process's progress-bar line (set by _init_worker)


def _init_worker(lock, slots, parent: int) -> None:
    """Each worker process draws the next free bar line once and shares tqdm's lock; it
    ends itself when its parent is gone (killed outright, no ``finally`` ran there)."""
    global _SLOT
    tqdm.set_lock(lock)
    with slots.get_lock():
        _SLOT = slots.value
        slots.value += 1
    # ``parent`` comes from the parent: read here, it could already be init's PID (a
    # parent killed while this process was still importing).

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        # Orphaned: stop as on SIGTERM (the model's MLflow run ends KILLED, then
        # ``_train_job`` exits), and for good if that has not ended the process.
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30.0)
        os._exit(1)

    threading.Thread(target=watch, name="fedct-train-parent-watch", daemon=True).start()


def _train_job(job: tuple) -> dict:
    """One model in a worker process: its share of the CPU threads, then ``run``."""
    import torch

    params, site, cohort_dir, out_dir, checkpoint_dir, threads = job
    torch.set_num_threads(threads)
    try:
        return run(params, site, cohort_dir, out_dir, checkpoint_dir, keep_checkpoint=True,
                   position=_SLOT)
    except KeyboardInterrupt:
        # Stopped (SIGTERM from ``_stop_workers``, or Ctrl-C): the MLflow run has ended
        # KILLED; the pool's worker loop would otherwise go on to the next queued model.
        os._exit(130)


def _reason(exc: FedctError) -> str:
    """One line: the error without the stage's own prefix."""
    text = " ".join(str(exc).split())
    return text[len("train: "):] if text.startswith("train: ") else text


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Cancel what has not started and end the worker processes by PID (an interrupted
    worker would otherwise go on to the next model). SIGTERM first, so that each worker
    ends its MLflow run KILLED (a busy store may take seconds); SIGKILL after 30 s."""
    procs = list((getattr(pool, "_processes", None) or {}).values())  # before shutdown
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()


def run_sites(params: TrainParams, sites: Sequence[str], cohort_dir: Path, models_dir: Path,
              checkpoint_dir: Path | None = None) -> dict[str, dict]:
    """Train the models of ``sites`` into ``models_dir/<site>``, ``train.workers`` at once.

    The longest trainings start first. A model that fails does not stop the others: every
    model that finishes is written, and then a FedctError names each failed site and its
    reason (the finished models' checkpoints are kept, so a rerun restores them). An
    unexpected exception (a bug) is raised with its traceback after the other models have
    finished; an interrupt (Ctrl-C) stops every worker at once. Returns site -> metrics.

    The workers log to the same MLflow store; MLflow's SQLite store waits up to 20 s for
    a lock (``PRAGMA busy_timeout``), far longer than any of the stage's short writes.
    """
    from fedct import tracking

    sites = list(dict.fromkeys(sites))
    if not sites:
        raise FedctError("train: no sites to train (train.sites is empty)")
    models_dir = Path(models_dir)
    read_cohort(Path(cohort_dir))  # a missing cohort is one error, not one per site
    # The tracking store and experiment are created here once, not raced by the workers.
    tracking.configure()
    # Pooled first: its cap is train.steps x its sites (``pooled_params``), the longest.
    order = sorted(sites, key=lambda s: s != POOLED)
    workers = max(1, min(params.workers, len(order)))
    results: dict[str, dict] = {}
    failed: dict[str, str] = {}
    bug: BaseException | None = None

    def collect(outcomes: Iterator[tuple[str, Callable[[], dict]]]) -> None:
        """Each site's result, or its reason; a bug is kept to raise after the rest."""
        nonlocal bug
        for site, result in outcomes:
            try:
                results[site] = result()
            except FedctError as exc:
                failed[site] = _reason(exc)
            except BrokenProcessPool:
                failed[site] = ("its worker process died (killed, or out of memory) or the "
                                "pool broke before it ran")
            except Exception as exc:  # a bug: the others still train, then it is raised
                failed[site], bug = f"{type(exc).__name__}: {exc}", bug or exc

    if workers == 1:
        collect((site, functools.partial(run, params, site, cohort_dir, models_dir / site,
                                         checkpoint_dir, keep_checkpoint=True))
                for site in order)
    else:
        import torch

        threads = max(1, torch.get_num_threads() // workers)
        # Spawned, not forked: a fork after torch has started its OpenMP threads can hang.
        ctx = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                   initargs=(ctx.RLock(), ctx.Value("i", 0), os.getpid()))
        # SIGTERM (a scheduler, ``kill``) ends the run like Ctrl-C: the workers are stopped.
        with procs.raising():
            try:
                futures = {site: pool.submit(_train_job, (params, site, cohort_dir,
                                                          models_dir / site, checkpoint_dir,
                                                          threads))
                           for site in order}
                collect((site, future.result) for site, future in futures.items())
            except BaseException:
                _stop_workers(pool)
                raise
        pool.shutdown(wait=True)
    if bug is not None:
        raise bug
    if failed:
        done = ", ".join(s for s in order if s in results) or "none"
        raise FedctError("train: " + "; ".join(f"site {s} failed: {m}" for s, m in
                                                failed.items())
                         + f" (finished and kept: {done}; a rerun restores them)")
    if checkpoint_dir is not None:
        for site in order:
            checkpoint_path(checkpoint_dir, site).unlink(missing_ok=True)
    write_convergence(models_dir)
    return results


CONVERGENCE_FILE = "convergence.json"


def convergence(per_model: dict[str, dict]) -> dict:
    """Per model its best step, last step and cap, and ``cap_hit_fraction``: the share of
    models that ran to their cap without a validation plateau stopping them (issue 23:
    at most 1 in 10). ``per_model``: model -> its ``metrics.json``."""
    models = {m: {k: v.get(k) for k in ("best_step", "steps", "cap", "cap_hit")}
              for m, v in sorted(per_model.items())}
    known = [v["cap_hit"] for v in models.values() if v["cap_hit"] is not None]
    return {"models": models, "n_models": len(models),
            "cap_hit_fraction": (sum(map(bool, known)) / len(known)) if known else None}


def write_convergence(models_dir: Path) -> dict:
    """``MODELS_DIR/convergence.json`` over every model folder's ``metrics.json``."""
    per_model = {}
    for f in sorted(Path(models_dir).glob("*/metrics.json")):
        try:
            per_model[f.parent.name] = json.loads(f.read_text())
        except (OSError, ValueError) as exc:
            raise FedctError(f"{f}: cannot read a model's metrics ({exc})") from exc
    out = convergence(per_model)
    (Path(models_dir) / CONVERGENCE_FILE).write_text(json.dumps(out, indent=1))
    return out
