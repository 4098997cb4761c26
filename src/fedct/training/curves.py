"""Learning curves of a training run."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from fedct.data.labels import LabelSet


def plot_curves(history: pd.DataFrame, path: Path, title: str, labels: LabelSet) -> None:
    """Training and validation loss, and validation Dice per structure, against epoch (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    ax[0].plot(history["epoch"], history["loss"], label="training")
    if "val_loss" in history:
        ax[0].plot(history["epoch"], history["val_loss"], label="validation")
        ax[0].legend(fontsize=7)
    ax[0].set(xlabel="epoch", ylabel="Dice + CE loss", title=f"{title}: loss")
    if "val_dice_mean" in history:
        v = history.dropna(subset=["val_dice_mean"])
        for n in labels.structures.values():
            ax[1].plot(v["epoch"], v[f"val_dice_{n}"], label=n, lw=0.8)
        ax[1].plot(v["epoch"], v["val_dice_mean"], "k", lw=2, label="mean")
        ax[1].set(xlabel="epoch", ylabel="Dice", ylim=(0, 1), title="validation Dice")
        ax[1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
