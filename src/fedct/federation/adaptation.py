"""Adaptation at a target site from its images and MC-dropout uncertainty alone.

Pure functions (no file I/O, no tracking; a round callback reports progress), used by
the ``cw_self_train`` and ``gated_tent`` methods and their ablations:

- **Class-wise curriculum self-training** (``cw_self_train``; CBST/CRST's class-balanced
  selection with DPL's MC-dropout uncertainty): in each of R rounds the current model
  labels the target's images with the argmax of its MC-dropout mean, and per predicted
  structure trusts the fraction ``keep_r`` of its voxels with the lowest MC standard
  deviation of that structure's probability (``classwise_keep``: one threshold per
  structure, so a small structure is not wiped out by a threshold set by the background);
  ``keep_r`` rises linearly over the rounds (``curriculum``). The model then trains on
  every voxel, the untrusted ones weighted by ``floor`` < 1 (``WeightedDiceCELoss``).
  With ``floor`` 0 the untrusted voxels are ignored, as DPL and CBST do; on development
  seeds that collapsed (held-out Dice 0.78 -> 0.47 at the most shifted site after 200
  steps: target-only training without a labelled source leaves the ignored boundaries
  and body background unsupervised, and they drift). With ``keep`` = (1, 1) every voxel
  is trusted: the same method without uncertainty (its ablation).
- **Uncertainty-gated TENT** (``gated_tent``): TENT's entropy minimisation on the voxels
  whose MC-dropout uncertainty is in the lowest ``keep`` fraction of each image
  (``uncertainty_gates``); the ablation gates the same number of voxels at random
  (``random_gates``).

Images are ``(1, X, Y, Z)`` float arrays or tensors; a mapping (a case, which may hold a
label) is refused, as in :mod:`fedct.federation.label_free`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 (torch's convention)
from torch import nn

from fedct.analysis.metrics import argmax_segmentation, predictive_mean
from fedct.config import TrainParams
from fedct.federation.label_free import Image, image_list
from fedct.model.mc import mc_predict
from fedct.training.local import local_update, round_seed


def voxel_uncertainty(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Label and uncertainty of every voxel from MC samples ``(T, C, *S)``, T >= 2.

    ``label``: argmax of the MC mean ``(*S)`` int64; ``uncertainty``: the sample standard
    deviation over T of the label's probability ``(*S)`` float (DPL's signal)."""
    p = torch.as_tensor(probs).float()
    if p.ndim < 3 or p.shape[0] < 2:
        raise ValueError(f"need (T, C, *S) MC samples with T >= 2, got {tuple(p.shape)}")
    label = argmax_segmentation(predictive_mean(p))
    index = label[None, None].expand(p.shape[0], 1, *label.shape)
    chosen = p.gather(1, index)[:, 0]
    return label, chosen.std(dim=0, correction=1)


def classwise_keep(label: torch.Tensor, uncertainty: torch.Tensor, keep: float
                   ) -> torch.Tensor:
    """Per predicted class, the ``keep`` fraction of its voxels with the lowest uncertainty.

    The threshold of class k is the ``keep`` quantile of the uncertainty over the voxels
    labelled k (ties at the threshold are kept), so every structure keeps about the same
    share of its own voxels. ``keep`` >= 1 keeps every voxel. Returns a bool mask shaped
    like ``label``."""
    if not 0 < keep:
        raise ValueError(f"keep must be > 0, got {keep}")
    if label.shape != uncertainty.shape:
        raise ValueError(f"label and uncertainty shapes differ: {tuple(label.shape)} vs "
                         f"{tuple(uncertainty.shape)}")
    if keep >= 1:
        return torch.ones_like(label, dtype=torch.bool)
    mask = torch.zeros_like(label, dtype=torch.bool)
    u = uncertainty.float()
    for k in torch.unique(label).tolist():
        sel = label == k
        threshold = torch.quantile(u[sel], keep)
        mask |= sel & (u <= threshold)
    return mask


