"""predict's science: the card, the cohort's preprocessing, the way back to the input's
grid, the per-structure numbers and the failure flag."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from fedct.analysis.metrics import failure_signals
from fedct.data.preprocess import prepare_case
from fedct.errors import FedctError
from fedct.inference import segment
from fedct.inference.inputs import read_input
from fedct.model.io import load_model
from fedct.model.mc import mc_predict


def _card(model_dir: Path, **extra) -> segment.ModelCard:
    raw = json.loads((model_dir / "model_card.json").read_text())
    return segment.read_card({**raw, **extra}, "card")


def test_card_defaults_are_the_uncertainty_stage_defaults(model_dir: Path) -> None:
    card = _card(model_dir)
    assert (card.signal, card.aggregation, card.threshold, card.mc_samples) == (
        "sample_disagreement", "mean", None, 10)
    assert card.labels.structures == {1: "muscle", 2: "femur"}
    assert card.spec.roi_size == (12, 12, 16)
    lead = _card(model_dir, failure={"signal": "entropy", "threshold": 0.2,
                                     "aggregate": "max", "mc_samples": 20})
    assert (lead.signal, lead.aggregation, lead.threshold, lead.mc_samples) == (
        "entropy", "max", 0.2, 20)
    assert _card(model_dir, failure={"threshold": float("nan")}).threshold is None


def test_mc_inference_runs_in_the_precision_the_model_trained_in(model_dir: Path,
                                                                 monkeypatch) -> None:
    """``train.amp: false`` must reach predict's MC dropout through the card."""
    assert _card(model_dir).amp is True  # the card's training settings leave amp unset
    assert _card(model_dir, training={"amp": True}).amp is True
    off = _card(model_dir, training={"amp": False})
    assert off.amp is False
    seen: list[bool] = []
    monkeypatch.setattr(segment, "mc_predict",
                        lambda *a, amp, **k: seen.append(amp) or torch.zeros(1, 3, 2, 2, 2))
    model, _ = load_model(model_dir / "model.safetensors")
    segment.mc_probabilities(model, np.zeros((1, 12, 12, 16), np.float32), 2, 0,
                             torch.device("cpu"), off.amp)
    assert seen == [False]


@pytest.mark.parametrize("extra, message", [
    ({"failure": {"signal": "luck"}}, "failure signal 'luck' is not one of"),
    ({"failure": {"aggregation": "median"}}, "failure aggregation 'median' is not mean or max"),
    ({"failure": {"threshold": "high"}}, "failure threshold 'high' is not a number"),
    ({"preprocessing": {"spacing_mm": [2, 2, 2]}}, "no usable labels or preprocessing"),
    ({"reference_ml": [1.0]}, "reference_ml has 1 values for 2 structures"),
])
def test_bad_cards_are_refused(model_dir: Path, extra: dict, message: str) -> None:
    with pytest.raises(FedctError, match=f"^card: {message}"):
        _card(model_dir, **extra)


def test_preprocessing_is_the_cohort_stage_s(dicom_series: Path, model_dir: Path) -> None:
    image = read_input(dicom_series).image
    spec = _card(model_dir).spec
    x, grid = segment.preprocess(image, spec)
    np.testing.assert_array_equal(x, prepare_case(image, None, spec)["image"])
    assert x.shape == (1, *spec.roi_size) and grid.GetSize() == spec.roi_size
    assert grid.GetSpacing() == pytest.approx(spec.spacing_mm)


def test_maps_go_back_onto_the_input_grid(nifti_volume: Path, model_dir: Path) -> None:
    image = read_input(nifti_volume).image  # flipped x/y direction
    spec = _card(model_dir).spec
    _, grid = segment.preprocess(image, spec)
    labels = np.zeros(spec.roi_size, dtype=np.uint8)
    labels[2:10, 2:10, :] = 2
    back = segment.to_input_grid(labels, grid, image, label=True)
    for get in ("GetSize", "GetOrigin", "GetSpacing", "GetDirection"):
        np.testing.assert_allclose(getattr(back, get)(), getattr(image, get)())
    arr = sitk.GetArrayFromImage(back)
    assert set(np.unique(arr)) == {0, 2}  # nearest neighbour: no new classes
    # z is cropped (16 x 2 mm < 40 x 1.5 mm): end slices are outside the network's grid.
    assert arr[0].max() == 0 and arr[-1].max() == 0 and arr[20].max() == 2
    ones = segment.to_input_grid(np.ones(spec.roi_size, np.float32), grid, image, label=False)
    covered = float((sitk.GetArrayFromImage(ones) > 0.5).mean())
    assert segment.roi_coverage(grid, image) == pytest.approx(covered, abs=0.03)
    mask = sitk.GetArrayFromImage(segment.analysed_mask(grid, image))
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
    assert mask[0].max() == 0 and mask[20].min() == 1  # z cropped, x and y covered
    assert 0.5 < covered < 0.6  # 32 mm of 60 mm in z; x and y padded, fully covered


