"""Every model on every site: Dice/HD95 where labels exist, MC-dropout uncertainty always.

For each model (one per training site, plus pooled) and each evaluation case (the val
and test cases of training sites, every case of held-out sites), T MC-dropout samples
give the label-free failure signals of ``fedct.metrics.failure_signals`` per structure;
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

from fedct.config import UncertaintyParams, to_dict
from fedct.metrics import (
    argmax_segmentation,
    dice_per_structure,
    failure_auroc,
    failure_signals,
    flag_threshold,
    hd95_per_structure,
    predictive_mean,
    spearman,
)
from fedct.model import mc_predict
from fedct.preprocess import load_case
from fedct.stages.train import POOLED, load_model, pick_device
from fedct.synth.anatomy import N_CLASSES, STRUCTURES

SIGNALS = ("variance", "entropy", "mutual_information", "boundary_entropy",
           "volume_deviation", "unassigned_mass", "max_softmax_deficit", "sample_disagreement")


def evaluation_cases(cohort: pd.DataFrame) -> pd.DataFrame:
    """Val and test cases of training sites, all (test) cases of held-out sites."""
    return cohort[cohort["split"].isin(["val", "test"])].reset_index(drop=True)


def case_records(model_site: str, case: pd.Series, probs: torch.Tensor,
                 label: np.ndarray | None, reference_ml: list[float],
                 spacing: tuple[float, ...]) -> list[dict]:
    """Per-structure rows for one (model, case)."""
    signals = failure_signals(probs, reference_ml, spacing)
    seg = argmax_segmentation(predictive_mean(probs))
    if label is not None:
        lab = torch.as_tensor(label[0])
        dice = dice_per_structure(seg, lab, N_CLASSES)
        hd95 = hd95_per_structure(seg, lab, N_CLASSES, spacing)
    else:
        dice = hd95 = np.full(N_CLASSES - 1, np.nan)
    rows = []
    for k, name in STRUCTURES.items():
        rows.append({"model": model_site, "site": case["site"], "series_key": case["series_key"],
                     "split": case["split"], "role": case["role"], "structure": name,
                     "dice": dice[k - 1], "hd95": hd95[k - 1],
                     **{s: float(signals[s][k - 1]) for s in SIGNALS}})
    return rows


def aggregate_cases(structures: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, case): mean Dice, HD95 and signals over structures.

    The mean matches how case Dice is formed; a max lets one small, always-uncertain
    structure (gluteus medius at coarse sampling) dominate every case.
    """
    keys = ["model", "site", "series_key", "split", "role"]
    agg = {"dice": "mean", "hd95": "mean", **dict.fromkeys(SIGNALS, "mean")}
    return structures.groupby(keys, sort=True).agg(agg).reset_index()


def signal_table(cases: pd.DataFrame, structures: pd.DataFrame, failure_dice: float
                 ) -> pd.DataFrame:
    """Spearman(signal, Dice) and failure AUROC of every signal, case and structure level."""
    rows = []
    for level, df in (("case", cases), ("structure", structures)):
        d = df.dropna(subset=["dice"])
        failed = d["dice"] < failure_dice
        for s in SIGNALS:
            rows.append({"level": level, "signal": s, "n": len(d), "n_failed": int(failed.sum()),
                         "spearman": spearman(d[s], d["dice"]),
                         "auroc": failure_auroc(d[s], failed)})
    return pd.DataFrame(rows)


def calibrate_threshold(scores: pd.Series, failed: pd.Series, in_domain: pd.Series | None = None,
                        min_failures: int = 5, in_domain_quantile: float = 0.95
                        ) -> tuple[float, str]:
    """Threshold to flag at, from validation (model, case) pairs only; returns it and its rule.

    With at least ``min_failures`` failures among the validation pairs: Youden's J
    (``flag_threshold``). With fewer (well-trained models rarely fail on validation data),
    the label-free rule of out-of-distribution detection: the ``in_domain_quantile`` of
    the scores of in-domain pairs (``in_domain``: a model on its own site's cases, or the
    pooled model), so that about 5 % of familiar cases are flagged and anything less
    familiar is. ``+inf`` (a structure not predicted) stays the highest score throughout.
    """
    if int(failed.sum()) >= min_failures and (~failed).any():
        return flag_threshold(scores, failed), "youden"
    base = scores[in_domain] if in_domain is not None else scores
    if base.empty:
        return float("nan"), "none"
    return (float(np.quantile(base.to_numpy(dtype=float), in_domain_quantile, method="higher")),
            f"in_domain_quantile_{in_domain_quantile:g}")


