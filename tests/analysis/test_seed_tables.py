"""The report-seed summary: per-seed headline numbers, pooled cases, spread over seeds."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from fedct.analysis import heldout
from fedct.analysis.seed_tables import (
    across_seeds,
    experiment_name,
    pooled_cases,
    report_pairs,
    seed_row,
    shifted_heldout_site,
)
from fedct.errors import FedctError


def signals_table(auroc: float = 0.9, without: str = "C") -> pd.DataFrame:
    rows = []
    for subset in ("all", f"without_{without}"):
        rows.append({"signal": "sample_disagreement", "kind": "uncertainty", "level": "case",
                     "subset": subset, "auroc": auroc, "auroc_lo": auroc - 0.1,
                     "auroc_hi": auroc + 0.05, "aurc": 0.05})
        rows.append({"signal": "entropy", "kind": "uncertainty", "level": "case",
                     "subset": subset, "auroc": 0.5, "auroc_lo": 0.4, "auroc_hi": 0.6,
                     "aurc": 0.01})
        for name, aurc in (("max_softmax", 0.08), ("header_rule", 0.2)):
            rows.append({"signal": name, "kind": "baseline", "level": "case", "subset": subset,
                         "auroc": 0.7, "auroc_lo": 0.6, "auroc_hi": 0.8, "aurc": aurc})
        rows.append({"signal": "sample_disagreement", "kind": "uncertainty",
                     "level": "structure", "subset": subset, "auroc": 0.1, "auroc_lo": 0.0,
                     "auroc_hi": 0.2, "aurc": 0.9})
    return pd.DataFrame(rows)


def evaluate_metrics() -> dict:
    return {"best_local": "D", "sites": ["C", "G"],
            "heldout_dice": {"local": 0.40, "local_D": 0.40, "pooled": 0.70, "fedavg": 0.42,
                             "fedprox": 0.47, "one_shot": 0.18, "uw_merge": 0.17,
                             "tent": 0.41, "self_train": 0.37},
            "heldout_dice_C": {"local": 0.34, "pooled": 0.62, "fedavg": 0.37, "fedprox": 0.43,
                               "one_shot": 0.16, "uw_merge": 0.16, "tent": 0.39,
                               "self_train": 0.33},
            "heldout_dice_G": {"local": 0.47, "pooled": 0.75, "fedavg": 0.47},
            "paired_vs_best_local": {"fedavg": 0.02},
            "paired_vs_best_local_lo": {"fedavg": -0.01},
            "paired_vs_best_local_hi": {"fedavg": 0.04},
            "paired_vs_fedavg_C": {"tent": 0.02, "uw_merge": -0.21},
            "paired_vs_fedavg_C_lo": {"tent": -0.01, "uw_merge": -0.3},
            "paired_vs_fedavg_C_hi": {"tent": 0.05, "uw_merge": -0.1},
            "paired_vs_fedavg_G": {"tent": 0.9}}


def ranking(order: str) -> pd.DataFrame:
    return pd.DataFrame({"site": list(order), "rank": np.arange(1, len(order) + 1)})


def test_report_pairs_pair_the_lists_and_refuse_development_seeds() -> None:
    assert report_pairs([5, 6], [1, 2]) == [(5, 1), (6, 2)]
    assert experiment_name(5, 1) == "report-5-1"
    with pytest.raises(FedctError, match="same length"):
        report_pairs([5, 6], [1])
    with pytest.raises(FedctError, match="development seeds"):
        report_pairs([5, 6], [1, 2], synth_dev=[6])
    with pytest.raises(FedctError, match="development seeds"):
        report_pairs([5, 6], [1, 2], cohort_dev=[1])
    with pytest.raises(FedctError, match="repeats"):
        report_pairs([5, 5], [1, 2])


def test_seed_row_reads_the_frozen_signal_and_the_shifted_site() -> None:
    row = seed_row(5101, 313, evaluate_metrics(), {"in_domain_dice": 0.55}, signals_table(),
                   ranking("CGEA"), ["C", "G"], "sample_disagreement",
                   ("uw_merge", "tent", "self_train"), None)
    assert row["in_domain_dice"] == 0.55
    # The frozen signal's case-level rows, not the structure level or another signal.
    assert row["auroc_all"] == 0.9 and row["auroc_without_lo"] == pytest.approx(0.8)
    assert row["aurc_all"] == 0.05 and row["best_baseline_aurc_all"] == 0.08
    assert row["without_site"] == "C" and row["shifted_site"] == "C"
    assert row["shift_sites_first"] is True and row["shift_site_ranks"] == "C:1,G:2"
    assert row["fedavg_over_pooled"] == pytest.approx(0.42 / 0.70)
    assert row["fedavg_vs_best_local_lo"] == -0.01
    # Best label-free method at C is TENT (0.39), 0.02 above FedAvg there.
    assert row["best_label_free"] == "tent"
    assert row["best_label_free_minus_fedavg_shifted"] == pytest.approx(0.02)
    assert row["primary_label_free"] is None
    assert math.isnan(row["primary_minus_fedavg_shifted"])


def test_the_pre_specified_label_free_method_is_reported_even_when_another_wins() -> None:
    row = seed_row(5101, 313, evaluate_metrics(), {}, signals_table(), ranking("CGEA"),
                   ["C", "G"], "sample_disagreement", ("uw_merge", "tent", "self_train"),
                   primary="uw_merge")
    # At C (the shifted site), from evaluate's paired interval, not from G's.
    assert row["primary_label_free"] == "uw_merge"
    assert (row["primary_minus_fedavg_shifted"], row["primary_minus_fedavg_shifted_lo"],
            row["primary_minus_fedavg_shifted_hi"]) == (-0.21, -0.3, -0.1)
    assert row["best_label_free"] == "tent"  # the ex-post best is still there, apart
    # A method evaluate did not pair with FedAvg at C is an error, not a silent NaN.
    with pytest.raises(FedctError, match="paired_vs_fedavg_C for 'self_train'"):
        seed_row(5101, 313, evaluate_metrics(), {}, signals_table(), ranking("CGEA"),
                 ["C", "G"], "sample_disagreement", ("uw_merge", "tent", "self_train"),
                 primary="self_train")


def test_a_shift_site_ranked_third_is_not_first() -> None:
    row = seed_row(1, 2, evaluate_metrics(), {}, signals_table(), ranking("CEGA"), ["C", "G"],
                   "sample_disagreement", ("tent",), None)
    assert row["shift_sites_first"] is False and row["shift_site_ranks"] == "C:1,G:3"
    assert math.isnan(row["in_domain_dice"])


def test_shifted_site_falls_back_to_lowest_pooled_dice() -> None:
    # The most failing site of the uncertainty protocol is not held out (E): the held-out
    # site where pooled scores lowest is the shifted one.
    assert shifted_heldout_site(evaluate_metrics(), "E") == "C"
    assert shifted_heldout_site(evaluate_metrics(), "G") == "G"
    with pytest.raises(FedctError):
        shifted_heldout_site({"sites": []}, "C")


def test_missing_frozen_signal_is_an_error() -> None:
    with pytest.raises(FedctError, match="no case-level row"):
        seed_row(1, 2, evaluate_metrics(), {}, signals_table(), ranking("CG"), ["C"],
                 "mutual_information", ("tent",), None)


def cases(seed_offset: float, models=("A", "pooled", "fedavg")) -> pd.DataFrame:
    kinds = {"A": "local", "pooled": "pooled", "fedavg": "federated"}
    rows = []
    for i, site in enumerate(("C", "C", "G", "G")):
        for m in models:
            rows.append({"model": m, "kind": kinds[m], "site": site, "case": f"k{i}",
                         "dice": 0.5 + seed_offset + (0.2 if m == "pooled" else 0.0),
                         "hd95": 10.0})
    return pd.DataFrame(rows)


def test_pooled_cases_keep_seeds_apart_and_feed_the_heldout_tables() -> None:
    pooled = pooled_cases({"s1": cases(0.0), "s2": cases(0.1)})
    # The same case name in two seeds is two cases.
    assert pooled["case"].nunique() == 8 and set(pooled["seed"]) == {"s1", "s2"}
    summary = heldout.summary_table(pooled, n_boot=50, seed=0)
    overall = summary[summary["site"] == heldout.ALL_SITES].set_index("model")
    assert overall.loc["A", "n_cases"] == 8
    assert overall.loc["A", "dice"] == pytest.approx(0.55)
    assert overall.loc["pooled", "dice"] == pytest.approx(0.75)
    paired = heldout.paired_table(pooled, n_boot=50, seed=0)
    p = paired[(paired["site"] == "all") & (paired["reference"] == "pooled")]
    assert p.set_index("model").loc["fedavg", "difference"] == pytest.approx(-0.2)


def test_pooled_cases_refuse_seeds_with_different_candidates() -> None:
    with pytest.raises(FedctError, match="different candidates"):
        pooled_cases({"s1": cases(0.0), "s2": cases(0.0, models=("A", "pooled"))})


def test_across_seeds_gives_mean_spread_and_range() -> None:
    rows = pd.DataFrame({"synth_seed": [1, 2, 3], "cohort_seed": [4, 5, 6],
                         "in_domain_dice": [0.5, 0.6, 0.7], "shift_sites_first": [True, False,
                                                                                  True],
                         "best_local": ["A", "D", "A"],
                         "auroc_all_lo": [0.8, 0.7, 0.9]})
    out = across_seeds(rows).set_index("metric")
    assert "synth_seed" not in out.index and "best_local" not in out.index
    assert "auroc_all_lo" not in out.index  # a mean of bounds is no interval
    assert out.loc["in_domain_dice", "mean"] == pytest.approx(0.6)
    assert out.loc["in_domain_dice", "sd"] == pytest.approx(0.1)
    assert (out.loc["in_domain_dice", "min"], out.loc["in_domain_dice", "max"]) == (0.5, 0.7)
    assert out.loc["shift_sites_first", "mean"] == pytest.approx(2 / 3)
