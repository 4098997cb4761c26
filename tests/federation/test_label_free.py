"""Label-free methods on a tiny Bayesian U-Net and hand-built probabilities."""

from __future__ import annotations

import copy
import inspect
import math

import numpy as np
import pytest
import torch
from torch import nn

from fedct.federation.label_free import (
    IGNORE_INDEX,
    MaskedDiceCELoss,
    case_uncertainty,
    merge_for_target,
    norm_affine_parameters,
    prediction_entropy,
    pseudo_label,
    pseudo_label_from_probs,
    pseudo_labelled_cases,
    scores_to_weights,
    select_by_uncertainty,
    self_train_update,
    target_uncertainty,
    tent_adapt,
    uncertainty_weights,
    with_ignore,
)
from fedct.model.io import architecture, build_from_arch
from fedct.model.unet import dropout_modules

N_CLASSES = 3
SHAPE = (12, 12, 4)


def scene(seed: int, contrast: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """A (1, X, Y, Z) image with a bright disc (class 1) and a dark square (class 2)."""
    g = np.random.default_rng(seed)
    x, y, _ = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")
    label = np.zeros(SHAPE, np.int64)
    cx, cy = 4 + g.integers(-1, 2), 4 + g.integers(-1, 2)
    label[(x - cx) ** 2 + (y - cy) ** 2 < 7] = 1
    label[(x >= 7) & (x < 11) & (y >= 7) & (y < 11)] = 2
    image = contrast * np.where(label == 1, 1.0, np.where(label == 2, -1.0, 0.0))
    image = image + 0.2 * g.standard_normal(SHAPE)
    return image[None].astype(np.float32), label[None]


def tiny_model(dropout: float = 0.5) -> nn.Module:
    torch.manual_seed(0)
    return build_from_arch(architecture(N_CLASSES, [4, 8], [2], dropout, 1))


@pytest.fixture(scope="module")
def trained() -> nn.Module:
    """A tiny U-Net fitted for a few seconds to two scenes (so it predicts every class)."""
    from monai.losses import DiceCELoss

    model = tiny_model()
    data = [scene(i) for i in range(2)]
    x = torch.stack([torch.as_tensor(d[0]) for d in data])
    y = torch.stack([torch.as_tensor(d[1]) for d in data])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    model.train()
    for _ in range(25):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    return model.eval()


def with_dropout(model: nn.Module, p: float) -> nn.Module:
    """The same weights with another dropout rate (p is not part of the state dict)."""
    out = copy.deepcopy(model)
    for m in dropout_modules(out):
        m.p = p
    return out


@pytest.fixture(scope="module")
def targets() -> list[np.ndarray]:
    # The target site: lower contrast than training (a shift), no labels.
    return [scene(10 + i, contrast=0.7)[0] for i in range(2)]


# --- uncertainty-guided selection (uw_select) ---------------------------------------------


def test_select_takes_the_lowest_finite_score_and_keeps_the_first_on_a_tie() -> None:
    assert select_by_uncertainty({"fedavg": 0.3, "tent": 0.1, "fedprox": 0.2}) == "tent"
    assert select_by_uncertainty({"fedavg": 0.2, "fedprox": 0.2}) == "fedavg"
    assert select_by_uncertainty({"fedprox": 0.2, "fedavg": 0.2}) == "fedprox"
    assert select_by_uncertainty({"broken": math.nan, "inf": math.inf, "ok": 0.9}) == "ok"
    for bad in ({}, {"a": math.nan, "b": math.inf}):
        with pytest.raises(ValueError):
            select_by_uncertainty(bad)


def test_selection_by_uncertainty_picks_the_model_that_segments_the_target_better(
        trained, targets) -> None:
    """Without a label, the MC-dropout score tells a fitted model from an unfitted one of
    the same architecture and dropout; the labels only check the choice here."""
    from fedct.analysis.metrics import dice_per_structure

    candidates = {"unfitted": tiny_model(), "fitted": trained}
    scores = target_uncertainty(candidates, targets, mc_samples=8, mc_batch=8, seed=0)
    chosen = select_by_uncertainty(scores)
    dice = {}
    for name, model in candidates.items():
        per = []
        for i, image in enumerate(targets):
            label = scene(10 + i, contrast=0.7)[1][0]
            with torch.no_grad():
                seg = model.eval()(torch.as_tensor(image)[None]).argmax(1)[0]
            per.append(np.nanmean(dice_per_structure(seg, torch.as_tensor(label), N_CLASSES)))
        dice[name] = float(np.mean(per))
    assert dice["fitted"] > dice["unfitted"] + 0.2
    assert chosen == "fitted", scores


# --- (a) uncertainty-weighted merging ------------------------------------------------------


@pytest.mark.parametrize("signal", ["sample_disagreement", "entropy"])
def test_a_model_that_disagrees_more_gets_a_lower_weight(trained, targets, signal) -> None:
    models = {"steady": with_dropout(trained, 0.1), "mid": trained,
              "shaky": with_dropout(trained, 0.8)}
    scores = target_uncertainty(models, targets, mc_samples=8, mc_batch=8, seed=3,
                                signal=signal)
    assert scores["steady"] < scores["mid"] < scores["shaky"]
    w = uncertainty_weights(models, targets, mc_samples=8, mc_batch=8, seed=3, signal=signal)
    assert w["steady"] > w["mid"] > w["shaky"] > 0
    assert math.isclose(sum(w.values()), 1.0, abs_tol=1e-12)


def test_weights_do_not_depend_on_site_order(trained, targets) -> None:
    models = {"A": with_dropout(trained, 0.2), "B": trained, "C": with_dropout(trained, 0.7)}
    forward = uncertainty_weights(models, targets, mc_samples=6, mc_batch=6, seed=1)
    backward = uncertainty_weights(dict(reversed(models.items())), targets, mc_samples=6,
                                   mc_batch=6, seed=1)
    assert set(forward) == set(backward)
    for site in models:
        assert forward[site] == pytest.approx(backward[site], abs=1e-12)
    # Site scores carry no trace of the other models either.
    alone = target_uncertainty({"C": models["C"]}, targets, mc_samples=6, mc_batch=6, seed=1)
    both = target_uncertainty(models, targets, mc_samples=6, mc_batch=6, seed=1)
    assert alone["C"] == both["C"]


def test_no_label_can_reach_the_weights(trained) -> None:
    image, label = scene(0)
    for bad in ([{"image": image, "label": label}], {"image": image}, image):
        with pytest.raises(TypeError):
            uncertainty_weights({"A": trained}, bad, mc_samples=2, mc_batch=2)
    for fn in (uncertainty_weights, target_uncertainty, tent_adapt, pseudo_labelled_cases):
        names = inspect.signature(fn).parameters
        assert not any("label" in n or "case" in n and n != "case_counts" for n in names), fn


def test_scores_to_weights_by_hand() -> None:
    # softmax: exp(-(s - 0.1) / 0.1) -> 1 and e^-1.
    w = scores_to_weights({"A": 0.1, "B": 0.2}, "softmax", temperature=0.1)
    assert w["A"] == pytest.approx(1 / (1 + math.exp(-1)))
    assert w["B"] == pytest.approx(math.exp(-1) / (1 + math.exp(-1)))
    # inverse: 1/0.1 and 1/0.3 -> 3:1.
    w = scores_to_weights({"A": 0.1, "B": 0.3}, "inverse", eps=1e-12)
    assert w == pytest.approx({"A": 0.75, "B": 0.25})
    # With case counts 1 and 9: 3*1 : 1*9 -> 0.25, 0.75.
    w = scores_to_weights({"A": 0.1, "B": 0.3}, "inverse", eps=1e-12,
                          case_counts={"A": 1, "B": 9})
    assert w == pytest.approx({"A": 0.25, "B": 0.75})
    # A broken model (inf / NaN score) gets 0; the rest still sum to 1.
    w = scores_to_weights({"A": 0.2, "B": math.inf, "C": math.nan, "D": 0.2})
    assert w == pytest.approx({"A": 0.5, "B": 0.0, "C": 0.0, "D": 0.5})
    with pytest.raises(ValueError, match="finite"):
        scores_to_weights({"A": math.inf, "B": math.nan})
    with pytest.raises(ValueError, match="case_counts"):
        scores_to_weights({"A": 0.1, "B": 0.2}, case_counts={"A": 3})
    with pytest.raises(ValueError, match="temperature"):
        scores_to_weights({"A": 0.1}, temperature=0.0)


def test_an_absent_structure_scores_the_worst_value_not_infinity() -> None:
    # T = 2 identical one-hot samples: class 1 on half the voxels, class 2 nowhere.
    seg = torch.zeros(4, 4, 2, dtype=torch.int64)
    seg[:2] = 1
    onehot = torch.nn.functional.one_hot(seg, N_CLASSES).permute(3, 0, 1, 2).float()
    probs = torch.stack([onehot, onehot])
    # Class 1: perfect agreement (0); class 2: not predicted -> worst disagreement (1).
    assert case_uncertainty(probs, "sample_disagreement") == pytest.approx(0.5)
    assert case_uncertainty(probs, "sample_disagreement", "max") == pytest.approx(1.0)
    assert case_uncertainty(probs, "entropy") == pytest.approx(0.5 * math.log(N_CLASSES))
    broken = probs.clone()
    broken[0, :, 0, 0, 0] = math.nan
    assert case_uncertainty(broken) == math.inf
    with pytest.raises(ValueError, match="volume_deviation"):
        case_uncertainty(probs, "volume_deviation")


def test_merge_for_target_is_the_weighted_average() -> None:
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(5)}
    out = merge_for_target({"B": b, "A": a}, {"A": 0.25, "B": 0.75})
    torch.testing.assert_close(out["w"], torch.tensor([2.5, 5.0]))
    same = merge_for_target({"A": a, "B": b}, {"B": 0.75, "A": 0.25})
    torch.testing.assert_close(same["w"], out["w"])
    with pytest.raises(ValueError, match="different sites"):
        merge_for_target({"A": a, "B": b}, {"A": 1.0})


