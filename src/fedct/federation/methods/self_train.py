"""``self_train``: FedAvg continued for ``federate.self_train_rounds`` rounds with every
held-out target site as one more client, whose data are the FedAvg model's confident,
stable MC-dropout pseudo-labels of its images (DPL's filter; ``label_free``). One model
for every target; the rejected voxels are ignored by the loss."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fedct.data.cases import adaptation_cases, case_path, save_case
from fedct.federation.aggregate import site_weights
from fedct.federation.label_free import pseudo_labelled_cases, with_ignore
from fedct.federation.methods.base import Context, Method, RunLike
from fedct.federation.methods.rounds import multi_round
from fedct.model.io import load_model


def pseudo_labelled_cohort(ctx: Context, teacher: torch.nn.Module, out: Path
                           ) -> tuple[Path, dict[str, float]]:
    """A cohort (under ``out``) whose target sites train on the teacher's pseudo-labels
    (DPL filter) beside the clients' own training cases; each target's kept fraction."""
    p = ctx.params
    derived = out / "cohort"
    shutil.rmtree(derived, ignore_errors=True)
    (derived / "cases").mkdir(parents=True)
    for name in ("labels.json", "spec.json"):
        shutil.copy2(ctx.cohort_dir / name, derived / name)
    cohort = ctx.cohort
    keep = cohort[cohort["site"].isin(ctx.sites) & (cohort["role"] == "train")].copy()
    for key in keep["series_key"]:
        shutil.copy2(case_path(ctx.cohort_dir, key), case_path(derived, key))
    teacher = teacher.to(ctx.device)
    kept: dict[str, float] = {}
    rows = [keep]
    held = adaptation_cases(cohort)
    for site, imgs in ctx.targets.items():
        cases = pseudo_labelled_cases(teacher, imgs, p.mc_samples, p.mc_batch, p.seed,
                                      p.pseudo_p_min, p.pseudo_std_max, amp=ctx.amp)
        keys = held.loc[held["site"] == site, "series_key"].tolist()
        for key, case in zip(keys, cases, strict=True):
            label = with_ignore(case["label"], case["mask"]).astype(np.uint8)
            save_case(case_path(derived, key), {"image": case["image"], "label": label})
        kept[site] = float(np.mean([c["mask"].mean() for c in cases]))
        site_rows = held[held["site"] == site].copy()
        site_rows["split"], site_rows["role"], site_rows["has_label"] = "train", "train", True
        rows.append(site_rows)
    pd.concat(rows).to_csv(derived / "cohort.csv", index=False)
    return derived, kept


def run(ctx: Context, mlrun: RunLike) -> dict:
    p = ctx.params
    fedavg = ctx.model_path("fedavg")
    out = ctx.out_dir / "self_train"
    teacher, _ = load_model(fedavg)
    derived, kept = pseudo_labelled_cohort(ctx, teacher, out)
    clients = ctx.sites + tuple(sorted(ctx.targets))
    # Its own schedule over its rounds, whatever train.schedule_steps says.
    fine_tune = dataclasses.replace(ctx.train, learning_rate=p.self_train_lr,
                                    schedule_steps=0)
    path, _ = multi_round(
        ctx, "self_train", mlrun, cohort_dir=derived, sites=clients, out=out,
        train=fine_tune, init_model=fedavg, rounds=p.self_train_rounds,
        patience=0,  # a fixed number of fine-tuning rounds
        # federate.weighting holds here too, pseudo-labelled sites included.
        site_weights=(site_weights({s: 1.0 for s in clients})
                      if p.weighting == "equal" else None))
    ctx.finish_card(path, "self_train", ctx.here, start="fedavg", clients=list(clients),
                    pseudo_labelled=sorted(ctx.targets), kept_fraction=kept,
                    rounds=p.self_train_rounds)
    shutil.rmtree(derived, ignore_errors=True)  # images stay in the cohort
    ctx.tracker.log_model(mlrun, path.parent)
    mlrun.log_metrics({f"kept_fraction.{s}": v for s, v in kept.items()})
    return {"self_train_kept_fraction": kept}


METHOD = Method("self_train", run, label_free=True, needs=lambda params: ("fedavg",))
