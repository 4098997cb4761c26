"""The held-out comparison: every candidate model on the test cases of sites no model trained on.

Pure functions over tables, no I/O. Input is the per-structure record table of
``fedct.analysis.mc_eval.evaluate_models`` (one row per model, case and structure, with
``dice``, ``hd95`` and the MC-dropout signals), restricted to the held-out sites' labelled
test cases (``heldout_test_cases``). Candidates have a ``kind``: ``local`` (one training
site), ``pooled`` (every training site's data, the centralised bound) or ``federated``.

Tables:

- ``case_table``: one row per (model, case): ``model, kind, site, case`` (the cohort's
  pseudonymised ``series_key``, never a patient identifier), ``dice`` and ``hd95`` (means
  over the scored structures), ``dice_<structure>``, ``hd95_<structure>``, and the frozen
  failure signal: ``signal`` (its name), ``score`` (aggregated over structures as the
  uncertainty stage does), ``threshold`` (the uncertainty stage's flag threshold, NaN when
  unknown) and ``flagged`` (``score >= threshold``; empty when the threshold is unknown).
  Its ``model, site, case, dice`` columns are what ``fedct.analysis.gate.decide`` reads.
- ``summary_table``: per model and per site, and over all held-out sites (``site ==
  "all"``): mean case Dice and HD95 with 95 % intervals. Over all sites the interval is the
  two-stage cluster bootstrap of ``fedct.analysis.stats.cluster_bootstrap`` (sites, then
  cases within sites); within one site it is a case bootstrap. The point estimate is the
  mean over cases (each case weighs the same, as in the gate). Every model uses the same
  bootstrap seed, so models scored on the same cases see the same resamples.
- ``paired_table``: per model, the paired difference of mean case Dice against the best
  local model, against pooled and against FedAvg
  (``fedct.analysis.stats.paired_difference``), over all sites and per site, and each
  uncertainty-guided method against its ablation (``ablations``). The best
  local model is the local model with the highest mean case Dice (ties: the first name in
  sorted order), exactly the gate's rule: on the training sites' validation cases when a
  ``selection`` table is given (``evaluate.best_local_on: val``), else on the held-out
  cases (``test``).

Extra rows per (model, case), e.g. one per report seed, are averaged into one case row
before any statistic, so every case weighs the same.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from fedct.analysis.failure import aggregate_cases
from fedct.analysis.gate import case_dice
from fedct.analysis.stats import cluster_bootstrap

LOCAL, POOLED_KIND, FEDERATED = "local", "pooled", "federated"
KINDS = (LOCAL, POOLED_KIND, FEDERATED)
#: The ``site`` value of rows over every held-out site together.
ALL_SITES = "all"
BEST_LOCAL, VS_POOLED, VS_FEDAVG = "best_local", "pooled", "fedavg"
#: A method against its ablation: the same method without its uncertainty guidance.
VS_ABLATION = "ablation"
#: References of the paired differences, in table order (each when its model is there).
REFERENCES = (BEST_LOCAL, VS_POOLED, VS_FEDAVG, VS_ABLATION)
#: References with an interval at each site too (metrics.json, MLflow).
PER_SITE = (VS_FEDAVG, VS_ABLATION)
#: paired_table's columns of an interval and the metric-name suffix of each.
_INTERVAL = (("difference", ""), ("lo", "_lo"), ("hi", "_hi"))

#: Summary columns other than the per-structure means.
SUMMARY_COLUMNS = ("model", "kind", "site", "n_cases", "dice", "dice_lo", "dice_hi", "hd95",
                   "hd95_lo", "hd95_hi", "score", "flag_rate")
_RECORD_COLUMNS = ("model", "site", "series_key", "split", "role", "structure", "dice", "hd95")


def heldout_test_cases(cohort: pd.DataFrame) -> pd.DataFrame:
    """Labelled test cases of held-out sites (``role == "holdout"``), in cohort order."""
    keep = ((cohort["role"] == "holdout") & (cohort["split"] == "test")
            & cohort["has_label"].astype(bool))
    return cohort[keep].reset_index(drop=True)


def metric_label(model: str, kind: str) -> str:
    """The name of a candidate in metrics and MLflow: ``local_<site>``, ``pooled`` or the
    federated method."""
    return f"local_{model}" if kind == LOCAL else str(model)


def structure_column(name: str) -> str:
    """A structure name as a column suffix (letters, digits and ``_``)."""
    return re.sub(r"[^0-9A-Za-z]+", "_", str(name)).strip("_")


def _order(models: Sequence[str], kinds: Mapping[str, str]) -> list[str]:
    """Local models, then pooled, then federated; by name within each kind."""
    return sorted(models, key=lambda m: (KINDS.index(kinds[m]), str(m)))


def case_table(structures: pd.DataFrame, kinds: Mapping[str, str], signal: str,
               aggregation: str = "mean", threshold: float = math.nan) -> pd.DataFrame:
    """One row per (model, case) from the per-structure records (module docstring).

    Args:
        structures: records of ``evaluate_models`` (``model, site, series_key, split,
            role, structure, dice, hd95`` and the signal columns).
        kinds: model -> ``local``, ``pooled`` or ``federated``; every model of the
            records must have one.
        signal: the frozen failure signal (``uncertainty.signal``), a column of the records.
        aggregation: structure scores -> case score (``uncertainty.aggregation``).
        threshold: the flag threshold of the uncertainty stage, NaN when unknown.

    Raises:
        ValueError: a missing column, an unknown kind, or a model without a kind.
    """
    missing = [c for c in (*_RECORD_COLUMNS, signal) if c not in structures.columns]
    if missing:
        raise ValueError(f"structure records lack column(s) {missing}")
    bad = {m: k for m, k in kinds.items() if k not in KINDS}
    if bad:
        raise ValueError(f"unknown kind(s) {bad}; known: {list(KINDS)}")
    unknown = sorted(set(structures["model"]) - set(kinds))
    if unknown:
        raise ValueError(f"no kind for model(s) {unknown}")
    names = {s: structure_column(s) for s in structures["structure"].unique()}
    if len(set(names.values())) < len(names) or {"lo", "hi"} & set(names.values()):
        raise ValueError(f"structure names collide as columns: {sorted(names)}")

    cases = aggregate_cases(structures, aggregation)
    keys = ["model", "series_key"]
    wide = (structures.groupby([*keys, "structure"], sort=True)[["dice", "hd95"]].mean()
            .unstack("structure"))
    order = [s for s in structures["structure"].drop_duplicates()]
    per_structure = pd.concat(
        {f"{metric}_{names[s]}": wide[(metric, s)] for metric in ("dice", "hd95")
         for s in order}, axis=1).reset_index()
    out = cases[[*keys, "site", "dice", "hd95", signal]].merge(per_structure, on=keys)
    out = out.rename(columns={"series_key": "case", signal: "score"})
    out.insert(1, "kind", out["model"].map(kinds))
    out["signal"] = signal
    out["threshold"] = float(threshold)
    flagged = pd.array(out["score"].to_numpy() >= threshold, dtype="boolean")
    if np.isnan(threshold):  # no threshold; +inf flags only +inf scores, as elsewhere
        flagged[:] = pd.NA
    out["flagged"] = flagged
    columns = ["model", "kind", "site", "case", "dice", "hd95",
               *[c for c in per_structure.columns if c not in keys],
               "signal", "score", "threshold", "flagged"]
    rank = {m: i for i, m in enumerate(_order(list(kinds), kinds))}
    out = out[columns].assign(_rank=out["model"].map(rank))
    return (out.sort_values(["_rank", "site", "case"]).drop(columns="_rank")
            .reset_index(drop=True))


def _one_row_per_case(cases: pd.DataFrame) -> pd.DataFrame:
    """Average extra rows per (model, case) (e.g. report seeds) into one; ``flagged``
    becomes the fraction of those rows flagged."""
    keys = ["model", "kind", "site", "case"]
    frame = cases
    if "flagged" in frame:  # booleans with missing values, also as read back from CSV
        as_float = {True: 1.0, False: 0.0, "True": 1.0, "False": 0.0}
        frame = frame.assign(flagged=[as_float.get(v, math.nan) if not pd.isna(v) else math.nan
                                      for v in frame["flagged"]])
    values = [c for c in frame.columns
              if c not in keys and pd.api.types.is_numeric_dtype(frame[c])]
    return frame.groupby(keys, sort=True)[values].mean().reset_index()


def _draws(index: pd.DataFrame, clusters: tuple[str, ...], n_boot: int, seed: int
           ) -> list[np.ndarray]:
    """Row positions in ``index`` (one row per case: ``site, case``) of each resample of
    ``cluster_bootstrap`` with these arguments.

    The resamples depend only on the cases, the clusters and the seed, never on the
    statistic, so they are drawn once and every model's statistic is computed on the same
    resamples: exactly what one ``cluster_bootstrap`` call per model would give, without
    rebuilding the resampled table once per model.
    """
    frame = pd.DataFrame({"site": index["site"].to_numpy(), "case": index["case"].to_numpy(),
                          "_row": np.arange(len(index))})
    seen: list[np.ndarray] = []

    def record(f: pd.DataFrame) -> float:
        seen.append(f["_row"].to_numpy())
        return 0.0

    cluster_bootstrap(frame, record, clusters, "case", n_boot=n_boot, seed=seed)
    return seen[-n_boot:]  # the first call is the full frame (the estimate)


def _nanmean(values: np.ndarray) -> np.ndarray:
    """Column means over the finite-or-inf entries (NaN skipped; all NaN -> NaN)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: NaN, as wanted
        return np.nanmean(values, axis=0)