# --- (b) pseudo-labels and self-training ---------------------------------------------------


def test_pseudo_label_mask_matches_hand_computation() -> None:
    # T = 4 samples, C = 3 classes, 5 voxels (5 x 1 x 1). Per voxel, the samples of the
    # class that wins the mean (other classes share the rest equally):
    #   v0 class 0: 0.9 0.9 0.9 0.9      mean 0.90 sd 0            -> kept
    #   v1 class 0: 0.8 0.9 0.8 0.9      mean 0.85 sd 0.0577       -> sd too high
    #   v2 class 1: 0.7 0.7 0.7 0.7      mean 0.70                 -> mean too low
    #   v3 class 2: 0.76 0.78 0.76 0.78  mean 0.77 sd 0.0115       -> kept
    #   v4 class 1: 0.755 0.845 x2       mean 0.80 sd 0.0520 (Bessel; 0.045 without) -> dropped
    win = {0: (0, [0.9] * 4), 1: (0, [0.8, 0.9, 0.8, 0.9]), 2: (1, [0.7] * 4),
           3: (2, [0.76, 0.78, 0.76, 0.78]), 4: (1, [0.755, 0.845, 0.755, 0.845])}
    probs = torch.zeros(4, N_CLASSES, 5, 1, 1)
    for v, (c, ps) in win.items():
        for t, p in enumerate(ps):
            probs[t, :, v] = (1 - p) / 2
            probs[t, c, v] = p
    label, mask = pseudo_label_from_probs(probs, p_min=0.75, std_max=0.05)
    assert label.shape == mask.shape == (1, 5, 1, 1)
    assert label.dtype == torch.int64 and mask.dtype == torch.bool
    assert label.flatten().tolist() == [0, 0, 1, 2, 1]
    assert mask.flatten().tolist() == [True, False, False, True, False]
    # A looser spread threshold admits v1 and v4, a stricter mean threshold drops v3.
    assert pseudo_label_from_probs(probs, 0.75, 0.06)[1].flatten().tolist() == \
        [True, True, False, True, True]
    assert pseudo_label_from_probs(probs, 0.8, 0.05)[1].flatten().tolist() == \
        [True, False, False, False, False]
    with pytest.raises(ValueError, match="T >= 2"):
        pseudo_label_from_probs(probs[:1])


