"""Reports of the test archive's catalogue, and no identifier in any output."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from tests.catalogue.archive import assert_no_phi


def test_reports(catalogued) -> None:
    result, _, _ = catalogued
    out = result.out_dir
    exams = pd.read_csv(out / "exam_counts.csv", index_col="vendor")
    assert list(exams.columns) == ["A", "B", "C", "total"]
    assert list(exams.index) == ["CANON", "SIEMENS", "total"]
    assert exams.loc["CANON"].tolist() == [1, 2, 1, 4]
    assert exams.loc["SIEMENS"].tolist() == [0, 0, 1, 1]
    assert exams.loc["total"].tolist() == [1, 2, 2, 5]
    combos = pd.read_csv(out / "combos.csv")
    assert {"vendor", "model", "kernel", "A", "B", "C", "total", "usable"} <= set(combos)
    usable = pd.read_csv(out / "usable_by_site.csv").set_index("site")
    assert usable.loc["A", "usable_fraction"] == pytest.approx(1 / 6, abs=1e-4)
    assert usable.loc["B", "usable_fraction"] == 1.0
    reasons = pd.read_csv(out / "unusable_reasons.csv")
    assert set(reasons["reason"]) == {"localizer", "coronal", "too few slices",
                                      "irregular slice spacing", "inconsistent geometry"}
    assert (out / "shift_heatmap.png").stat().st_size > 1000
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_usable"] == 5 and metrics["n_series"] == 10
    assert metrics["demo_key"] is True and metrics["n_duplicates"] == 3


def test_no_identifier_reaches_any_output(archive, catalogued) -> None:
    root, _ = archive
    result, _, _ = catalogued
    assert_no_phi(result.out_dir, root)
