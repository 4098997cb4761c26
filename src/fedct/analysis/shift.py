"""Domain shift between sites as models see it: (model x site) matrices of Dice and of a
label-free signal, and the label-free ranking of sites. Pure table logic."""

from __future__ import annotations

import numpy as np
import pandas as pd

from fedct.analysis.failure import SIGNALS
from fedct.data.cases import POOLED


def shift_matrices(cases: pd.DataFrame, signal: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(model x test site) mean test Dice and mean signal; rows models, columns sites."""
    test = cases[cases["split"] == "test"]
    dice = test.pivot_table(index="model", columns="site", values="dice", aggfunc="mean")
    finite = test.assign(**{signal: test[signal].replace(np.inf, np.nan)})
    unc = finite.pivot_table(index="model", columns="site", values=signal, aggfunc="mean")
    return dice, unc


def site_ranking(cases: pd.DataFrame, signal: str) -> pd.DataFrame:
    """Test sites ranked by mean label-free uncertainty of the local models (no labels).

    A site's own model is left out: it has seen that site, so its confidence there says
    nothing about shift. Pooled is left out too: it has seen every training site. A
    structure that a model did not predict at all scores +inf, so a site where that
    happens ranks above every site where it does not (ties broken by the median).
    """
    test = cases[(cases["split"] == "test") & (cases["model"] != POOLED)]
    test = test[test["model"] != test["site"]]
    r = test.groupby("site")[signal].agg(["mean", "median", "count"])
    r = r.sort_values(["mean", "median"], ascending=False).reset_index()
    r["rank"] = np.arange(1, len(r) + 1)
    return r


def site_ranks(cases: pd.DataFrame) -> pd.DataFrame:
    """Rank of each test site (rows) under every label-free signal (columns); 1 = most uncertain."""
    ranks = {s: site_ranking(cases, s).set_index("site")["rank"] for s in SIGNALS}
    return pd.DataFrame(ranks).sort_index()
