"""``fedct uncertainty``: every model on every site; Dice/HD95 where labels exist,
MC-dropout uncertainty always.

For each model (one per training site, plus pooled) and each evaluation case (the val
and test cases of training sites, every case of held-out sites), T MC-dropout samples
give the label-free failure signals of ``fedct.analysis.metrics.failure_signals`` per structure;
where a label exists, Dice and HD95 per structure. Outputs (``OUT_DIR``):

- ``structures.csv``: one row per (model, case, structure): dice, hd95, every signal;
- ``cases.csv``: one row per (model, case): mean Dice over structures, and each signal
  averaged over structures the same way (a structure not predicted at all scores +inf
  and makes its case +inf: a missing structure is a failure);
- ``shift_dice.csv`` / ``shift_uncertainty.csv``: the shift matrices (train site x test
  site) of mean test Dice and of the chosen label-free signal;
- ``signals.csv``: every signal's Spearman correlation with Dice and its failure AUROC
  (failure = Dice < ``failure_dice``), case level and structure level;
- ``site_ranking.csv``: test sites ranked by label-free uncertainty (``ranking_signal``,
  no labels used); ``site_ranks.csv``: each site's rank under every signal, for comparison;
- ``threshold.json``: the signal ``predict`` uses and the threshold to flag at,
  calibrated on validation cases only and then checked on test cases;
- ``metrics.json`` and heatmap / scatter PNGs (DVC plots and MLflow artifacts).
"""

from __future__ import annotations

import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from fedct.analysis.evaluate import evaluate_model
from fedct.analysis.failure import (
    SIGNALS,
    aggregate_cases,
    calibrate_threshold,
    signal_table,
)
from fedct.analysis.metrics import failure_auroc
from fedct.analysis.plots import heatmap, scatter
from fedct.analysis.shift import shift_matrices, site_ranking, site_ranks
from fedct.config import UncertaintyParams, to_dict
from fedct.data.cases import POOLED, evaluation_cases, read_cohort
from fedct.devices import pick_device
from fedct.errors import FedctError


