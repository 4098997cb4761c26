"""The study's run rows and their pooling, on fake run outputs whose numbers are known."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from fedct.analysis import study_tables


def fake_outputs(fedavg: float = 0.8, best: float = 0.7, ranking=("G", "C", "H", "J"),
                 gain: float = 0.04):
    evaluate = {"best_local": "B",
                "heldout_dice": {"local": best, "A": 0.6, "B": best, "pooled": 0.84,
                                 "fedavg": fedavg, "steered": fedavg + gain / 2,
                                 "tent": fedavg - 0.01},
                "paired_vs_best_local": {"fedavg": fedavg - best},
                "paired_vs_best_local_lo": {"fedavg": fedavg - best - 0.03},
                # The primary method (steered) at C (most shifted), G, and the controls.
                "paired_vs_fedavg": {"fedavg": 0.0, "steered": gain / 2, "tent": -0.01},
                "paired_vs_fedavg_C": {"fedavg": 0.0, "steered": gain, "tent": -0.02},
                "paired_vs_fedavg_C_lo": {"fedavg": 0.0, "steered": gain - 0.03,
                                          "tent": -0.05},
                "paired_vs_fedavg_C_hi": {"fedavg": 0.0, "steered": gain + 0.03,
                                          "tent": 0.01},
                "paired_vs_fedavg_H": {"steered": -0.004, "tent": 0.0},
                "paired_vs_fedavg_J": {"steered": -0.012, "tent": 0.0},
                "paired_vs_ablation_C": {"steered": 0.03},
                "paired_vs_ablation_C_lo": {"steered": 0.01},
                "paired_vs_ablation_C_hi": {"steered": 0.05}}
    uncertainty = {"in_domain_dice": 0.86, "auroc_all": 0.97, "auroc_lo_all": 0.93,
                   "auroc_without_worst": 0.95, "auroc_lo_without_worst": 0.9,
                   "aurc_all": 0.05, "aurc_without_worst": 0.04, "most_shifted_site": "C",
                   "aurc_header_rule_all": 0.2, "aurc_noise_estimate_all": 0.1,
                   "aurc_deterministic_max_softmax_all": 0.07, "aurc_heldout_site_all": 0.09,
                   "aurc_header_rule_without_worst": 0.3,
                   "aurc_noise_estimate_without_worst": 0.08,
                   "aurc_out_of_domain": 0.06, "aurc_noise_estimate_out_of_domain": 0.11}
    cases = pd.DataFrame({"model": ["A", "A", "B", "pooled", "A"],
                          "site": ["A", "A", "B", "A", "B"],
                          "split": ["calib", "calib", "calib", "calib", "calib"],
                          "dice": [0.9, np.nan, 0.8, 0.9, 0.5]})
    return evaluate, uncertainty, list(ranking), cases


def row(train_seed=0, synth=5301, cohort=331, **kw):
    evaluate, uncertainty, ranking, cases = fake_outputs(**kw)
    return study_tables.run_row(synth, cohort, train_seed, evaluate, uncertainty, ranking, cases,
                         {"cap_hit_fraction": 0.1}, {"promote": True}, ["C", "G", "H", "J"],
                         ["H", "J"], 42.0, "2 CPU cores",
                         {"fedavg_best_round": 11, "fedavg_last_round": 12},
                         primary="steered")


def test_a_run_row_holds_every_column_from_the_outputs() -> None:
    r = row()
    assert list(r) == list(study_tables.RUN_COLUMNS)
    assert r["report_seed"] == "5301-331" and r["train_seed"] == 0
    assert r["heldout_fedavg"] == 0.8 and r["heldout_best_local"] == 0.7
    assert r["fedavg_minus_best_local_lo"] == pytest.approx(0.07)
    assert r["auroc_all_lo"] == 0.93 and r["auroc_without_most_shifted"] == 0.95
    # The best baseline is the lowest AURC of any baseline, the held-out flag included.
    assert r["aurc_best_baseline_all"] == 0.07
    assert r["aurc_best_baseline_without"] == 0.08
    assert r["aurc_best_baseline_out_of_domain"] == 0.11
    assert math.isnan(r["aurc_best_baseline_controls"])  # no controls subset reported
    assert r["shifted_sites_above_controls"] == 1.0
    assert r["n_calib_pairs"] == 2  # own-site calib pairs with a Dice; pooled never
    assert r["cap_hit_fraction"] == 0.1 and r["promoted"] == 1.0
    assert r["fedavg_over_pooled"] == pytest.approx(0.8 / 0.84)
    assert (r["fedavg_best_round"], r["fedavg_last_round"]) == (11, 12)


def test_a_run_row_judges_the_primary_label_free_method_at_the_most_shifted_site() -> None:
    r = row()
    assert r["primary_label_free"] == "steered" and r["shifted_site"] == "C"
    assert r["primary_minus_fedavg_shifted"] == pytest.approx(0.04)
    assert r["primary_minus_fedavg_shifted_lo"] == pytest.approx(0.01)
    assert r["primary_minus_fedavg_shifted_hi"] == pytest.approx(0.07)
    assert r["primary_minus_ablation_shifted"] == pytest.approx(0.03)
    assert r["primary_minus_ablation_shifted_lo"] == pytest.approx(0.01)
    # The controls: the mean of H's and J's paired differences, and the worst.
    assert r["primary_minus_fedavg_controls"] == pytest.approx(-0.008)
    assert r["primary_minus_fedavg_controls_min"] == pytest.approx(-0.012)
    # A control that failed most does not stand in for the shifted sites: the shifted site
    # where pooled scores lowest does.
    evaluate, uncertainty, ranking, cases = fake_outputs()
    evaluate.update({"heldout_dice_C": {"pooled": 0.7}, "heldout_dice_G": {"pooled": 0.6},
                     "paired_vs_fedavg_G": {"steered": 0.01}})
    other = study_tables.run_row(1, 2, 0, evaluate, {**uncertainty, "most_shifted_site": "H"},
                          ranking, cases, None, None, ["C", "G", "H", "J"], ["H", "J"], 1.0,
                          "cpu", primary="steered")
    assert other["shifted_site"] == "G"
    assert other["primary_minus_fedavg_shifted"] == pytest.approx(0.01)
    assert math.isnan(other["primary_minus_ablation_shifted_lo"])  # none at G
    # Without a primary method the columns stay empty.
    bare = study_tables.run_row(1, 2, 0, evaluate, uncertainty, ranking, cases, None, None,
                         ["C", "G", "H", "J"], ["H", "J"], 1.0, "cpu")
    assert bare["primary_label_free"] == "" and math.isnan(bare["primary_minus_fedavg_shifted"])


def test_every_label_free_method_gets_a_row_misses_included() -> None:
    evaluate, uncertainty, _, _ = fake_outputs()
    rows = study_tables.method_rows(5301, 331, 1, evaluate, uncertainty,
                             ["steered", "tent", "gated_tent"], ["C", "G", "H", "J"],
                             ["H", "J"])
    assert [r["method"] for r in rows] == ["steered", "tent"]  # gated_tent was not scored
    assert all(list(r) == list(study_tables.METHOD_COLUMNS) for r in rows)
    tent = rows[1]
    assert tent["report_seed"] == "5301-331" and tent["train_seed"] == 1
    assert tent["minus_fedavg_shifted"] == pytest.approx(-0.02)
    assert tent["minus_fedavg_shifted_lo"] == pytest.approx(-0.05)
    assert tent["minus_fedavg"] == pytest.approx(-0.01) and tent["heldout_dice"] == 0.79
    assert math.isnan(tent["minus_ablation_shifted"])
    assert rows[0]["minus_ablation_shifted_hi"] == pytest.approx(0.05)


def test_a_control_ranked_above_a_shifted_site_is_a_miss_and_unknowns_stay_empty() -> None:
    assert row(ranking=("G", "H", "C", "J"))["shifted_sites_above_controls"] == 0.0
    assert math.isnan(study_tables.shifted_above_controls(["G", "C"], ["C", "G"], []))
    assert math.isnan(study_tables.shifted_above_controls(["G", "C"], ["C", "G"], ["H"]))
    evaluate, uncertainty, ranking, cases = fake_outputs()
    bare = study_tables.run_row(1, 2, 0, {}, {}, ranking, cases, None, None, ["C"], [], 1.0, "cpu")
    assert math.isnan(bare["heldout_fedavg"]) and math.isnan(bare["promoted"])
    assert math.isnan(bare["cap_hit_fraction"])


def test_pooling_means_over_runs_with_a_two_stage_interval_over_runs() -> None:
    runs = pd.DataFrame([row(t, s, c, fedavg=f) for (s, c), fs in
                         {(5301, 331): (0.80, 0.82), (5302, 332): (0.70, 0.74)}.items()
                         for t, f in enumerate(fs)])
    pooled = study_tables.pool(runs, n_boot=500, seed=1)
    assert pooled["n_runs"] == 4 and pooled["report_seeds"] == ["5301-331", "5302-332"]
    assert pooled["heldout_fedavg"] == pytest.approx(0.765)
    # The interval moves with the runs: within the range of the run values, not a point.
    assert 0.70 <= pooled["heldout_fedavg_lo"] < pooled["heldout_fedavg"]
    assert pooled["heldout_fedavg"] < pooled["heldout_fedavg_hi"] <= 0.82
    assert pooled["heldout_fedavg_sd"] == pytest.approx(np.std([0.8, 0.82, 0.7, 0.74], ddof=1))
    # Constant over runs: a zero-width interval; counts and labels have none.
    assert pooled["in_domain_dice_lo"] == pooled["in_domain_dice_hi"] == pytest.approx(0.86)
    assert "runtime_min_lo" not in pooled and "device" not in pooled
    assert pooled["promoted"] == 1.0
    assert study_tables.pool(runs.iloc[:1])["heldout_fedavg_lo"] is None  # one run: no interval
    # A run's own interval bound is not pooled as a mean over runs: x_lo in pooled.json is
    # the pooled interval of x.
    assert pooled["primary_minus_fedavg_shifted"] == pytest.approx(0.04)
    assert pooled["primary_minus_fedavg_shifted_lo"] == pooled[
        "primary_minus_fedavg_shifted_hi"] == pytest.approx(0.04)
    assert "primary_minus_fedavg_shifted_lo_lo" not in pooled
    assert pooled["auroc_all_lo"] == pytest.approx(0.97)  # auroc_all's, not 0.93


def test_experiment_names_carry_both_seeds_and_the_training_seed() -> None:
    assert study_tables.experiment_name(5301, 331, 1) == "study-5301-331-t1"
