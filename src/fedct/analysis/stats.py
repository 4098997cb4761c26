"""Failure-detection evaluation: risk-coverage, AURC, relative failure and cluster bootstrap.

Pure functions, no I/O. ``scores`` are per-case failure scores (higher = more likely
failed; ``+inf`` allowed, NaN raises) and ``failed`` the matching booleans, both 1-D of
length n. Tables are long pandas frames with one row per (case, ...) and a case column.

Definitions (Geifman & El-Yaniv 2018; Zenk et al. 2025):

- A selective model keeps the cases with ``score <= t`` (most confident first). Coverage
  is the kept fraction k/n, risk the fraction of failures among the kept cases.
- Ties: cases with equal scores cannot be separated by any threshold, so a tied block is
  kept or dropped as a whole and the curve is evaluated only at block ends; the result
  does not depend on input order.
- AURC is the mean of risk over the coverages k/n, k = 1..n; a k inside a tied block
  takes the risk at the block's end (the operating point a threshold can reach). So a
  constant score gives AURC = failure rate, as does a random one in expectation.
- The oracle AURC ranks every good case before every failure: exact discrete sum,
  not the continuous ``r + (1 - r) ln(1 - r)`` approximation. E-AURC = AURC - oracle.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd

# One NaN rule for the package: NaN scores raise, +inf is the worst score.
from fedct.analysis.metrics import failure_auroc, scores_and_labels

ArrayLike = np.ndarray | pd.Series | Sequence[float]

#: Column the bootstrap adds: one id per drawn case instance (a case drawn twice gets two
#: ids), so a statistic that groups by case must group by this, not by the case column.
DRAW_COL = "draw_id"


class Interval(NamedTuple):
    """Point estimate on the full data and its percentile bootstrap interval."""

    estimate: float
    lo: float
    hi: float


# --- risk-coverage -------------------------------------------------------------------------


def _blocks(scores: ArrayLike, failed: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """At each tie-block end (ascending score): cases kept k, failures kept, score there."""
    s, f = scores_and_labels(scores, failed)
    if s.size == 0:
        raise ValueError("need at least one case")
    order = np.argsort(s, kind="stable")
    s, f = s[order], f[order]
    end = np.append(s[1:] != s[:-1], True)  # inf == inf, so +inf cases form one block
    return np.flatnonzero(end) + 1, np.cumsum(f)[end], s[end]


def risk_coverage(scores: ArrayLike, failed: ArrayLike) -> pd.DataFrame:
    """Risk-coverage curve, one row per distinct score (tie-block end), ascending coverage.

    Args:
        scores: ``(n,)`` failure scores, higher = less confident; ``+inf`` allowed.
        failed: ``(n,)`` booleans, True where the case failed.

    Returns:
        Columns ``coverage`` (k/n), ``risk`` (failures / k among the k kept cases) and
        ``threshold`` (keeping ``score <= threshold`` gives that coverage).

    Raises:
        ValueError: on NaN scores, mismatched lengths or no cases.
    """
    k, n_fail, thr = _blocks(scores, failed)
    return pd.DataFrame({"coverage": k / k[-1], "risk": n_fail / k, "threshold": thr})


def aurc(scores: ArrayLike, failed: ArrayLike) -> float:
    """Area under the risk-coverage curve: mean risk over coverages k/n, k = 1..n.

    Every k inside a tied block takes the block-end risk (see the module docstring).
    In [0, 1]; lower is better; a constant or random score gives about the failure rate.
    Same inputs and errors as ``risk_coverage``.
    """
    k, n_fail, _ = _blocks(scores, failed)
    block_size = np.diff(k, prepend=0)
    return float(np.sum(block_size * n_fail / k) / k[-1])


def _oracle_aurc(n: int, n_failed: int) -> float:
    # Good cases first: risk 0 up to k = n - m, then (k - (n - m)) / k.
    k = np.arange(n - n_failed + 1, n + 1, dtype=np.float64)
    return float(np.sum((k - (n - n_failed)) / k) / n)


def e_aurc(scores: ArrayLike, failed: ArrayLike) -> float:
    """Excess AURC: ``aurc`` minus the AURC of a perfect ranking with the same failures.

    0 for a perfect ranking (failures strictly above every good case); removes the part
    of AURC that only reflects the failure rate, so sets with different rates compare.
    """
    s, f = scores_and_labels(scores, failed)
    return aurc(s, f) - _oracle_aurc(s.size, int(f.sum()))


# --- failure relative to in-domain performance ----------------------------------------------


def relative_failure_threshold(in_domain_dice: ArrayLike, percentile: float = 5.0) -> float:
    """Dice below which a case counts as failed: a percentile of in-domain calibration Dice.

    Args:
        in_domain_dice: ``(m,)`` Dice of in-domain calibration cases; NaN (nothing to
            score) is dropped.
        percentile: in [0, 100]; ``np.percentile`` with linear interpolation.

    Failure is then ``dice < threshold`` (strict), so about ``percentile`` % of in-domain
    cases fail by construction and a shifted site fails relative to what the model does
    at home rather than against a fixed Dice.
    """
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}")
    d = np.asarray(in_domain_dice, dtype=np.float64).ravel()
    d = d[~np.isnan(d)]
    if d.size == 0:
        raise ValueError("no in-domain Dice to calibrate the failure threshold on")
    return float(np.percentile(d, percentile))


def failure_sweep(
    dice: ArrayLike,
    scores: ArrayLike,
    in_domain_dice: ArrayLike,
    percentiles: Sequence[float] = (1, 2.5, 5, 10, 20),
) -> pd.DataFrame:
    """Failure-detection quality as the failure definition varies, one row per percentile.

    Args:
        dice: ``(n,)`` Dice of the evaluated cases; cases with NaN Dice are dropped.
        scores: ``(n,)`` their failure scores (NaN raises, ``+inf`` allowed).
        in_domain_dice: calibration Dice for ``relative_failure_threshold``.
        percentiles: in-domain percentiles defining failure.

    Returns:
        Columns ``percentile, threshold, n, n_failed, failure_rate, auroc`` (NaN when only
        one class), ``aurc`` and ``e_aurc``.
    """
    d = np.asarray(dice, dtype=np.float64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if d.shape != s.shape:
        raise ValueError(f"need one score per Dice, got {s.size} and {d.size}")
    keep = ~np.isnan(d)
    d, s = d[keep], s[keep]
    rows = []
    for p in percentiles:
        thr = relative_failure_threshold(in_domain_dice, p)
        failed = d < thr
        rows.append({"percentile": float(p), "threshold": thr, "n": d.size,
                     "n_failed": int(failed.sum()), "failure_rate": float(failed.mean()),
                     "auroc": failure_auroc(s, failed), "aurc": aurc(s, failed),
                     "e_aurc": e_aurc(s, failed)})
    return pd.DataFrame(rows)


# --- cluster bootstrap ---------------------------------------------------------------------


def _resample(base: pd.DataFrame, cases: np.ndarray, row_start: np.ndarray,
              rows_per_case: np.ndarray) -> pd.DataFrame:
    """All rows of each drawn case (cases' rows are contiguous in ``base``), with draw ids."""
    counts = rows_per_case[cases]
    ends = np.cumsum(counts)
    offsets = np.arange(ends[-1]) - np.repeat(ends - counts, counts)
    out = base.take(np.repeat(row_start[cases], counts) + offsets)
    out.index = pd.RangeIndex(ends[-1])  # cheaper than reset_index, which copies again
    out[DRAW_COL] = np.repeat(np.arange(cases.size), counts)
    return out


def cluster_bootstrap(
    frame: pd.DataFrame,
    statistic: Callable[[pd.DataFrame], float],
    cluster_cols: Sequence[str] = ("site",),
    case_col: str = "case",
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> Interval:
    """Two-stage cluster bootstrap with a percentile interval.

    Each resample draws as many clusters (distinct values of ``cluster_cols``) as there
    are, with replacement, then within each drawn cluster as many of its cases as it has,
    with replacement; every row of a drawn case comes along (e.g. one row per model or
    structure). ``cluster_cols=()`` makes one cluster of everything: a plain case bootstrap.

    Args:
        frame: long table, one or more rows per case; a case must lie in one cluster.
        statistic: ``frame -> float`` on the full frame and on each resample. Resamples
            carry ``DRAW_COL`` (a case drawn twice has two ids, 0..cases-1) and a
            RangeIndex; group by ``DRAW_COL`` to work per case.
        n_boot, seed, alpha: resamples, ``np.random.default_rng`` seed, 1 - coverage.

    Returns:
        ``Interval(estimate, lo, hi)``: statistic of the full frame and the alpha/2 and
        1 - alpha/2 quantiles of the resampled statistics. Results do not depend on the
        order of the rows (clusters and cases are taken in sorted order).

    Resamples where the statistic is NaN (e.g. AUROC with one class) are skipped with a
    RuntimeWarning; this conditions the interval on the statistic being defined, so more
    than half NaN raises ValueError, as does a NaN estimate.
    """
    cols = list(cluster_cols)
    keys = [*cols, case_col]
    if DRAW_COL in frame.columns:
        raise ValueError(f"frame already has a column {DRAW_COL!r}, which the bootstrap adds")
    if frame.empty:
        raise ValueError("cluster_bootstrap needs a non-empty frame")
    if n_boot < 1 or not 0.0 < alpha < 1.0:
        raise ValueError(f"need n_boot >= 1 and 0 < alpha < 1, got {n_boot} and {alpha}")
    if frame[keys].isna().to_numpy().any():
        raise ValueError(f"cluster/case columns {keys} contain missing values")
    if cols and (frame.groupby(case_col)[cols].nunique() > 1).to_numpy().any():
        raise ValueError(f"some {case_col!r} values lie in several {cols} clusters")

    # Sort rows by (cluster, case) so each case's rows and each cluster's cases are
    # contiguous blocks that integer arithmetic can address.
    case_code = frame.groupby(keys, sort=True).ngroup().to_numpy()
    order = np.argsort(case_code, kind="stable")
    base = frame.iloc[order].reset_index(drop=True)
    case_code = case_code[order]
    # Full-frame draw ids are the case codes; resamples overwrite the column, which is
    # much cheaper than inserting a new one (pandas rebuilds the column index then).
    base[DRAW_COL] = case_code
    rows_per_case = np.bincount(case_code)
    row_start = np.cumsum(rows_per_case) - rows_per_case
    if cols:
        cluster_of_case = base.iloc[row_start].groupby(cols, sort=True).ngroup().to_numpy()
    else:
        cluster_of_case = np.zeros(row_start.size, dtype=np.int64)
    cases_per_cluster = np.bincount(cluster_of_case)
    case_start = np.cumsum(cases_per_cluster) - cases_per_cluster

    estimate = float(statistic(base.copy()))
    if np.isnan(estimate):
        raise ValueError("statistic is NaN on the full frame")

    rng = np.random.default_rng(seed)
    n_clusters = cases_per_cluster.size
    values = np.empty(n_boot)
    for b in range(n_boot):
        drawn = rng.integers(n_clusters, size=n_clusters)
        size = cases_per_cluster[drawn]
        cases = np.repeat(case_start[drawn], size) + rng.integers(np.repeat(size, size))
        values[b] = float(statistic(_resample(base, cases, row_start, rows_per_case)))

    ok = ~np.isnan(values)
    n_nan = n_boot - int(ok.sum())
    if 2 * n_nan > n_boot:
        raise ValueError(f"statistic is NaN in {n_nan} of {n_boot} resamples; "
                         "too few clusters or events for this statistic")
    if n_nan:
        warnings.warn(f"skipped {n_nan} of {n_boot} resamples where the statistic is NaN",
                      RuntimeWarning, stacklevel=2)
    lo, hi = np.quantile(values[ok], [alpha / 2.0, 1.0 - alpha / 2.0])
    return Interval(estimate, float(lo), float(hi))


def paired_difference(
    frame: pd.DataFrame,
    a_col: str,
    b_col: str,
    cluster_cols: Sequence[str] = ("site",),
    case_col: str = "case",
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> Interval:
    """Mean over cases of the per-case mean of ``a - b``, with a cluster-bootstrap interval.

    E.g. ``a_col="dice_federated"``, ``b_col="dice_local"`` on one row per (case,
    structure): each case weighs the same however many rows it has. NaN in either
    column raises (drop unscorable rows first). Other arguments as ``cluster_bootstrap``.
    """
    if frame[[a_col, b_col]].isna().to_numpy().any():
        raise ValueError(f"{a_col!r} or {b_col!r} contains NaN; drop those rows first")

    def mean_case_difference(f: pd.DataFrame) -> float:
        draw = f[DRAW_COL].to_numpy()
        diff = f[a_col].to_numpy(dtype=np.float64) - f[b_col].to_numpy(dtype=np.float64)
        return float(np.mean(np.bincount(draw, weights=diff) / np.bincount(draw)))

    return cluster_bootstrap(frame, mean_case_difference, cluster_cols, case_col,
                             n_boot=n_boot, seed=seed, alpha=alpha)
