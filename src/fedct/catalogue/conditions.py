"""Domain-shift candidates: which acquisition conditions concentrate at which site.

Pure functions of the series table (or of a site x condition count table).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from fedct.catalogue.series import site_order

# What makes an acquisition condition for the shift analysis.
CONDITION = ("vendor", "model", "kernel", "thickness_class")


def condition_table(series: pd.DataFrame, columns: Sequence[str] = CONDITION,
                    usable_only: bool = True) -> pd.DataFrame:
    """Contingency table site (rows) x acquisition condition (columns), in series.

    Counts usable series (the data a model will see) when there are any, else all.
    A condition label joins ``columns`` with " | ".
    """
    data = series
    if usable_only and not series.empty and series["usable"].any():
        data = series[series["usable"].astype(bool)]
    if data.empty:
        return pd.DataFrame()
    label = data[columns[0]].fillna("").astype(str)
    for c in columns[1:]:
        label = label + " | " + data[c].fillna("").astype(str)
    t = pd.crosstab(data["site"], label)
    t = t.reindex(index=site_order(t.index))
    t.index.name, t.columns.name = "site", "condition"
    return t


def adjusted_residuals(table: pd.DataFrame) -> pd.DataFrame:
    """Haberman's adjusted standardised residuals of a contingency table.

    (O - E) / sqrt(E (1 - row share) (1 - column share)): approximately N(0, 1) under
    independence of site and condition, so > 3 flags a combination markedly
    concentrated at that site whatever the table's size.
    """
    o = table.to_numpy(dtype=float)
    n = o.sum()
    if n == 0:
        return table.astype(float) * 0
    r = o.sum(axis=1, keepdims=True)
    c = o.sum(axis=0, keepdims=True)
    e = r @ c / n
    var = e * (1 - r / n) * (1 - c / n)
    with np.errstate(divide="ignore", invalid="ignore"):
        res = np.where(var > 0, (o - e) / np.sqrt(var), 0.0)
    return pd.DataFrame(res, index=table.index, columns=table.columns)


def pmi(table: pd.DataFrame, normalised: bool = False) -> pd.DataFrame:
    """Pointwise mutual information log2 p(site, cond) / (p(site) p(cond)); NaN where 0.

    ``normalised``: divide by -log2 p(site, cond) (NPMI in [-1, 1]; 1 = the condition
    occurs only at that site and the site has only that condition).
    """
    o = table.to_numpy(dtype=float)
    n = o.sum()
    r = o.sum(axis=1, keepdims=True)
    c = o.sum(axis=0, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = o / n
        out = np.where(o > 0, np.log2(p / ((r / n) * (c / n))), np.nan)
        if normalised:
            out = np.where(o > 0, np.where(p < 1, out / -np.log2(p), 1.0), np.nan)
    return pd.DataFrame(out, index=table.index, columns=table.columns)


def jensen_shannon(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence (base 2, in [0, 1]) of two count/probability vectors."""
    p = np.asarray(p, dtype=float)
    q = np.asarray(q, dtype=float)
    if p.sum() <= 0 or q.sum() <= 0:
        return float("nan")
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        mask = a > 0
        return float(np.sum(a[mask] * np.log2(a[mask] / m[mask])))

    return max(0.0, 0.5 * kl(p) + 0.5 * kl(q))


def shift_combos(table: pd.DataFrame) -> pd.DataFrame:
    """(site, condition) cells ranked by how site-specific the condition is.

    Ranked by adjusted residual (evidence that the condition concentrates at the site),
    with PMI/NPMI (how strongly) and the share of the condition's series at that site.
    """
    cols = ["rank", "site", "condition", "n_site", "n_condition", "share_at_site",
            "site_share", "pmi", "npmi", "residual"]
    if table.empty:
        return pd.DataFrame(columns=cols)
    res = adjusted_residuals(table)
    p = pmi(table)
    npmi = pmi(table, normalised=True)
    o = table.to_numpy(dtype=float)
    n = o.sum()
    rows = []
    for i, site in enumerate(table.index):
        for j, cond in enumerate(table.columns):
            if o[i, j] <= 0:
                continue
            rows.append({
                "site": site, "condition": cond, "n_site": int(o[i, j]),
                "n_condition": int(o[:, j].sum()),
                "share_at_site": o[i, j] / o[:, j].sum(), "site_share": o[i].sum() / n,
                "pmi": p.iat[i, j], "npmi": npmi.iat[i, j], "residual": res.iat[i, j],
            })
    out = pd.DataFrame(rows).sort_values(["residual", "npmi", "site", "condition"],
                                         ascending=[False, False, True, True])
    out.insert(0, "rank", np.arange(1, len(out) + 1))
    return out.round(4).reset_index(drop=True)[cols]


def shift_sites(table: pd.DataFrame) -> pd.DataFrame:
    """Sites ranked by the JSD between their condition mix and that of all other sites."""
    cols = ["rank", "site", "n_series", "jsd", "top_condition", "top_residual"]
    if table.empty:
        return pd.DataFrame(columns=cols)
    o = table.to_numpy(dtype=float)
    res = adjusted_residuals(table)
    rows = []
    for i, site in enumerate(table.index):
        rest = o.sum(axis=0) - o[i]
        j = int(np.argmax(res.iloc[i].to_numpy()))
        rows.append({"site": site, "n_series": int(o[i].sum()),
                     "jsd": jensen_shannon(o[i], rest),
                     "top_condition": table.columns[j], "top_residual": res.iat[i, j]})
    out = pd.DataFrame(rows).sort_values(["jsd", "site"], ascending=[False, True],
                                         na_position="last")
    out.insert(0, "rank", np.arange(1, len(out) + 1))
    return out.round(4).reset_index(drop=True)[cols]