def test_masked_loss_ignores_masked_voxels() -> None:
    from monai.losses import DiceCELoss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, N_CLASSES, 6, 6, 4, generator=g)
    label = torch.randint(0, N_CLASSES, (2, 1, 6, 6, 4), generator=g)
    mask = torch.rand(2, 1, 6, 6, 4, generator=g) > 0.4
    loss = MaskedDiceCELoss()
    base = loss(logits, torch.as_tensor(with_ignore(label, mask)))
    # Other labels where the mask is False: the same loss.
    other = torch.where(mask, label, (label + 1) % N_CLASSES)
    assert float(loss(logits, torch.as_tensor(with_ignore(other, mask)))) == \
        pytest.approx(float(base), abs=1e-6)
    # Other labels where it is True: a different loss.
    flipped = torch.where(mask, (label + 1) % N_CLASSES, label)
    assert abs(float(loss(logits, torch.as_tensor(with_ignore(flipped, mask)))) -
               float(base)) > 1e-3
    # Nothing ignored: exactly MONAI's DiceCE (labelled sites train with it unchanged).
    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True)
    assert float(loss(logits, label)) == pytest.approx(float(dice_ce(logits, label)),
                                                       abs=1e-6)
    # Everything ignored: finite, and no gradient signal.
    all_out = torch.full_like(label, IGNORE_INDEX)
    x = logits.clone().requires_grad_(True)
    value = loss(x, all_out)
    value.backward()
    assert math.isfinite(float(value.detach())) and float(x.grad.abs().max()) == 0.0
    # The gradient reaches kept voxels only.
    x = logits.clone().requires_grad_(True)
    loss(x, torch.as_tensor(with_ignore(label, mask))).backward()
    grad_at = x.grad.abs().sum(dim=1, keepdim=True)
    assert float(grad_at[~mask].max()) == 0.0 and float(grad_at[mask].max()) > 0.0


