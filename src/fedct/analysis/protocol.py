"""The failure-detection protocol, fixed before the numbers (params ``uncertainty``).

Pairs are (model, case) rows of the uncertainty stage. The protocol:

1. **Failure** is relative to in-domain performance: a pair fails when its Dice is below
   the ``failure_percentile`` of in-domain *calibration* Dice (each local model on its own
   site's calib cases, which neither training nor checkpoint selection saw).
2. **Every signal and baseline** is scored on the test pairs by Spearman with Dice, failure
   AUROC with a 95 % two-stage cluster-bootstrap interval (sites, then cases within sites;
   all pairs of a case move together) and AURC (risk = failure rate among kept pairs),
   over all test pairs and without the most shifted site (the site with most failures);
   with ``uncertainty.domain_subsets`` also among out-of-domain pairs only (the model
   never trained on the case's site) and among the negative-control sites' pairs
   (``cohort.control_sites``: held-out sites without an injected shift).
3. **Within each site** AUROC where the site has both failed and good pairs.
4. **The label-free site ranking** uses the same number of pairs per site (a seeded
   subsample), the median and a case-bootstrap interval.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from fedct.analysis.metrics import failure_auroc, spearman
from fedct.analysis.stats import (
    aurc,
    cluster_bootstrap,
    relative_failure_threshold,
    risk_coverage,
)
from fedct.data.cases import POOLED


def calibration_split(cases: pd.DataFrame) -> str:
    """``calib`` when the cohort has labelled calibration pairs, else ``val``.

    ``val`` (used for checkpoint selection) is only a fallback for cohorts too small to
    spare calibration patients (the tiny test archive); the stage warns and records it.
    """
    calib = cases[(cases["split"] == "calib")].dropna(subset=["dice"])
    return "calib" if (calib["model"] == calib["site"]).any() else "val"


def in_domain_calibration_dice(cases: pd.DataFrame, split: str = "calib") -> pd.Series:
    """Dice of each local model on its own site's calibration cases."""
    calib = cases[(cases["split"] == split) & (cases["model"] == cases["site"])]
    return calib["dice"].dropna()


def failure_threshold(cases: pd.DataFrame, percentile: float, split: str = "calib") -> float:
    """The Dice below which a pair has failed (``percentile`` of in-domain calib Dice)."""
    return relative_failure_threshold(in_domain_calibration_dice(cases, split), percentile)


#: The trivial "held-out site" flag (``uncertainty.heldout_flag``): 1 for a pair whose case
#: comes from a held-out site, else 0. No image, no model: what a site label alone scores.
HELDOUT_FLAG = "heldout_site"
#: Names of the extra subsets of ``uncertainty.domain_subsets``.
OUT_OF_DOMAIN, CONTROLS = "out_of_domain", "controls"


def heldout_flag(pairs: pd.DataFrame) -> pd.Series:
    """The held-out-site flag of each pair (``role`` of its case), as a score."""
    return (pairs["role"] == "holdout").astype(float)


def out_of_domain(pairs: pd.DataFrame) -> pd.Series:
    """Pairs whose model never trained on the case's site: a local model on another site,
    the pooled model on a held-out site."""
    model, site = pairs["model"].astype(str), pairs["site"].astype(str)
    return (model != site) & ~((model == POOLED) & (pairs["role"] == "train"))


def subsets(test: pd.DataFrame, worst: str, domain_subsets: bool = False,
            control_sites: tuple[str, ...] = ()) -> dict[str, pd.Series]:
    """The subsets of ``signal_table``: ``all`` and ``without_<worst>``; with
    ``domain_subsets`` also ``out_of_domain`` and (given control sites) ``controls``."""
    out = {"all": pd.Series(True, index=test.index), f"without_{worst}": test["site"] != worst}
    if domain_subsets:
        out[OUT_OF_DOMAIN] = out_of_domain(test)
        if control_sites:
            out[CONTROLS] = test["site"].astype(str).isin(control_sites)
    return out


def most_shifted_site(test: pd.DataFrame) -> str:
    """The site with the most failed test pairs (ties: the lower mean Dice)."""
    per = test.groupby("site").agg(n_failed=("failed", "sum"), dice=("dice", "mean"))
    return str(per.sort_values(["n_failed", "dice"], ascending=[False, True]).index[0])


def _auroc_interval(pairs: pd.DataFrame, signal: str, n_boot: int, seed: int
                    ) -> tuple[float, float, float]:
    frame = pairs[["site", "series_key", signal, "failed"]]
    if frame["failed"].nunique() < 2:
        return float("nan"), float("nan"), float("nan")
    est, lo, hi = cluster_bootstrap(
        frame, lambda f: failure_auroc(f[signal], f["failed"]), ("site",), "series_key",
        n_boot=n_boot, seed=seed)
    return est, lo, hi