def test_structure_table_counts_voxels_hu_and_uncertainty(dicom_series: Path,
                                                          model_dir: Path) -> None:
    image = read_input(dicom_series).image
    hu = sitk.GetArrayFromImage(image)
    seg_arr = np.zeros(hu.shape, dtype=np.uint8)
    seg_arr[hu > 500] = 2  # the bone
    unc_arr = np.where(seg_arr == 2, 0.25, 0.0).astype(np.float32)
    seg, unc = sitk.GetImageFromArray(seg_arr), sitk.GetImageFromArray(unc_arr)
    seg.CopyInformation(image)
    unc.CopyInformation(image)
    rows = segment.structure_table(seg, unc, image, _card(model_dir).labels)
    muscle, femur = rows
    assert muscle == {"label": 1, "name": "muscle", "predicted": False, "voxels": 0,
                      "volume_ml": 0.0, "mean_hu": None, "mean_uncertainty": None}
    n = int((hu > 500).sum())
    assert femur["voxels"] == n and femur["predicted"]
    assert femur["volume_ml"] == pytest.approx(n * 1.0 * 1.0 * 1.5 / 1000)
    assert femur["mean_hu"] == pytest.approx(700.0)
    assert femur["mean_uncertainty"] == pytest.approx(0.25)


def test_failure_score_is_the_uncertainty_stage_s(dicom_series: Path, model_dir: Path
                                                  ) -> None:
    image = read_input(dicom_series).image
    card = _card(model_dir)
    model, _ = load_model(model_dir / "model.safetensors")
    x, _ = segment.preprocess(image, card.spec)
    probs = segment.mc_probabilities(model, x, 10, 0, torch.device("cpu"), True)
    out = segment.failure_flag(probs, card)
    # The stage: cached case -> mc_predict(T, batch, seed) -> signals -> mean over structures.
    stage_probs = mc_predict(model, torch.as_tensor(prepare_case(image, None, card.spec)
                                                    ["image"]), 10, 10, seed=0, amp=True)
    signals = failure_signals(stage_probs, card.reference_ml, card.spec.spacing_mm)
    assert out["score"] == pytest.approx(float(np.mean(signals["sample_disagreement"])))
    assert out["flag"] is None and "no failure threshold" in out["reason"]


@pytest.mark.parametrize("threshold, flag", [(0.0, True), (1e9, False)])
def test_flag_fires_at_the_threshold(dicom_series: Path, model_dir: Path, threshold: float,
                                     flag: bool) -> None:
    image = read_input(dicom_series).image
    # max_softmax_deficit is finite here (every class reaches p >= 0.1 somewhere).
    card = _card(model_dir, failure={"signal": "max_softmax_deficit",
                                     "threshold": threshold})
    model, _ = load_model(model_dir / "model.safetensors")
    x, _ = segment.preprocess(image, card.spec)
    out = segment.failure_flag(segment.mc_probabilities(model, x, 4, 0, torch.device("cpu"), True),
                               card)
    assert math.isfinite(out["score"]) and out["flag"] is flag
    assert out["threshold"] == threshold and set(out["per_structure"]) == {"muscle", "femur"}


def test_uncertainty_maps(dicom_series: Path, model_dir: Path) -> None:
    probs = torch.softmax(torch.randn(5, 3, 4, 4, 4), dim=1)
    ent = segment.uncertainty_map(probs, "entropy")
    assert ent.shape == (4, 4, 4) and ent.dtype == np.float32
    assert (ent >= 0).all() and (ent <= math.log(3) + 1e-6).all()
    with pytest.raises(FedctError, match="uncertainty map 'luck'"):
        segment.uncertainty_map(probs, "luck")
