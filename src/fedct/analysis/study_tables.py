"""The study (issue 23): one row of results per run, and the pooling over runs.

Pure functions over the outputs of one pipeline run, no I/O (``fedct.study`` runs the
experiments, reads their outputs and writes ``results/study/``). A run is one (report seed
pair, training seed): the report seed pair (``synth.seed``, ``cohort.seed``) draws new
patients and a new split; the training seed (``train.seed`` = ``federate.seed``) retrains
every model on the same data, so the spread over training seeds is training noise.

- ``run_row``: the columns of ``results/study/runs.csv`` (``RUN_COLUMNS``) from one run's
  outputs. A value the outputs do not give stays empty (NaN), never guessed.
- ``pool``: ``pooled.json``: per column the mean over runs, and where an interval applies
  (``_lo`` / ``_hi``) a 95 % two-stage bootstrap over runs: report seed pairs resampled
  first, then the training seeds within each. That interval holds training noise and the
  seed-to-seed variation of patients and splits; the within-run case intervals (sites,
  then cases) stay in each run's row (e.g. ``auroc_all_lo``,
  ``fedavg_minus_best_local_lo``), beside it; a column that is such a per-run bound of
  another column is not pooled itself (``x_lo`` in pooled.json is the pooled interval of
  ``x``). Also ``<column>_sd`` (across runs), ``n_runs`` and ``report_seeds``.
- ``primary_columns``: the frozen label-free method (issue 27) against FedAvg and its
  ablation at the most shifted held-out site and at the controls; ``method_rows``: the
  same for every label-free method of a run (``results/study/label_free.csv``), so that
  the methods that miss are reported beside the primary one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from fedct.analysis.baselines import BASELINES
from fedct.analysis.protocol import HELDOUT_FLAG

#: The columns of runs.csv, in order (issue 23's list first, then what helps reading it).
RUN_COLUMNS = (
    "report_seed", "train_seed", "in_domain_dice", "heldout_fedavg", "heldout_pooled",
    "heldout_best_local", "fedavg_minus_best_local_lo", "auroc_all", "auroc_all_lo",
    "auroc_without_most_shifted", "aurc_all", "aurc_best_baseline_all", "aurc_without",
    "aurc_best_baseline_without", "shifted_sites_above_controls", "n_calib_pairs",
    "cap_hit_fraction", "promoted", "runtime_min", "device",
    # Beyond the minimum:
    "fedavg_minus_best_local", "fedavg_over_pooled", "best_local", "most_shifted_site",
    "auroc_without_most_shifted_lo", "auroc_out_of_domain", "aurc_out_of_domain",
    "aurc_best_baseline_out_of_domain", "auroc_controls", "aurc_controls",
    "aurc_best_baseline_controls", "site_ranking", "fedavg_best_round", "fedavg_last_round",
    "commit",
    # The frozen label-free method (issue 27; federate.primary_label_free) at the most
    # shifted held-out site (shifted_site) and at the negative controls:
    "primary_label_free", "primary_minus_fedavg_shifted", "primary_minus_fedavg_shifted_lo",
    "primary_minus_ablation_shifted_lo", "primary_minus_fedavg_controls",
    "primary_minus_fedavg_shifted_hi", "primary_minus_ablation_shifted", "shifted_site",
    "primary_minus_fedavg_controls_min",
)
#: Columns that are labels, not numbers to pool.
LABELS = ("report_seed", "device", "best_local", "most_shifted_site", "site_ranking",
          "commit", "primary_label_free", "shifted_site")
#: Columns pooled as a mean without an interval (counts, run facts).
NO_INTERVAL = ("train_seed", "n_calib_pairs", "runtime_min", "fedavg_best_round",
               "fedavg_last_round")
#: Why a column may stay empty (docs/study.md repeats it).
EMPTY_BECAUSE = {
    "shifted_sites_above_controls": "no cohort.control_sites, or a shifted or control site "
                                    "missing from the label-free ranking",
    "auroc_all_lo": "the test pairs hold one class only (no failure, or only failures)",
    "auroc_controls": "the control sites' pairs hold one class only (typically no failure)",
    "fedavg_minus_best_local_lo": "federate.methods without fedavg, or no local model",
    "cap_hit_fraction": "a train stage older than convergence.json",
    "primary_minus_fedavg_shifted": "no federate.primary_label_free, or evaluate scored "
                                    "it or FedAvg not at the most shifted held-out site",
    "primary_minus_ablation_shifted_lo": "the primary method has no ablation, or it did "
                                         "not run beside it",
    "primary_minus_fedavg_controls": "no cohort.control_sites",
}


def report_seed(synth_seed: int, cohort_seed: int) -> str:
    """The ``report_seed`` value of a run: ``<synth>-<cohort>``."""
    return f"{int(synth_seed)}-{int(cohort_seed)}"


def experiment_name(synth_seed: int, cohort_seed: int, train_seed: int) -> str:
    """The DVC experiment of one study run."""
    return f"study-{report_seed(synth_seed, cohort_seed)}-t{int(train_seed)}"


def _num(value: object) -> float:
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan
    return out


def _get(metrics: Mapping, key: str, label: str | None = None) -> float:
    """``metrics[key]`` (or ``metrics[key][label]``) as a float, NaN when absent."""
    value = metrics.get(key)
    if label is not None:
        value = value.get(label) if isinstance(value, Mapping) else None
    return _num(value)


def best_baseline_aurc(uncertainty: Mapping, tag: str) -> float:
    """The lowest AURC of any baseline in ``uncertainty``'s metrics on subset ``tag``."""
    values = [_get(uncertainty, f"aurc_{b}_{tag}") for b in (*BASELINES, HELDOUT_FLAG)]
    values = [v for v in values if not math.isnan(v)]
    return min(values) if values else math.nan


