"""Risk-coverage, AURC, relative failure thresholds and the cluster bootstrap."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from fedct.analysis.metrics import failure_auroc
from fedct.analysis.stats import (
    DRAW_COL,
    aurc,
    cluster_bootstrap,
    e_aurc,
    failure_sweep,
    paired_difference,
    relative_failure_threshold,
    risk_coverage,
)

# --- risk-coverage and AURC ----------------------------------------------------------------


def test_risk_coverage_by_hand_distinct_scores() -> None:
    # Ascending scores keep failed flags 0, 1, 0, 1: risks 0/1, 1/2, 1/3, 2/4.
    curve = risk_coverage([0.4, 0.1, 0.3, 0.2], [True, False, False, True])
    np.testing.assert_allclose(curve["coverage"], [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(curve["risk"], [0.0, 1 / 2, 1 / 3, 1 / 2])
    np.testing.assert_allclose(curve["threshold"], [0.1, 0.2, 0.3, 0.4])


def test_risk_coverage_by_hand_ties_and_inf() -> None:
    # Blocks {0.1}, {0.2, 0.2}, {inf, inf}: only block ends k = 1, 3, 5 appear.
    scores = [np.inf, 0.2, 0.1, 0.2, np.inf]
    failed = [True, True, False, False, False]
    curve = risk_coverage(scores, failed)
    np.testing.assert_allclose(curve["coverage"], [0.2, 0.6, 1.0])
    np.testing.assert_allclose(curve["risk"], [0.0, 1 / 3, 2 / 5])
    assert curve["threshold"].tolist() == [0.1, 0.2, np.inf]


def test_aurc_and_e_aurc_by_hand() -> None:
    scores, failed = [0.1, 0.2, 0.3, 0.4], [False, True, False, True]
    # Mean of risks (0 + 1/2 + 1/3 + 1/2) / 4; oracle (0 + 0 + 1/3 + 1/2) / 4 = 5/24.
    assert aurc(scores, failed) == pytest.approx(1 / 3)
    assert e_aurc(scores, failed) == pytest.approx(1 / 3 - 5 / 24)
    # Worst ranking: failures first, risks 1, 1, 2/3, 1/2.
    assert aurc(scores, [True, True, False, False]) == pytest.approx(19 / 24)


def test_aurc_ties_use_block_end_risk() -> None:
    # Blocks {0.1}, {0.2, 0.2}, {0.5}: risks 0 (k=1), 1/3 for k = 2 and 3, 1/2 (k=4).
    assert aurc([0.1, 0.2, 0.2, 0.5], [False, True, False, True]) == pytest.approx(7 / 24)
    # The failure at +inf ties with a good case: risks 0, 0, 1/2, 1/2.
    assert aurc([0.1, np.inf, 0.3, np.inf], [False, True, False, True]) == pytest.approx(1 / 4)
    # A constant score carries no information: AURC is exactly the failure rate.
    assert aurc(np.ones(7), [1, 0, 0, 1, 0, 0, 0]) == pytest.approx(2 / 7)


def _naive_curve(scores: np.ndarray, failed: np.ndarray) -> pd.DataFrame:
    """Reference: for each distinct threshold, keep ``score <= t`` and count failures."""
    rows = []
    for t in np.unique(scores):
        kept = scores <= t
        rows.append((kept.mean(), failed[kept].mean(), t))
    return pd.DataFrame(rows, columns=["coverage", "risk", "threshold"])


def test_risk_coverage_is_invariant_to_row_order_under_ties() -> None:
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 6, size=60).astype(float)  # many ties
    scores[:4] = np.inf
    failed = rng.random(60) < 0.3 + 0.08 * np.minimum(scores, 5)
    reference = _naive_curve(scores, failed)
    pd.testing.assert_frame_equal(risk_coverage(scores, failed), reference)
    expected = aurc(scores, failed)
    for _ in range(5):
        perm = rng.permutation(60)
        pd.testing.assert_frame_equal(risk_coverage(scores[perm], failed[perm]), reference)
        assert aurc(scores[perm], failed[perm]) == pytest.approx(expected, abs=1e-15)


def test_perfect_ranking_reaches_the_oracle() -> None:
    n, m = 10, 3
    failed = np.arange(n) >= n - m
    scores = np.linspace(0.0, 1.0, n)  # every failure strictly above every good case
    oracle = sum((k - (n - m)) / k for k in range(n - m + 1, n + 1)) / n
    assert aurc(scores, failed) == pytest.approx(oracle)
    assert e_aurc(scores, failed) == pytest.approx(0.0, abs=1e-15)
    assert e_aurc(scores[::-1], failed) > 0.3  # reversed ranking is far from it


def test_random_signal_aurc_is_about_the_failure_rate() -> None:
    rng = np.random.default_rng(0)
    failed = rng.random(20000) < 0.2
    scores = rng.random(20000)
    assert aurc(scores, failed) == pytest.approx(failed.mean(), abs=0.01)
    assert e_aurc(scores, failed) > 0.05


def test_nan_scores_raise_and_lengths_must_match() -> None:
    with pytest.raises(ValueError, match="NaN"):
        aurc([0.1, np.nan], [True, False])
    with pytest.raises(ValueError, match="NaN"):
        risk_coverage([np.nan], [True])
    with pytest.raises(ValueError, match="one failure flag per score"):
        aurc([0.1, 0.2], [True])
    with pytest.raises(ValueError, match="at least one case"):
        aurc([], [])


# --- relative failure ----------------------------------------------------------------------


def test_relative_failure_threshold_by_hand() -> None:
    in_domain = [0.9, 0.5, np.nan, 0.7, 0.6, 0.8]  # NaN (nothing to score) is dropped
    assert relative_failure_threshold(in_domain, 25) == pytest.approx(0.6)
    assert relative_failure_threshold(in_domain, 10) == pytest.approx(0.54)
    with pytest.raises(ValueError, match="percentile"):
        relative_failure_threshold(in_domain, 120)
    with pytest.raises(ValueError, match="no in-domain Dice"):
        relative_failure_threshold([np.nan], 5)


def test_failure_sweep_by_hand() -> None:
    in_domain = [0.5, 0.6, 0.7, 0.8, 0.9]
    dice = [0.55, 0.65, 0.75, 0.85, np.nan]  # the NaN case is dropped
    scores = [4.0, 3.0, 2.0, 1.0, 0.0]
    sweep = failure_sweep(dice, scores, in_domain, percentiles=(10, 25, 50))
    np.testing.assert_allclose(sweep["threshold"], [0.54, 0.6, 0.7])
    assert sweep["n"].tolist() == [4, 4, 4]
    assert sweep["n_failed"].tolist() == [0, 1, 2]
    assert math.isnan(sweep["auroc"][0])
    np.testing.assert_allclose(sweep["auroc"][1:], [1.0, 1.0])
    # 50th: failed flags by ascending score 0, 0, 1, 1 -> risks 0, 0, 1/3, 1/2.
    np.testing.assert_allclose(sweep["aurc"], [0.0, 1 / 16, 5 / 24])
    np.testing.assert_allclose(sweep["e_aurc"], [0.0, 0.0, 0.0], atol=1e-15)


def test_failure_sweep_is_monotone_and_uses_failure_auroc() -> None:
    rng = np.random.default_rng(1)
    in_domain = rng.beta(20, 3, size=200)
    dice = rng.beta(8, 3, size=300)
    scores = -dice + rng.normal(0, 0.1, size=300)
    sweep = failure_sweep(dice, scores, in_domain)
    assert sweep["percentile"].tolist() == [1, 2.5, 5, 10, 20]
    assert (np.diff(sweep["threshold"]) > 0).all()
    assert (np.diff(sweep["n_failed"]) >= 0).all() and sweep["n_failed"].iloc[-1] > 0
    for _, row in sweep.iterrows():
        expected = failure_auroc(scores, dice < row["threshold"])
        assert row["auroc"] == pytest.approx(expected)
        assert row["auroc"] > 0.7  # scores track Dice, so detection is informative


# --- cluster bootstrap ---------------------------------------------------------------------


def _sites_frame(site_means: list[float], n_cases: int = 40, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = [{"site": f"s{i}", "case": f"s{i}c{j}", "dice": mu + rng.normal(0, 0.05)}
            for i, mu in enumerate(site_means) for j in range(n_cases)]
    return pd.DataFrame(rows)


def _mean_dice(frame: pd.DataFrame) -> float:
    return float(frame["dice"].mean())


def test_bootstrap_is_deterministic_and_contains_the_estimate() -> None:
    frame = _sites_frame([0.8] * 6)
    first = cluster_bootstrap(frame, _mean_dice, n_boot=300, seed=7)
    again = cluster_bootstrap(frame, _mean_dice, n_boot=300, seed=7)
    other = cluster_bootstrap(frame, _mean_dice, n_boot=300, seed=8)
    assert first == again
    assert (first.lo, first.hi) != (other.lo, other.hi)
    assert first.estimate == pytest.approx(frame["dice"].mean())
    assert first.lo < first.estimate < first.hi


def test_bootstrap_does_not_depend_on_row_order() -> None:
    frame = _sites_frame([0.8, 0.7, 0.9], n_cases=15)
    shuffled = frame.sample(frac=1.0, random_state=4)
    a = cluster_bootstrap(frame, _mean_dice, n_boot=200, seed=1)
    b = cluster_bootstrap(shuffled, _mean_dice, n_boot=200, seed=1)
    np.testing.assert_allclose(a, b, rtol=1e-12)


def _width(frame: pd.DataFrame, cluster_cols: tuple[str, ...]) -> float:
    ci = cluster_bootstrap(frame, _mean_dice, cluster_cols=cluster_cols, n_boot=400, seed=0)
    return ci.hi - ci.lo


def test_site_clustering_widens_the_interval_when_sites_disagree() -> None:
    disagree = _sites_frame([0.8, 0.8, 0.8, 0.8, 0.3, 0.3])
    assert _width(disagree, ("site",)) > 3.0 * _width(disagree, ())
    # Control: with exchangeable sites the gap is only the known two-stage inflation
    # (within-site variance counted twice: width x sqrt(2) in theory), so the factor above
    # comes from the between-site spread, not from the scheme itself.
    agree = _sites_frame([0.8] * 6)
    assert 1.1 < _width(agree, ("site",)) / _width(agree, ()) < 1.8


def test_all_rows_of_a_case_move_together() -> None:
    # Three rows (models) per case; uneven site sizes so drawn sites are recognisable.
    sizes = {"A": 3, "B": 5, "C": 8}
    rows = [{"site": s, "case": f"{s}{j}", "model": m, "value": float(j)}
            for s, n in sizes.items() for j in range(n) for m in ("fed", "local", "pooled")]
    frame = pd.DataFrame(rows)
    max_copies: list[int] = []

    def consistent(f: pd.DataFrame) -> float:
        by_draw = f.groupby(DRAW_COL)
        distinct = by_draw[["model", "case", "site"]].nunique()
        whole = bool((by_draw.size() == 3).all() and (distinct["model"] == 3).all()
                     and (distinct[["case", "site"]] == 1).all().all())
        draws_per_site = f.groupby("site")[DRAW_COL].nunique()
        # A drawn site brings as many case draws as it has cases (a multiple if drawn twice).
        whole_sites = all(draws_per_site[s] % sizes[s] == 0 for s in draws_per_site.index)
        max_copies.append(int(f.groupby("case")[DRAW_COL].nunique().max()))
        return float(whole and whole_sites)

    assert cluster_bootstrap(frame, consistent, n_boot=60, seed=2) == (1.0, 1.0, 1.0)
    assert max(max_copies) >= 2  # cases really are drawn with replacement


def test_plain_case_bootstrap_draws_every_case_count() -> None:
    frame = _sites_frame([0.8, 0.6], n_cases=10)
    counts: list[int] = []

    def n_draws(f: pd.DataFrame) -> float:
        counts.append(f[DRAW_COL].nunique())
        return float(f["site"].eq("s0").mean())

    ci = cluster_bootstrap(frame, n_draws, cluster_cols=(), n_boot=100, seed=0)
    assert set(counts) == {20}
    assert ci.lo < 0.5 < ci.hi  # site shares vary: cases are drawn across sites


def test_nan_resamples_are_skipped_or_raise() -> None:
    frame = _sites_frame([0.8] * 6, n_cases=5)

    def needs_s0(f: pd.DataFrame) -> float:  # NaN when s0 was not drawn: p = (5/6)^6 ~ 1/3
        return _mean_dice(f) if (f["site"] == "s0").any() else float("nan")

    with pytest.warns(RuntimeWarning, match="skipped"):
        ci = cluster_bootstrap(frame, needs_s0, n_boot=300, seed=0)
    assert ci.lo < ci.estimate < ci.hi

    def lacks_s0(f: pd.DataFrame) -> float:
        # Defined on the full frame (all 6 sites); NaN in the ~65 % of resamples that
        # drew s0 but not all six sites.
        defined = (f["site"] != "s0").all() or f["site"].nunique() == 6
        return _mean_dice(f) if defined else float("nan")

    with pytest.raises(ValueError, match="NaN in"):
        cluster_bootstrap(frame, lacks_s0, n_boot=300, seed=0)


def test_bootstrap_rejects_bad_frames() -> None:
    frame = _sites_frame([0.8, 0.7], n_cases=3)
    split = frame.assign(case=frame["case"].str[-2:])  # "c0" now lies in both sites
    with pytest.raises(ValueError, match="several"):
        cluster_bootstrap(split, _mean_dice)
    with pytest.raises(ValueError, match=DRAW_COL):
        cluster_bootstrap(frame.assign(**{DRAW_COL: 0}), _mean_dice)


# --- paired difference ---------------------------------------------------------------------


def test_paired_difference_weighs_cases_equally() -> None:
    frame = pd.DataFrame({
        "site": ["A", "A", "A", "B", "B", "B"],
        "case": ["c1", "c1", "c2", "c3", "c3", "c3"],
        "fed": [0.7, 0.9, 0.4, 0.5, 0.5, 0.9],
        "local": [0.5, 0.5, 0.5, 0.5, 0.5, 0.3],
    })
    # Per case: c1 (0.2 + 0.4) / 2, c2 -0.1, c3 (0 + 0 + 0.6) / 3; a row mean would be 1.1/6.
    ci = paired_difference(frame, "fed", "local", n_boot=200)
    assert ci.estimate == pytest.approx((0.3 - 0.1 + 0.2) / 3)


def test_paired_difference_detects_a_consistent_gain() -> None:
    frame = _sites_frame([0.8, 0.7, 0.75, 0.85, 0.6, 0.9], n_cases=20)
    rng = np.random.default_rng(5)
    frame["fed"] = frame["dice"] + 0.03 + rng.normal(0, 0.02, len(frame))
    ci = paired_difference(frame, "fed", "dice", n_boot=300)
    assert 0.0 < ci.lo < ci.estimate < ci.hi
    assert ci.estimate == pytest.approx(0.03, abs=0.01)
    with pytest.raises(ValueError, match="NaN"):
        paired_difference(frame.assign(fed=np.nan), "fed", "dice")