def test_pseudo_labelled_cases_keep_the_confident_voxels(trained, targets) -> None:
    cases = pseudo_labelled_cases(trained, targets, mc_samples=8, mc_batch=8, seed=2)
    assert len(cases) == len(targets)
    for case, image, seed in zip(cases, targets, (10, 11), strict=True):
        assert set(case) == {"image", "label", "mask"}
        np.testing.assert_array_equal(case["image"], image)
        assert case["label"].shape == case["mask"].shape == image.shape
        assert case["label"].dtype == np.int64 and case["mask"].dtype == bool
        kept = case["mask"]
        assert 0.0 < kept.mean() < 1.0
        # The truth of the test scene (never given to the method) judges the filter: kept
        # pseudo-labels are right more often than the rejected ones.
        right = case["label"] == scene(seed, contrast=0.7)[1]
        assert right[kept].mean() > right[~kept].mean()
    # The same seed, the same pseudo-labels.
    label, mask = pseudo_label(trained, targets[0], 8, 8, seed=2)
    np.testing.assert_array_equal(label.numpy(), cases[0]["label"])
    np.testing.assert_array_equal(mask.numpy(), cases[0]["mask"])


def test_self_training_ignores_labels_outside_the_mask(trained, targets) -> None:
    from fedct.config import TrainParams

    params = TrainParams(channels=(4, 8), strides=(2,), patch_size=SHAPE, max_shift=(0, 0, 0),
                         batch_size=2, steps=3, learning_rate=1e-2, amp=False, device="cpu")
    cases = pseudo_labelled_cases(trained, targets, mc_samples=6, mc_batch=6, seed=0)
    start = {k: v.clone() for k, v in trained.state_dict().items()}

    def update(cs: list[dict]) -> dict[str, torch.Tensor]:
        state, metrics = self_train_update(copy.deepcopy(trained), cs, params, steps=3,
                                           round_seed=7)
        assert math.isfinite(metrics["loss"]) and metrics["steps"] == 3
        return state

    def relabel(where: str) -> list[dict]:
        out = []
        for c in cases:
            moved = (c["label"] + 1) % N_CLASSES
            keep = c["mask"] if where == "outside" else ~c["mask"]
            out.append({**c, "label": np.where(keep, c["label"], moved)})
        return out

    base = update(cases)
    assert any(not torch.equal(base[k], start[k]) for k in start)  # it trained
    outside = update(relabel("outside"))
    assert all(torch.equal(base[k], outside[k]) for k in base)
    inside = update(relabel("inside"))
    assert any(not torch.equal(base[k], inside[k]) for k in base)
    with pytest.raises(ValueError, match="mask"):
        self_train_update(trained, [{"image": targets[0], "label": cases[0]["label"]}],
                          params, steps=1, round_seed=0)
    # Plain local updates after it still train with the unmasked DiceCE.
    from fedct.training import local, loop

    assert local.make_loss is loop.make_loss


