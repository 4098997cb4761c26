"""Baselines that a failure signal must beat: what a sceptic would try first.

- ``header_rule``: the acquisition, read from DICOM headers, is outside what the model was
  trained on: the number of fields (vendor, scanner model, kernel, slice-thickness class)
  whose value never occurs in the model's training cases. No image is looked at.
- ``deterministic_max_softmax``: one deterministic pass (dropout off), 1 - max softmax
  averaged over the voxels the pass segments as foreground. No MC sampling.
- ``noise_estimate``: an image statistic, the robust noise level (HU) of soft tissue in
  the prepared image. No model at all.

Every score is "higher = more likely failed", like the uncertainty signals.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from scipy import ndimage

from fedct.data.cases import POOLED

BASELINES = ("header_rule", "deterministic_max_softmax", "noise_estimate")
# Columns of cohort.csv; thickness_class is the catalogue's (thin / medium / thick).
HEADER_FIELDS = ("vendor", "model", "kernel", "thickness_class")


def training_conditions(cohort: pd.DataFrame, model_site: str) -> dict[str, set]:
    """The header values of each field among the training cases of ``model_site``."""
    c = cohort[(cohort["role"] == "train") & (cohort["split"] == "train")]
    if model_site != POOLED:
        c = c[c["site"] == model_site]
    return {f: set(c[f].astype(str)) for f in HEADER_FIELDS}


def header_rule(pairs: pd.DataFrame, cohort: pd.DataFrame) -> pd.Series:
    """Per (model, case) row of ``pairs``: how many header fields the model never trained on.

    ``pairs`` has ``model`` and ``series_key``; ``cohort`` the header columns of each case.
    """
    info = cohort.set_index("series_key")
    seen = {m: training_conditions(cohort, m) for m in pairs["model"].unique()}
    scores = []
    for model, key in zip(pairs["model"], pairs["series_key"], strict=True):
        row = info.loc[key]
        scores.append(sum(str(row[f]) not in seen[model][f] for f in HEADER_FIELDS))
    return pd.Series(scores, index=pairs.index, dtype=float)


def deterministic_max_softmax(probs: torch.Tensor) -> float:
    """1 - mean max softmax over predicted-foreground voxels of one deterministic pass.

    ``probs``: ``(C, X, Y, Z)`` softmax of one pass with dropout off. A pass that predicts
    no foreground at all scores +inf (nothing was found: a failure).
    """
    top, seg = probs.max(dim=0)
    fg = seg > 0
    if not bool(fg.any()):
        return float("inf")
    return float(1.0 - top[fg].double().mean())


def noise_estimate(image: np.ndarray, hu_min: float, hu_max: float,
                   tissue_hu: tuple[float, float] = (-150.0, 150.0)) -> float:
    """Robust noise (HU) of soft tissue: 1.4826 x median |x - median3x3x3(x)|.

    ``image``: the prepared ``(1, X, Y, Z)`` volume, HU window [hu_min, hu_max] scaled to
    [0, 1]. Only voxels whose local median lies in ``tissue_hu`` count, so edges of bone
    and air do not pass for noise. NaN when no voxel qualifies.
    """
    hu = np.asarray(image[0], dtype=np.float64) * (hu_max - hu_min) + hu_min
    med = ndimage.median_filter(hu, size=3, mode="nearest")
    mask = (med > tissue_hu[0]) & (med < tissue_hu[1])
    if not mask.any():
        return float("nan")
    return float(1.4826 * np.median(np.abs(hu - med)[mask]))
