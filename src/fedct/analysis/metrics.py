"""Uncertainty maps, segmentation accuracy and failure-detection statistics.

Pure functions, no I/O. Voxel-wise functions take torch tensors (numpy arrays are
accepted and converted) so they also run on the GPU next to ``mc_predict``; per-structure
results are float64 numpy arrays of shape ``(C - 1,)`` where entry ``k`` is foreground class
``k + 1`` (background is never scored). Shapes:

- ``probs``: MC softmax samples ``(T, C, *S)`` with ``S`` the spatial shape ``(X, Y, Z)``.
- ``mean_probs``: predictive mean ``(C, *S)``.
- ``seg`` / ``label``: integer class maps ``(*S)``.
- ``spacing_mm``: voxel size in mm per spatial axis.

Entropies and mutual information are in nats; variances are of probabilities (unitless).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

# MONAI (whose ``__init__`` imports all of it, ~10 CPU-s), scipy and scikit-learn are
# imported by the functions that score against labels or compute statistics: the
# uncertainty maps, which ``fedct predict`` needs, import neither.

Array = torch.Tensor | np.ndarray


def _tensor(x: Array) -> torch.Tensor:
    return torch.as_tensor(x)


def _entropy(p: torch.Tensor, dim: int) -> torch.Tensor:
    # xlogy gives 0 * log 0 = 0, so one-hot probabilities have zero entropy, not NaN.
    return -torch.special.xlogy(p, p).sum(dim=dim)


# --- voxel maps from MC samples ------------------------------------------------------------


def class_argmax(values: torch.Tensor, dim: int) -> torch.Tensor:
    """``values.argmax(dim)`` (first maximum wins) for a short class axis, int64.

    On CPU torch reduces over a non-innermost axis one strided element at a time; a
    running maximum over the C class slices is the same result ~5x faster for C = 9
    (it was a third of the uncertainty stage).

    Raises:
        ValueError: on NaN, which ``torch.argmax`` would return as the maximum and this
            loop would skip (e.g. fp16 overflow upstream): neither is a segmentation.
    """
    if torch.isnan(values).any():
        raise ValueError("class_argmax: probabilities contain NaN (overflow upstream?)")
    v = values.movedim(dim, 0)
    best = v[0].clone()
    index = torch.zeros(v.shape[1:], dtype=torch.int64, device=v.device)
    for c in range(1, v.shape[0]):
        index.masked_fill_(v[c] > best, c)
        torch.maximum(best, v[c], out=best)
    return index


def predictive_mean(probs: Array) -> torch.Tensor:
    """Mean softmax over the T samples: ``(T, C, *S)`` -> ``(C, *S)``."""
    return _tensor(probs).mean(dim=0)


def argmax_segmentation(mean_probs: Array) -> torch.Tensor:
    """Hard segmentation from the predictive mean: ``(C, *S)`` -> ``(*S)`` int64 classes."""
    return class_argmax(_tensor(mean_probs), dim=0)


def predictive_variance_map(probs: Array) -> torch.Tensor:
    """The lab's "variance": per-class variance of the softmax over T, averaged over classes.

    Population variance (divide by T), as ``K.var`` in the lab's MC sampler.
    ``(T, C, *S)`` -> ``(*S)``; 0 when all samples agree, at most 0.25.
    """
    p = _tensor(probs)
    # Two elementwise passes: torch.var over the leading axis is ~3x slower on CPU.
    return (p - p.mean(dim=0)).square_().mean(dim=0).mean(dim=0)


def predictive_entropy_map(probs: Array) -> torch.Tensor:
    """Entropy of the predictive mean, ``-sum_c p_mean log p_mean`` in nats.

    ``(T, C, *S)`` -> ``(*S)``; total (aleatoric + epistemic) uncertainty, in
    ``[0, log C]`` with the maximum at the uniform distribution.
    """
    return _entropy(predictive_mean(probs), dim=0)


def mutual_information_map(probs: Array) -> torch.Tensor:
    """Mutual information (BALD): entropy of the mean minus mean per-sample entropy, nats.

    ``(T, C, *S)`` -> ``(*S)``. The epistemic part of the entropy: high where the samples
    disagree, zero where they agree, however flat each one is. Non-negative by
    concavity of entropy; rounding noise below 0 is clipped.
    """
    p = _tensor(probs)
    expected = _entropy(p, dim=1).mean(dim=0)
    return (predictive_entropy_map(p) - expected).clamp_min(0.0)


# --- per-structure summaries ---------------------------------------------------------------


def _per_class_mean(values: torch.Tensor, classes: torch.Tensor, n_classes: int) -> np.ndarray:
    """Mean of ``values`` over the voxels of each class 1..C-1; NaN where a class is absent."""
    flat = classes.reshape(-1).long()
    sums = torch.bincount(flat, weights=values.reshape(-1).double(), minlength=n_classes)
    counts = torch.bincount(flat, minlength=n_classes).double()
    mean = sums / counts  # 0 / 0 -> NaN marks absent classes
    return mean[1:n_classes].cpu().numpy()


def structure_uncertainty(unc_map: Array, seg: Array, n_classes: int) -> np.ndarray:
    """Mean voxel uncertainty inside each predicted structure (the lab's structure-wise score).

    Args:
        unc_map: ``(*S)`` voxel uncertainty (variance, entropy, MI...).
        seg: ``(*S)`` predicted classes.
        n_classes: C, including background.

    Returns:
        ``(C - 1,)`` means; NaN where the structure is not predicted at all.
    """
    return _per_class_mean(_tensor(unc_map), _tensor(seg), n_classes)


def structure_volumes_ml(seg: Array, n_classes: int, spacing_mm: Sequence[float]) -> np.ndarray:
    """Volume of each structure 1..C-1 in mL (voxel count x voxel volume in mm^3 / 1000).

    Averaged over the training labels this gives the ``reference_ml`` of ``volume_ratio``.
    """
    counts = torch.bincount(_tensor(seg).reshape(-1).long(), minlength=n_classes)
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    return counts[1:n_classes].cpu().numpy().astype(np.float64) * voxel_ml


# --- accuracy against labels ---------------------------------------------------------------


def _one_hot_pair(seg: Array, label: Array, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    from monai.networks.utils import one_hot

    s, lab = _tensor(seg), _tensor(label)
    if s.shape != lab.shape:
        raise ValueError(f"seg and label shapes differ: {tuple(s.shape)} vs {tuple(lab.shape)}")
    return (
        one_hot(s[None, None].long(), n_classes, dim=1),
        one_hot(lab[None, None].long(), n_classes, dim=1),
    )


def dice_per_structure(seg: Array, label: Array, n_classes: int) -> np.ndarray:
    """Dice of each structure 1..C-1 (MONAI ``DiceMetric``, background excluded).

    Empty cases: label present and prediction empty -> 0 (a missed structure is a
    failure); label empty and prediction present -> 0 (a hallucinated structure); both
    empty -> NaN (nothing to score; excluded from means with ``np.nanmean``).

    Returns:
        ``(C - 1,)`` Dice in [0, 1] or NaN.
    """
    from monai.metrics import DiceMetric

    pred, lab = _one_hot_pair(seg, label, n_classes)
    # ignore_empty=False scores an empty label 0 when something was predicted; MONAI scores
    # both-empty as 1, which we turn into NaN below.
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=False)
    dice = metric(pred, lab)[0].double()
    both_empty = ~(pred.flatten(2).any(dim=2) | lab.flatten(2).any(dim=2))[0, 1:]
    dice[both_empty] = float("nan")
    return dice.cpu().numpy()


def hd95_per_structure(
    seg: Array, label: Array, n_classes: int, spacing_mm: Sequence[float]
) -> np.ndarray:
    """95th-percentile symmetric Hausdorff distance of each structure 1..C-1, in mm.

    MONAI's ``compute_hausdorff_distance`` (percentile 95, surface distances scaled by
    ``spacing_mm``). Empty cases: exactly one of label / prediction empty -> the image
    diagonal in mm, the largest distance the grid allows (a finite worst case, so a missed
    structure ranks worst and means stay finite; MONAI would give inf); both empty -> NaN.

    Returns:
        ``(C - 1,)`` distances in mm or NaN.
    """
    from monai.metrics import compute_hausdorff_distance

    pred, lab = _one_hot_pair(seg, label, n_classes)
    pred, lab = pred[:, 1:], lab[:, 1:]
    pred_any = pred.flatten(2).any(dim=2)[0]
    lab_any = lab.flatten(2).any(dim=2)[0]
    shape = np.asarray(pred.shape[2:], dtype=np.float64)
    diagonal = float(np.linalg.norm((shape - 1.0) * np.asarray(spacing_mm, dtype=np.float64)))
    out = np.full(n_classes - 1, np.nan)
    out[(pred_any ^ lab_any).cpu().numpy()] = diagonal
    both = torch.nonzero(pred_any & lab_any).flatten()
    if both.numel():
        # Only structures present in both: MONAI warns and returns inf/NaN on empty masks.
        hd = compute_hausdorff_distance(
            pred[:, both],
            lab[:, both],
            include_background=True,
            percentile=95,
            spacing=list(spacing_mm),
        )
        out[both.cpu().numpy()] = hd[0].double().cpu().numpy()
    return out


# --- label-free failure signals ------------------------------------------------------------
#
# Plain in-structure uncertainty misses *confident under-segmentation*: a model that
# predicts a small piece of a structure with low variance inside it looks certain. The
# signals below look where that failure leaves traces: in the size of what was predicted,
# in probability mass that did not make it into the segmentation, around its boundary and
# in how much the individual MC samples agree.


def volume_ratio(
    seg: Array, reference_ml: Sequence[float], spacing_mm: Sequence[float]
) -> np.ndarray:
    """Predicted volume of each structure over its reference (training-set mean) volume.

    ``reference_ml`` has one entry per structure 1..C-1 (``structure_volumes_ml`` averaged
    over the training labels). Under-segmentation gives ratios well below 1 however
    confident the model is; ``|log ratio|`` is the failure score. NaN where the reference
    is 0.

    Returns:
        ``(C - 1,)`` unitless ratios.
    """
    ref = np.asarray(reference_ml, dtype=np.float64)
    vol = structure_volumes_ml(seg, ref.size + 1, spacing_mm)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(ref > 0, vol / ref, np.nan)


def unassigned_mass_fraction(mean_probs: Array, seg: Array) -> np.ndarray:
    """Fraction of each structure's probability mass lying outside its predicted voxels.

    ``1 - sum_{seg == c} p_c / sum_all p_c`` from the predictive mean ``(C, *S)``. A model
    that under-segments under shift often still puts sub-threshold probability (say 0.3)
    on the missed part; the argmax drops it, this fraction keeps it. NaN where class
    ``c`` has no probability mass at all.

    Returns:
        ``(C - 1,)`` fractions in [0, 1].
    """
    p = _tensor(mean_probs).double()
    s = _tensor(seg).long()
    inside = torch.stack([p[c][s == c].sum() for c in range(1, p.shape[0])])
    total = p[1:].flatten(1).sum(dim=1)
    return (1.0 - inside / total).cpu().numpy()


def _dilate(mask: torch.Tensor, width: int) -> torch.Tensor:
    """Binary dilation of a ``(*S)`` 3D mask with a ``(2 width + 1)^3`` cube."""
    k = 2 * width + 1
    return F.max_pool3d(mask[None, None].float(), k, stride=1, padding=width)[0, 0] > 0


def boundary_band_uncertainty(
    unc_map: Array, seg: Array, n_classes: int, width: int = 1
) -> np.ndarray:
    """Mean uncertainty in a band of ``width`` voxels on both sides of each structure's surface.

    The band is the dilation minus the erosion of the predicted structure (cube structuring
    element, 3D volumes). Where a structure is under-segmented its true extent lies just
    outside the predicted surface, so uncertainty concentrates there while the interior
    stays confident. NaN where the structure is not predicted.

    Returns:
        ``(C - 1,)`` mean uncertainty per structure.
    """
    u, s = _tensor(unc_map), _tensor(seg).long()
    if s.ndim != 3:
        raise ValueError(f"boundary_band_uncertainty needs a 3D seg, got shape {tuple(s.shape)}")
    out = np.full(n_classes - 1, np.nan)
    for c in range(1, n_classes):
        mask = s == c
        if not mask.any():
            continue
        band = _dilate(mask, width) & _dilate(~mask, width)
        out[c - 1] = float(u[band].double().mean())
    return out


def max_softmax_deficit(mean_probs: Array, min_prob: float = 0.1) -> np.ndarray:
    """Mean ``1 - max_c p_mean`` over each structure's candidate region ``{p_mean_c >= min_prob}``.

    The candidate region includes voxels that the argmax gave to another class, so a
    hesitant extension of an under-segmented structure counts even though it is not in
    the segmentation. NaN where no voxel reaches ``min_prob``.

    Returns:
        ``(C - 1,)`` deficits in [0, 1 - 1/C].
    """
    p = _tensor(mean_probs)
    deficit = 1.0 - p.max(dim=0).values.double()
    out = np.full(p.shape[0] - 1, np.nan)
    for c in range(1, p.shape[0]):
        region = p[c] >= min_prob
        if region.any():
            out[c - 1] = float(deficit[region].mean())
    return out


def mc_sample_agreement(probs: Array) -> np.ndarray:
    """Mean Dice between each MC sample's argmax segmentation and the mean segmentation.

    ``(T, C, *S)`` -> ``(C - 1,)``. 1 when every sample segments the structure identically.
    Samples where both the sample and the mean segmentation lack the structure are skipped
    (they agree on its absence but have nothing to overlap); NaN if all are skipped.
    """
    p = _tensor(probs)
    n_classes = p.shape[1]
    consensus = argmax_segmentation(predictive_mean(p))
    samples = class_argmax(p, dim=1)
    out = np.full(n_classes - 1, np.nan)
    for c in range(1, n_classes):
        ref = (consensus == c).flatten()
        each = (samples == c).flatten(1)
        overlap = (each & ref).sum(dim=1).double()
        size = each.sum(dim=1).double() + ref.sum().double()
        scored = size > 0
        if scored.any():
            out[c - 1] = float((2.0 * overlap[scored] / size[scored]).mean())
    return out


def failure_signals(
    probs: Array, reference_ml: Sequence[float], spacing_mm: Sequence[float]
) -> dict[str, np.ndarray]:
    """All per-structure label-free failure scores of one image, higher = more likely failed.

    Every entry is ``(C - 1,)``. A structure that is not predicted at all scores ``+inf``
    on every signal that is undefined for it: the study's anatomy has every structure in
    every scan, so absence is itself a failure. Rank-based statistics (``failure_auroc``,
    ``spearman``) handle ``inf``; aggregate per image with e.g. ``max`` over structures.

    Signals: in-structure ``variance``, ``entropy`` and ``mutual_information`` (the
    plain ones), ``boundary_entropy``, ``volume_deviation`` (``|log volume_ratio|``),
    ``unassigned_mass``, ``max_softmax_deficit`` and ``sample_disagreement``
    (``1 - mc_sample_agreement``).
    """
    p = _tensor(probs)
    n_classes = p.shape[1]
    mean = predictive_mean(p)
    seg = argmax_segmentation(mean)
    entropy = predictive_entropy_map(p)
    with np.errstate(divide="ignore"):
        volume_deviation = np.abs(np.log(volume_ratio(seg, reference_ml, spacing_mm)))
    signals = {
        "variance": structure_uncertainty(predictive_variance_map(p), seg, n_classes),
        "entropy": structure_uncertainty(entropy, seg, n_classes),
        "mutual_information": structure_uncertainty(mutual_information_map(p), seg, n_classes),
        "boundary_entropy": boundary_band_uncertainty(entropy, seg, n_classes),
        "volume_deviation": volume_deviation,
        "unassigned_mass": unassigned_mass_fraction(mean, seg),
        "max_softmax_deficit": max_softmax_deficit(mean),
        "sample_disagreement": 1.0 - mc_sample_agreement(p),
    }
    return {name: np.where(np.isnan(v), np.inf, v) for name, v in signals.items()}


# --- failure-detection statistics ----------------------------------------------------------


def _paired(x: Array, y: Array) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(x, dtype=np.float64).ravel()
    b = np.asarray(y, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"need paired values, got {a.size} and {b.size}")
    return a, b


def spearman(x: Array, y: Array) -> float:
    """Spearman rank correlation of paired values, NaN pairs dropped (``scipy.stats``).

    E.g. structure uncertainty vs Dice: a useful uncertainty correlates negatively.
    NaN if fewer than 3 pairs remain or either side is constant.
    """
    a, b = _paired(x, y)
    keep = ~(np.isnan(a) | np.isnan(b))
    a, b = a[keep], b[keep]
    if a.size < 3 or np.all(a == a[0]) or np.all(b == b[0]):
        return float("nan")
    from scipy import stats

    return float(stats.spearmanr(a, b).statistic)


def scores_and_labels(scores: Array, failed: Array) -> tuple[np.ndarray, np.ndarray]:
    """``scores`` as float64 and ``failed`` as bool, both flat and of one length, checked
    once for every statistic of a failure score (AUROC, AURC, the bootstrap): a NaN score
    is a ValueError, not a case silently dropped."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    f = np.asarray(failed).ravel().astype(bool)
    if s.shape != f.shape:
        raise ValueError(f"need one failure flag per score, got {s.size} and {f.size}")
    if np.isnan(s).any():
        # Silently dropping NaN cases would drop exactly the absent structures, i.e. the
        # worst failures; the caller must decide (failure_signals maps them to +inf).
        raise ValueError("scores contain NaN; map them to a value first (e.g. +inf = worst)")
    return s, f


