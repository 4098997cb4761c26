"""The study over report seeds: each seed's headline numbers, and the held-out comparison
with every seed's cases together.

Pure functions over tables, no I/O (``fedct.seeds`` reads each seed's outputs from its
DVC experiment). A report seed is a pair (``synth.seed``, ``cohort.seed``): a new
archive (new patients) and a new patient split, so every seed retrains every model.

- ``seed_row``: one row of headline numbers for one seed, from that seed's outputs:
  in-domain Dice, the frozen failure signal's AUROC and AURC beside the best baseline's
  (overall and without the most shifted site), where the injected-shift sites rank in the
  label-free ranking, and the held-out comparison (FedAvg, the best local model, pooled,
  one-shot; at the most shifted held-out site the study's label-free method, fixed in
  params (``federate.primary_label_free``), minus FedAvg with its interval, and, for the record
  only, the label-free method that scored best there, which is chosen after seeing labels
  and so flatters the label-free methods).
- ``pooled_cases``: every seed's per-case table of ``evaluate`` in one, each case named
  ``<seed>/<case>`` so that cases of different seeds stay distinct; the held-out tables
  of ``fedct.analysis.heldout`` then give means and paired differences over all seeds'
  cases with the same two-stage cluster bootstrap (sites, then cases) as one seed.
- ``across_seeds``: mean, standard deviation, minimum and maximum of each headline number.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from fedct.errors import FedctError


def experiment_name(synth_seed: int, cohort_seed: int) -> str:
    """The DVC experiment of one report seed pair."""
    return f"report-{synth_seed}-{cohort_seed}"


def report_pairs(synth_seeds: Sequence[int], cohort_seeds: Sequence[int],
                 synth_dev: Sequence[int] = (), cohort_dev: Sequence[int] = ()
                 ) -> list[tuple[int, int]]:
    """The report seed pairs (``synth.report_seeds[i]``, ``cohort.report_seeds[i]``).

    Raises:
        FedctError: lists of different lengths, a repeated pair, or a development seed
            among the report seeds.
    """
    if len(synth_seeds) != len(cohort_seeds) or not synth_seeds:
        raise FedctError(f"synth.report_seeds {list(synth_seeds)} and cohort.report_seeds "
                         f"{list(cohort_seeds)} must be non-empty lists of the same length")
    dev = sorted(set(synth_seeds) & set(synth_dev)) + sorted(set(cohort_seeds) & set(cohort_dev))
    if dev:
        raise FedctError(f"report seeds {dev} are also development seeds (dev_seeds); "
                         "a report seed must be one that no choice saw")
    pairs = [(int(s), int(c)) for s, c in zip(synth_seeds, cohort_seeds, strict=True)]
    if len(set(s for s, _ in pairs)) != len(pairs):
        raise FedctError(f"synth.report_seeds {list(synth_seeds)} repeats a seed")
    return pairs


def _value(d: Mapping, key: str, label: str) -> float:
    v = (d.get(key) or {}).get(label)
    return math.nan if v is None else float(v)


def _signal_rows(signals: pd.DataFrame, signal: str) -> dict:
    """AUROC [lo, hi] and AURC of ``signal`` and the best baseline AURC, per subset."""
    out: dict = {}
    case = signals[signals["level"] == "case"]
    subsets = {"all": case[case["subset"] == "all"],
               "without": case[case["subset"].astype(str).str.startswith("without_")]}
    for name, rows in subsets.items():
        mine = rows[(rows["signal"] == signal) & (rows["kind"] == "uncertainty")]
        base = rows[rows["kind"] == "baseline"]
        if mine.empty:
            raise FedctError(f"signals.csv: no case-level row of signal {signal!r} "
                             f"(subset {name})")
        r = mine.iloc[0]
        out.update({f"auroc_{name}": float(r["auroc"]), f"auroc_{name}_lo": float(r["auroc_lo"]),
                    f"auroc_{name}_hi": float(r["auroc_hi"]), f"aurc_{name}": float(r["aurc"]),
                    f"best_baseline_aurc_{name}": float(base["aurc"].min()) if len(base)
                    else math.nan})
        if name == "without":
            out["without_site"] = str(r["subset"]).removeprefix("without_")
    return out


def shifted_heldout_site(evaluate_metrics: Mapping, without_site: str | None) -> str:
    """The most shifted held-out site: the uncertainty protocol's most shifted site (the
    one with most failed pairs) when it is held out, else the held-out site where the
    pooled model scores lowest."""
    sites = [str(s) for s in evaluate_metrics.get("sites") or []]
    if not sites:
        raise FedctError("evaluate metrics.json lists no held-out site")
    if without_site in sites:
        return str(without_site)
    dice = {s: _value(evaluate_metrics, f"heldout_dice_{s}", "pooled") for s in sites}
    return min(sites, key=lambda s: (math.inf if math.isnan(dice[s]) else dice[s], s))


def seed_row(synth_seed: int, cohort_seed: int, evaluate_metrics: Mapping,
             uncertainty_metrics: Mapping, signals: pd.DataFrame, ranking: pd.DataFrame,
             shift_sites: Sequence[str], signal: str, label_free: Sequence[str],
             primary: str | None) -> dict:
    """One report seed's headline numbers (module docstring).

    ``evaluate_metrics`` is ``evaluate``'s ``metrics.json``; ``uncertainty_metrics``,
    ``signals`` and ``ranking`` are the uncertainty stage's ``metrics.json``,
    ``signals.csv`` and ``site_ranking.csv``; ``shift_sites`` the archive's injected-shift
    sites; ``label_free`` the label-free methods; ``primary`` the one fixed in params
    (``federate.primary_label_free``). Columns ``*_shifted`` are at the
    most shifted held-out site (``shifted_heldout_site``, named in ``shifted_site``):
    ``primary_minus_fedavg_shifted`` (+ ``_lo``, ``_hi``: the case-bootstrap interval of
    ``evaluate``'s ``paired_vs_fedavg_<site>``) answers whether the fixed method is
    at least as good as FedAvg there; ``best_label_free*`` is the best of the methods at
    that site, picked with its labels (optimistic, not a result).
    """
    e = evaluate_metrics
    row: dict = {"synth_seed": int(synth_seed), "cohort_seed": int(cohort_seed),
                 "in_domain_dice": float(uncertainty_metrics.get("in_domain_dice", math.nan))}
    row.update(_signal_rows(signals, signal))
    shifted_site = shifted_heldout_site(e, row.get("without_site"))
    row["shifted_site"] = shifted_site
    ranks = dict(zip(ranking["site"].astype(str), ranking["rank"].astype(int), strict=False))
    shift = sorted(str(s) for s in shift_sites)
    row["shift_site_ranks"] = ",".join(f"{s}:{ranks.get(s, 0)}" for s in shift)
    row["shift_sites_first"] = bool(shift) and sorted(
        ranks.get(s, len(ranks) + 1) for s in shift) == list(range(1, len(shift) + 1))
    row["best_local"] = str(e.get("best_local"))
    for label in ("local", "pooled", "fedavg", "fedprox", "one_shot", *label_free):
        row[f"heldout_{label}"] = _value(e, "heldout_dice", label)
        row[f"heldout_{label}_shifted"] = _value(e, f"heldout_dice_{shifted_site}", label)
    for suffix in ("", "_lo", "_hi"):
        row[f"fedavg_vs_best_local{suffix}"] = _value(e, f"paired_vs_best_local{suffix}",
                                                      "fedavg")
    row["fedavg_over_pooled"] = row["heldout_fedavg"] / row["heldout_pooled"]
    at_site = {m: row[f"heldout_{m}_shifted"] for m in label_free}
    best = max(at_site, key=lambda m: -math.inf if math.isnan(at_site[m]) else at_site[m],
               default=None)
    row["best_label_free"] = best
    row["best_label_free_shifted"] = at_site[best] if best else math.nan
    row["best_label_free_minus_fedavg_shifted"] = (row["best_label_free_shifted"]
                                                   - row["heldout_fedavg_shifted"])
    row["primary_label_free"] = primary
    for suffix in ("", "_lo", "_hi"):
        key = f"paired_vs_fedavg_{shifted_site}{suffix}"
        if primary and primary not in (e.get(key) or {}):
            raise FedctError(f"evaluate's metrics have no {key} for {primary!r}: evaluate "
                             "ran without FedAvg or that method, or before it wrote them")
        row[f"primary_minus_fedavg_shifted{suffix}"] = (_value(e, key, primary) if primary
                                                        else math.nan)
    return row


def pooled_cases(cases_by_seed: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Every seed's ``evaluate`` case table in one; ``case`` becomes ``<seed>/<case>``."""
    if not cases_by_seed:
        raise FedctError("no report seed's cases to pool")
    frames = []
    for seed, cases in cases_by_seed.items():
        frames.append(cases.assign(case=str(seed) + "/" + cases["case"].astype(str),
                                   seed=str(seed)))
    out = pd.concat(frames, ignore_index=True)
    models = {seed: set(c["model"].astype(str)) for seed, c in cases_by_seed.items()}
    common = set.intersection(*models.values())
    differ = {seed: sorted(m - common) for seed, m in models.items() if m - common}
    if differ:
        raise FedctError(f"report seeds scored different candidates: {differ}; rerun them "
                         "with the same federate.methods and train.sites")
    return out


def across_seeds(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean, sd, min and max over seeds of each numeric headline column.

    Interval bounds (``*_lo``, ``*_hi``) are left out: their mean is not an interval (the
    pooled tables of ``pooled_cases`` give intervals over all seeds)."""
    numeric = [c for c in rows.columns if c not in ("synth_seed", "cohort_seed")
               and not c.endswith(("_lo", "_hi"))
               and pd.api.types.is_numeric_dtype(rows[c])
               and not pd.api.types.is_bool_dtype(rows[c])]
    out = []
    for c in numeric:
        v = rows[c].to_numpy(dtype=np.float64)
        v = v[~np.isnan(v)]
        out.append({"metric": c, "n_seeds": len(v),
                    "mean": float(v.mean()) if len(v) else math.nan,
                    "sd": float(v.std(ddof=1)) if len(v) > 1 else math.nan,
                    "min": float(v.min()) if len(v) else math.nan,
                    "max": float(v.max()) if len(v) else math.nan})
    for c in [c for c in rows.columns if pd.api.types.is_bool_dtype(rows[c])]:
        v = rows[c].astype(float).to_numpy()
        out.append({"metric": c, "n_seeds": len(v), "mean": float(v.mean()), "sd": math.nan,
                    "min": float(v.min()), "max": float(v.max())})
    return pd.DataFrame(out, columns=["metric", "n_seeds", "mean", "sd", "min", "max"])
