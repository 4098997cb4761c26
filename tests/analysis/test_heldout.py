"""The held-out comparison tables on hand-built records whose answers are known."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from fedct.analysis import heldout
from fedct.analysis.failure import SIGNALS
from fedct.analysis.gate import decide
from fedct.analysis.stats import cluster_bootstrap, paired_difference

N_BOOT = 300
KINDS = {"A": "local", "B": "local", "pooled": "pooled", "fedavg": "federated"}


def records(dice: dict[str, dict[tuple[str, str], list[float]]],
            hd95: float = 10.0) -> pd.DataFrame:
    """Per-structure records as ``evaluate_models`` writes them: two structures per case,
    the signal ``sample_disagreement`` = 1 - Dice of the structure."""
    rows = []
    for model, per_case in dice.items():
        for (site, case), values in per_case.items():
            for name, d in zip(("gluteus maximus", "femur"), values, strict=True):
                rows.append({"model": model, "site": site, "series_key": case, "split": "test",
                             "role": "holdout", "structure": name, "dice": d,
                             "hd95": hd95 if name == "femur" else 2 * hd95,
                             **dict.fromkeys(SIGNALS, 0.0), "sample_disagreement": 1.0 - d})
    return pd.DataFrame(rows)


def cases_table(means: dict[str, list[float]], sites: str = "CG", per_site: int = 5,
                seed: int = 0, kinds: dict[str, str] = KINDS) -> pd.DataFrame:
    """A ``cases`` table: each model's case Dice = its mean + the same case effect."""
    rng = np.random.default_rng(seed)
    effect = rng.normal(0.0, 0.05, len(sites) * per_site)
    rows = []
    for model, (mean,) in ((m, (v,)) for m, v in means.items()):
        for i, e in enumerate(effect):
            site = sites[i // per_site]
            rows.append({"model": model, "kind": kinds[model], "site": site,
                         "case": f"{site}{i}", "dice": float(np.clip(mean + e, 0, 1)),
                         "hd95": 20.0 - 10 * mean + i, "score": 1.0 - mean,
                         "flagged": mean < 0.5})
    return pd.DataFrame(rows)


def test_case_table_aggregates_structures_and_flags() -> None:
    recs = records({m: {("C", "C1"): [0.2, 0.6], ("G", "G1"): [0.4, 0.8]} for m in KINDS})
    recs.loc[(recs["model"] == "A") & (recs["structure"] == "femur")
             & (recs["series_key"] == "G1"), "hd95"] = np.nan
    cases = heldout.case_table(recs, KINDS, "sample_disagreement", "mean", threshold=0.65)
    assert len(cases) == 2 * len(KINDS)
    for col in ("model", "kind", "site", "case", "dice", "hd95", "dice_gluteus_maximus",
                "dice_femur", "hd95_femur", "signal", "score", "threshold", "flagged"):
        assert col in cases.columns, col
    assert "series_key" not in cases.columns and "patient_key" not in cases.columns
    a = cases[cases["model"] == "A"].set_index("case")
    assert a.loc["C1", "dice"] == pytest.approx(0.4)
    assert a.loc["C1", "dice_gluteus_maximus"] == pytest.approx(0.2)
    assert a.loc["C1", "hd95"] == pytest.approx(15.0)
    assert a.loc["G1", "hd95"] == pytest.approx(20.0)  # NaN structure skipped, not NaN
    assert a.loc["C1", "score"] == pytest.approx(0.6)   # mean of 1 - Dice
    assert bool(a.loc["C1", "flagged"]) is False and bool(a.loc["G1", "flagged"]) is False
    assert a.loc["C1", "kind"] == "local"
    assert list(dict.fromkeys(cases["model"])) == ["A", "B", "pooled", "fedavg"]
    flagged = heldout.case_table(recs, KINDS, "sample_disagreement", threshold=0.5)
    assert flagged.set_index(["model", "case"]).loc[("A", "C1"), "flagged"]
    unknown = heldout.case_table(recs, KINDS, "sample_disagreement")
    assert unknown["flagged"].isna().all() and unknown["threshold"].isna().all()
    # A threshold of +inf is a threshold (flag only +inf scores, as uncertainty and
    # predict do), not a missing one.
    at_inf = heldout.case_table(recs, KINDS, "sample_disagreement", threshold=float("inf"))
    assert at_inf["flagged"].notna().all() and not at_inf["flagged"].any()
    with pytest.raises(ValueError, match="no kind"):
        heldout.case_table(recs, {"A": "local"}, "sample_disagreement")


def test_best_local_is_the_highest_local_and_matches_the_gate() -> None:
    cases = cases_table({"A": 0.5, "B": 0.7, "pooled": 0.9, "fedavg": 0.95})
    assert heldout.best_local(cases) == "B"  # pooled and federated never count
    gate = decide(cases, "fedavg", ["A", "B"], 0.0, 0.1, n_boot=50)
    assert gate.best_local == "B"
    tie = cases_table({"A": 0.6, "B": 0.6, "pooled": 0.9, "fedavg": 0.95})
    assert heldout.best_local(tie) == "A"
    assert heldout.best_local(cases[cases["kind"] != "local"]) is None


def test_best_local_chosen_on_validation_cases_never_looks_at_held_out_dice() -> None:
    # A wins on the held-out cases, B on the training sites' validation cases: with a
    # selection table (evaluate.best_local_on: val) the bar is B, in the paired table,
    # its metrics and the gate alike, whatever the held-out cases say.
    cases = cases_table({"A": 0.8, "B": 0.6, "pooled": 0.9, "fedavg": 0.95})
    val = cases_table({"A": 0.5, "B": 0.7}, sites="AB", per_site=3, seed=1)
    assert heldout.best_local(cases) == "A"
    assert heldout.best_local(cases, val) == "B"
    paired = heldout.paired_table(cases, n_boot=50, selection=val)
    bar = paired[paired["reference"] == heldout.BEST_LOCAL]
    assert set(bar["reference_model"]) == {"B"}
    summary = heldout.summary_table(cases, n_boot=50)
    metrics = heldout.metrics_json(summary, paired)
    assert metrics["best_local"] == "B"
    assert metrics["heldout_dice"]["local"] == pytest.approx(cases.loc[
        cases["model"] == "B", "dice"].mean())
    gate = decide(cases, "fedavg", ["A", "B"], 0.0, 0.5, n_boot=50, selection=val)
    assert gate.best_local == "B" and gate.selected_on == "val"
    assert decide(cases, "fedavg", ["A", "B"], 0.0, 0.5, n_boot=50).selected_on == "test"
    # Held-out Dice no longer moves the choice: lift A's held-out cases further.
    lifted = cases.assign(dice=np.where(cases["model"] == "A", 1.0, cases["dice"]))
    assert heldout.best_local(lifted, val) == "B"


def test_summary_means_equal_hand_means_and_intervals_contain_them() -> None:
    cases = cases_table({"A": 0.5, "B": 0.7, "pooled": 0.9, "fedavg": 0.8}, per_site=6)
    summary = heldout.summary_table(cases, N_BOOT, seed=1)
    assert set(summary["site"]) == {"all", "C", "G"}
    assert len(summary) == 4 * 3
    for _, row in summary.iterrows():
        g = cases[cases["model"] == row["model"]]
        if row["site"] != "all":
            g = g[g["site"] == row["site"]]
        assert row["n_cases"] == len(g)
        assert row["dice"] == pytest.approx(g["dice"].mean())
        assert row["hd95"] == pytest.approx(g["hd95"].mean())
        assert row["dice_lo"] <= row["dice"] <= row["dice_hi"]
        assert row["hd95_lo"] <= row["hd95"] <= row["hd95_hi"]
        assert row["dice_lo"] < row["dice_hi"]
        assert row["kind"] == KINDS[row["model"]]
        assert row["flag_rate"] == pytest.approx(float(g["flagged"].mean()))
    # The shared resamples give exactly cluster_bootstrap's interval for each model.
    fed = cases[cases["model"] == "fedavg"][["site", "case", "dice"]]
    ref = cluster_bootstrap(fed, lambda f: float(f["dice"].mean()), ("site",), "case",
                            n_boot=N_BOOT, seed=1)
    got = summary.set_index(["model", "site"]).loc[("fedavg", "all")]
    assert (got["dice"], got["dice_lo"], got["dice_hi"]) == pytest.approx(tuple(ref))


def test_extra_rows_per_case_are_averaged_first(tmp_path) -> None:
    one = cases_table({"A": 0.5, "B": 0.7, "pooled": 0.9, "fedavg": 0.8})
    # The same summary from the table as written to and read back from cases.csv.
    one.to_csv(tmp_path / "cases.csv", index=False)
    back = pd.read_csv(tmp_path / "cases.csv")
    pd.testing.assert_frame_equal(heldout.summary_table(back, 50),
                                  heldout.summary_table(one, 50))
    two = pd.concat([one.assign(dice=one["dice"] - 0.1), one.assign(dice=one["dice"] + 0.1)])
    a = heldout.summary_table(one, 50).set_index(["model", "site"])
    b = heldout.summary_table(two, 50).set_index(["model", "site"])
    assert (b["n_cases"] == a["n_cases"]).all()
    np.testing.assert_allclose(b["dice"], a["dice"])


def test_paired_difference_of_identical_models_is_zero() -> None:
    cases = cases_table({"A": 0.5, "B": 0.7, "pooled": 0.9, "fedavg": 0.7})
    # fedavg gets exactly B's case Dice: every resample differs by 0.
    cases.loc[cases["model"] == "fedavg", "dice"] = cases.loc[cases["model"] == "B",
                                                              "dice"].to_numpy()
    paired = heldout.paired_table(cases, N_BOOT, seed=2)
    assert set(paired["reference"]) == {"best_local", "pooled", "fedavg"}
    assert (paired.loc[paired["reference"] == "best_local", "reference_model"] == "B").all()
    same = paired[(paired["model"].isin(["fedavg", "B"])) & (paired["reference"] == "best_local")]
    assert len(same) == 2 * 3  # all sites, C, G
    assert (same[["difference", "lo", "hi"]].to_numpy() == 0.0).all()
    self_pooled = paired[(paired["model"] == "pooled") & (paired["reference"] == "pooled")]
    assert (self_pooled[["difference", "lo", "hi"]].to_numpy() == 0.0).all()


def test_paired_difference_matches_stats_and_is_signed_model_minus_reference() -> None:
    cases = cases_table({"A": 0.5, "B": 0.6, "pooled": 0.8, "fedavg": 0.7}, per_site=6)
    cases.loc[cases["model"] == "fedavg", "dice"] += np.linspace(-0.02, 0.02, 12)
    paired = heldout.paired_table(cases, N_BOOT, seed=4).set_index(
        ["model", "reference", "site"])
    wide = cases.pivot(index=["site", "case"], columns="model", values="dice").reset_index()
    for reference, other in (("best_local", "B"), ("pooled", "pooled")):
        want = paired_difference(wide, "fedavg", other, ("site",), "case", n_boot=N_BOOT,
                                 seed=4)
        row = paired.loc[("fedavg", reference, "all")]
        assert (row["difference"], row["lo"], row["hi"]) == pytest.approx(tuple(want))
        assert row["difference"] == pytest.approx(
            (wide["fedavg"] - wide[other]).mean())
        site_g = paired_difference(wide[wide["site"] == "G"], "fedavg", other, (), "case",
                                   n_boot=N_BOOT, seed=4)
        g = paired.loc[("fedavg", reference, "G")]
        assert (g["difference"], g["lo"], g["hi"]) == pytest.approx(tuple(site_g))
    assert paired.loc[("fedavg", "best_local", "all"), "difference"] > 0.05
    assert paired.loc[("fedavg", "pooled", "all"), "difference"] < -0.05


def test_a_label_free_method_is_paired_with_fedavg_at_each_site() -> None:
    kinds = {**KINDS, "uw_select": "federated"}
    cases = cases_table({"A": 0.5, "B": 0.6, "pooled": 0.8, "fedavg": 0.7,
                         "uw_select": 0.7}, per_site=6, kinds=kinds)
    # uw_select gains 0.03 over FedAvg at C only (plus case noise), nothing at G.
    at_c = (cases["model"] == "uw_select") & (cases["site"] == "C")
    cases.loc[at_c, "dice"] += 0.03 + np.linspace(-0.01, 0.01, 6)
    paired = heldout.paired_table(cases, N_BOOT, seed=5)
    m = heldout.metrics_json(heldout.summary_table(cases, N_BOOT, seed=5), paired)
    wide = cases.pivot(index=["site", "case"], columns="model", values="dice").reset_index()
    want = paired_difference(wide[wide["site"] == "C"], "uw_select", "fedavg", (), "case",
                             n_boot=N_BOOT, seed=5)
    got = (m["paired_vs_fedavg_C"]["uw_select"], m["paired_vs_fedavg_C_lo"]["uw_select"],
           m["paired_vs_fedavg_C_hi"]["uw_select"])
    assert got == pytest.approx(tuple(want))
    assert got[0] == pytest.approx(0.03) and got[1] > 0.0
    assert m["paired_vs_fedavg_G"]["uw_select"] == pytest.approx(0.0, abs=1e-12)
    assert m["paired_vs_fedavg"]["fedavg"] == 0.0
    # Without a FedAvg model there is nothing to pair with.
    no_fedavg = cases[cases["model"] != "fedavg"]
    assert "fedavg" not in set(heldout.paired_table(no_fedavg, 50)["reference"])
    assert not any(k.startswith("paired_vs_fedavg") for k in heldout.metrics_json(
        heldout.summary_table(no_fedavg, 50), heldout.paired_table(no_fedavg, 50)))


def test_a_method_is_paired_with_its_ablation_and_nothing_else_is() -> None:
    kinds = {**KINDS, "steered": "federated", "steered_uniform": "federated"}
    cases = cases_table({"A": 0.5, "B": 0.6, "pooled": 0.8, "fedavg": 0.7, "steered": 0.7,
                         "steered_uniform": 0.7}, per_site=6, kinds=kinds)
    at_c = (cases["model"] == "steered") & (cases["site"] == "C")
    cases.loc[at_c, "dice"] += 0.04 + np.linspace(-0.01, 0.01, 6)
    pairs = {"steered": "steered_uniform", "gated_tent": "gated_tent_random"}
    paired = heldout.paired_table(cases, N_BOOT, seed=5, ablations=pairs)
    vs = paired[paired["reference"] == heldout.VS_ABLATION]
    # One model against its own ablation (a pair not scored is skipped), at every site.
    assert set(vs["model"]) == {"steered"} and set(vs["reference_model"]) == {
        "steered_uniform"}
    assert sorted(vs["site"]) == ["C", "G", "all"]
    m = heldout.metrics_json(heldout.summary_table(cases, N_BOOT, seed=5), paired)
    wide = cases.pivot(index=["site", "case"], columns="model", values="dice").reset_index()
    want = paired_difference(wide[wide["site"] == "C"], "steered", "steered_uniform", (),
                             "case", n_boot=N_BOOT, seed=5)
    got = tuple(m[f"paired_vs_ablation_C{s}"]["steered"] for s in ("", "_lo", "_hi"))
    assert got == pytest.approx(tuple(want)) and got[1] > 0
    assert m["paired_vs_ablation_G"] == {"steered": pytest.approx(0.0, abs=1e-12)}
    # The other references are as without ablations.
    plain = heldout.paired_table(cases, N_BOOT, seed=5)
    pd.testing.assert_frame_equal(paired[paired["reference"] != heldout.VS_ABLATION]
                                  .reset_index(drop=True), plain)
    run = heldout.candidate_metrics(heldout.summary_table(cases, 50), paired, "steered")
    assert run["paired_vs_ablation_C_lo"] == pytest.approx(got[1])


def test_metrics_json_and_run_metrics_name_every_candidate_alike() -> None:
    cases = cases_table({"A": 0.5, "B": 0.7, "pooled": 0.9, "fedavg": 0.8})
    cases.loc[cases["model"] == "A", "hd95"] = np.nan  # undefined -> null, not NaN
    summary = heldout.summary_table(cases, 50)
    paired = heldout.paired_table(cases, 50)
    m = heldout.metrics_json(summary, paired)
    json.dumps(m, allow_nan=False)
    assert m["best_local"] == "B" and m["sites"] == ["C", "G"] and m["n_cases"] == 10
    assert list(m["heldout_dice"]) == ["local", "local_A", "local_B", "pooled", "fedavg"]
    assert m["heldout_dice"]["local"] == m["heldout_dice"]["local_B"]
    assert m["heldout_hd95"]["local_A"] is None
    for key in ("heldout_dice_lo", "heldout_dice_hi", "heldout_dice_C", "heldout_dice_G",
                "heldout_hd95_C", "paired_vs_best_local", "paired_vs_best_local_lo",
                "paired_vs_pooled_hi"):
        assert key in m, key
    assert m["paired_vs_best_local"]["local_B"] == 0.0
    names = [set(heldout.candidate_metrics(summary, paired, model)) for model in KINDS]
    assert all(n == names[0] for n in names)
    fed = heldout.candidate_metrics(summary, paired, "fedavg")
    assert fed["heldout_dice"] == pytest.approx(m["heldout_dice"]["fedavg"])
    assert fed["paired_vs_best_local"] == pytest.approx(m["paired_vs_best_local"]["fedavg"])
    assert math.isnan(heldout.candidate_metrics(summary, paired, "A")["heldout_hd95"])
    bars = heldout.dice_by_site(summary)
    assert list(bars.columns) == ["candidate", "site", "entry", "dice", "lo", "hi", "n_cases"]
    assert bars["entry"].is_unique


def test_heldout_test_cases_keep_labelled_holdout_test_rows() -> None:
    cohort = pd.DataFrame({
        "series_key": list("abcde"), "site": ["A", "A", "C", "C", "G"],
        "split": ["test", "train", "test", "test", "test"],
        "role": ["train", "train", "holdout", "holdout", "holdout"],
        "has_label": [True, True, True, False, True]})
    assert list(heldout.heldout_test_cases(cohort)["series_key"]) == ["c", "e"]