def _intervals(values: np.ndarray, draws: list[np.ndarray], alpha: float
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Estimate, lo, hi per column of ``values`` (cases x models): the mean over cases
    and the percentile interval over the resamples, as ``cluster_bootstrap`` forms them
    (resamples with a NaN mean skipped; more than half NaN, or a NaN estimate, -> NaN)."""
    estimate = _nanmean(values)
    boot = np.stack([_nanmean(values[d]) for d in draws])
    lo = np.full(values.shape[1], np.nan)
    hi = np.full(values.shape[1], np.nan)
    for j in range(values.shape[1]):
        ok = ~np.isnan(boot[:, j])
        if np.isnan(estimate[j]) or 2 * (len(draws) - ok.sum()) > len(draws):
            continue
        lo[j], hi[j] = np.quantile(boot[ok, j], [alpha / 2.0, 1.0 - alpha / 2.0])
    return estimate, lo, hi


def _site_groups(index: pd.DataFrame) -> list[tuple[str, np.ndarray, tuple[str, ...]]]:
    """(site label, row mask, bootstrap clusters): every site together, then each site."""
    groups = [(ALL_SITES, np.ones(len(index), dtype=bool), ("site",))]
    groups += [(str(s), (index["site"] == s).to_numpy(), ())
               for s in sorted(index["site"].unique(), key=str)]
    return groups


def summary_table(cases: pd.DataFrame, n_boot: int = 1000, seed: int = 0,
                  alpha: float = 0.05) -> pd.DataFrame:
    """Per (model, site) and per model over all sites: mean Dice and HD95 with intervals.

    Columns ``model, kind, site, n_cases, dice, dice_lo, dice_hi, hd95, hd95_lo,
    hd95_hi``, the mean of each ``dice_<structure>`` / ``hd95_<structure>`` (no interval),
    ``score`` (mean failure score; ``inf`` when a case's is) and ``flag_rate`` (fraction of
    cases flagged; NaN without a threshold). ``n_cases`` counts cases with a Dice; a case
    without one (nothing to score) is left out of that model's means.
    """
    per_case = _one_row_per_case(cases)
    kinds = dict(zip(per_case["model"], per_case["kind"], strict=False))
    models = _order(list(kinds), kinds)
    index = (per_case[["site", "case"]].drop_duplicates()
             .sort_values(["site", "case"]).reset_index(drop=True))
    keys = pd.MultiIndex.from_frame(index)
    table = per_case.set_index(["site", "case", "model"])
    extra = [c for c in per_case.columns if c.startswith(("dice_", "hd95_"))]
    extra += [c for c in ("score", "flagged") if c in per_case.columns]

    def wide(column: str) -> np.ndarray:
        return (table[column].unstack("model").reindex(index=keys, columns=models)
                .to_numpy(dtype=np.float64))

    values = {c: wide(c) for c in ("dice", "hd95", *extra)}
    rows = []
    for site, mask, clusters in _site_groups(index):
        draws = _draws(index[mask], clusters, n_boot, seed)
        stats = {m: _intervals(values[m][mask], draws, alpha) for m in ("dice", "hd95")}
        for j, model in enumerate(models):
            if not (~np.isnan(values["dice"][mask, j]) | ~np.isnan(values["hd95"][mask, j])
                    ).any():
                continue  # the model has no case at this site
            row = {"model": model, "kind": kinds[model], "site": site,
                   "n_cases": int((~np.isnan(values["dice"][mask, j])).sum())}
            for m in ("dice", "hd95"):
                est, lo, hi = (float(a[j]) for a in stats[m])
                row.update({m: est, f"{m}_lo": lo, f"{m}_hi": hi})
            means = {c: float(_nanmean(values[c][mask, j:j + 1])[0]) for c in extra}
            row.update({c: means[c] for c in extra if c not in ("score", "flagged")})
            row["score"] = means.get("score", math.nan)
            row["flag_rate"] = means.get("flagged", math.nan)
            rows.append(row)
    out = pd.DataFrame(rows)
    site_rank = {s: i for i, (s, _, _) in enumerate(_site_groups(index))}
    return (out.assign(_m=out["model"].map({m: i for i, m in enumerate(models)}),
                       _s=out["site"].map(site_rank))
            .sort_values(["_m", "_s"]).drop(columns=["_m", "_s"]).reset_index(drop=True))


def best_local(cases: pd.DataFrame, selection: pd.DataFrame | None = None) -> str | None:
    """The local model with the highest mean case Dice; None without local models.

    The same rule as ``fedct.analysis.gate.decide``: means over the cases every local
    model scored, ties to the first name in sorted order; on ``selection`` (the local
    models on the training sites' validation cases) when given, else on ``cases``.
    """
    local = sorted(cases.loc[cases["kind"] == LOCAL, "model"].astype(str).unique())
    if not local:
        return None
    if selection is None:
        means = case_dice(cases, local, "held-out cases")[local].mean()
    else:
        means = case_dice(selection, local, "validation cases")[local].mean()
    return str(sorted(means.items(), key=lambda kv: (-kv[1], str(kv[0])))[0][0])


def paired_table(cases: pd.DataFrame, n_boot: int = 1000, seed: int = 0,
                 alpha: float = 0.05, selection: pd.DataFrame | None = None,
                 ablations: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Paired differences of mean case Dice, model minus reference, with intervals.

    References: ``best_local`` (``best_local``, chosen on ``selection`` when given),
    ``pooled`` (the pooled model) and
    ``fedavg`` (the federated model named ``fedavg``: what a label-free method must match
    at a shifted site), when present; and ``ablation``: for each method of ``ablations``
    (method -> its ablation, the same method without its uncertainty guidance) that was
    scored with its ablation, one row of it against that ablation only. One row per
    (model, reference, site),
    ``site == "all"`` over every held-out site (two-stage cluster bootstrap) and one per
    site (case bootstrap); the numbers are
    those of ``fedct.analysis.stats.paired_difference`` on each pair of models. Columns
    ``model, kind, reference, reference_model, site, n_cases, model_dice,
    reference_dice, difference, lo, hi``. A reference against itself gives 0 [0, 0].

    Raises:
        FedctError: a case that some models scored and others did not (``case_dice``).
    """
    columns = ["model", "kind", "reference", "reference_model", "site", "n_cases",
               "model_dice", "reference_dice", "difference", "lo", "hi"]
    kinds = dict(zip(cases["model"].astype(str), cases["kind"], strict=False))
    models = _order(list(kinds), kinds)
    wide = case_dice(cases, models, "held-out cases")
    references = []
    best = best_local(cases, selection)
    if best is not None:
        references.append((BEST_LOCAL, best))
    pooled = sorted(m for m, k in kinds.items() if k == POOLED_KIND)
    if pooled:
        references.append((VS_POOLED, pooled[0]))
    if kinds.get(VS_FEDAVG) == FEDERATED:
        references.append((VS_FEDAVG, VS_FEDAVG))
    # (reference, its model, the one model compared with it; None: every model)
    compared = [(r, m, None) for r, m in references]
    compared += [(VS_ABLATION, a, m) for m, a in (ablations or {}).items()
                 if m in kinds and a in kinds]
    dice = wide[models].to_numpy(dtype=np.float64)
    rows = []
    for site, mask, clusters in _site_groups(wide):
        draws = _draws(wide[mask], clusters, n_boot, seed)
        for reference, ref_model, only in compared:
            ref = dice[mask][:, models.index(ref_model)]
            diff = dice[mask] - ref[:, None]
            est, lo, hi = _intervals(diff, draws, alpha)
            for j, model in enumerate(models):
                if only is not None and model != only:
                    continue
                rows.append({"model": model, "kind": kinds[model], "reference": reference,
                             "reference_model": ref_model, "site": site,
                             "n_cases": int(mask.sum()),
                             "model_dice": float(dice[mask, j].mean()),
                             "reference_dice": float(ref.mean()),
                             "difference": float(est[j]), "lo": float(lo[j]),
                             "hi": float(hi[j])})
    out = pd.DataFrame(rows, columns=columns)
    rank = {r: i for i, (r, _, _) in enumerate(compared)}
    order = {m: i for i, m in enumerate(models)}
    site_rank = {s: i for i, (s, _, _) in enumerate(_site_groups(wide))}
    return (out.assign(_r=out["reference"].map(rank), _m=out["model"].map(order),
                       _s=out["site"].map(site_rank))
            .sort_values(["_r", "_m", "_s"]).drop(columns=["_r", "_m", "_s"])
            .reset_index(drop=True))


def dice_by_site(summary: pd.DataFrame) -> pd.DataFrame:
    """The plot table (``dvc plots``): one row per (candidate, site) with its interval.

    Columns ``candidate`` (``metric_label``), ``site``, ``entry`` (``candidate | site``,
    one bar each), ``dice``, ``lo``, ``hi``, ``n_cases``.
    """
    out = pd.DataFrame({
        "candidate": [metric_label(m, k) for m, k in zip(summary["model"], summary["kind"],
                                                         strict=True)],
        "site": summary["site"].astype(str),
    })
    out["entry"] = out["candidate"] + " | " + out["site"]
    out["dice"] = summary["dice"].to_numpy()
    out["lo"] = summary["dice_lo"].to_numpy()
    out["hi"] = summary["dice_hi"].to_numpy()
    out["n_cases"] = summary["n_cases"].to_numpy()
    return out


def _number(v: object) -> float | None:
    """JSON-safe float: NaN and infinities become None (``null``)."""
    f = float(v)  # type: ignore[arg-type]
    return f if math.isfinite(f) else None


def candidate_metrics(summary: pd.DataFrame, paired: pd.DataFrame, model: str
                      ) -> dict[str, float]:
    """One candidate's metrics for its MLflow run; the same names for every candidate.

    ``heldout_dice`` (+ ``_lo``, ``_hi``), ``heldout_hd95`` (+ ``_lo``, ``_hi``),
    ``heldout_dice_<site>``, ``heldout_hd95_<site>``, ``heldout_dice_<structure>``,
    ``heldout_hd95_<structure>``, ``heldout_score``, ``heldout_flag_rate``,
    ``heldout_n_cases``, ``paired_vs_best_local``, ``paired_vs_pooled`` and
    ``paired_vs_fedavg`` (+ ``_lo``, ``_hi``, over all sites),
    ``paired_vs_<reference>_<site>`` and ``paired_vs_fedavg_<site>_lo`` / ``_hi``. NaN where
    undefined.
    """
    s = summary[summary["model"] == model].set_index("site")
    out: dict[str, float] = {}
    overall = s.loc[ALL_SITES]
    for metric in ("dice", "hd95"):
        for suffix in ("", "_lo", "_hi"):
            out[f"heldout_{metric}{suffix}"] = float(overall[f"{metric}{suffix}"])
    out["heldout_n_cases"] = float(overall["n_cases"])
    out["heldout_score"] = float(overall["score"])
    out["heldout_flag_rate"] = float(overall["flag_rate"])
    for c in summary.columns:
        if c not in SUMMARY_COLUMNS:
            out[f"heldout_{c}"] = float(overall[c])
    for site, row in s.drop(index=ALL_SITES).iterrows():
        out[f"heldout_dice_{site}"] = float(row["dice"])
        out[f"heldout_hd95_{site}"] = float(row["hd95"])
    for reference in REFERENCES:
        p = paired[(paired["model"] == model) & (paired["reference"] == reference)]
        p = p.set_index("site")
        key = f"paired_vs_{reference}"
        if ALL_SITES in p.index:
            r = p.loc[ALL_SITES]
            out.update({key: float(r["difference"]), f"{key}_lo": float(r["lo"]),
                        f"{key}_hi": float(r["hi"])})
        else:
            out.update(dict.fromkeys((key, f"{key}_lo", f"{key}_hi"), math.nan))
        for site in s.index.drop(ALL_SITES):
            # Per-site intervals only against FedAvg and the ablation, as in metrics.json.
            for col, suffix in _INTERVAL if reference in PER_SITE else _INTERVAL[:1]:
                out[f"{key}_{site}{suffix}"] = (float(p.loc[site, col]) if site in p.index
                                                else math.nan)
    return out


def metrics_json(summary: pd.DataFrame, paired: pd.DataFrame) -> dict:
    """``metrics.json`` for DVC: per metric a mapping candidate label -> value.

    ``heldout_dice`` (and ``_lo``, ``_hi``), ``heldout_hd95``, ``heldout_dice_<site>`` map
    ``local_<site>``, ``pooled`` and each federated method to its value, and ``local`` to
    the best local model's; ``paired_vs_best_local``, ``paired_vs_pooled`` and
    ``paired_vs_fedavg`` (+ ``_lo``, ``_hi``) likewise, over all held-out sites, and
    ``paired_vs_fedavg_<site>`` (+ ``_lo``, ``_hi``) at each site: whether a label-free
    method matches FedAvg at the most shifted site; ``paired_vs_ablation`` and
    ``paired_vs_ablation_<site>`` (+ ``_lo``, ``_hi``) for each method scored with its
    ablation: what its uncertainty guidance adds. Also ``best_local``, ``sites`` and
    ``n_cases``. NaN is written as null.
    """
    kinds = dict(zip(summary["model"], summary["kind"], strict=False))
    models = _order(list(kinds), kinds)
    best = (str(paired.loc[paired["reference"] == BEST_LOCAL, "reference_model"].iloc[0])
            if (paired["reference"] == BEST_LOCAL).any() else None)
    sites = [str(s) for s in summary["site"].unique() if s != ALL_SITES]
    overall = summary[summary["site"] == ALL_SITES].set_index("model")
    out: dict = {"best_local": best, "sites": sites,
                 "n_cases": int(overall["n_cases"].max()) if len(overall) else 0}

    def per_model(values: Mapping[str, object]) -> dict:
        d = {metric_label(m, kinds[m]): _number(values[m]) for m in models if m in values}
        if best is not None and best in values:
            d = {LOCAL: _number(values[best]), **d}
        return d

    for metric in ("dice", "dice_lo", "dice_hi", "hd95", "hd95_lo", "hd95_hi"):
        out[f"heldout_{metric}"] = per_model(overall[metric].to_dict())
    for site in sites:
        at = summary[summary["site"] == site].set_index("model")
        out[f"heldout_dice_{site}"] = per_model(at["dice"].to_dict())
        out[f"heldout_hd95_{site}"] = per_model(at["hd95"].to_dict())
    for reference in REFERENCES:
        at_sites = [ALL_SITES, *sites] if reference in PER_SITE else [ALL_SITES]
        for site in at_sites:
            p = paired[(paired["reference"] == reference) & (paired["site"] == site)]
            p = p.set_index("model")
            if p.empty:
                continue
            key = f"paired_vs_{reference}" + ("" if site == ALL_SITES else f"_{site}")
            for col, suffix in _INTERVAL:
                values = p[col].to_dict()
                out[f"{key}{suffix}"] = {metric_label(m, kinds[m]): _number(values[m])
                                         for m in models if m in values}
    return out
