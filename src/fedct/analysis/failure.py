"""Failure detection from MC-dropout signals: per-structure records, case aggregation,
each signal's agreement with Dice, and the flag threshold. Pure table logic."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from fedct.analysis.metrics import (
    argmax_segmentation,
    dice_per_structure,
    failure_signals,
    flag_threshold,
    hd95_per_structure,
    predictive_mean,
)
from fedct.data.labels import LabelSet

# Scores that are one number per (model, case), repeated on each structure row.
CASE_SCORES = ("deterministic_max_softmax", "noise_estimate")
SIGNALS = ("variance", "entropy", "mutual_information", "boundary_entropy",
           "volume_deviation", "unassigned_mass", "max_softmax_deficit", "sample_disagreement")


# The worst value of each bounded signal for a C-class network. A structure the model
# does not predict at all scores +inf in ``failure_signals``; it is set to this worst
# value instead, so that a case missing one structure still ranks below a case missing
# three, and the mean over structures stays finite (the site ranking and AURC need
# finite, ordered scores). ``volume_deviation`` is unbounded and keeps +inf.
SIGNAL_WORST = {
    "variance": lambda c: 0.25,  # the variance of a probability is at most 1/4
    "entropy": math.log,
    "mutual_information": math.log,
    "boundary_entropy": math.log,
    "unassigned_mass": lambda c: 1.0,
    "max_softmax_deficit": lambda c: 1.0 - 1.0 / c,
    "sample_disagreement": lambda c: 1.0,
}


def cap_missing(signals: dict[str, np.ndarray], n_classes: int) -> dict[str, np.ndarray]:
    """``signals`` with each bounded one capped at its worst value (missing structures)."""
    return {name: (np.minimum(v, SIGNAL_WORST[name](n_classes)) if name in SIGNAL_WORST
                   else v) for name, v in signals.items()}


def case_records(model_site: str, case: pd.Series, probs: torch.Tensor,
                 label: np.ndarray | None, reference_ml: list[float],
                 spacing: tuple[float, ...], labels: LabelSet) -> list[dict]:
    """Per-structure rows for one (model, case); ``probs`` (T, C, X, Y, Z)."""
    signals = cap_missing(failure_signals(probs, reference_ml, spacing), labels.n_classes)
    seg = argmax_segmentation(predictive_mean(probs))
    if label is not None:
        lab = torch.as_tensor(label[0])
        dice = dice_per_structure(seg, lab, labels.n_classes)
        hd95 = hd95_per_structure(seg, lab, labels.n_classes, spacing)
    else:
        dice = hd95 = np.full(labels.n_classes - 1, np.nan)
    rows = []
    for k, name in labels.structures.items():
        rows.append({"model": model_site, "site": case["site"], "series_key": case["series_key"],
                     "split": case["split"], "role": case["role"], "structure": name,
                     "dice": dice[k - 1], "hd95": hd95[k - 1],
                     **{s: float(signals[s][k - 1]) for s in SIGNALS}})
    return rows


def aggregate_cases(structures: pd.DataFrame, aggregation: str = "mean") -> pd.DataFrame:
    """One row per (model, case): mean Dice and HD95, signals by ``aggregation`` over structures.

    The mean matches how case Dice is formed; a max lets one small, always-uncertain
    structure (a thin muscle at coarse sampling) dominate every case.
    """
    keys = ["model", "site", "series_key", "split", "role"]
    case_level = [c for c in CASE_SCORES if c in structures]
    agg = {"dice": "mean", "hd95": "mean", **dict.fromkeys(SIGNALS, aggregation),
           **dict.fromkeys(case_level, "first")}
    return structures.groupby(keys, sort=True).agg(agg).reset_index()


def calibrate_threshold(scores: pd.Series, failed: pd.Series, in_domain: pd.Series | None,
                        min_failures: int, in_domain_quantile: float) -> tuple[float, str]:
    """Threshold to flag at, from validation (model, case) pairs only; returns it and its rule.

    With at least ``min_failures`` failures among the validation pairs: Youden's J
    (``flag_threshold``). With fewer (well-trained models rarely fail on validation data),
    the label-free rule of out-of-distribution detection: the ``in_domain_quantile`` of
    the scores of in-domain pairs (``in_domain``: a model on its own site's cases, or the
    pooled model; None: all pairs), so that about 1 - ``in_domain_quantile`` of familiar
    cases are flagged and anything less familiar is. ``+inf`` (a structure not predicted)
    stays the highest score throughout.
    """
    if int(failed.sum()) >= min_failures and (~failed).any():
        return flag_threshold(scores, failed), "youden"
    base = scores[in_domain] if in_domain is not None else scores
    if base.empty:
        return float("nan"), "none"
    return (float(np.quantile(base.to_numpy(dtype=float), in_domain_quantile, method="higher")),
            f"in_domain_quantile_{in_domain_quantile:g}")
