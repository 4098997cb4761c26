"""The failure-detection protocol: relative failure, signal table, ranking, baselines."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from fedct.analysis import protocol
from fedct.analysis.baselines import (
    deterministic_max_softmax,
    header_rule,
    noise_estimate,
)


def _pairs(seed: int = 0, n_cases: int = 6) -> pd.DataFrame:
    """Models A, B, pooled on sites A, B, C (C shifted): calib and test cases."""
    rng = np.random.default_rng(seed)
    rows = []
    for site in ("A", "B", "C"):
        for split in ("calib", "test"):
            for c in range(n_cases):
                key = f"{site}-{split}-{c}"
                for model in ("A", "B", "pooled"):
                    home = model in (site, "pooled") and site != "C"
                    dice = rng.normal(0.9 if home else (0.5 if site == "C" else 0.8), 0.03)
                    rows.append({"model": model, "site": site, "series_key": key,
                                 "split": split, "role": "holdout" if site == "C" else "train",
                                 "dice": dice, "good": 1 - dice + rng.normal(0, 0.02),
                                 "noise": rng.random()})
    return pd.DataFrame(rows)


def test_failure_is_relative_to_in_domain_calibration_dice() -> None:
    pairs = _pairs()
    home = pairs[(pairs["split"] == "calib") & (pairs["model"] == pairs["site"])]["dice"]
    assert protocol.failure_threshold(pairs, 5.0) == pytest.approx(np.percentile(home, 5))
    # Test pairs and the pooled model do not move it.
    moved = pairs.copy()
    moved.loc[moved["split"] == "test", "dice"] = 0.0
    moved.loc[moved["model"] == "pooled", "dice"] = 0.0
    assert protocol.failure_threshold(moved, 5.0) == protocol.failure_threshold(pairs, 5.0)


def test_signal_table_contract_and_a_real_signal_beats_noise() -> None:
    pairs = _pairs()
    pairs["failed"] = pairs["dice"] < protocol.failure_threshold(pairs, 5.0)
    test = pairs[pairs["split"] == "test"]
    worst = protocol.most_shifted_site(test)
    assert worst == "C"
    subsets = {"all": pd.Series(True, index=test.index), "without_C": test["site"] != "C"}
    table = protocol.signal_table(test, None, {"good": "uncertainty", "noise": "baseline"},
                                  subsets, n_boot=200, seed=0)
    assert {"signal", "kind", "level", "subset", "spearman", "auroc", "auroc_lo",
            "auroc_hi", "aurc"} <= set(table.columns)
    assert set(table["subset"]) == {"all", "without_C"}
    good = table[(table["signal"] == "good") & (table["subset"] == "all")].iloc[0]
    noise = table[(table["signal"] == "noise") & (table["subset"] == "all")].iloc[0]
    assert good["auroc_lo"] <= good["auroc"] <= good["auroc_hi"]
    assert good["auroc"] > 0.9 > noise["auroc"]
    assert good["aurc"] < noise["aurc"]
    assert good["spearman"] < -0.8


def test_balanced_ranking_takes_equal_pairs_and_puts_the_shifted_site_first() -> None:
    pairs = _pairs()
    test = pairs[pairs["split"] == "test"].copy()
    test["signal"] = 1 - test["dice"]
    # Site A gets many extra confident foreign pairs: the balanced ranking ignores the excess.
    extra = test[(test["site"] == "A") & (test["model"] == "B")].assign(
        series_key=lambda d: d["series_key"] + "x", signal=0.0)
    ranked = protocol.balanced_site_ranking(pd.concat([test, extra]), "signal", 0, 200)
    assert list(ranked["site"])[0] == "C"
    assert ranked["n_pairs"].nunique() == 1
    assert (ranked["lo"] <= ranked["median"]).all() and (ranked["median"] <= ranked["hi"]).all()
    # Labels are never needed.
    protocol.balanced_site_ranking(test.drop(columns=["dice"]), "signal", 0, 50)


def test_within_site_skips_sites_with_one_class() -> None:
    pairs = _pairs()
    test = pairs[pairs["split"] == "test"].assign(failed=lambda d: d["site"] == "C")
    table = protocol.within_site(test, {"good": "uncertainty"})
    assert table.empty  # every site is all-failed or all-good


def test_header_rule_counts_fields_the_model_never_trained_on() -> None:
    cohort = pd.DataFrame({
        "series_key": ["a1", "a2", "b1", "c1"], "site": ["A", "A", "B", "C"],
        "role": ["train", "train", "train", "holdout"], "split": ["train", "test", "train", "test"],
        "vendor": ["GE", "GE", "SIEMENS", "GE"], "model": ["X", "X", "Y", "X"],
        "kernel": ["STANDARD", "STANDARD", "Br40", "BONE"],
        "thickness_class": ["thin", "thin", "thin", "thick"]})
    pairs = pd.DataFrame({"model": ["A", "A", "B", "pooled"],
                          "series_key": ["a2", "c1", "c1", "c1"]})
    assert list(header_rule(pairs, cohort)) == [0.0, 2.0, 4.0, 2.0]


def test_deterministic_max_softmax_and_noise_estimate() -> None:
    probs = torch.zeros(3, 4, 4, 4)
    probs[0] = 1.0
    assert deterministic_max_softmax(probs) == float("inf")  # nothing segmented
    probs[:, :2] = torch.tensor([0.1, 0.7, 0.2])[:, None, None, None]
    assert deterministic_max_softmax(probs) == pytest.approx(0.3)
    rng = np.random.default_rng(0)
    quiet, loud = (((rng.normal(40, s, (1, 24, 24, 12)) + 250) / 1250).astype(np.float32)
                   for s in (5.0, 40.0))
    n_quiet, n_loud = noise_estimate(quiet, -250, 1000), noise_estimate(loud, -250, 1000)
    assert n_loud > 5 * n_quiet and 3 < n_quiet < 8


def test_held_out_flag_out_of_domain_and_control_subsets_per_pair() -> None:
    pairs = pd.DataFrame({
        "model": ["A", "A", "A", "pooled", "pooled", "B"],
        "site": ["A", "B", "C", "A", "H", "H"],
        "role": ["train", "train", "holdout", "train", "holdout", "holdout"]})
    assert protocol.heldout_flag(pairs).tolist() == [0, 0, 1, 0, 1, 1]
    assert protocol.out_of_domain(pairs).tolist() == [False, True, True, False, True, True]
    test = pairs.assign(failed=False)
    subsets = protocol.subsets(test, "C", domain_subsets=True, control_sites=("H",))
    assert list(subsets) == ["all", "without_C", "out_of_domain", "controls"]
    assert subsets["controls"].tolist() == [False, False, False, False, True, True]
    assert list(protocol.subsets(test, "C")) == ["all", "without_C"]  # the demo's