def signal_table(test: pd.DataFrame, structures: pd.DataFrame | None,
                 kinds: dict[str, str], subsets: dict[str, pd.Series], n_boot: int,
                 seed: int) -> pd.DataFrame:
    """One row per (signal, level, subset): spearman, auroc [lo, hi], aurc, counts.

    ``test``: case-level test pairs with ``dice``, ``failed`` and a column per signal;
    ``structures``: structure-level rows (uncertainty signals only; intervals there are
    left out, the case level is the protocol's unit); ``kinds``: signal -> ``uncertainty``
    or ``baseline``; ``subsets``: name -> boolean mask over ``test`` rows.
    """
    rows = []
    for subset, mask in subsets.items():
        pairs = test[mask]
        for signal, kind in kinds.items():
            auroc, lo, hi = _auroc_interval(pairs, signal, n_boot, seed)
            rows.append({"signal": signal, "kind": kind, "level": "case", "subset": subset,
                         "n": len(pairs), "n_failed": int(pairs["failed"].sum()),
                         "spearman": spearman(pairs[signal], pairs["dice"]),
                         "auroc": auroc, "auroc_lo": lo, "auroc_hi": hi,
                         "aurc": aurc(pairs[signal], pairs["failed"])})
        if structures is None:
            continue
        keep = structures["series_key"].isin(pairs["series_key"])
        s = structures[keep]
        for signal, kind in kinds.items():
            if signal not in s:
                continue
            rows.append({"signal": signal, "kind": kind, "level": "structure",
                         "subset": subset, "n": len(s), "n_failed": int(s["failed"].sum()),
                         "spearman": spearman(s[signal], s["dice"]),
                         "auroc": failure_auroc(s[signal], s["failed"]),
                         "auroc_lo": float("nan"), "auroc_hi": float("nan"),
                         "aurc": aurc(s[signal], s["failed"])})
    return pd.DataFrame(rows)


def within_site(test: pd.DataFrame, kinds: dict[str, str]) -> pd.DataFrame:
    """AUROC of every signal within each site that has failed and good test pairs."""
    rows = []
    for site, g in test.groupby("site"):
        if g["failed"].nunique() < 2:
            continue
        for signal, kind in kinds.items():
            rows.append({"site": site, "signal": signal, "kind": kind, "n": len(g),
                         "n_failed": int(g["failed"].sum()),
                         "auroc": failure_auroc(g[signal], g["failed"]),
                         "aurc": aurc(g[signal], g["failed"])})
    return pd.DataFrame(rows, columns=["site", "signal", "kind", "n", "n_failed", "auroc",
                                       "aurc"])


def risk_coverage_table(test: pd.DataFrame, kinds: dict[str, str]) -> pd.DataFrame:
    """Risk-coverage curve of every signal (columns signal, kind, coverage, risk)."""
    parts = [risk_coverage(test[s], test["failed"]).assign(signal=s, kind=k)
             for s, k in kinds.items()]
    return pd.concat(parts, ignore_index=True)[["signal", "kind", "coverage", "risk",
                                                "threshold"]]


def balanced_site_ranking(test: pd.DataFrame, signal: str, seed: int, n_boot: int
                          ) -> pd.DataFrame:
    """Sites ranked by the median label-free signal of models that never saw them.

    Each site contributes the same number of (model, case) pairs: a seeded subsample of
    the smallest site's count, so a site with more cases or more foreign models does not
    weigh more. Pooled and the site's own model are left out. Columns: site, rank,
    median, lo, hi (95 % case-bootstrap interval of the median), n_pairs.
    """
    foreign = test[(test["model"] != POOLED) & (test["model"] != test["site"])]
    if foreign.empty:
        return pd.DataFrame(columns=["site", "rank", "median", "lo", "hi", "n_pairs"])
    n = int(foreign.groupby("site").size().min())
    rng = np.random.default_rng(seed)
    rows = []
    for site, g in foreign.groupby("site", sort=True):
        g = g.sort_values(["model", "series_key"])
        pick = g.iloc[np.sort(rng.choice(len(g), size=n, replace=False))]
        med = float(np.median(pick[signal].to_numpy(dtype=float)))
        _, lo, hi = cluster_bootstrap(
            pick[["series_key", signal]],
            lambda f: float(np.median(f[signal].to_numpy(dtype=float))), (), "series_key",
            n_boot=n_boot, seed=seed)
        rows.append({"site": site, "median": med, "lo": lo, "hi": hi, "n_pairs": n})
    r = pd.DataFrame(rows).sort_values(["median", "hi"], ascending=False).reset_index(
        drop=True)
    r.insert(1, "rank", np.arange(1, len(r) + 1))
    return r