def shifted_above_controls(ranking: Sequence[str], shifted: Sequence[str],
                           controls: Sequence[str]) -> float:
    """1.0 when every shifted site ranks above every control site in the label-free
    ranking (most shifted first), 0.0 when not, NaN when it cannot be told."""
    order = [str(s) for s in ranking]
    if not shifted or not controls or not set(shifted) | set(controls) <= set(order):
        return math.nan
    worst_shifted = max(order.index(s) for s in shifted)
    best_control = min(order.index(c) for c in controls)
    return float(worst_shifted < best_control)


def n_calib_pairs(uncertainty_cases: pd.DataFrame) -> int:
    """In-domain calibration pairs (each local model on its own site's calib cases, with a
    Dice): what the failure cut-off and the flag threshold rest on."""
    c = uncertainty_cases
    keep = (c["split"] == "calib") & (c["model"].astype(str) == c["site"].astype(str))
    return int(c.loc[keep, "dice"].notna().sum())


def shifted_site(uncertainty: Mapping, evaluate: Mapping, shifted: Sequence[str]) -> str:
    """The most shifted held-out site of a run: the uncertainty protocol's most shifted
    site (most failed pairs) when it is one of the ``shifted`` (non-control) held-out
    sites, else the shifted site where the pooled model scores lowest; "" without one."""
    most = str(uncertainty.get("most_shifted_site") or "")
    if most in shifted or not shifted:
        return most if most in shifted else ""
    dice = {s: _get(evaluate, f"heldout_dice_{s}", "pooled") for s in shifted}
    return min(shifted, key=lambda s: (math.inf if math.isnan(dice[s]) else dice[s], s))


def primary_columns(evaluate: Mapping, primary: str | None, site: str,
                    control_sites: Sequence[str]) -> dict:
    """The frozen label-free method ``primary`` against FedAvg and against its ablation,
    from ``evaluate``'s paired differences (``paired_vs_fedavg_<site>``,
    ``paired_vs_ablation_<site>``, each with its 95 % case-bootstrap interval): at the most
    shifted held-out ``site``, and at the control sites (their mean, and the worst)."""
    def at(key: str) -> float:
        return _get(evaluate, key, primary) if primary and site else math.nan

    controls = [_get(evaluate, f"paired_vs_fedavg_{c}", primary) if primary else math.nan
                for c in control_sites]
    controls = [v for v in controls if not math.isnan(v)]
    return {"primary_label_free": primary or "", "shifted_site": site,
            "primary_minus_fedavg_shifted": at(f"paired_vs_fedavg_{site}"),
            "primary_minus_fedavg_shifted_lo": at(f"paired_vs_fedavg_{site}_lo"),
            "primary_minus_fedavg_shifted_hi": at(f"paired_vs_fedavg_{site}_hi"),
            "primary_minus_ablation_shifted": at(f"paired_vs_ablation_{site}"),
            "primary_minus_ablation_shifted_lo": at(f"paired_vs_ablation_{site}_lo"),
            "primary_minus_fedavg_controls": float(np.mean(controls)) if controls
            else math.nan,
            "primary_minus_fedavg_controls_min": min(controls) if controls else math.nan}