def curriculum(rounds: int, start: float, end: float) -> list[float]:
    """The kept fraction of each of ``rounds`` rounds: linear from ``start`` to ``end``."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    return [float(v) for v in np.linspace(start, end, rounds)] if rounds > 1 else [float(end)]


def encode(label: torch.Tensor, trusted: torch.Tensor, n_classes: int) -> torch.Tensor:
    """A pseudo-label with its trust in one integer array that crops and flips carry along:
    ``label`` where trusted, ``label + n_classes`` where not (decoded by
    ``WeightedDiceCELoss``; padding writes 0, a trusted background)."""
    return label + n_classes * (~trusted).to(label.dtype)


class WeightedDiceCELoss(nn.Module):
    """Dice + cross-entropy over ``encode``d pseudo-labels: every voxel counts, an untrusted
    one with weight ``floor`` (0: ignored). Soft Dice per class (background included, as
    MONAI's ``DiceLoss`` in the training loss) and the mean cross-entropy, both weighted
    per voxel. ``forward(logits (B, C, *S), target (B, 1, *S) int)``."""

    def __init__(self, n_classes: int, floor: float, eps: float = 1e-5) -> None:
        super().__init__()
        if not 0 <= floor <= 1:
            raise ValueError(f"floor must be in [0, 1], got {floor}")
        self.n_classes, self.floor, self.eps = n_classes, floor, eps

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        t = target.long()[:, 0]
        if logits.shape[1] != self.n_classes or (t >= 2 * self.n_classes).any():
            raise ValueError("targets not encoded for this network's classes")
        weight = torch.where(t >= self.n_classes, self.floor, 1.0).to(logits.dtype)
        cls = t % self.n_classes
        ce = (F.cross_entropy(logits, cls, reduction="none") * weight).sum()
        ce = ce / weight.sum().clamp_min(self.eps)
        prob = logits.softmax(dim=1)
        onehot = F.one_hot(cls, self.n_classes).movedim(-1, 1).to(prob.dtype)
        w = weight[:, None]
        dims = tuple(range(2, prob.ndim))
        inter = (w * prob * onehot).sum(dims)
        denom = (w * prob).sum(dims) + (w * onehot).sum(dims)
        dice = 1.0 - (2.0 * inter + self.eps) / (denom + self.eps)
        return dice.mean() + ce


def pseudo_label_round(model: nn.Module, images: Sequence[torch.Tensor], keep: float,
                       mc_samples: int, mc_batch: int, seed: int, amp: bool
                       ) -> tuple[list[dict[str, np.ndarray]], dict[str, float]]:
    """One round's training cases (``image``, ``label`` ``encode``d with its trust) and
    statistics: ``kept`` (trusted share of all voxels), ``kept.<k>`` (of the voxels
    predicted k), ``uncertainty`` (mean voxel uncertainty), ``labels`` (the argmax
    labels, for the change between rounds; not a metric)."""
    cases, kept, total, per_class, unc = [], 0, 0, {}, []
    labels = []
    for x in images:
        probs = mc_predict(model, x, mc_samples, mc_batch, amp=amp, seed=seed,
                           output_device="cpu")
        label, u = voxel_uncertainty(probs)
        mask = classwise_keep(label, u, keep)
        cases.append({"image": x.cpu().numpy(),
                      "label": encode(label, mask, probs.shape[1])[None].numpy()
                      .astype(np.uint8)})
        kept, total = kept + int(mask.sum()), total + mask.numel()
        for k in torch.unique(label).tolist():
            sel = label == k
            n_k, got = per_class.get(k, (0, 0))
            per_class[k] = (n_k + int(sel.sum()), got + int((mask & sel).sum()))
        unc.append(float(u.mean()))
        labels.append(label)
    stats = {"kept": kept / total, "uncertainty": float(np.mean(unc)),
             **{f"kept.{k}": got / n for k, (n, got) in sorted(per_class.items())}}
    return cases, {**stats, "labels": labels}


def cw_self_train(model: nn.Module, target_images: Sequence[Image], params: TrainParams, *,
                  rounds: int, steps: int, keep: tuple[float, float], floor: float = 0.2,
                  mc_samples: int = 10, mc_batch: int = 10, seed: int = 0, mu: float = 0.0,
                  site: str = "target",
                  on_round: Callable[[int, dict[str, float]], None] | None = None
                  ) -> nn.Module:
    """Class-wise curriculum self-training (module docstring): a trained copy of ``model``.

    ``rounds`` rounds, each: pseudo-labels of the current model (MC dropout, ``seed``)
    trusted by ``classwise_keep`` at that round's fraction of ``curriculum(rounds,
    *keep)``, then ``steps`` steps of ``fedct.training.local.local_update`` on them with
    ``WeightedDiceCELoss`` (untrusted voxels weighted ``floor``; ``params``: batch,
    crops, learning rate; its one-cycle schedule spans all ``rounds * steps`` steps, the
    AdamW moments carry over; ``mu`` > 0 adds a proximal term to the round's starting
    weights, limiting how far one round drifts). ``on_round(r, stats)`` (1-based) gets the
    kept fractions, the mean voxel uncertainty, the fraction of voxels whose label changed
    since the previous round, and the mean loss. The input model is not modified.
    """
    images = image_list(target_images)
    student = copy.deepcopy(model)
    loss = WeightedDiceCELoss(int(_n_classes(student, images[0])), floor)
    opt_store: dict = {}
    previous = None
    for r, keep_r in enumerate(curriculum(rounds, *keep), start=1):
        cases, stats = pseudo_label_round(student, images, keep_r, mc_samples, mc_batch,
                                          seed, params.amp)
        labels = stats.pop("labels")
        changed = (float(np.mean([float((a != b).float().mean())
                                  for a, b in zip(labels, previous, strict=True)]))
                   if previous is not None else float("nan"))
        previous = labels
        _, m = local_update(student, cases, params, steps, round_seed(seed, r, site),
                            mu=mu, start_step=(r - 1) * steps, total_steps=rounds * steps,
                            loss_fn=loss, opt_store=opt_store)
        if on_round is not None:
            on_round(r, {**stats, "keep": keep_r, "changed": changed, "loss": m["loss"]})
    return student.eval()


def _n_classes(model: nn.Module, image: torch.Tensor) -> int:
    """The number of output classes of ``model`` (one forward pass of ``image``)."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        was = model.training
        model.eval()
        n = model(image[None].to(device)).shape[1]
        model.train(was)
    return int(n)


def uncertainty_gates(model: nn.Module, target_images: Sequence[Image], keep: float,
                      mc_samples: int = 10, mc_batch: int = 10, seed: int = 0,
                      amp: bool = False) -> list[torch.Tensor]:
    """Per image, the ``(X, Y, Z)`` bool mask of its ``keep`` fraction of voxels with the
    lowest MC-dropout uncertainty (``voxel_uncertainty``) under ``model``."""
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    gates = []
    for x in image_list(target_images):
        _, u = voxel_uncertainty(mc_predict(model, x, mc_samples, mc_batch, amp=amp,
                                            seed=seed, output_device="cpu"))
        gates.append(u <= torch.quantile(u.float().flatten(), keep))
    return gates


def random_gates(gates: Sequence[torch.Tensor], seed: int = 0) -> list[torch.Tensor]:
    """Masks with as many voxels as each of ``gates``, drawn at random (seeded): the
    uncertainty gate's ablation at the same rate."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for g in gates:
        order = torch.randperm(g.numel(), generator=generator)
        mask = torch.zeros(g.numel(), dtype=torch.bool)
        mask[order[:int(g.sum())]] = True
        out.append(mask.reshape(g.shape))
    return out
