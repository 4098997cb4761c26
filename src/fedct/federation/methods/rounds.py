"""Multi-round federations on Flower (``fedct.federation.simulation``), as methods run them:
per-round MLflow metrics, a child run per site, ``history.csv`` beside the model."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from fedct.config import TrainParams
from fedct.federation.methods.base import Context, RunLike
from fedct.federation.stopping import best_round


def rounds_summary(history: list[dict], patience: int = 0, min_delta: float = 0.0) -> dict:
    """Convergence of a multi-round method (issue 23): ``best_round``, the completed round
    with the highest aggregated validation Dice of the clients' val splits (None without
    one); ``last_round``, the last round run (below ``federate.rounds`` when a plateau
    stopped it); ``kept_round``, the round whose model is kept: the best with
    ``federate.patience`` > 0, else the last (``patience`` is the stage's setting)."""
    done = [r for r in history if r.get("round") is not None]
    best = best_round([r.get("val_dice_mean", float("nan")) for r in done], min_delta)
    last = int(done[-1]["round"]) if done else None
    return {"best_round": int(done[best - 1]["round"]) if best else None,
            "last_round": last, "kept_round": last if not patience or not best
            else int(done[best - 1]["round"])}


def history_table(history: list[dict]) -> pd.DataFrame:
    """One row per round: totals, failures, and each site's loss, Dice and seconds."""
    rows = []
    for rec in history:
        row = {k: rec.get(k) for k in ("round", "attempt", "seconds", "bytes_sent",
                                       "bytes_received", "clients", "train_loss",
                                       "val_dice_mean")}
        row["val_dice"] = rec.get("val_dice_mean")
        row["failed"] = ";".join(f"{f['site']}: {f['reason']}" for f in rec.get("failed", []))
        for site, m in (rec.get("sites") or {}).items():
            for key in ("train_loss", "val_dice", "seconds"):
                row[f"{site}_{key}"] = m.get(key)
        for target, scores in (rec.get("steer_scores") or {}).items():
            row.update({f"{site}_weight": w for site, w in (rec.get("weights") or {}).items()})
            row.update({f"{target}_score_{site}": v for site, v in scores.items()})
        rows.append(row)
    return pd.DataFrame(rows)


def federated_train_params(ctx: Context, train: TrainParams | None = None) -> TrainParams:
    """The clients' training settings: ``train``'s (default the stage's), on the
    federation's device."""
    return dataclasses.replace(train or ctx.train, device=ctx.params.device)


def multi_round(ctx: Context, name: str, mlrun: RunLike, *, mu: float = 0.0,
                cohort_dir: Path | None = None, sites: tuple[str, ...] | None = None,
                out: Path | None = None, train: TrainParams | None = None,
                init_model: Path | None = None, rounds: int | None = None,
                site_weights: Mapping[str, float] | None = None, patience: int | None = None,
                **federation: Any) -> tuple[Path, list[dict]]:
    """A Flower federation of ``sites`` (default the clients) for ``rounds`` rounds
    (default ``federate.rounds``, stopping on a plateau after ``patience`` rounds,
    default ``federate.patience``); the final model's path and the history.

    Each round is logged to ``mlrun`` (step = round: global validation Dice, per-site
    loss, Dice and seconds, bytes; for a steered federation the merge weights and each
    target's scores), each site to a child run; the
    history is written to ``out/history.csv``. ``federation`` goes on to
    ``run_federation`` (e.g. ``steer``)."""
    from fedct.federation.simulation import run_federation

    p = ctx.params
    rounds = p.rounds if rounds is None else rounds
    sites = ctx.sites if sites is None else sites
    out = ctx.out_dir / name if out is None else out

    def on_round(rec: dict) -> None:
        step = int(rec["round"])
        metrics = {"val_dice": rec.get("val_dice_mean"), "train_loss": rec.get("train_loss"),
                   "round_seconds": rec.get("seconds"), "bytes_sent": rec.get("bytes_sent"),
                   "bytes_received": rec.get("bytes_received"),
                   "clients": rec.get("clients"), "failed_clients": len(rec.get("failed", []))}
        for site, m in (rec.get("sites") or {}).items():
            metrics.update({f"{site}.train_loss": m.get("train_loss"),
                            f"{site}.val_dice": m.get("val_dice"),
                            f"{site}.seconds": m.get("seconds")})
        for target, scores in (rec.get("steer_scores") or {}).items():
            metrics.update({f"{site}.weight": w for site, w in rec["weights"].items()})
            metrics.update({f"{target}.score.{site}": v for site, v in scores.items()})
        mlrun.log_metrics(metrics, step=step)
        failed = ", ".join(f"{f['site']} ({f['reason']})" for f in rec.get("failed", []))
        ctx.log(f"federate {name}: round {step}/{rounds}, val Dice "
                f"{rec.get('val_dice_mean', float('nan')):.3f}, {rec.get('seconds', 0):.0f} s"
                + (f"; failed: {failed}" if failed else ""))

    history, model_path = run_federation(
        cohort_dir or ctx.cohort_dir, sites, federated_train_params(ctx, train),
        rounds=rounds, local_steps=p.local_steps, mu=mu,
        min_clients=min(p.min_clients, len(sites)), init_model=init_model, out_dir=out,
        checkpoint_dir=ctx.checkpoint_dir / name, on_round=on_round, seed=p.seed,
        site_weights=site_weights,
        patience=p.patience if patience is None else patience, min_delta=p.min_delta,
        **federation)
    # The checkpoint serves a killed run only: a finished one must not be reused when the
    # cohort changes under the same settings.
    shutil.rmtree(ctx.checkpoint_dir / name, ignore_errors=True)
    history_table(history).to_csv(out / "history.csv", index=False)
    # One child run per site, with its per-round metrics.
    for site in sites:
        with ctx.tracker.start_run(f"{name}-{site}", {"fedct.method": name,
                                                     "fedct.site": site}) as child:
            n_train = None
            for rec in history:
                m = (rec.get("sites") or {}).get(site)
                if m:
                    child.log_metrics({k: m.get(k) for k in ("train_loss", "val_dice",
                                                             "val_loss", "seconds")},
                                      step=int(rec["round"]))
                    n_train = m.get("n_train") if n_train is None else n_train
            child.log_params({"site": site, "n_train": n_train})
    return model_path, history


def round_metrics(name: str, history: list[dict], patience: int = 0,
                  min_delta: float = 0.0) -> dict:
    """A multi-round method's entries of ``metrics.json``: the kept round's validation
    Dice, best, last and kept round (``rounds_summary``), failed clients."""
    summary = rounds_summary(history, patience, min_delta)
    kept = summary["kept_round"]
    out = {f"{name}_val_dice": history[kept - 1].get("val_dice_mean") if kept else None}
    out.update({f"{name}_{k}": v for k, v in summary.items()})
    out[f"{name}_failed_clients"] = sum(len(r.get("failed", [])) for r in history)
    return out
