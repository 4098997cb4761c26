from __future__ import annotations

import math
from itertools import product

import numpy as np
import pytest
import torch
from scipy import stats

from fedct.analysis.metrics import (
    argmax_segmentation,
    boundary_band_uncertainty,
    class_argmax,
    dice_per_structure,
    failure_auroc,
    failure_signals,
    flag_threshold,
    hd95_per_structure,
    max_softmax_deficit,
    mc_sample_agreement,
    mutual_information_map,
    predictive_entropy_map,
    predictive_mean,
    predictive_variance_map,
    spearman,
    structure_uncertainty,
    structure_volumes_ml,
    unassigned_mass_fraction,
    volume_ratio,
)

LOG2 = math.log(2.0)


def two_sample_probs() -> torch.Tensor:
    """T=2, C=2, three voxels: disagreeing one-hots, agreeing flat, agreeing confident."""
    s1 = [[1.0, 0.5, 1.0], [0.0, 0.5, 0.0]]
    s2 = [[0.0, 0.5, 1.0], [1.0, 0.5, 0.0]]
    return torch.tensor([s1, s2])  # (T=2, C=2, X=3)


def cube(shape: tuple[int, int, int], lo: tuple[int, ...], size: int, value: int = 1) -> np.ndarray:
    out = np.zeros(shape, dtype=np.int64)
    out[lo[0] : lo[0] + size, lo[1] : lo[1] + size, lo[2] : lo[2] + size] = value
    return out