# Settings for scikit-learn calls on inputs scores_and_labels has checked.
_CHECKED = {"assume_finite": True, "skip_parameter_validation": True}


def _roc(scores: np.ndarray, failed: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``sklearn.metrics.roc_curve`` of every distinct score: false-alarm rate, sensitivity
    and the threshold (flag when ``score >= threshold``), high to low threshold.

    scikit-learn refuses infinite scores, but ``+inf`` is this module's "worst" (an absent
    structure); every statistic here depends on the scores' order alone, so the curve is
    computed on dense ranks and its thresholds mapped back to the scores. The inputs are
    checked by ``scores_and_labels``, so callers skip scikit-learn's own validation
    (``_CHECKED``: most of its time per call, which the bootstrap makes thousands of
    times). roc_curve's leading "flag nothing" point (threshold ``inf``) is kept for the
    area; callers that want observed thresholds drop it.
    """
    from sklearn.metrics import roc_curve

    distinct = np.unique(scores)
    ranks = np.searchsorted(distinct, scores)
    false_alarm, sensitivity, at = roc_curve(failed, ranks, drop_intermediate=False)
    thresholds = np.concatenate([[np.inf], distinct[at[1:].astype(np.int64)]])
    return false_alarm, sensitivity, thresholds


def failure_auroc(scores: Array, failed: Array) -> float:
    """AUROC of ``scores`` for detecting failed cases (higher score = more likely failed).

    The trapezoid area under ``sklearn.metrics.roc_curve`` (what ``roc_auc_score`` computes
    for two classes): with ties it equals the probability that a random failed case scores
    above a random good one, ties counting 1/2 (Mann-Whitney U / (n_failed * n_ok)).
    1 = perfect, 0.5 = chance, 0 = perfectly reversed. NaN when only one class is present
    (where scikit-learn raises). ``+inf`` scores are allowed (ranked above every finite
    score); NaN scores raise.
    """
    s, f = scores_and_labels(scores, failed)
    if f.all() or not f.any():
        return float("nan")
    import sklearn
    from sklearn.metrics import auc

    with sklearn.config_context(**_CHECKED):
        false_alarm, sensitivity, _ = _roc(s, f)
        return float(auc(false_alarm, sensitivity))


def flag_threshold(scores: Array, failed: Array, min_sensitivity: float | None = None) -> float:
    """Threshold a consumer should flag at: flag a case when ``score >= threshold``.

    Fit on validation cases with known failures, then apply unchanged to unlabelled sites.
    By default the threshold maximises Youden's J = sensitivity + specificity - 1 (ties go
    to the higher threshold, i.e. fewer flags). With ``min_sensitivity`` it is instead the
    highest threshold that still flags at least that fraction of failures (for a consumer
    who must catch, e.g., 95 % of failures whatever the false-alarm cost).

    Candidate thresholds are the observed scores (``sklearn.metrics.roc_curve``'s, every
    one kept). NaN when only one class is present.
    """
    if min_sensitivity is not None and not 0.0 < min_sensitivity <= 1.0:
        raise ValueError(f"min_sensitivity must be in (0, 1], got {min_sensitivity}")
    s, f = scores_and_labels(scores, failed)
    if f.all() or not f.any():
        return float("nan")
    import sklearn

    with sklearn.config_context(**_CHECKED):
        false_alarm, sensitivity, thresholds = _roc(s, f)
    # Drop the leading "flag nothing" point; the rest run high to low threshold.
    false_alarm, sensitivity, thresholds = false_alarm[1:], sensitivity[1:], thresholds[1:]
    if min_sensitivity is not None:
        # Sensitivity only grows as the threshold falls: the first hit is the highest.
        return float(thresholds[np.argmax(sensitivity >= min_sensitivity)])
    # argmax takes the first maximum, i.e. the highest threshold among equal J.
    return float(thresholds[np.argmax(sensitivity - false_alarm)])