# --- (c) TENT ------------------------------------------------------------------------------


def test_norm_affine_parameters_are_the_instance_norm_affines(trained) -> None:
    params = norm_affine_parameters(trained)
    norms = [m for m in trained.modules() if isinstance(m, nn.InstanceNorm3d)]
    assert len(params) == 2 * len(norms) > 0
    assert all(n.endswith((".weight", ".bias")) for n in params)
    state = trained.state_dict()
    assert all(n in state for n in params)


def test_tent_changes_only_norm_affines_lowers_entropy_and_leaves_input(trained,
                                                                       targets) -> None:
    before_state = {k: v.clone() for k, v in trained.state_dict().items()}
    trained.train()  # a mode the caller chose must survive too
    modes = {n: m.training for n, m in trained.named_modules()}
    flags = {n: p.requires_grad for n, p in trained.named_parameters()}
    entropy_before = prediction_entropy(trained, targets)
    adapted = tent_adapt(trained, targets, steps=8, lr=1e-2, seed=0)
    # The input model is untouched: weights, modes, grad flags.
    for k, v in trained.state_dict().items():
        torch.testing.assert_close(v, before_state[k], rtol=0, atol=0)
    assert {n: m.training for n, m in trained.named_modules()} == modes
    assert {n: p.requires_grad for n, p in trained.named_parameters()} == flags
    trained.eval()
    # Only the normalisation affines moved (all of them), nothing else by a single bit.
    affine = set(norm_affine_parameters(adapted))
    after = adapted.state_dict()
    for k, v in before_state.items():
        if k in affine:
            assert not torch.equal(after[k], v), k
        else:
            assert torch.equal(after[k], v), k
    # The copy trains normally later (grad flags restored) and is in eval mode.
    assert all(p.requires_grad for p in adapted.parameters())
    assert not any(m.training for m in adapted.modules())
    assert prediction_entropy(adapted, targets) < entropy_before
    assert prediction_entropy(trained, targets) == entropy_before


def test_tent_is_reproducible_and_zero_steps_is_a_copy(trained, targets) -> None:
    a = tent_adapt(trained, targets, steps=3, lr=1e-2, seed=5)
    b = tent_adapt(trained, targets, steps=3, lr=1e-2, seed=5)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])
    same = tent_adapt(trained, targets, steps=0)
    assert same is not trained
    for k, v in trained.state_dict().items():
        assert torch.equal(v, same.state_dict()[k])

