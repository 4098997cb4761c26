"""Failure detection and shift tables: aggregation, shift matrices, label-free site ranking."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from fedct.analysis.failure import (
    SIGNALS,
    aggregate_cases,
    calibrate_threshold,
    case_records,
)
from fedct.analysis.shift import shift_matrices, site_ranking, site_ranks
from fedct.data.labels import LabelSet

LABELS = LabelSet(("background", "femur_left", "femur_right", "gluteus_maximus_left"))
N_CLASSES = LABELS.n_classes


def _cases() -> pd.DataFrame:
    rows = []
    for model in ("A", "B", "pooled"):
        for site in ("A", "B", "G"):
            shifted = site == "G"
            own = model == site
            dice = 0.9 if own else (0.3 if shifted else 0.75)
            unc = 0.1 if own else (0.8 if shifted else 0.3)
            rows.append({"model": model, "site": site, "series_key": f"{site}1", "split": "test",
                         "role": "holdout" if shifted else "train", "dice": dice, "hd95": 1.0,
                         **dict.fromkeys(SIGNALS, unc)})
    return pd.DataFrame(rows)


def test_site_ranking_uses_no_labels_and_skips_own_models() -> None:
    cases = _cases()
    ranking = site_ranking(cases.drop(columns=["dice"]), "variance")
    assert ranking.iloc[0]["site"] == "G"
    # Site A is only scored by model B: its own model's confidence must not count.
    assert ranking.set_index("site").loc["A", "count"] == 1


def test_shift_matrix_layout() -> None:
    dice, unc = shift_matrices(_cases(), "entropy")
    assert dice.loc["A", "A"] == 0.9 and dice.loc["A", "G"] == 0.3
    assert list(dice.columns) == ["A", "B", "G"]
    assert unc.loc["B", "G"] == 0.8


def test_case_records_and_aggregation() -> None:
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(3, N_CLASSES, 8, 8, 4, generator=gen), dim=1)
    label = probs.mean(0).argmax(0).numpy()[None].astype(np.uint8)
    case = pd.Series({"site": "A", "series_key": "k", "split": "test", "role": "train"})
    rows = pd.DataFrame(case_records("A", case, probs, label, [1.0] * (N_CLASSES - 1),
                                     (1.0, 1.0, 1.0), LABELS))
    assert list(rows["structure"]) == list(LABELS.names[1:])
    present = rows["dice"].notna()
    assert np.allclose(rows.loc[present, "dice"], 1.0)  # label = the prediction
    agg = aggregate_cases(rows)
    assert len(agg) == 1
    assert agg["variance"].iloc[0] == pytest.approx(rows["variance"].mean(), rel=1e-12)


def test_threshold_from_validation_failures_or_in_domain_quantile() -> None:
    scores = pd.Series([0.1, 0.2, 0.3, 0.8, 0.9, 0.85, 0.95, 0.7])
    failed = pd.Series([False, False, False, True, True, True, True, True])
    threshold, rule = calibrate_threshold(scores, failed, None, 5, 0.95)
    assert rule == "youden" and threshold == 0.7
    # Too few failures to fit on: flag what is less familiar than 95 % of the in-domain
    # pairs; cross-site pairs (the 9.0 below) must not widen what counts as familiar.
    quiet = pd.Series([*np.linspace(0.0, 1.0, 101), 9.0])
    in_domain = pd.Series([True] * 101 + [False])
    one_failure = pd.Series([False] * 101 + [True])
    threshold, rule = calibrate_threshold(quiet, one_failure, in_domain, 5, 0.95)
    assert rule == "in_domain_quantile_0.95" and threshold == pytest.approx(0.95)
    # Both halves of the rule come from params: 5 failures are too few for a minimum of 6,
    # and the quantile moves the threshold.
    threshold, rule = calibrate_threshold(scores, failed, None, 6, 0.5)
    assert rule == "in_domain_quantile_0.5" and threshold == 0.8  # median of all 8, "higher"
    threshold, rule = calibrate_threshold(quiet, one_failure, in_domain, 5, 0.9)
    assert rule == "in_domain_quantile_0.9" and threshold == pytest.approx(0.9)
    # A structure never predicted scores +inf and stays the worst score, never dropped.
    threshold, _ = calibrate_threshold(pd.Series([np.inf, 0.2, 0.4]), pd.Series([False] * 3),
                                       None, 5, 0.95)
    assert threshold == np.inf


def test_site_with_a_missing_structure_ranks_first() -> None:
    cases = _cases()
    cases.loc[(cases["site"] == "B") & (cases["model"] == "A"), "entropy"] = np.inf
    assert site_ranking(cases, "entropy").iloc[0]["site"] == "B"


def test_site_ranks_cover_every_signal() -> None:
    cases = _cases()
    cases["entropy"] = np.where(cases["site"] == "A", 0.9, 0.1)  # entropy disagrees
    ranks = site_ranks(cases)
    assert list(ranks.columns) == list(SIGNALS)
    assert ranks.loc["G", "variance"] == 1 and ranks.loc["A", "entropy"] == 1


def test_a_missing_structure_scores_the_worst_value_and_ranks_by_how_many() -> None:
    """case_records caps bounded signals at their worst value instead of +inf, so a case
    missing one structure scores below one missing two, and case means stay finite."""
    from fedct.analysis.failure import SIGNAL_WORST

    def probs_missing(n_missing: int) -> torch.Tensor:
        p = torch.full((4, N_CLASSES, 8, 8, 4), 0.01)
        p[:, 0] = 1.0
        for k in range(1, N_CLASSES - n_missing):  # predicted structures: a block each
            p[:, :, 2 * k - 2:2 * k, :, :] = 0.01
            p[:, k, 2 * k - 2:2 * k, :, :] = 0.97
        return p / p.sum(1, keepdim=True)

    case = pd.Series({"site": "A", "series_key": "k", "split": "test", "role": "train"})
    scores = {}
    for n in (1, 2):
        rows = pd.DataFrame(case_records("A", case, probs_missing(n), None, [1.0] * 3,
                                         (1.0, 1.0, 1.0), LABELS))
        for signal, worst in SIGNAL_WORST.items():
            values = rows[signal].to_numpy()
            assert np.isfinite(values).all(), signal
            assert (values[-n:] == pytest.approx(worst(N_CLASSES))), signal
        assert np.isinf(rows["volume_deviation"].to_numpy()[-1])  # unbounded: stays +inf
        scores[n] = aggregate_cases(rows)["sample_disagreement"].iloc[0]
    assert scores[1] < scores[2]
