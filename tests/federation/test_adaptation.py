"""Adaptation at a target site from its images and MC-dropout uncertainty
(``fedct.federation.adaptation``): class-wise curriculum self-training and gated TENT,
and what their ablations change."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedct.config import TrainParams
from fedct.federation import adaptation as ad
from fedct.federation.label_free import tent_adapt
from fedct.model.io import architecture, build_from_arch

PARAMS = TrainParams(steps=4, channels=(4, 8), strides=(2,), patch_size=(12, 12, 8),
                     max_shift=(0, 0, 0), batch_size=1, learning_rate=1e-3, amp=False,
                     device="cpu", seed=2)


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_from_arch(architecture(3, (4, 8), (2,), 0.5, 1))


def _images(n: int = 2) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        x = rng.normal(0.2, 0.05, (1, 12, 12, 8)).astype(np.float32)
        x[0, 3:9, 3:9, 2:6] += 0.5
        out.append(x)
    return out


def test_voxel_uncertainty_is_the_spread_of_the_chosen_class() -> None:
    # Two voxels, three samples: voxel 0 is class 1 in every sample (spread 0.1 of p1),
    # voxel 1 is class 0 on average with p0 in {0.9, 0.5, 0.7}.
    p1 = torch.tensor([[0.7, 0.05], [0.8, 0.45], [0.9, 0.25]])
    p0 = 1 - p1
    probs = torch.stack([p0, p1], dim=1)  # (T, C, S)
    label, u = ad.voxel_uncertainty(probs)
    assert label.tolist() == [1, 0]
    assert u.tolist() == pytest.approx([0.1, 0.2])
    with pytest.raises(ValueError, match="T >= 2"):
        ad.voxel_uncertainty(probs[:1])


def test_each_structure_keeps_its_own_share_of_its_least_uncertain_voxels() -> None:
    # Background: 90 voxels of low uncertainty; a small structure: 10 voxels, all more
    # uncertain than any background voxel. A global threshold at half the voxels would
    # drop the structure; the class-wise one keeps half of each.
    label = torch.cat([torch.zeros(90, dtype=torch.long), torch.ones(10, dtype=torch.long)])
    u = torch.cat([torch.linspace(0.0, 0.1, 90), torch.linspace(0.2, 0.3, 10)])
    mask = ad.classwise_keep(label, u, 0.5)
    assert int(mask[:90].sum()) == 45 and int(mask[90:].sum()) == 5
    # The kept voxels are each structure's least uncertain ones.
    assert mask[:45].all() and not mask[45:90].any() and mask[90:95].all()
    assert ad.classwise_keep(label, u, 1.0).all()  # the ablation: every voxel
    global_half = u <= torch.quantile(u, 0.5)
    assert not global_half[90:].any()


def test_the_weighted_loss_counts_untrusted_voxels_at_the_floor() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, 2)
    label = torch.randint(0, 3, (2, 4, 4, 2))
    trusted = torch.rand(2, 4, 4, 2) < 0.5
    target = ad.encode(label, trusted, 3)[:, None]
    assert int(target.max()) < 6 and torch.equal(target[:, 0] % 3, label)
    # Every voxel trusted, or a floor of 1: plain (unweighted) Dice + CE.
    full = ad.WeightedDiceCELoss(3, 1.0)(logits, target)
    plain = ad.WeightedDiceCELoss(3, 0.2)(logits, label[:, None])
    assert float(full) == pytest.approx(float(plain))
    ce = torch.nn.functional.cross_entropy(logits, label)
    assert float(plain) > float(ce)  # Dice is added
    # Floor 0: the untrusted voxels do not count; changing their logits changes nothing.
    zero = ad.WeightedDiceCELoss(3, 0.0)
    moved = logits.clone()
    moved[:, 0][~trusted] += 5.0  # class 0 more likely at the untrusted voxels
    assert float(zero(logits, target)) == pytest.approx(float(zero(moved, target)))
    assert float(ad.WeightedDiceCELoss(3, 0.2)(moved, target)) != pytest.approx(
        float(ad.WeightedDiceCELoss(3, 0.2)(logits, target)))
    with pytest.raises(ValueError, match="encoded"):
        ad.WeightedDiceCELoss(2, 0.2)(logits[:, :2], target)


def test_curriculum_rises_linearly() -> None:
    assert ad.curriculum(4, 0.5, 0.8) == pytest.approx([0.5, 0.6, 0.7, 0.8])
    assert ad.curriculum(1, 0.5, 0.8) == [0.8]
    with pytest.raises(ValueError):
        ad.curriculum(0, 0.5, 0.8)


def test_random_gates_match_the_rate_but_not_the_voxels() -> None:
    model = _model()
    gates = ad.uncertainty_gates(model, _images(), 0.3, mc_samples=4, mc_batch=4, seed=1)
    assert [tuple(g.shape) for g in gates] == [(12, 12, 8)] * 2
    for g in gates:
        assert abs(float(g.float().mean()) - 0.3) < 0.05
    rand = ad.random_gates(gates, seed=4)
    assert [int(r.sum()) for r in rand] == [int(g.sum()) for g in gates]
    assert any(not torch.equal(r, g) for r, g in zip(rand, gates, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(rand, ad.random_gates(gates, seed=4),
                                                   strict=True))


def test_gated_tent_minimises_entropy_on_the_gated_voxels_only() -> None:
    model, images = _model(), _images()
    full = [torch.ones(12, 12, 8, dtype=torch.bool)] * 2
    plain = tent_adapt(model, images, steps=3, lr=1e-2, seed=0)
    all_gated = tent_adapt(model, images, steps=3, lr=1e-2, seed=0, gates=full)
    some = ad.random_gates([torch.ones(12, 12, 8, dtype=torch.bool)
                            & (torch.rand(12, 12, 8) < 0.2)] * 2, seed=1)
    gated = tent_adapt(model, images, steps=3, lr=1e-2, seed=0, gates=some)
    a, b, c = plain.state_dict(), all_gated.state_dict(), gated.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # every voxel gated = TENT
    assert any(not torch.equal(a[k], c[k]) for k in a)
    with pytest.raises(ValueError, match="gates"):
        tent_adapt(model, images, steps=1, gates=full[:1])


def test_cw_self_train_follows_its_curriculum_and_leaves_the_teacher_alone() -> None:
    teacher = _model(3)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    seen: list[tuple[int, dict]] = []
    student = ad.cw_self_train(teacher, _images(), PARAMS, rounds=3, steps=2,
                               keep=(0.4, 0.8), mc_samples=3, mc_batch=3, seed=1,
                               on_round=lambda r, s: seen.append((r, s)))
    assert [r for r, _ in seen] == [1, 2, 3]
    assert [s["keep"] for _, s in seen] == pytest.approx([0.4, 0.6, 0.8])
    for _, s in seen:
        # Each structure keeps about its share (ties at the threshold are kept).
        kept = [v for k, v in s.items() if k.startswith("kept.")]
        assert kept and all(s["keep"] - 0.05 <= v <= 1.0 for v in kept)
        assert np.isfinite(s["loss"]) and 0 <= s["uncertainty"]
    assert np.isnan(seen[0][1]["changed"]) and 0 <= seen[1][1]["changed"] <= 1
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
    # The ablation keeps every voxel in every round.
    seen.clear()
    ad.cw_self_train(teacher, _images(), PARAMS, rounds=2, steps=1, keep=(1.0, 1.0),
                     mc_samples=3, mc_batch=3, on_round=lambda r, s: seen.append((r, s)))
    assert [s["kept"] for _, s in seen] == [1.0, 1.0]


def test_adaptation_takes_images_never_a_case() -> None:
    case = {"image": _images(1)[0], "label": np.zeros((1, 12, 12, 8), np.uint8)}
    with pytest.raises(TypeError, match="mapping"):
        ad.cw_self_train(_model(), [case], PARAMS, rounds=1, steps=1, keep=(0.5, 0.5))
    with pytest.raises(TypeError, match="mapping"):
        ad.uncertainty_gates(_model(), [case], 0.5)