def run(params: UncertaintyParams, cohort_dir: Path, models_dir: Path, out_dir: Path) -> dict:
    """Evaluate every model on every evaluation case; write the tables and plots."""
    from fedct import tracking

    cohort_dir, models_dir, out_dir = Path(cohort_dir), Path(models_dir), Path(out_dir)
    for key in ("signal", "ranking_signal"):
        if getattr(params, key) not in SIGNALS:
            raise FedctError(f"uncertainty.{key}: {getattr(params, key)!r} is not one of "
                             f"{list(SIGNALS)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    cohort = read_cohort(cohort_dir)
    evaluate = evaluation_cases(cohort)
    model_paths = sorted(p for p in models_dir.glob("*/model.pt"))
    if not model_paths:
        raise FedctError(f"{models_dir}: no */model.pt; run `fedct train` first")
    device = pick_device(params.device)
    # On CPU, one process per model with one thread each keeps both cores busy through
    # the metric code as well; on a GPU one process owns the device.
    workers = 1 if device.type == "cuda" else max(1, min(params.workers, len(model_paths)))
    threads = max(1, torch.get_num_threads() // workers)
    jobs = [(mp, cohort_dir, evaluate, params, threads, i % workers + 1)
            for i, mp in enumerate(model_paths)]
    with tracking.start_run("uncertainty") as mlrun:
        mlrun.log_params({**to_dict(params), "n_models": len(model_paths),
                          "n_cases": len(evaluate), "device": str(device)})
        if workers > 1:
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
                results = list(tqdm(pool.map(evaluate_model, jobs), total=len(jobs),
                                    desc="uncertainty: models", position=0))
        else:
            results = [evaluate_model(j) for j in tqdm(jobs, desc="uncertainty: models")]
        structures = pd.DataFrame([r for rows in results for r in rows])
        cases = aggregate_cases(structures)
        structures.to_csv(out_dir / "structures.csv", index=False)
        cases.to_csv(out_dir / "cases.csv", index=False)
        signals = signal_table(cases[cases["split"] == "test"],
                               structures[structures["split"] == "test"], params.failure_dice)
        signals.to_csv(out_dir / "signals.csv", index=False)
        # The signal is fixed a priori (params); its threshold comes from validation only.
        val = cases[(cases["split"] == "val")].dropna(subset=["dice"])
        val_fail = val["dice"] < params.failure_dice
        val_auroc = {s: failure_auroc(val[s], val_fail) for s in SIGNALS}
        chosen = params.signal
        in_domain = (val["model"] == val["site"]) | (val["model"] == POOLED)
        threshold, rule = calibrate_threshold(val[chosen], val_fail, in_domain)
        test = cases[cases["split"] == "test"].dropna(subset=["dice"])
        flagged = test[chosen] >= threshold
        failed = test["dice"] < params.failure_dice
        dice_m, unc_m = shift_matrices(cases, chosen)
        dice_m.to_csv(out_dir / "shift_dice.csv")
        unc_m.to_csv(out_dir / "shift_uncertainty.csv")
        ranking = site_ranking(cases, params.ranking_signal)
        ranking.to_csv(out_dir / "site_ranking.csv", index=False)
        site_ranks(cases).to_csv(out_dir / "site_ranks.csv")
        heatmap(dice_m, out_dir / "shift_dice.png", "Mean test Dice", "viridis")
        heatmap(unc_m, out_dir / "shift_uncertainty.png", f"Mean {chosen}", "magma", ".3g")
        scatter(cases[cases["split"] == "test"], chosen, threshold, params.failure_dice,
                 out_dir / "uncertainty_vs_dice.png")
        case_sig = signals[(signals["level"] == "case") & (signals["signal"] == chosen)].iloc[0]
        holdout = test[test["role"] == "holdout"]
        local_h = holdout[holdout["model"] != POOLED]
        pooled_h = holdout[holdout["model"] == POOLED]
        (out_dir / "threshold.json").write_text(json.dumps({
            "signal": chosen, "threshold": threshold, "rule": rule,
            "aggregate": "mean over structures",
            "failure_dice": params.failure_dice, "val_auroc": val_auroc}, indent=1))
        metrics = {
            "signal": chosen,
            "spearman": float(case_sig["spearman"]),
            "failure_auroc": float(case_sig["auroc"]),
            "flag_sensitivity": float((flagged & failed).sum() / max(int(failed.sum()), 1)),
            "flag_specificity": float((~flagged & ~failed).sum() / max(int((~failed).sum()), 1)),
            "n_failed_test": int(failed.sum()),
            "n_test_pairs": len(test),
            "top_uncertain_site": str(ranking.iloc[0]["site"]) if len(ranking) else "",
            "site_ranking": ",".join(ranking["site"].astype(str)),
            "holdout_dice_pooled": float(pooled_h["dice"].mean()) if len(pooled_h) else np.nan,
            "holdout_dice_local_mean": float(local_h["dice"].mean()) if len(local_h) else np.nan,
            "insite_dice_local_mean": float(test[(test["model"] == test["site"])]["dice"].mean()),
        }
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
        mlrun.log_metrics({k: v for k, v in metrics.items() if isinstance(v, float | int)})
        mlrun.set_tags({"fedct.signal": chosen, "fedct.ranking_signal": params.ranking_signal,
                        "fedct.site_ranking": metrics["site_ranking"]})
        for f in ("signals.csv", "shift_dice.csv", "shift_uncertainty.csv", "site_ranking.csv",
                  "site_ranks.csv",
                  "threshold.json", "shift_dice.png", "shift_uncertainty.png",
                  "uncertainty_vs_dice.png"):
            mlrun.log_artifact(out_dir / f)
    return metrics
