"""The promotion gate on hand-built comparison tables whose verdict is certain."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from fedct.analysis.gate import case_dice, decide
from fedct.errors import FedctError

N_BOOT = 400


def table(differences: dict[str, list[float]], base: float = 0.6,
          weaker_local: float = 0.2) -> pd.DataFrame:
    """Held-out cases per site: local ``A`` at ``base``, local ``B`` well below it, and the
    federated model at ``base + difference`` for each case."""
    rows = []
    for site, diffs in differences.items():
        for i, d in enumerate(diffs):
            case = f"{site}-{i}"
            rows += [{"site": site, "case": case, "model": "A", "dice": base},
                     {"site": site, "case": case, "model": "B", "dice": base - weaker_local},
                     {"site": site, "case": case, "model": "fed", "dice": base + d}]
    return pd.DataFrame(rows)


def gate(t: pd.DataFrame, margin: float = 0.01, site_tolerance: float = 0.05):
    return decide(t, "fed", ["A", "B"], margin, site_tolerance, n_boot=N_BOOT, seed=3)


def test_win_every_case_better_promotes() -> None:
    # Every case gains 0.08-0.12, so every resampled mean does too: the bound is >= 0.08.
    rng = np.random.default_rng(0)
    t = table({s: list(rng.uniform(0.08, 0.12, 6)) for s in "HIJ"})
    d = gate(t)
    assert d.promote
    assert d.best_local == "A"
    assert d.difference.lo >= 0.08 - 1e-12
    assert d.difference.lo <= d.difference.estimate <= d.difference.hi <= 0.12 + 1e-12
    assert "is above the margin +0.0100" in d.reasons[0]
    assert f"{d.difference.lo:+.4f}" in d.reasons[0]
    assert [s.site for s in d.sites] == ["H", "I", "J"]


def test_loss_refused_by_the_bound_alone() -> None:
    # Every case loses 0.08-0.12; the site tolerance is wide enough not to fire.
    rng = np.random.default_rng(1)
    t = table({s: list(-rng.uniform(0.08, 0.12, 6)) for s in "HIJ"})
    d = gate(t, site_tolerance=0.5)
    assert not d.promote
    assert d.difference.hi <= -0.08 + 1e-12
    assert "is not above the margin" in d.reasons[0]
    assert not any(r.startswith("site ") for r in d.reasons)


def test_tie_is_refused_even_at_zero_margin() -> None:
    # The federated model equals the best local model on every case: the bound is exactly
    # 0, and promotion needs strictly more than the margin.
    t = table({s: [0.0] * 5 for s in "HI"})
    d = gate(t, margin=0.0)
    assert not d.promote
    assert d.difference == (0.0, 0.0, 0.0)
    assert "lower bound +0.0000" in d.reasons[0] and "not above the margin" in d.reasons[0]


def test_one_site_lost_by_too_much_refuses_despite_the_bound() -> None:
    # Five sites gain 0.4, site M loses 0.1. A resample is below the margin only when it
    # draws M at least 5 times in 6 (probability < 0.1 %), so the bound clears the margin
    # and the site rule alone refuses.
    t = table({"H": [0.4] * 4, "I": [0.4] * 4, "J": [0.4] * 4, "K": [0.4] * 4,
               "L": [0.4] * 4, "M": [-0.1] * 4})
    d = gate(t, margin=0.01, site_tolerance=0.05)
    assert d.difference.lo > 0.01
    assert not d.promote
    lost = [r for r in d.reasons if r.startswith("site ")]
    assert len(lost) == 1
    assert lost[0].startswith("site M:") and "-0.1000" in lost[0] and "0.0500" in lost[0]
    assert {s.site: round(s.difference, 6) for s in d.sites}["M"] == -0.1


def test_site_loss_within_tolerance_does_not_refuse() -> None:
    t = table({"H": [0.4] * 4, "I": [0.4] * 4, "J": [0.4] * 4, "K": [0.4] * 4,
               "L": [0.4] * 4, "M": [-0.04] * 4})
    d = gate(t, margin=0.01, site_tolerance=0.05)
    assert d.promote
    assert "worst: site M at -0.0400" in d.reasons[-1]


def test_win_whose_interval_crosses_the_margin_is_refused() -> None:
    # Mean gain 0.095 (site H +0.2, site I -0.01), well above the margin 0.05. But a
    # resample draws I twice with probability 1/4, so the 2.5 % quantile is -0.01.
    t = table({"H": [0.2] * 5, "I": [-0.01] * 5})
    d = gate(t, margin=0.05, site_tolerance=0.05)
    assert d.difference.estimate == pytest.approx(0.095)
    assert d.difference.estimate > 0.05 > d.difference.lo
    assert d.difference.lo == pytest.approx(-0.01)
    assert not d.promote
    assert "lower bound -0.0100" in d.reasons[0] and "not above the margin +0.0500" in d.reasons[0]
    assert not any(r.startswith("site ") for r in d.reasons)


def test_best_local_is_the_highest_mean_whatever_the_order() -> None:
    # B beats A here, so the bar is B: the federated model beats A but not B.
    t = table({s: [0.05] * 4 for s in "HI"}, weaker_local=-0.1)  # B = base + 0.1
    for order in (["A", "B"], ["B", "A"]):
        d = decide(t, "fed", order, 0.0, 0.5, n_boot=N_BOOT, seed=3)
        assert d.best_local == "B"
        assert d.local_means[0][0] == "B"
        assert d.difference.estimate == pytest.approx(-0.05)
        assert not d.promote
        assert "best local (B)" in d.reasons[0]


def test_structure_rows_average_into_one_case_dice() -> None:
    # Two structures per case, one unscored (NaN) for every model: the case Dice is the
    # mean of what was scored, and a case with many rows weighs as one.
    rows = []
    for site in "HI":
        for i in range(3):
            for model, dice in (("A", 0.5), ("B", 0.4), ("fed", 0.7)):
                rows += [{"site": site, "case": f"{site}{i}", "model": model,
                          "structure": s, "dice": dice + off}
                         for s, off in (("femur", 0.1), ("pelvis", -0.1))]
                rows.append({"site": site, "case": f"{site}{i}", "model": model,
                             "structure": "sartorius", "dice": np.nan})
    t = pd.DataFrame(rows)
    wide = case_dice(t, ["fed", "A", "B"])
    assert len(wide) == 6
    np.testing.assert_allclose(wide["fed"], 0.7)
    d = decide(t, "fed", ["A", "B"], 0.1, 0.05, n_boot=N_BOOT)
    assert d.n_cases == 6
    assert d.difference.lo == pytest.approx(0.2)
    assert d.promote


def test_unlabelled_cases_drop_and_half_scored_cases_raise() -> None:
    t = table({s: [0.1] * 3 for s in "HI"})
    unlabelled = pd.DataFrame([{"site": "H", "case": "H-x", "model": m, "dice": np.nan}
                               for m in ("A", "B", "fed")])
    assert gate(pd.concat([t, unlabelled])).n_cases == 6
    half = t.copy()
    half.loc[(half["case"] == "I-1") & (half["model"] == "fed"), "dice"] = np.nan
    with pytest.raises(FedctError, match=r"evaluate/comparison\.csv: case\(s\) \['I-1'\]"):
        decide(half, "fed", ["A", "B"], 0.0, 0.05, source="evaluate/comparison.csv")


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda t: t.drop(columns="dice"), r"missing column\(s\) \['dice'\]"),
    (lambda t: t[t["model"] != "fed"], r"no rows for model\(s\) \['fed'\]"),
    (lambda t: t.assign(dice=t["dice"] * 3), r"Dice outside \[0, 1\]"),
    (lambda t: t.assign(dice=t["dice"].astype(object).where(t["model"] != "A", "n/a")),
     "non-numeric Dice"),
    (lambda t: t.assign(site=np.where(t["model"] == "A", "H", t["site"])), "several sites"),
])
def test_bad_tables_name_the_source(mutate, message) -> None:
    t = table({s: [0.1] * 3 for s in "HI"})
    with pytest.raises(FedctError, match=f"^cmp.csv: .*{message}"):
        decide(mutate(t), "fed", ["A", "B"], 0.0, 0.05, source="cmp.csv")


def test_bad_arguments_raise() -> None:
    t = table({"H": [0.1] * 3})
    with pytest.raises(FedctError, match="also a baseline"):
        decide(t, "A", ["A", "B"], 0.0, 0.05)
    with pytest.raises(FedctError, match="no local baseline"):
        decide(t, "fed", [], 0.0, 0.05)
    with pytest.raises(FedctError, match="site_tolerance >= 0"):
        decide(t, "fed", ["A"], 0.0, -0.1)


def test_decision_is_frozen_and_json_ready() -> None:
    d = gate(table({s: [0.1] * 3 for s in "HI"}))
    with pytest.raises(AttributeError):
        d.promote = False  # type: ignore[misc]
    out = json.loads(json.dumps(d.as_dict()))
    assert out["promote"] is True
    assert set(out["difference"]) == {"estimate", "lo", "hi"}
    assert out["local_means"]["A"] == pytest.approx(0.6)
    assert [s["site"] for s in out["sites"]] == ["H", "I"]