#: The columns of label_free.csv: one row per (run, label-free method).
METHOD_COLUMNS = ("report_seed", "train_seed", "method", "shifted_site",
                  "heldout_dice", "minus_fedavg", "minus_fedavg_lo", "minus_fedavg_hi",
                  "minus_fedavg_shifted", "minus_fedavg_shifted_lo", "minus_fedavg_shifted_hi",
                  "minus_ablation_shifted", "minus_ablation_shifted_lo",
                  "minus_ablation_shifted_hi", "minus_fedavg_controls",
                  "minus_fedavg_controls_min")


def method_rows(synth_seed: int, cohort_seed: int, train_seed: int, evaluate: Mapping,
                uncertainty: Mapping, methods: Sequence[str], holdout_sites: Sequence[str],
                control_sites: Sequence[str]) -> list[dict]:
    """One row per label-free method of ``methods`` that ``evaluate`` scored: its mean
    held-out Dice and paired difference against FedAvg over every held-out site, at the
    most shifted one (``shifted_site``), against its ablation there (when it has one), and
    at the controls (mean and worst), each with its case-bootstrap interval."""
    shifted = [s for s in holdout_sites if s not in set(control_sites)]
    site = shifted_site(uncertainty, evaluate, shifted)
    rows = []
    for m in methods:
        if m not in (evaluate.get("heldout_dice") or {}):
            continue
        p = primary_columns(evaluate, m, site, control_sites)
        row = {"report_seed": report_seed(synth_seed, cohort_seed),
               "train_seed": int(train_seed), "method": m, "shifted_site": site,
               "heldout_dice": _get(evaluate, "heldout_dice", m),
               **{f"minus_fedavg{x}": _get(evaluate, f"paired_vs_fedavg{x}", m)
                  for x in ("", "_lo", "_hi")},
               **{f"minus_fedavg_shifted{x}": p[f"primary_minus_fedavg_shifted{x}"]
                  for x in ("", "_lo", "_hi")},
               **{f"minus_ablation_shifted{x}": _get(evaluate,
                                                     f"paired_vs_ablation_{site}{x}", m)
                  for x in ("", "_lo", "_hi")},
               "minus_fedavg_controls": p["primary_minus_fedavg_controls"],
               "minus_fedavg_controls_min": p["primary_minus_fedavg_controls_min"]}
        rows.append({c: row[c] for c in METHOD_COLUMNS})
    return rows


