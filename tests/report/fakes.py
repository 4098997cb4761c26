"""Small fake pipeline outputs in the formats the stages write, for the report's tests.

The catalogue reports come from the catalogue's own writer on a fake series table, the
shift matrices from the uncertainty stage's own function, the risk-coverage PNG from its
own plot; the other files mimic the stages' columns and keys.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

SITES = ("A", "B", "C", "D")
MODELS = ("A", "B", "pooled")
HOLDOUT = ("C", "D")
METHODS = ("fedavg", "fedprox", "self_train")  # with rounds: history.csv
NO_ROUNDS = ("one_shot", "tent")  # a model (or one per target site), no rounds
SIGNAL = "entropy"
REASON = "lower bound 0.012 of fedavg minus best local (A) is above the margin 0.0"
# Parts of the whole report: what ``write_outputs(skip=...)`` can leave out.
PARTS = ("catalogue", "uncertainty", "federated", "evaluate", "promote")


def series_table(rng: np.random.Generator) -> pd.DataFrame:
    rows = []
    vendors = {"A": "CANON", "B": "GE", "C": "PHILIPS", "D": "SIEMENS"}
    for i, site in enumerate(SITES):
        for j in range(6):
            vendor = vendors[site] if j < 4 else "CANON"
            rows.append({"series_key": f"s{i}{j:02d}", "study_key": f"t{i}{j // 2}",
                         "site": site, "vendor": vendor, "model": f"{vendor} M{j % 2}",
                         "kernel": "FC13" if j % 3 else "B70f",
                         "kernel_class": "soft" if j % 3 else "sharp",
                         "thickness_class": "thick" if site == "C" else "thin",
                         "usable": bool(j != 5),
                         "reason": "" if j != 5 else "localizer (2 slices)",
                         "n_files": 40 + j})
    return pd.DataFrame(rows)


def cases_table(rng: np.random.Generator) -> pd.DataFrame:
    rows = []
    for model in MODELS:
        for site in SITES:
            for k in range(4):
                shifted = site in HOLDOUT and model != "pooled"
                dice = float(np.clip(rng.normal(0.55 if shifted else 0.85, 0.05), 0, 1))
                ent = float(0.9 - dice + rng.normal(0, 0.03))
                rows.append({"model": model, "site": site, "series_key": f"{site}{k:03d}x9f",
                             "split": "test" if k < 3 else "calib",
                             "role": "holdout" if site in HOLDOUT else "train",
                             "dice": dice, "hd95": 30 * (1 - dice), SIGNAL: ent,
                             "variance": ent / 10, "failed": dice < 0.7})
    cases = pd.DataFrame(rows)
    # A structure the model did not predict: the signal is +inf (not drawn).
    cases.loc[0, SIGNAL] = np.inf
    return cases


def write_catalogue(out: Path, rng: np.random.Generator) -> None:
    from fedct.catalogue.reports import write_reports

    out.mkdir(parents=True, exist_ok=True)
    write_reports(series_table(rng), pd.DataFrame(columns=["path", "reason", "detail"]), out)


def write_uncertainty(out: Path, rng: np.random.Generator) -> None:
    from fedct.analysis.plots import risk_coverage_plot
    from fedct.analysis.shift import shift_matrices

    out.mkdir(parents=True, exist_ok=True)
    cases = cases_table(rng)
    cases.to_csv(out / "cases.csv", index=False)
    dice_m, unc_m = shift_matrices(cases, SIGNAL)
    dice_m.to_csv(out / "shift_dice.csv")
    unc_m.to_csv(out / "shift_uncertainty.csv")
    signals = pd.DataFrame([
        {"signal": s, "kind": k, "level": lvl, "subset": sub, "n": 36, "n_failed": 9,
         "spearman": -0.8, "auroc": 0.9, "auroc_lo": 0.8, "auroc_hi": 0.97, "aurc": 0.05}
        for s, k in ((SIGNAL, "uncertainty"), ("variance", "uncertainty"),
                     ("noise_estimate", "baseline"))
        for lvl in ("case", "structure") for sub in ("all", "without_C")])
    signals.to_csv(out / "signals.csv", index=False)
    cov = np.linspace(0.1, 1, 10)
    curves = pd.concat([pd.DataFrame({"signal": s, "kind": k, "coverage": cov,
                                      "risk": cov * f, "threshold": cov})
                        for s, k, f in ((SIGNAL, "uncertainty", 0.2),
                                        ("noise_estimate", "baseline", 0.3))])
    curves.to_csv(out / "risk_coverage.csv", index=False)
    risk_coverage_plot(curves, SIGNAL, out / "risk_coverage.png")
    pd.DataFrame({"site": ["C", "D", "B", "A"], "rank": [1, 2, 3, 4],
                  "median": [0.4, 0.35, 0.1, 0.08], "lo": [0.3, 0.3, 0.05, 0.05],
                  "hi": [0.5, 0.4, 0.15, 0.1], "n_pairs": 6}).to_csv(
        out / "site_ranking.csv", index=False)
    (out / "threshold.json").write_text(json.dumps({
        "signal": SIGNAL, "threshold": 0.25, "rule": "youden", "aggregate": "mean",
        "failure_percentile": 5, "failure_dice": 0.7, "calibrated_on": "calib split pairs"}))
    (out / "metrics.json").write_text(json.dumps({
        "signal": SIGNAL, "flag_threshold": 0.25, "failure_dice": 0.7, "auroc_all": 0.9,
        "auroc_lo_all": 0.8, "auroc_hi_all": 0.97, "flag_sensitivity": 0.83,
        "flag_specificity": 0.9}))


def write_federated(out: Path, rng: np.random.Generator) -> None:
    """Multi-round methods write history.csv (the federate stage's columns); one-shot
    averaging and target-adapted methods write models only."""
    for m, method in enumerate(METHODS):
        d = out / method
        d.mkdir(parents=True, exist_ok=True)
        rounds = np.arange(1, 6)
        val = 0.5 + 0.06 * rounds - 0.01 * m
        pd.DataFrame({"round": rounds, "attempt": 1, "seconds": 12.5,
                      "bytes_sent": 2_000_000, "bytes_received": 2_000_000, "clients": 2,
                      "train_loss": 1 / rounds, "val_dice_mean": val, "val_dice": val,
                      "failed": "", "A_train_loss": 1 / rounds, "A_val_dice": val + 0.01,
                      "A_seconds": 6.0, "B_train_loss": 1 / rounds,
                      "B_val_dice": val - 0.01, "B_seconds": 6.0}).to_csv(
            d / "history.csv", index=False)
    for method in NO_ROUNDS:
        (out / method / "C").mkdir(parents=True, exist_ok=True)
        (out / method / "C" / "model_card.json").write_text("{}")


def write_evaluate(out: Path, rng: np.random.Generator) -> None:
    """summary.csv and paired.csv with the evaluate stage's columns."""
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    models = [("A", "local"), ("B", "local"), ("pooled", "pooled"),
              *((m, "federated") for m in (*METHODS, *NO_ROUNDS))]
    for i, (model, kind) in enumerate(models):
        for site in (*HOLDOUT, "all"):
            mean = 0.6 + 0.03 * i
            rows.append({"model": model, "kind": kind, "site": site, "n_cases": 6,
                         "dice": mean, "dice_lo": mean - 0.05, "dice_hi": mean + 0.04,
                         "hd95": 20 - i, "hd95_lo": 18 - i, "hd95_hi": 23 - i,
                         "score": 0.2, "flag_rate": 0.1, "dice_pelvis": mean + 0.1,
                         "dice_femur": mean + 0.05, "hd95_pelvis": 10.0,
                         "hd95_femur": 12.0})
    pd.DataFrame(rows).to_csv(out / "summary.csv", index=False)
    pd.DataFrame([{"model": m, "kind": "federated", "reference": ref,
                   "reference_model": "A" if ref == "best_local" else "pooled",
                   "site": site, "n_cases": 6, "model_dice": 0.7, "reference_dice": 0.67,
                   "difference": 0.03, "lo": 0.012, "hi": 0.05} for m in METHODS
                  for ref in ("best_local", "pooled") for site in (*HOLDOUT, "all")]
                 ).to_csv(out / "paired.csv", index=False)


def write_promote(out: Path, promote: bool = True, champion: str | None = "3",
                  with_champion: bool = True) -> None:
    """decision.json with the promote stage's keys; ``numbers`` is ``Decision.as_dict``'s
    form (``with_champion=False``: a decision.json of before the ``champion`` key)."""
    out.mkdir(parents=True, exist_ok=True)
    decision = {
        "promote": promote, "reasons": [REASON, "no held-out site loses more than 0.05"],
        "candidate": "fedavg", "model_name": "fedct-seg", "version": "3",
        "alias": "champion", "champion": champion,
        "numbers": {"promote": promote, "reasons": [REASON], "candidate": "fedavg",
                    "best_local": "A", "local_means": {"A": 0.62, "B": 0.6},
                    "candidate_mean": 0.65,
                    "difference": {"estimate": 0.03, "lo": 0.012, "hi": 0.05},
                    "sites": [{"site": s, "n_cases": 6, "candidate_dice": 0.65,
                               "best_local_dice": 0.62, "difference": 0.03}
                              for s in HOLDOUT],
                    "margin": 0.0, "site_tolerance": 0.05, "n_cases": 12,
                    "n_boot": 200, "seed": 0, "alpha": 0.05}}
    if not with_champion:
        del decision["champion"]
    (out / "decision.json").write_text(json.dumps(decision))


def write_outputs(root: Path, skip: tuple[str, ...] = (), seed: int = 0) -> Path:
    """Every input of the report under ``root`` (the pipeline's outputs folder), except
    the parts named in ``skip`` (see ``PARTS``)."""
    rng = np.random.default_rng(seed)
    writers = {"catalogue": write_catalogue, "uncertainty": write_uncertainty,
               "federated": write_federated, "evaluate": write_evaluate,
               "promote": lambda out, _rng: write_promote(out)}
    root.mkdir(parents=True, exist_ok=True)
    for part, write in writers.items():
        if part not in skip:
            write(root / part, rng)
    return root
