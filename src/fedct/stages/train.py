"""``fedct train``: one Bayesian U-Net per site (or the pooled model on all training sites).

Inputs: the cohort (``cohort.csv``, ``spec.json``, ``labels.json``, prepared ``cases/``).
Output folder: ``model.pt`` and ``model_card.json`` (weights, architecture and card, so MC
dropout works after loading), ``reference.json`` (mean structure volumes of the training
set, for label-free volume checks), ``history.csv`` (at every validation pass: training
loss, validation loss and Dice per structure), ``curves.png`` and ``metrics.json``. A
checkpoint in ``checkpoint_dir`` lets a killed run resume; it is only reused when params,
training data and training code are the same, and is deleted when the run completes.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from tqdm import tqdm

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
from fedct.devices import pick_device
from fedct.model.io import save_model
from fedct.training.curves import plot_curves
from fedct.training.loop import fingerprint, model_arch, reference_volumes, train_model


def pooled_params(params: TrainParams, cases) -> TrainParams:
    """Matched epochs: the pooled model's step cap is ``train.steps`` times the number of
    pooled sites, so it sees each training case as often as a local model sees its own
    (and as a federated client does over all rounds) instead of a quarter as often."""
    n_sites = max(1, int(cases["site"].nunique()))
    return dataclasses.replace(params, steps=params.steps * n_sites)


def run(params: TrainParams, site: str, cohort_dir: Path, out_dir: Path,
        checkpoint_dir: Path | None = None) -> dict:
    """Train the model of ``site`` (a site letter or ``pooled``); log to MLflow."""
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
    loaded = [load_case(f) for f in tqdm(files, desc=f"train {site}: load")]
    train = [c for c, s in zip(loaded, cases["split"], strict=True) if s == "train"]
    val = [c for c, s in zip(loaded, cases["split"], strict=True) if s == "val"]
    fp = fingerprint(params, site, files)
    ckpt = Path(checkpoint_dir) / site / "checkpoint.pt" if checkpoint_dir else None
    spacing = tuple(spec["spacing_mm"])
    name = f"fedct-{POOLED}" if site == POOLED else f"fedct-local-{site}"
    with tracking.start_run("train", run_name=f"train-{site}",
                            tags={"fedct.site": site}) as mlrun:
        mlrun.log_params({**to_dict(params), "site": site, "n_train": len(train),
                          "n_val": len(val), "device": str(pick_device(params.device))})
        mlrun.log_dataset(cases, name=f"cohort-{site}", source=str(cohort_dir / "cohort.csv"),
                          context="training")
        model, history = train_model(
            params, labels, train, val, ckpt, fp,
            on_check=lambda row: mlrun.log_metrics(
                {k: v for k, v in row.items() if k != "step"}, step=int(row["step"])))
        reference = reference_volumes([c["label"][0] for c in train], spacing, labels)
        (out_dir / "reference.json").write_text(json.dumps(
            {"structures": list(labels.structures.values()), "volume_ml": reference}, indent=1))
        save_model(model, out_dir / "model.pt", model_arch(params, labels),
                   {"site": site, "labels": labels.to_json(), "preprocessing": spec,
                    "reference_ml": reference, "fingerprint": fp,
                    "n_train": len(train), "n_val": len(val), "training": to_dict(params)})
        history.to_csv(out_dir / "history.csv", index=False)
        plot_curves(history, out_dir / "curves.png", name, labels)
        # The kept weights: best validation loss, or the last step without validation.
        best = history.loc[history["val_loss"].idxmin()] if "val_loss" in history else None
        metrics = {"final_loss": float(history["loss"].iloc[-1]), "n_train": len(train),
                   "n_val": len(val), "steps": int(history["step"].iloc[-1]),
                   "best_step": int((best if best is not None else history.iloc[-1])["step"]),
                   "best_val_loss": float(best["val_loss"]) if best is not None else float("nan"),
                   "best_val_dice": float(best["val_dice_mean"]) if best is not None
                   else float("nan")}
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
        mlrun.log_metrics(metrics)
        mlrun.log_artifact(out_dir / "curves.png")
        mlrun.log_artifact(out_dir / "history.csv")
        mlrun.log_artifact(out_dir / "model_card.json")
        tracking.log_fedct_model(mlrun, out_dir, registered_name=name)
    # The checkpoint serves a killed run only: a finished one must not come back when DVC
    # reruns this stage (changed code or cases under the same params).
    if ckpt is not None:
        ckpt.unlink(missing_ok=True)
    return metrics