def run_row(synth_seed: int, cohort_seed: int, train_seed: int, evaluate: Mapping,
            uncertainty: Mapping, ranking: Sequence[str], uncertainty_cases: pd.DataFrame,
            convergence: Mapping | None, decision: Mapping | None, holdout_sites: Sequence[str],
            control_sites: Sequence[str], runtime_min: float, device: str,
            federated: Mapping | None = None, commit: str = "",
            primary: str | None = None) -> dict:
    """One row of runs.csv (``RUN_COLUMNS``) from one run's outputs: ``evaluate`` and
    ``uncertainty`` (their ``metrics.json``), the label-free ``ranking`` (site order of
    ``site_ranking.csv``), the uncertainty stage's ``cases.csv``, the train stage's
    ``convergence.json``, promote's ``decision.json`` and federate's ``metrics.json``
    (``federated``; None: not there). ``commit``: the git commit the run belongs to;
    ``primary``: ``federate.primary_label_free`` (``primary_columns``)."""
    shifted = [s for s in holdout_sites if s not in set(control_sites)]
    fedavg, pooled = (_get(evaluate, "heldout_dice", "fedavg"),
                      _get(evaluate, "heldout_dice", "pooled"))
    row = {
        "report_seed": report_seed(synth_seed, cohort_seed), "train_seed": int(train_seed),
        "in_domain_dice": _get(uncertainty, "in_domain_dice"),
        "heldout_fedavg": fedavg, "heldout_pooled": pooled,
        "heldout_best_local": _get(evaluate, "heldout_dice", "local"),
        "fedavg_minus_best_local_lo": _get(evaluate, "paired_vs_best_local_lo", "fedavg"),
        "auroc_all": _get(uncertainty, "auroc_all"),
        "auroc_all_lo": _get(uncertainty, "auroc_lo_all"),
        "auroc_without_most_shifted": _get(uncertainty, "auroc_without_worst"),
        "aurc_all": _get(uncertainty, "aurc_all"),
        "aurc_best_baseline_all": best_baseline_aurc(uncertainty, "all"),
        "aurc_without": _get(uncertainty, "aurc_without_worst"),
        "aurc_best_baseline_without": best_baseline_aurc(uncertainty, "without_worst"),
        "shifted_sites_above_controls": shifted_above_controls(ranking, shifted,
                                                               control_sites),
        "n_calib_pairs": n_calib_pairs(uncertainty_cases),
        "cap_hit_fraction": _get(convergence or {}, "cap_hit_fraction"),
        "promoted": (float(bool(decision["promote"])) if decision and "promote" in decision
                     else math.nan),
        "runtime_min": float(runtime_min), "device": str(device), "commit": str(commit),
        "fedavg_minus_best_local": _get(evaluate, "paired_vs_best_local", "fedavg"),
        "fedavg_over_pooled": fedavg / pooled if pooled and not math.isnan(pooled)
        else math.nan,
        "best_local": str(evaluate.get("best_local") or ""),
        "most_shifted_site": str(uncertainty.get("most_shifted_site") or ""),
        "auroc_without_most_shifted_lo": _get(uncertainty, "auroc_lo_without_worst"),
        "auroc_out_of_domain": _get(uncertainty, "auroc_out_of_domain"),
        "aurc_out_of_domain": _get(uncertainty, "aurc_out_of_domain"),
        "aurc_best_baseline_out_of_domain": best_baseline_aurc(uncertainty, "out_of_domain"),
        "auroc_controls": _get(uncertainty, "auroc_controls"),
        "aurc_controls": _get(uncertainty, "aurc_controls"),
        "aurc_best_baseline_controls": best_baseline_aurc(uncertainty, "controls"),
        "site_ranking": ",".join(str(s) for s in ranking),
        "fedavg_best_round": _get(federated or {}, "fedavg_best_round"),
        "fedavg_last_round": _get(federated or {}, "fedavg_last_round"),
        **primary_columns(evaluate, primary, shifted_site(uncertainty, evaluate, shifted),
                          control_sites),
    }
    return {c: row[c] for c in RUN_COLUMNS}


def _two_stage_means(groups: list[np.ndarray], n_boot: int, rng: np.random.Generator
                     ) -> np.ndarray:
    """Bootstrap means: report seed pairs (``groups``) resampled, then runs within each."""
    out = np.empty(n_boot)
    for b in range(n_boot):
        picked = rng.integers(0, len(groups), len(groups))
        values = [groups[g][rng.integers(0, len(groups[g]), len(groups[g]))] for g in picked]
        out[b] = np.nanmean(np.concatenate(values))
    return out


def _is_bound(column: str) -> bool:
    """A column that is another column's per-run interval bound (``x_lo`` beside ``x``):
    pooled.json holds the pooled interval of ``x`` under that name instead."""
    base, _, end = column.rpartition("_")
    return end in ("lo", "hi") and base in RUN_COLUMNS


def pool(runs: pd.DataFrame, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05
         ) -> dict:
    """``pooled.json`` from the rows of runs.csv (module docstring)."""
    out: dict = {"n_runs": len(runs),
                 "report_seeds": sorted(str(s) for s in runs["report_seed"].unique())
                 if len(runs) else [],
                 "interval": "95 % two-stage bootstrap over runs: report seed pairs, then "
                             "training seeds within each (training noise included); each "
                             "run's case intervals are in runs.csv"}
    rng = np.random.default_rng(seed)
    for column in RUN_COLUMNS:
        if column in LABELS or column not in runs or _is_bound(column):
            continue
        values = pd.to_numeric(runs[column], errors="coerce").astype(float)
        ok = values.notna()
        mean = float(values[ok].mean()) if ok.any() else math.nan
        out[column] = None if math.isnan(mean) else mean
        if column in NO_INTERVAL:
            continue
        out[f"{column}_sd"] = float(values[ok].std(ddof=1)) if ok.sum() >= 2 else None
        groups = [g.to_numpy() for _, g in values[ok].groupby(runs.loc[ok, "report_seed"])]
        if sum(len(g) for g in groups) >= 2:
            draws = _two_stage_means(groups, n_boot, rng)
            lo, hi = np.nanquantile(draws, [alpha / 2, 1 - alpha / 2])
            out[f"{column}_lo"], out[f"{column}_hi"] = float(lo), float(hi)
        else:
            out[f"{column}_lo"] = out[f"{column}_hi"] = None
    return out
