"""``fedct uncertainty``: every model on every site; Dice/HD95 where labels exist,
MC-dropout uncertainty always, and the failure-detection protocol of
``fedct.analysis.protocol`` with the baselines a sceptic would try.

For each model (one per training site, plus pooled) and each evaluation case (the val,
calib and test cases of training sites, every case of held-out sites), T MC-dropout
samples give the label-free signals of ``fedct.analysis.metrics.failure_signals`` per
structure; one deterministic pass and the image's noise level give the baselines of
``fedct.analysis.baselines``. Outputs (``OUT_DIR``):

- ``structures.csv`` / ``cases.csv``: per (model, case, structure) and per (model, case):
  dice, hd95, every signal and baseline, ``failed``;
- ``signals.csv``: one row per (signal, level, subset): Spearman with Dice, failure AUROC
  with its 95 % cluster-bootstrap interval, AURC; ``kind`` uncertainty or baseline;
  subsets ``all`` and ``without_<most shifted site>`` (with ``domain_subsets`` also
  ``out_of_domain`` and ``controls``, the pairs of ``cohort.control_sites``); with
  ``heldout_flag`` the baselines include the "held-out site" flag;
- ``within_site.csv``, ``risk_coverage.csv`` (+ PNG), ``failure_sweep.csv``;
- ``threshold.json``: the frozen signal, its flag threshold (calibration pairs only) and
  the failure definition, for ``predict``;
- ``site_ranking.csv``: the label-free ranking (equal pairs per site, median, interval);
  ``site_ranks.csv``: each site's rank under every signal (mean), for comparison;
- ``shift_dice.csv`` / ``shift_uncertainty.csv`` and heatmaps; ``metrics.json``.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fedct.analysis import protocol
from fedct.analysis.baselines import BASELINES, header_rule
from fedct.analysis.failure import SIGNALS, aggregate_cases, calibrate_threshold
from fedct.analysis.mc_eval import evaluate_models
from fedct.analysis.plots import heatmap, risk_coverage_plot, scatter
from fedct.analysis.shift import shift_matrices, site_ranks
from fedct.analysis.stats import failure_sweep
from fedct.config import UncertaintyParams, to_dict
from fedct.data.cases import POOLED, evaluation_cases, read_cohort
from fedct.devices import pick_device
from fedct.errors import FedctError
from fedct.model.io import WEIGHTS_FILE, find_weights

ARTIFACTS = ("signals.csv", "within_site.csv", "failure_sweep.csv", "risk_coverage.csv",
             "shift_dice.csv", "shift_uncertainty.csv", "site_ranking.csv", "site_ranks.csv",
             "threshold.json", "shift_dice.png", "shift_uncertainty.png",
             "uncertainty_vs_dice.png", "risk_coverage.png")


def _evaluate_all(params: UncertaintyParams, cohort_dir: Path, model_paths: list[Path],
                  evaluate: pd.DataFrame, device: torch.device) -> pd.DataFrame:
    return evaluate_models(params, cohort_dir, model_paths, evaluate, device)


def run(params: UncertaintyParams, cohort_dir: Path, models_dir: Path, out_dir: Path,
        control_sites: tuple[str, ...] = ()) -> dict:
    """Evaluate every model on every evaluation case; write the tables and plots.

    ``control_sites``: the held-out sites without an injected shift
    (``cohort.control_sites``), reported apart with ``params.domain_subsets``."""
    from fedct import tracking

    cohort_dir, models_dir, out_dir = Path(cohort_dir), Path(models_dir), Path(out_dir)
    for key in ("signal", "ranking_signal"):
        if getattr(params, key) not in SIGNALS:
            raise FedctError(f"uncertainty.{key}: {getattr(params, key)!r} is not one of "
                             f"{list(SIGNALS)}")
    cohort = read_cohort(cohort_dir)
    evaluate = evaluation_cases(cohort)
    model_paths = find_weights(models_dir)
    if not model_paths:
        raise FedctError(f"{models_dir}: no */{WEIGHTS_FILE}; run `fedct train` first")
    out_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(params.device)
    chosen = params.signal
    baselines = (*BASELINES, *((protocol.HELDOUT_FLAG,) if params.heldout_flag else ()))
    kinds = {**dict.fromkeys(SIGNALS, "uncertainty"), **dict.fromkeys(baselines, "baseline")}
    with tracking.start_run("uncertainty") as mlrun:
        mlrun.log_params({**to_dict(params), "n_models": len(model_paths),
                          "n_cases": len(evaluate), "device": str(device)})
        structures = _evaluate_all(params, cohort_dir, model_paths, evaluate, device)
        cases = aggregate_cases(structures, params.aggregation)
        cases["header_rule"] = header_rule(cases, cohort)
        if params.heldout_flag:
            cases[protocol.HELDOUT_FLAG] = protocol.heldout_flag(cases)
        # 1. Failure, relative to in-domain calibration Dice.
        calib_split = protocol.calibration_split(cases)
        if calib_split != "calib":
            warnings.warn("uncertainty: the cohort has no labelled calib cases; the failure "
                          "definition and flag threshold fall back to val cases, which also "
                          "picked the checkpoints (raise cohort.calib_fraction)", stacklevel=1)
        fail_at = protocol.failure_threshold(cases, params.failure_percentile, calib_split)
        cases["failed"] = cases["dice"] < fail_at
        structures["failed"] = structures["dice"] < fail_at
        structures.to_csv(out_dir / "structures.csv", index=False)
        cases.to_csv(out_dir / "cases.csv", index=False)
        test = cases[cases["split"] == "test"].dropna(subset=["dice"])
        worst = protocol.most_shifted_site(test)
        subsets = protocol.subsets(test, worst, params.domain_subsets, tuple(control_sites))
        # 2.-3. Every signal and baseline on the test pairs, overall and within sites.
        signals = protocol.signal_table(
            test, structures[structures["split"] == "test"].dropna(subset=["dice"]),
            kinds, subsets, params.n_boot, params.seed)
        signals.to_csv(out_dir / "signals.csv", index=False)
        protocol.within_site(test, kinds).to_csv(out_dir / "within_site.csv", index=False)
        curves = protocol.risk_coverage_table(test, kinds)
        curves.to_csv(out_dir / "risk_coverage.csv", index=False)
        risk_coverage_plot(curves, chosen, out_dir / "risk_coverage.png")
        in_domain_calib = protocol.in_domain_calibration_dice(cases, calib_split)
        failure_sweep(test["dice"], test[chosen], in_domain_calib,
                      params.failure_sweep).to_csv(out_dir / "failure_sweep.csv", index=False)
        # The flag threshold from calibration pairs only (never trained or selected on).
        calib = cases[cases["split"] == calib_split].dropna(subset=["dice"])
        threshold, rule = calibrate_threshold(calib[chosen], calib["failed"],
                                              calib["model"] == calib["site"],
                                              params.threshold_min_failures,
                                              params.threshold_in_domain_quantile)
        flagged = test[chosen] >= threshold
        # 4. Label-free shift: matrices and the balanced site ranking.
        dice_m, unc_m = shift_matrices(cases, chosen)
        dice_m.to_csv(out_dir / "shift_dice.csv")
        unc_m.to_csv(out_dir / "shift_uncertainty.csv")
        ranking = protocol.balanced_site_ranking(cases[cases["split"] == "test"],
                                                 params.ranking_signal, params.seed,
                                                 params.n_boot)
        ranking.to_csv(out_dir / "site_ranking.csv", index=False)
        site_ranks(cases).to_csv(out_dir / "site_ranks.csv")
        heatmap(dice_m, out_dir / "shift_dice.png", "Mean test Dice", "viridis")
        heatmap(unc_m, out_dir / "shift_uncertainty.png", f"Mean {chosen}", "magma", ".3g")
        scatter(test, chosen, threshold, fail_at, out_dir / "uncertainty_vs_dice.png")
        # Strict JSON: +inf (only an unbounded signal reaches it) as "inf", NaN as null;
        # read back with float() by evaluate, promote and predict.
        (out_dir / "threshold.json").write_text(json.dumps({
            "signal": chosen, "threshold": (None if math.isnan(threshold) else
                                            threshold if math.isfinite(threshold) else "inf"),
            "rule": rule, "mc_samples": params.mc_samples,
            "aggregate": params.aggregation, "failure_percentile": params.failure_percentile,
            "failure_dice": fail_at, "calibrated_on": f"{calib_split} split pairs"}, indent=1))
        metrics = _metrics(test, signals, ranking, params, fail_at, threshold,
                           flagged, worst, list(subsets), baselines)
        metrics["calibration_split"] = calib_split
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
        mlrun.log_metrics({k: v for k, v in metrics.items()
                           if isinstance(v, float | int) and not isinstance(v, bool)})
        mlrun.set_tags({"fedct.signal": chosen, "fedct.ranking_signal": params.ranking_signal,
                        "fedct.site_ranking": metrics["site_ranking"]})
        for f in ARTIFACTS:
            mlrun.log_artifact(out_dir / f)
    return metrics


def _metrics(test: pd.DataFrame, signals: pd.DataFrame,
             ranking: pd.DataFrame, params: UncertaintyParams, fail_at: float,
             threshold: float, flagged: pd.Series, worst: str,
             subsets: list[str] | None = None, baselines: tuple[str, ...] = BASELINES
             ) -> dict:
    def row(signal: str, subset: str) -> pd.Series:
        s = signals[(signals["level"] == "case") & (signals["signal"] == signal)
                    & (signals["subset"] == subset)]
        return s.iloc[0]

    chosen = params.signal
    failed = test["failed"]
    holdout = test[test["role"] == "holdout"]
    local_h = holdout[holdout["model"] != POOLED]
    pooled_h = holdout[holdout["model"] == POOLED]
    out: dict = {"signal": chosen, "failure_dice": fail_at, "flag_threshold": threshold,
                 "most_shifted_site": worst,
                 "in_domain_dice": float(test[test["model"] == test["site"]]["dice"].mean()),
                 "n_test_pairs": len(test), "n_failed_test": int(failed.sum())}
    tags = {"all": "all", f"without_{worst}": "without_worst"}
    for subset in subsets or list(tags):
        tag = tags.get(subset, subset)
        r = row(chosen, subset)
        out.update({f"auroc_{tag}": float(r["auroc"]), f"auroc_lo_{tag}": float(r["auroc_lo"]),
                    f"auroc_hi_{tag}": float(r["auroc_hi"]), f"aurc_{tag}": float(r["aurc"]),
                    f"spearman_{tag}": float(r["spearman"])})
        for b in baselines:
            out[f"aurc_{b}_{tag}"] = float(row(b, subset)["aurc"])
        if subset not in tags:
            out[f"n_pairs_{tag}"] = int(r["n"])
            out[f"n_failed_{tag}"] = int(r["n_failed"])
    out.update({
        "flag_sensitivity": float((flagged & failed).sum() / max(int(failed.sum()), 1)),
        "flag_specificity": float((~flagged & ~failed).sum() / max(int((~failed).sum()), 1)),
        "site_ranking": ",".join(ranking["site"].astype(str)),
        "holdout_dice_pooled": float(pooled_h["dice"].mean()) if len(pooled_h) else np.nan,
        "holdout_dice_local_mean": float(local_h["dice"].mean()) if len(local_h) else np.nan,
    })
    return out
