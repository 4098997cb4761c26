"""Figures of the uncertainty analysis."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def heatmap(table: pd.DataFrame, path: Path, title: str, cmap: str, fmt: str = ".2f") -> None:
    """A (model x site) table as an annotated heatmap (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * table.shape[1], 1.0 + 0.45 * table.shape[0]))
    im = ax.imshow(table.to_numpy(dtype=float), cmap=cmap, aspect="auto")
    ax.set_xticks(range(table.shape[1]), table.columns)
    ax.set_yticks(range(table.shape[0]), table.index)
    ax.set_xlabel("test site")
    ax.set_ylabel("model (training site)")
    for i in range(table.shape[0]):
        for j in range(table.shape[1]):
            v = table.iat[i, j]
            if np.isfinite(v):
                ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def scatter(cases: pd.DataFrame, signal: str, threshold: float, failure_dice: float,
             path: Path) -> None:
    """Signal against Dice for every (model, case), with the failure and flag lines (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = cases.dropna(subset=["dice"])
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for site, g in d.groupby("site"):
        ax.scatter(g[signal].replace(np.inf, np.nan), g["dice"], s=12, label=site)
    ax.axhline(failure_dice, color="k", ls="--", lw=0.8)
    if np.isfinite(threshold):
        ax.axvline(threshold, color="r", ls=":", lw=1)
    ax.set(xlabel=f"{signal} (label-free)", ylabel="mean Dice",
           title="Uncertainty vs Dice, every (model, case)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def risk_coverage_plot(curves: pd.DataFrame, chosen: str, path: Path) -> None:
    """Risk-coverage curves: the frozen signal bold, other signals thin, baselines dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for (signal, kind), g in curves.groupby(["signal", "kind"], sort=True):
        style = {"lw": 2.5, "color": "k", "zorder": 3} if signal == chosen else (
            {"lw": 1.2, "ls": "--"} if kind == "baseline" else {"lw": 0.8, "alpha": 0.7})
        ax.step(g["coverage"], g["risk"], where="post", label=signal, **style)
    ax.set(xlabel="coverage (fraction of pairs kept, most confident first)",
           ylabel="risk (failure rate among kept pairs)", xlim=(0, 1), ylim=(0, None),
           title="Risk-coverage on test pairs (lower is better)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def interval_bars(table: pd.DataFrame, path: Path, title: str, ylabel: str) -> None:
    """Grouped bars with 95 % interval whiskers (PNG): one group per ``candidate``, one
    bar per ``site`` (columns ``candidate, site, dice, lo, hi``, e.g.
    ``fedct.analysis.heldout.dice_by_site``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    candidates = list(dict.fromkeys(table["candidate"]))
    sites = list(dict.fromkeys(table["site"]))
    width = 0.8 / max(len(sites), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.5 + 0.9 * len(candidates)), 4.0))
    for k, site in enumerate(sites):
        g = table[table["site"] == site].set_index("candidate").reindex(candidates)
        x = np.arange(len(candidates)) + (k - (len(sites) - 1) / 2) * width
        est = g["dice"].to_numpy(dtype=float)
        err = np.vstack([est - g["lo"].to_numpy(dtype=float),
                         g["hi"].to_numpy(dtype=float) - est])
        ax.bar(x, est, width, label=str(site))
        ax.errorbar(x, est, yerr=np.nan_to_num(err), fmt="none", ecolor="k", lw=0.8,
                    capsize=2)
    ax.set_xticks(range(len(candidates)), candidates, rotation=30, ha="right")
    ax.set(ylabel=ylabel, ylim=(0, 1))
    ax.set_title(title, fontsize=9)
    ax.legend(title="held-out site", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