def dirichlet_probs(t: int, c: int, n: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.as_tensor(rng.dirichlet(np.full(c, 0.5), size=(t, n)).transpose(0, 2, 1))


# --- voxel maps ---------------------------------------------------------------------------


def test_hand_computed_variance_entropy_and_mutual_information() -> None:
    p = two_sample_probs()
    torch.testing.assert_close(predictive_mean(p), torch.tensor([[0.5, 0.5, 1.0], [0.5, 0.5, 0]]))
    # Disagreeing one-hots: each class is 1 in one sample, 0 in the other -> variance 1/4.
    var = predictive_variance_map(p)
    torch.testing.assert_close(var, torch.tensor([0.25, 0.0, 0.0]))
    ent = predictive_entropy_map(p)
    torch.testing.assert_close(ent, torch.tensor([LOG2, LOG2, 0.0]))
    # MI separates the two flat-mean voxels: disagreement is epistemic, a flat agreed
    # distribution is not.
    torch.testing.assert_close(mutual_information_map(p), torch.tensor([LOG2, 0.0, 0.0]))


def test_entropy_is_maximal_at_uniform() -> None:
    c = 4
    uniform = torch.full((1, c, 1), 1.0 / c)
    assert predictive_entropy_map(uniform).item() == pytest.approx(math.log(c))
    others = predictive_entropy_map(dirichlet_probs(1, c, 500, seed=0))
    assert others.max() < math.log(c)


def test_mutual_information_is_between_zero_and_entropy() -> None:
    p = dirichlet_probs(6, 3, 1000, seed=1)
    mi = mutual_information_map(p)
    assert mi.min() >= 0
    assert (mi <= predictive_entropy_map(p) + 1e-12).all()
    assert mi.max() > 0.1  # not trivially zero
    identical = p[:1].expand(5, -1, -1)
    assert mutual_information_map(identical).max() < 1e-12  # zero up to rounding


def test_argmax_segmentation_of_mean() -> None:
    mean = torch.tensor([[0.2, 0.7], [0.5, 0.1], [0.3, 0.2]])
    assert argmax_segmentation(mean).tolist() == [1, 0]


def test_structure_uncertainty_means_and_nan_for_absent() -> None:
    unc = torch.tensor([0.1, 0.3, 0.5, 0.9, 0.0])
    seg = torch.tensor([1, 1, 2, 0, 0])
    out = structure_uncertainty(unc, seg, n_classes=4)
    assert out.shape == (3,)
    np.testing.assert_allclose(out[:2], [0.2, 0.5])
    assert np.isnan(out[2])


# --- accuracy against labels ----------------------------------------------------------------


def test_dice_of_shifted_cube() -> None:
    label = cube((10, 10, 10), (2, 2, 2), 4)
    pred = cube((10, 10, 10), (3, 2, 2), 4)  # shifted by one voxel: overlap 3 x 4 x 4 = 48
    np.testing.assert_allclose(dice_per_structure(pred, label, 2), [2 * 48 / 128])
    np.testing.assert_allclose(dice_per_structure(label, label, 2), [1.0])


def test_dice_empty_conventions() -> None:
    label = cube((8, 8, 8), (1, 1, 1), 3, value=1)
    pred = cube((8, 8, 8), (1, 1, 1), 3, value=3)  # class 1 missed, class 3 hallucinated
    out = dice_per_structure(pred, label, n_classes=4)
    assert out[0] == 0.0  # missed
    assert np.isnan(out[1])  # class 2 in neither
    assert out[2] == 0.0  # hallucinated


def test_hd95_uses_spacing_in_mm() -> None:
    shape = (6, 6, 8)
    label = np.zeros(shape, dtype=np.int64)
    pred = np.zeros(shape, dtype=np.int64)
    label[2, 2, 2] = 1
    pred[2, 2, 5] = 1  # 3 voxels apart along z
    np.testing.assert_allclose(hd95_per_structure(pred, label, 2, (1.0, 1.0, 1.0)), [3.0])
    np.testing.assert_allclose(hd95_per_structure(pred, label, 2, (1.0, 1.0, 2.5)), [7.5])
    np.testing.assert_allclose(hd95_per_structure(label, label, 2, (1.0, 1.0, 2.5)), [0.0])


def test_hd95_empty_conventions() -> None:
    shape = (5, 5, 5)
    label = cube(shape, (1, 1, 1), 2, value=1)
    pred = cube(shape, (1, 1, 1), 2, value=2)
    out = hd95_per_structure(pred, label, 4, (2.0, 1.0, 1.0))
    diagonal = math.sqrt(8.0**2 + 4.0**2 + 4.0**2)
    np.testing.assert_allclose(out[[0, 1]], [diagonal, diagonal])  # missed, hallucinated
    assert np.isnan(out[2])


def test_volumes_and_volume_ratio() -> None:
    seg = np.zeros((4, 4, 4), dtype=np.int64)
    seg[:2, :2, :2] = 1  # 8 voxels of 2 x 2 x 2.5 mm = 80 mm^3
    np.testing.assert_allclose(structure_volumes_ml(seg, 3, (2.0, 2.0, 2.5)), [0.08, 0.0])
    np.testing.assert_allclose(volume_ratio(seg, [0.16, 0.0], (2.0, 2.0, 2.5)), [0.5, np.nan])


# --- label-free signals ---------------------------------------------------------------------


def test_unassigned_mass_fraction() -> None:
    # Class 1 owns voxel 0 (p=0.8) and has sub-threshold mass 0.4 + 0.4 in voxels 1-2.
    mean = torch.tensor([[0.2, 0.6, 0.6, 1.0], [0.8, 0.4, 0.4, 0.0]])
    seg = argmax_segmentation(mean)
    np.testing.assert_allclose(unassigned_mass_fraction(mean, seg), [0.8 / 1.6])


def test_boundary_band_uncertainty() -> None:
    shape = (10, 10, 10)
    seg = cube(shape, (3, 3, 3), 4)
    unc = cube(shape, (2, 2, 2), 6).astype(np.float64) - seg  # 1 on the shell just outside
    # Band of width 1 = 6^3 dilation minus 2^3 erosion = 208 voxels; the outer shell is
    # 6^3 - 4^3 = 152 of them.
    np.testing.assert_allclose(boundary_band_uncertainty(unc, seg, 3), [152 / 208, np.nan])
    with pytest.raises(ValueError, match="3D"):
        boundary_band_uncertainty(unc[0], seg[0], 3)


def test_max_softmax_deficit_counts_voxels_the_argmax_dropped() -> None:
    mean = torch.tensor([[0.9, 0.7, 0.95], [0.1, 0.3, 0.05]])
    # Class 1 candidates (p >= 0.1): voxels 0 and 1, deficits 0.1 and 0.3.
    np.testing.assert_allclose(max_softmax_deficit(mean, min_prob=0.1), [0.2])
    assert np.isnan(max_softmax_deficit(mean, min_prob=0.5)[0])


def test_mc_sample_agreement() -> None:
    # One-hot samples (C=2, X=4): "full" segments voxels 0-2, "partial" only voxel 0.
    full = torch.tensor([[0.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
    partial = torch.tensor([[0.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    np.testing.assert_allclose(mc_sample_agreement(torch.stack([full, full])), [1.0])
    # The mean of (full, full, partial) segments voxels 0-2; Dice(partial, mean) = 2 / 4.
    probs = torch.stack([full, full, partial])
    np.testing.assert_allclose(mc_sample_agreement(probs), [(1 + 1 + 0.5) / 3])


def make_case(under_segmented: bool, seed: int) -> torch.Tensor:
    """MC probabilities (T=5, C=2) of a 16^3 case whose true structure is an 8^3 cube.

    Good cases segment the whole cube with some disagreement at the surface; the failure
    is *confidently* under-segmented: a 3^3 core with near-one-hot, agreeing samples.
    """
    gen = torch.Generator().manual_seed(seed)
    shape = (16, 16, 16)
    if under_segmented:
        fg = torch.as_tensor(cube(shape, (6, 6, 6), 3), dtype=torch.float64)
        p1 = (0.02 + 0.96 * fg).expand(5, *shape)
    else:
        core = torch.as_tensor(cube(shape, (5, 5, 5), 6), dtype=torch.float64)
        shell = torch.as_tensor(cube(shape, (4, 4, 4), 8), dtype=torch.float64) - core
        noise = torch.rand((5, *shape), generator=gen, dtype=torch.float64)
        p1 = 0.02 + 0.9 * core + shell * (0.3 + 0.6 * noise)
    return torch.stack([1 - p1, p1], dim=1)


def test_volume_signal_catches_confident_under_segmentation_that_variance_misses() -> None:
    cases = [make_case(i % 2 == 1, seed=i) for i in range(8)]
    failed = np.array([i % 2 == 1 for i in range(8)])
    reference_ml = [8**3 / 1000.0]
    signals = [failure_signals(p, reference_ml, (1.0, 1.0, 1.0)) for p in cases]
    per_signal = {k: np.array([s[k][0] for s in signals]) for k in signals[0]}
    # Inside the predicted structure the failed cases look *more* certain.
    assert failure_auroc(per_signal["variance"], failed) == 0.0
    assert failure_auroc(per_signal["volume_deviation"], failed) == 1.0


def test_failure_signals_orientation_and_absent_structure() -> None:
    probs = torch.zeros(3, 3, 4, 4, 4, dtype=torch.float64)
    probs[:, 0] = 0.9
    probs[:, 1] = 0.1  # class 1 never wins, class 2 never has mass
    signals = failure_signals(probs, [0.01, 0.01], (1.0, 1.0, 1.0))
    assert set(signals) == {
        "variance",
        "entropy",
        "mutual_information",
        "boundary_entropy",
        "volume_deviation",
        "unassigned_mass",
        "max_softmax_deficit",
        "sample_disagreement",
    }
    for name, values in signals.items():
        assert values.shape == (2,), name
        assert not np.isnan(values).any(), name
        assert values[1] == np.inf, name  # class 2 absent everywhere: worst on every signal
    assert signals["unassigned_mass"][0] == 1.0  # all class-1 mass is outside the seg


# --- failure-detection statistics ---------------------------------------------------------


def test_auroc_perfect_reversed_and_ties() -> None:
    failed = [False, False, True, True]
    assert failure_auroc([0.1, 0.2, 0.8, 0.9], failed) == 1.0
    assert failure_auroc([0.9, 0.8, 0.2, 0.1], failed) == 0.0
    assert failure_auroc([0.5, 0.5, 0.5, 0.5], failed) == 0.5
    assert failure_auroc([0.1, 0.2, np.inf, 0.9], failed) == 1.0
    assert math.isnan(failure_auroc([0.1, 0.2], [True, True]))


def test_auroc_equals_pairwise_probability_with_ties() -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=40).astype(float)  # many ties
    failed = rng.random(40) < 0.4
    pairs = [
        1.0 if a > b else 0.5 if a == b else 0.0
        for a, b in product(scores[failed], scores[~failed])
    ]
    assert failure_auroc(scores, failed) == pytest.approx(np.mean(pairs))


def test_auroc_refuses_nan_and_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="NaN"):
        failure_auroc([0.1, np.nan], [True, False])
    with pytest.raises(ValueError, match="one failure flag per score"):
        failure_auroc([0.1, 0.2, 0.3], [True, False])


def test_spearman_sign_and_nan_handling() -> None:
    x = np.arange(10.0)
    assert spearman(x, x**3) == pytest.approx(1.0)
    assert spearman(x, -np.exp(x)) == pytest.approx(-1.0)
    y = -x.copy()
    y[3] = np.nan
    assert spearman(x, y) == pytest.approx(-1.0)
    assert math.isnan(spearman(x, np.ones(10)))
    assert math.isnan(spearman([1.0, 2.0], [2.0, 1.0]))


def test_flag_threshold_youden_and_min_sensitivity() -> None:
    scores = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.9])
    failed = np.array([False, False, False, False, True, True, True])
    # Flagging >= 0.4 catches all 3 failures with one false alarm (0.6): J = 1 - 1/4.
    assert flag_threshold(scores, failed) == 0.4
    # Catching 2 of 3 failures is possible with no false alarm at 0.7.
    assert flag_threshold(scores, failed, min_sensitivity=0.6) == 0.7
    assert flag_threshold(scores, failed, min_sensitivity=1.0) == 0.4
    separated = flag_threshold([0.1, 0.2, 0.8, 0.9], [False, False, True, True])
    assert separated == 0.8  # the highest threshold among equal J
    with pytest.raises(ValueError, match="min_sensitivity"):
        flag_threshold(scores, failed, min_sensitivity=1.5)
    assert math.isnan(flag_threshold([0.1, 0.2], [False, False]))


def test_flag_threshold_handles_tied_and_infinite_scores() -> None:
    scores = [np.inf, np.inf, 0.5, 0.5, 0.1]
    failed = [True, True, True, False, False]
    # >= inf: sens 2/3, fa 0 (J 0.667); >= 0.5: sens 1, fa 1/2 (J 0.5).
    assert flag_threshold(scores, failed) == np.inf


@pytest.mark.parametrize("dim", [0, 1])
def test_class_argmax_matches_torch_including_ties(dim: int) -> None:
    gen = torch.Generator().manual_seed(5)
    # Coarse values force ties: the first maximal class must win, as in torch.argmax.
    values = torch.randint(0, 3, (4, 6, 5, 7), generator=gen).float()
    assert torch.equal(class_argmax(values, dim), values.argmax(dim))


def test_class_argmax_refuses_nan() -> None:
    values = torch.rand(3, 4, 4)
    values[1, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        class_argmax(values, 0)


def _mann_whitney_auroc(scores: np.ndarray, failed: np.ndarray) -> float:
    """The hand-written AUROC that scikit-learn replaced: U / (n_failed * n_ok), mid-ranks."""
    ranks = stats.rankdata(scores)
    n_fail, n_ok = int(failed.sum()), int((~failed).sum())
    return float((ranks[failed].sum() - n_fail * (n_fail + 1) / 2.0) / (n_fail * n_ok))


def _youden_by_hand(scores: np.ndarray, failed: np.ndarray) -> float:
    """The hand-written Youden threshold that roc_curve replaced (cumulative counts)."""
    order = np.argsort(-scores, kind="stable")
    s, f = scores[order], failed[order]
    last_of_tie = np.append(s[1:] != s[:-1], True)
    j = np.cumsum(f)[last_of_tie] / f.sum() - np.cumsum(~f)[last_of_tie] / (~f).sum()
    return float(s[last_of_tie][np.argmax(j)])


@pytest.mark.parametrize("seed", range(20))
def test_sklearn_auroc_and_threshold_equal_the_hand_written_ones(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(4, 60))
    scores = rng.integers(0, 6, size=n).astype(float) / 7.0  # many ties
    scores[rng.random(n) < 0.1] = np.inf  # absent structures rank worst
    failed = rng.random(n) < 0.35
    failed[:2] = [True, False]  # both classes present
    assert failure_auroc(scores, failed) == pytest.approx(_mann_whitney_auroc(scores, failed),
                                                          rel=1e-12, abs=1e-12)
    assert flag_threshold(scores, failed) == _youden_by_hand(scores, failed)


def test_auroc_one_class_stays_nan_where_sklearn_would_raise() -> None:
    assert math.isnan(failure_auroc([0.1, 0.2, 0.3], [False, False, False]))
    assert math.isnan(flag_threshold([0.1, np.inf], [True, True]))
