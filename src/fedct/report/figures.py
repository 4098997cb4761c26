"""Figures of the report, drawn in memory: each function returns PNG bytes.

Matplotlib's object API (``Figure`` with an Agg canvas), never pyplot, so no global state
and no display are touched; PNGs carry no software or date metadata, so the same inputs
give the same bytes.
"""

from __future__ import annotations

import io
from collections.abc import Mapping

import numpy as np
import pandas as pd

DPI = 90


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def heatmap(matrix: pd.DataFrame, title: str, cmap: str = "viridis", fmt: str = ".2f",
            xlabel: str = "test site", ylabel: str = "model (training site)") -> bytes:
    """A (rows x columns) table of numbers as an annotated heatmap; NaN cells stay blank."""
    values = matrix.to_numpy(dtype=float)
    fig = _figure(2.0 + 0.6 * max(matrix.shape[1], 1), 1.4 + 0.45 * max(matrix.shape[0], 1))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, aspect="auto")
    ax.set_xticks(range(matrix.shape[1]), [str(c) for c in matrix.columns])
    ax.set_yticks(range(matrix.shape[0]), [str(i) for i in matrix.index])
    ax.set(xlabel=xlabel, ylabel=ylabel)
    for (i, j), v in np.ndenumerate(values):
        if np.isfinite(v):
            # Light text on dark cells, so that every number stays readable.
            r, g, b, _ = im.cmap(im.norm(v))
            dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
            ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=7,
                    color="w" if dark else "k")
    fig.colorbar(im, ax=ax)
    ax.set_title(title, fontsize=10)
    return _png(fig)


def uncertainty_scatter(pairs: pd.DataFrame, signal: str, threshold: float | None = None,
                        failure_dice: float | None = None) -> bytes:
    """Label-free ``signal`` (x) against mean case Dice (y), one point per (model, case),
    coloured by test site; the flag threshold (vertical) and failure Dice (horizontal)."""
    fig = _figure(6.5, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    for site, g in pairs.groupby("site", sort=True):
        ax.scatter(g[signal], g["dice"], s=14, alpha=0.8, label=str(site))
    if failure_dice is not None and np.isfinite(failure_dice):
        ax.axhline(failure_dice, color="k", ls="--", lw=0.8, label="failure Dice")
    if threshold is not None and np.isfinite(threshold):
        ax.axvline(threshold, color="r", ls=":", lw=1.2, label="flag threshold")
    ax.set(xlabel=f"{signal} (label-free)", ylabel="mean Dice",
           title="Uncertainty against Dice, every (model, test case)")
    ax.legend(fontsize=6, ncol=2, title="test site", title_fontsize=7)
    return _png(fig)


def line_chart(histories: Mapping[str, pd.DataFrame], x: str, y: str, xlabel: str,
               ylabel: str, title: str, integer_x: bool = False) -> bytes:
    """Column ``y`` against ``x``, one line per entry of ``histories`` (its label); rows
    where ``y`` is NaN are left out (validation every few epochs)."""
    fig = _figure(6.5, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    for name, h in histories.items():
        h = h.dropna(subset=[y]).sort_values(x)
        ax.plot(h[x], h[y], marker="o", ms=3, lw=1.5, label=name)
    if integer_x:
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)


def round_curves(histories: Mapping[str, pd.DataFrame]) -> bytes:
    """Global validation Dice per round, one line per federated method."""
    return line_chart(histories, "round", "val_dice", "round", "global validation Dice",
                      "Federated training: validation Dice per round", integer_x=True)


def interval_chart(summary: pd.DataFrame, estimate: str, lo: str, hi: str) -> bytes:
    """Mean held-out Dice with its 95 % interval: models along x, one marker per site.

    ``summary``: one row per (model, site) with columns ``model``, ``site`` and the
    ``estimate``, ``lo``, ``hi`` columns named.
    """
    models = list(dict.fromkeys(summary["model"].astype(str)))
    sites = list(dict.fromkeys(summary["site"].astype(str)))
    fig = _figure(2.5 + 0.7 * len(models) * max(1, min(len(sites), 4) / 2), 4.5)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(len(sites), 1)
    for k, site in enumerate(sites):
        g = summary[summary["site"].astype(str) == site]
        x = np.array([models.index(m) for m in g["model"].astype(str)], dtype=float)
        x += (k - (len(sites) - 1) / 2) * width
        est = g[estimate].to_numpy(dtype=float)
        err = np.vstack([est - g[lo].to_numpy(dtype=float), g[hi].to_numpy(dtype=float) - est])
        ax.errorbar(x, est, yerr=np.clip(np.nan_to_num(err), 0, None), fmt="o", ms=4,
                    capsize=3, lw=1, label=site)
    ax.set_xticks(range(len(models)), models, rotation=30, ha="right")
    ax.set(xlabel="model", ylabel="mean Dice (95 % interval)",
           title="Held-out sites: mean Dice with 95 % intervals")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, title="site", title_fontsize=7)
    return _png(fig)
