"""Markup helpers: text is escaped, figures must be PNG, empty tables become a note."""

from __future__ import annotations

import pandas as pd
import pytest

from fedct.report.html import Section, figure, page, table
from fedct.report.sections import flatten


def test_cells_and_titles_are_escaped() -> None:
    df = pd.DataFrame({"site": ["<script>alert(1)</script>"], "dice": [0.123456]})
    out = table(df, "a <b> caption")
    assert "<script>" not in out and "&lt;script&gt;" in out
    assert "0.1235" in out and "a &lt;b&gt; caption" in out
    doc = page("t & <i>", [Section("s1", "<x>", (out,))])
    assert "<script>" not in doc and "t &amp; &lt;i&gt;" in doc


def test_an_empty_table_is_a_note_not_a_table() -> None:
    out = table(pd.DataFrame(columns=["site"]), "nothing")
    assert "<table" not in out and "no rows" in out


def test_a_figure_must_be_png() -> None:
    with pytest.raises(ValueError, match="not PNG"):
        figure(b"GIF89a", "x")


def test_nested_numbers_flatten_to_dotted_rows() -> None:
    rows = flatten({"margin": 0.0, "difference": {"lo": 0.0123456, "hi": float("nan")},
                    "sites": ["C", "G"], "per_site": [{"site": "C"}], "ok": True})
    assert rows == [("margin", "0"), ("difference.lo", "0.01235"), ("difference.hi", "nan"),
                    ("sites", "C, G"), ("per_site", "site C"), ("ok", "True")]
