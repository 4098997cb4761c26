"""The science of ``predict``, free of file I/O: model card -> preprocessing, MC dropout,
uncertainty, the prediction on the input's grid, per-structure numbers, the failure flag.

Arrays on the network grid are channel first as everywhere in fedct: an image
``(1, X, Y, Z)``, MC probabilities ``(T, C, X, Y, Z)``, maps ``(X, Y, Z)``. Results on the
input's grid are SimpleITK images with the input's size, origin, spacing and direction.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import SimpleITK as sitk
import torch

from fedct.analysis.failure import SIGNALS, aggregate_cases, case_records
from fedct.analysis.metrics import (
    argmax_segmentation,
    mutual_information_map,
    predictive_entropy_map,
    predictive_mean,
    predictive_variance_map,
    structure_uncertainty,
    structure_volumes_ml,
)
from fedct.config import UncertaintyParams
from fedct.data.labels import LabelSet, parse_labels
from fedct.data.preprocess import PrepSpec, normalise, resample, to_array
from fedct.errors import FedctError
from fedct.model.io import card_amp
from fedct.model.mc import mc_predict

# The uncertainty stage's defaults (equal to params.yaml): what a card without its own
# ``failure`` entry was evaluated with.
_UNCERTAINTY = UncertaintyParams()

# Voxel maps predict can write: name -> (function of (T, C, ...) probabilities, unit).
UNCERTAINTY_MAPS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], str]] = {
    "entropy": (predictive_entropy_map, "nats"),
    "variance": (predictive_variance_map, "variance of the softmax, mean over classes"),
    "mutual_information": (mutual_information_map, "nats"),
}


@dataclass(frozen=True)
class ModelCard:
    """What ``predict`` reads from a model card (``fedct.model.io``)."""

    site: str
    labels: LabelSet
    spec: PrepSpec
    reference_ml: tuple[float, ...]
    signal: str
    aggregation: str
    threshold: float | None  # None: the card carries no calibrated threshold
    mc_samples: int
    amp: bool  # bf16 autocast where the device has it: as the model trained (card_amp)


def read_card(card: Mapping[str, Any], where: str) -> ModelCard:
    """Check and read a model card; ``where`` names it in errors.

    The optional ``failure`` entry, ``{"signal", "threshold", "aggregation"}`` (the
    uncertainty stage's ``threshold.json``; ``aggregate`` is accepted for
    ``aggregation``), decides the flag; without it the signal and aggregation are the
    uncertainty stage's defaults and there is no threshold. ``mc_samples`` comes from
    ``failure``, then the card, then the uncertainty stage's default (the threshold was
    calibrated with that T).
    """
    try:
        labels = parse_labels(card["labels"], where)
        prep = card["preprocessing"]
        spec = PrepSpec(tuple(float(s) for s in prep["spacing_mm"]),
                        tuple(int(s) for s in prep["roi_size"]),
                        float(prep["hu_min"]), float(prep["hu_max"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise FedctError(f"{where}: no usable labels or preprocessing ({exc!r})") from exc
    if len(spec.spacing_mm) != 3 or len(spec.roi_size) != 3:
        raise FedctError(f"{where}: preprocessing needs 3 spacings and a 3D roi_size")
    failure = card.get("failure") or {}
    if not isinstance(failure, Mapping):
        raise FedctError(f"{where}: failure must be a mapping (signal, threshold, aggregation)")
    signal = str(failure.get("signal", _UNCERTAINTY.signal))
    if signal not in SIGNALS:
        raise FedctError(f"{where}: failure signal {signal!r} is not one of {list(SIGNALS)}")
    aggregation = str(failure.get("aggregation", failure.get("aggregate",
                                                             _UNCERTAINTY.aggregation)))
    if aggregation not in ("mean", "max"):
        raise FedctError(f"{where}: failure aggregation {aggregation!r} is not mean or max")
    threshold = failure.get("threshold")
    try:
        threshold = None if threshold is None else float(threshold)
    except (TypeError, ValueError) as exc:
        raise FedctError(f"{where}: failure threshold {threshold!r} is not a number") from exc
    if threshold is not None and math.isnan(threshold):
        threshold = None
    n = labels.n_classes - 1
    reference = card.get("reference_ml") or [float("nan")] * n
    if len(reference) != n:
        raise FedctError(f"{where}: reference_ml has {len(reference)} values for {n} "
                         "structures")
    mc_samples = int(failure.get("mc_samples") or card.get("mc_samples")
                     or _UNCERTAINTY.mc_samples)
    return ModelCard(str(card.get("site", "unknown")), labels, spec,
                     tuple(float(v) for v in reference), signal, aggregation, threshold,
                     mc_samples, card_amp(card))


def preprocess(image: sitk.Image, spec: PrepSpec) -> tuple[np.ndarray, sitk.Image]:
    """The network input ``(1, X, Y, Z)`` in [0, 1] and its grid (HU, on the spec's grid).

    The same steps as the cohort stage's ``fedct.data.preprocess.prepare_case`` (low-pass,
    resample and crop/pad centred on the scan, HU window), keeping the grid so that the
    prediction can go back to the input. The volume is first put in LPS axis order, the
    orientation of the axial DICOM stacks the models trained on (a no-op for them): a
    NIfTI stored RAS, or a coronal stack, would otherwise reach the network mirrored or
    with its axes swapped.
    """
    grid = resample(sitk.DICOMOrient(image, "LPS"), spec)
    return normalise(to_array(grid), spec), grid


def mc_probabilities(model: torch.nn.Module, image: np.ndarray, n_samples: int,
                     seed: int | None, device: torch.device, amp: bool,
                     batch: int = _UNCERTAINTY.mc_batch) -> torch.Tensor:
    """``(T, C, X, Y, Z)`` MC-dropout probabilities on the CPU, as the uncertainty stage
    samples them (same batching and seed; bf16 autocast when ``amp`` and the device has
    it)."""
    model.to(device)
    return mc_predict(model, torch.as_tensor(image), n_samples, batch,
                      amp=amp, seed=seed, output_device="cpu").float()


def _grid_image(values: np.ndarray, grid: sitk.Image) -> sitk.Image:
    """``(X, Y, Z)`` array -> SimpleITK image with the geometry of ``grid``."""
    out = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(values, (2, 1, 0))))
    out.CopyInformation(grid)
    return out


def to_input_grid(values: np.ndarray, grid: sitk.Image, reference: sitk.Image,
                  label: bool) -> sitk.Image:
    """Resample a network-grid map ``(X, Y, Z)`` onto ``reference``'s grid.

    Labels by nearest neighbour (class values stay classes), maps linearly. Both grids
    are in physical space, so the crop/pad of preprocessing is undone by the resampling:
    input voxels outside the network's grid get 0 (background, no uncertainty).
    """
    src = _grid_image(values, grid)
    interp = sitk.sitkNearestNeighbor if label else sitk.sitkLinear
    return sitk.Resample(src, reference, sitk.Transform(), interp, 0, src.GetPixelID())


def analysed_mask(grid: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """uint8 image on ``reference``'s grid: 1 where the voxel lies inside the network's
    grid (analysed), 0 where the network never looked (label 0 and uncertainty 0 there
    mean "not analysed", not "background" and "certain").

    A mask rather than NaN in the uncertainty map: ITK's NIfTI reader (SimpleITK, and the
    viewers built on ITK) reads NaN back as 0.
    """
    ones = np.ones(grid.GetSize()[::-1], dtype=np.uint8)
    inside = sitk.GetImageFromArray(ones)
    inside.CopyInformation(grid)
    return sitk.Resample(inside, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                         sitk.sitkUInt8)


def roi_coverage(grid: sitk.Image, reference: sitk.Image) -> float:
    """Fraction of the input's voxels inside the network's grid (1 unless the scan is
    larger than ``roi_size`` x ``spacing_mm``; the rest is never segmented)."""
    return float(sitk.GetArrayFromImage(analysed_mask(grid, reference)).mean())


def label_map(probs: torch.Tensor) -> np.ndarray:
    """Hard segmentation ``(X, Y, Z)`` from the MC predictive mean (uint8/uint16)."""
    n = probs.shape[1]
    seg = argmax_segmentation(predictive_mean(probs)).numpy()
    return seg.astype(np.uint8 if n <= 256 else np.uint16)


def uncertainty_map(probs: torch.Tensor, kind: str) -> np.ndarray:
    """Voxel uncertainty ``(X, Y, Z)`` float32 of ``UNCERTAINTY_MAPS[kind]``."""
    if kind not in UNCERTAINTY_MAPS:
        raise FedctError(f"uncertainty map {kind!r} is not one of {list(UNCERTAINTY_MAPS)}")
    return UNCERTAINTY_MAPS[kind][0](probs).numpy().astype(np.float32)


def _finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def structure_table(seg: sitk.Image, unc: sitk.Image, hu: sitk.Image,
                    labels: LabelSet) -> list[dict[str, Any]]:
    """One entry per structure on the input's grid: voxels, volume (mL), mean HU of the
    original image and mean uncertainty inside the predicted structure (None where it is
    not predicted)."""
    s = torch.as_tensor(sitk.GetArrayFromImage(seg).astype(np.int64))
    n = labels.n_classes
    spacing = hu.GetSpacing()
    volumes = structure_volumes_ml(s, n, spacing)
    voxels = torch.bincount(s.reshape(-1), minlength=n)[1:n].numpy()
    # structure_uncertainty is the mean of any voxel map inside each predicted structure.
    mean_hu = structure_uncertainty(torch.as_tensor(sitk.GetArrayFromImage(hu)), s, n)
    mean_unc = structure_uncertainty(torch.as_tensor(sitk.GetArrayFromImage(unc)), s, n)
    return [{"label": k, "name": name, "predicted": bool(voxels[k - 1] > 0),
             "voxels": int(voxels[k - 1]), "volume_ml": float(volumes[k - 1]),
             "mean_hu": _finite(mean_hu[k - 1]), "mean_uncertainty": _finite(mean_unc[k - 1])}
            for k, name in labels.structures.items()]


def failure_flag(probs: torch.Tensor, card: ModelCard) -> dict[str, Any]:
    """The case's failure score and flag, computed exactly as the uncertainty stage does.

    Per-structure signals come from ``fedct.analysis.failure.case_records`` (on the
    network grid, with the card's reference volumes) and are aggregated over structures
    by ``aggregate_cases``; the case is flagged when its score is >= the card's
    threshold (the stage's rule). Without a threshold ``flag`` is None and ``reason``
    says so. A structure not predicted at all scores +inf, written as ``"inf"``, as is a
    threshold of +inf (flag only such cases).
    """
    case = pd.Series({"site": "input", "series_key": "input", "split": "predict",
                      "role": "predict"})
    rows = case_records(card.site, case, probs, None, list(card.reference_ml),
                        card.spec.spacing_mm, card.labels)
    score = float(aggregate_cases(pd.DataFrame(rows), card.aggregation)[card.signal].iloc[0])
    out: dict[str, Any] = {
        "signal": card.signal, "aggregation": card.aggregation,
        # +inf (an unbounded signal whose calibration pairs missed a structure): "inf".
        "threshold": (card.threshold if card.threshold is None or np.isfinite(card.threshold)
                      else "inf"),
        "score": score if np.isfinite(score) else ("inf" if score > 0 else None),
        "per_structure": {r["structure"]: (float(r[card.signal])
                                           if np.isfinite(r[card.signal]) else "inf")
                          for r in rows},
    }
    if card.threshold is None:
        out.update(flag=None, reason="the model card has no failure threshold "
                   "(set at promotion from the uncertainty stage); score reported unflagged")
    else:
        out.update(flag=bool(score >= card.threshold),
                   reason="score >= threshold" if score >= card.threshold
                   else "score < threshold")
    return out
