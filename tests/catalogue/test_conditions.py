"""Shift statistics on count tables, and the ranking of the test archive's sites."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedct.catalogue import conditions


def test_shift_ranking_puts_the_unique_condition_site_first(catalogued) -> None:
    result, _, _ = catalogued
    sites = pd.read_csv(result.out_dir / "shift_sites.csv")
    combos = pd.read_csv(result.out_dir / "shift_combos.csv")
    assert sites.iloc[0]["site"] == "C"
    assert combos.iloc[0]["site"] == "C"
    assert combos.iloc[0]["condition"] == "SIEMENS | SOMATOM Force | Br64\\3 | thin"
    assert result.metrics["top_shift_site"] == "C"


def test_shift_scores_on_count_tables() -> None:
    assert conditions.jensen_shannon(np.array([1, 2, 3]), np.array([2, 4, 6])) == pytest.approx(0)
    assert conditions.jensen_shannon(np.array([1, 0]), np.array([0, 5])) == pytest.approx(1)
    table = pd.DataFrame([[50, 50, 0], [40, 60, 0], [45, 35, 20]],
                         index=["A", "B", "C"], columns=["soft", "std", "sharp"])
    sites = conditions.shift_sites(table)
    assert sites.iloc[0]["site"] == "C" and sites.iloc[0]["top_condition"] == "sharp"
    combos = conditions.shift_combos(table)
    assert tuple(combos.iloc[0][["site", "condition"]]) == ("C", "sharp")
    pmi = conditions.pmi(table)
    assert pmi.loc["C", "sharp"] == pytest.approx(np.log2(300 / 100))
    assert np.isnan(pmi.loc["A", "sharp"])
    res = conditions.adjusted_residuals(table)
    assert res.loc["C", "sharp"] > 5 and res.loc["A", "sharp"] < 0