def shift_matrices(cases: pd.DataFrame, signal: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(model x test site) mean test Dice and mean signal; rows models, columns sites."""
    test = cases[cases["split"] == "test"]
    dice = test.pivot_table(index="model", columns="site", values="dice", aggfunc="mean")
    finite = test.assign(**{signal: test[signal].replace(np.inf, np.nan)})
    unc = finite.pivot_table(index="model", columns="site", values=signal, aggfunc="mean")
    return dice, unc


def site_ranking(cases: pd.DataFrame, signal: str) -> pd.DataFrame:
    """Test sites ranked by mean label-free uncertainty of the local models (no labels).

    A site's own model is left out: it has seen that site, so its confidence there says
    nothing about shift. Pooled is left out too: it has seen every training site. A
    structure that a model did not predict at all scores +inf, so a site where that
    happens ranks above every site where it does not (ties broken by the median).
    """
    test = cases[(cases["split"] == "test") & (cases["model"] != POOLED)]
    test = test[test["model"] != test["site"]]
    r = test.groupby("site")[signal].agg(["mean", "median", "count"])
    r = r.sort_values(["mean", "median"], ascending=False).reset_index()
    r["rank"] = np.arange(1, len(r) + 1)
    return r


def site_ranks(cases: pd.DataFrame) -> pd.DataFrame:
    """Rank of each test site (rows) under every label-free signal (columns); 1 = most uncertain."""
    ranks = {s: site_ranking(cases, s).set_index("site")["rank"] for s in SIGNALS}
    return pd.DataFrame(ranks).sort_index()


def _heatmap(table: pd.DataFrame, path: Path, title: str, cmap: str, fmt: str = ".2f") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * table.shape[1], 1.0 + 0.45 * table.shape[0]))
    im = ax.imshow(table.to_numpy(dtype=float), cmap=cmap, aspect="auto")
    ax.set_xticks(range(table.shape[1]), table.columns)
    ax.set_yticks(range(table.shape[0]), table.index)
    ax.set_xlabel("test site")
    ax.set_ylabel("model (training site)")
    for i in range(table.shape[0]):
        for j in range(table.shape[1]):
            v = table.iat[i, j]
            if np.isfinite(v):
                ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _scatter(cases: pd.DataFrame, signal: str, threshold: float, failure_dice: float,
             path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = cases.dropna(subset=["dice"])
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for site, g in d.groupby("site"):
        ax.scatter(g[signal].replace(np.inf, np.nan), g["dice"], s=12, label=site)
    ax.axhline(failure_dice, color="k", ls="--", lw=0.8)
    if np.isfinite(threshold):
        ax.axvline(threshold, color="r", ls=":", lw=1)
    ax.set(xlabel=f"{signal} (label-free)", ylabel="mean Dice",
           title="Uncertainty vs Dice, every (model, case)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def evaluate_model(args: tuple) -> list[dict]:
    """All evaluation cases under one model (runs in a worker process)."""
    model_path, cohort_dir, evaluate, params, threads, position = args
    torch.set_num_threads(threads)
    device = pick_device(params.device)
    model, blob = load_model(model_path)
    model.to(device)
    spacing = tuple(blob["spacing_mm"])
    rows: list[dict] = []
    for _, case in tqdm(evaluate.iterrows(), total=len(evaluate), position=position,
                        desc=f"uncertainty: model {blob['site']}", leave=False):
        data = load_case(Path(cohort_dir) / "cases" / f"{case['series_key']}.npz")
        probs = mc_predict(model, torch.as_tensor(data["image"]), params.mc_samples,
                           params.mc_batch, amp=device.type == "cuda", seed=params.seed,
                           output_device="cpu").float()
        label = data.get("label") if bool(case["has_label"]) else None
        rows.extend(case_records(blob["site"], case, probs, label, blob["reference_ml"],
                                 spacing))
    return rows


def run(params: UncertaintyParams, cohort_dir: Path, models_dir: Path, out_dir: Path) -> dict:
    """Evaluate every model on every evaluation case; write the tables and plots."""
    from fedct import tracking

    cohort_dir, models_dir, out_dir = Path(cohort_dir), Path(models_dir), Path(out_dir)
    for key in ("signal", "ranking_signal"):
        if getattr(params, key) not in SIGNALS:
            raise ValueError(f"uncertainty.{key} {getattr(params, key)!r} is not one of {SIGNALS}")
    out_dir.mkdir(parents=True, exist_ok=True)
    cohort = pd.read_csv(cohort_dir / "cohort.csv")
    evaluate = evaluation_cases(cohort)
    model_paths = sorted(p for p in models_dir.glob("*/model.pt"))
    if not model_paths:
        raise FileNotFoundError(f"uncertainty: no */model.pt under {models_dir}")
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
        _heatmap(dice_m, out_dir / "shift_dice.png", "Mean test Dice", "viridis")
        _heatmap(unc_m, out_dir / "shift_uncertainty.png", f"Mean {chosen}", "magma", ".3g")
        _scatter(cases[cases["split"] == "test"], chosen, threshold, params.failure_dice,
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
