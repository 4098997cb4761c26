"""Label-free, uncertainty-guided ways to fight site shift: no label of the target site is read.

Four methods, each selectable by name in the ``federate`` stage:

- ``uw_merge``: merge the site models for one target site, each weighted by how certain it
  is (MC dropout) on the target's unlabelled images (``uncertainty_weights``,
  ``merge_for_target``); in the spirit of FUNAvg / FedUAA / FIVA (STUDY.md).
- ``self_train``: DPL-style pseudo-labels at an unlabelled site, kept only where the MC
  mean is confident and the MC spread is low (``pseudo_label``, ``pseudo_labelled_cases``),
  used as that site's training data in further federated rounds (``self_train_update``,
  with a loss that ignores the rejected voxels, ``MaskedDiceCELoss``).
- ``tent``: test-time entropy minimisation of the normalisation affine parameters only
  (``tent_adapt``).
- ``uw_select``: for one target site, the federated candidate (FedAvg, FedProx, the TENT
  and self-trained models, ...) whose MC-dropout uncertainty on the target's unlabelled
  images is lowest (``target_uncertainty``, ``select_by_uncertainty``): which model to
  deploy at a site that has no ground truth.

Every function takes images only, never case dicts: an image is a ``(1, X, Y, Z)`` float
array or tensor (channel first, normalised by preprocessing). A mapping (a case, which may
carry a label) is refused with ``TypeError``, so a label cannot reach these methods by
accident. Pure functions: no file I/O, no tracking.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from fedct.analysis.failure import SIGNAL_WORST, SIGNALS
from fedct.analysis.metrics import argmax_segmentation, failure_signals, predictive_mean
from fedct.config import TrainParams
from fedct.devices import use_amp
from fedct.federation.aggregate import weighted_average
from fedct.model.mc import mc_predict
from fedct.training import local
from fedct.training.losses import IGNORE_INDEX, MaskedDiceCELoss  # noqa: F401 (re-export)

Image = np.ndarray | torch.Tensor
Rule = Literal["softmax", "inverse"]
Aggregation = Literal["mean", "max"]

# The label value of voxels a pseudo-label rejects. It lies outside any label set (which
# has far fewer classes), and survives the training transforms (padding writes 0, crops and
# flips move values without interpolating) and an uint8 cast.

# Each per-structure signal's worst (largest) possible value for C classes. A structure
# that is not predicted at all scores +inf in ``failure_signals``; here it scores this
# bound instead, so one missing small structure on one target image makes a site model
# look as uncertain as possible on that structure rather than removing the model
# altogether. ``volume_deviation`` is unbounded and needs each model's reference volumes,
# so it is not offered.
_WORST = SIGNAL_WORST  # bounded signals and their worst values (analysis.failure)
WEIGHT_SIGNALS = tuple(s for s in SIGNALS if s in _WORST)


def _image(x: Any, where: str) -> torch.Tensor:
    """One ``(1, X, Y, Z)`` image as a float32 tensor; a case dict is refused."""
    if isinstance(x, Mapping):
        raise TypeError(f"{where}: got a mapping (a case?); label-free methods take images "
                        f"only, so that no target label can be read")
    if not isinstance(x, np.ndarray | torch.Tensor):
        raise TypeError(f"{where}: expected a numpy array or tensor, got {type(x).__name__}")
    t = torch.as_tensor(x)
    if t.ndim != 4 or t.shape[0] != 1:
        raise ValueError(f"{where}: expected one single-channel volume (1, X, Y, Z), "
                         f"got {tuple(t.shape)}")
    return t.float()


def image_list(xs: Sequence[Image]) -> list[torch.Tensor]:
    """``xs`` as float32 ``(1, X, Y, Z)`` tensors; a mapping (a case) or an empty list is
    refused."""
    if isinstance(xs, Mapping) or isinstance(xs, np.ndarray | torch.Tensor):
        raise TypeError("target_images must be a list of (1, X, Y, Z) images")
    out = [_image(x, f"target image {i}") for i, x in enumerate(xs)]
    if not out:
        raise ValueError("no target images given")
    return out


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# --- (a) uncertainty-weighted merging ------------------------------------------------------


def case_uncertainty(probs: torch.Tensor, signal: str = "sample_disagreement",
                     aggregation: Aggregation = "mean") -> float:
    """One image's label-free uncertainty score from its MC samples ``(T, C, X, Y, Z)``.

    The per-structure signal of ``fedct.analysis.metrics.failure_signals`` (higher = less
    certain), a structure not predicted at all set to the signal's worst value (see
    ``_WORST``), then the ``mean`` (as ``fedct.analysis.failure.aggregate_cases`` forms
    case scores) or ``max`` over structures. Non-finite probabilities (a broken model)
    give ``+inf``.
    """
    if signal not in _WORST:
        raise ValueError(f"signal {signal!r} not offered; choose one of {WEIGHT_SIGNALS}")
    if aggregation not in ("mean", "max"):
        raise ValueError(f"aggregation must be 'mean' or 'max', got {aggregation!r}")
    p = torch.as_tensor(probs)
    if not torch.isfinite(p).all():
        return math.inf
    n_classes = p.shape[1]
    # failure_signals also computes volume_deviation, which needs reference volumes; it is
    # not used here, so unit references and spacing stand in for them.
    per_structure = failure_signals(p, [1.0] * (n_classes - 1), (1.0,) * (p.ndim - 2))[signal]
    capped = np.minimum(per_structure, _WORST[signal](n_classes))
    return float(capped.mean() if aggregation == "mean" else capped.max())


def target_uncertainty(models: Mapping[str, nn.Module], target_images: Sequence[Image], *,
                       mc_samples: int = 10, mc_batch: int = 10, seed: int = 0,
                       signal: str = "sample_disagreement",
                       aggregation: Aggregation = "mean", amp: bool = False
                       ) -> dict[str, float]:
    """Each site model's mean case uncertainty (``case_uncertainty``) on the target images.

    Every model samples every image with the same dropout ``seed`` (as the ``uncertainty``
    stage does), so a site's score does not depend on which other sites are merged or in
    what order. Images go to each model's device; probabilities are gathered on the CPU.
    """
    if signal not in _WORST:
        raise ValueError(f"signal {signal!r} not offered; choose one of {WEIGHT_SIGNALS}")
    images = image_list(target_images)
    if not models:
        raise ValueError("no site models given")
    scores = {}
    for site, model in models.items():
        per_case = []
        for image in images:
            probs = mc_predict(model, image, mc_samples, mc_batch, amp=amp, seed=seed,
                               output_device="cpu").float()
            per_case.append(case_uncertainty(probs, signal, aggregation))
        scores[site] = float(np.mean(per_case))
    return scores


def scores_to_weights(scores: Mapping[str, float], rule: Rule = "softmax",
                      temperature: float = 0.1,
                      case_counts: Mapping[str, int | float] | None = None,
                      eps: float = 1e-6) -> dict[str, float]:
    """Uncertainty scores -> merging weights that sum to 1 (lower score, higher weight).

    Rules, over the sites with a finite score ``s_i``:

    - ``softmax``: ``w_i ∝ exp(-(s_i - min_j s_j) / temperature)``; ``temperature`` is in
      the signal's units (a score lower by ``temperature`` weighs ``e`` times more).
    - ``inverse``: ``w_i ∝ 1 / (s_i + eps)`` (inverse-uncertainty, as FIVA's n_i / σ²_i
      with ``case_counts``).

    A site whose score is NaN or infinite gets weight 0. With ``case_counts`` the weights
    are multiplied by each site's number of training cases and renormalised (uncertainty
    and FedAvg's weights together).

    Raises:
        ValueError: no site has a finite score, or every combined weight is 0, or
            ``case_counts`` misses a site, or ``temperature`` / ``eps`` is not positive.
    """
    if not scores:
        raise ValueError("no scores given")
    if rule not in ("softmax", "inverse"):
        raise ValueError(f"rule must be 'softmax' or 'inverse', got {rule!r}")
    if rule == "softmax" and not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if rule == "inverse" and not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    sites = list(scores)
    s = np.array([float(scores[k]) for k in sites], dtype=np.float64)
    usable = np.isfinite(s)
    if not usable.any():
        raise ValueError(f"no site model has a finite uncertainty on the target images "
                         f"(scores {dict(zip(sites, s.tolist(), strict=True))})")
    w = np.zeros_like(s)
    if rule == "softmax":
        w[usable] = np.exp(-(s[usable] - s[usable].min()) / temperature)
    else:
        w[usable] = 1.0 / (np.maximum(s[usable], 0.0) + eps)
    if case_counts is not None:
        missing = [k for k in sites if k not in case_counts]
        if missing:
            raise ValueError(f"case_counts has no entry for sites {missing}")
        counts = np.array([float(case_counts[k]) for k in sites])
        if (counts < 0).any() or not np.isfinite(counts).all():
            raise ValueError(f"case_counts must be finite and >= 0, got {dict(case_counts)}")
        w = w * counts
    total = w.sum()
    if not total > 0:
        raise ValueError("every merging weight is 0 (no usable site with cases)")
    return {k: float(v) for k, v in zip(sites, w / total, strict=True)}


def uncertainty_weights(models: Mapping[str, nn.Module], target_images: Sequence[Image], *,
                        mc_samples: int = 10, mc_batch: int = 10, seed: int = 0,
                        signal: str = "sample_disagreement",
                        aggregation: Aggregation = "mean", rule: Rule = "softmax",
                        temperature: float = 0.1,
                        case_counts: Mapping[str, int | float] | None = None,
                        amp: bool = False) -> dict[str, float]:
    """Merging weights for one target site from each site model's MC-dropout uncertainty
    on the target's unlabelled images: ``target_uncertainty`` then ``scores_to_weights``
    (see both for the rules). Takes images only; no argument can carry a label.

    Returns:
        site -> weight, in the order of ``models``, summing to 1.
    """
    scores = target_uncertainty(models, target_images, mc_samples=mc_samples,
                                mc_batch=mc_batch, seed=seed, signal=signal,
                                aggregation=aggregation, amp=amp)
    return scores_to_weights(scores, rule, temperature, case_counts)


def steering_weights(scores: Mapping[str, Mapping[str, float]],
                     base: Mapping[str, float], temperature: float) -> dict[str, float]:
    """The merge weights of one round of ``steered``: the target sites steer FedAvg.

    ``scores``: target site -> client site -> that client's update's mean MC-dropout
    uncertainty on the target's images (``target_uncertainty``; the only thing a target
    returns). ``base``: the clients' FedAvg weights (training cases, or fixed weights).
    Each client's score is the mean over the targets; the weights are
    ``base_i * exp(-(s_i - min_j s_j) / temperature)``, renormalised
    (``scores_to_weights`` with ``case_counts = base``): a client whose update is less
    uncertain on the target's images weighs more, and with equal scores the weights are
    FedAvg's. A client with a non-finite score from any target gets weight 0.

    Raises:
        ValueError: no target's scores, a target that scored other clients than ``base``
            names, or no client with a finite score (``scores_to_weights``).
    """
    if not scores:
        raise ValueError("no target scored the updates")
    clients = list(base)
    for target, by_client in scores.items():
        if set(by_client) != set(clients):
            raise ValueError(f"target {target} scored {sorted(by_client)}, not the clients "
                             f"{sorted(clients)}")
    mean = {c: float(np.mean([float(scores[t][c]) for t in scores])) for c in clients}
    return scores_to_weights(mean, "softmax", temperature, case_counts=base)


def merge_for_target(states: Mapping[str, Mapping[str, torch.Tensor]],
                     weights: Mapping[str, float]) -> dict[str, torch.Tensor]:
    """The target site's merged model: ``aggregate.weighted_average`` of the site states.

    ``states`` and ``weights`` must name the same sites; sites are taken in sorted order,
    so the result does not depend on the order of either mapping.
    """
    if set(states) != set(weights):
        raise ValueError(f"states and weights name different sites: "
                         f"{sorted(states)} vs {sorted(weights)}")
    sites = sorted(states)
    return weighted_average([dict(states[k]) for k in sites], [float(weights[k]) for k in sites])


def select_by_uncertainty(scores: Mapping[str, float]) -> str:
    """The candidate with the lowest finite uncertainty score (``uw_select``).

    Ties go to the candidate named first, so with FedAvg first a tie keeps FedAvg. NaN
    and infinite scores (a broken model) are never chosen.

    Raises:
        ValueError: no candidate, or none with a finite score.
    """
    if not scores:
        raise ValueError("no candidates to select from")
    finite = [(float(v), i, k) for i, (k, v) in enumerate(scores.items())
              if math.isfinite(float(v))]
    if not finite:
        raise ValueError(f"no candidate has a finite uncertainty on the target images "
                         f"(scores {dict(scores)})")
    return min(finite)[2]


# --- (b) self-training on pseudo-labels ----------------------------------------------------


def pseudo_label_from_probs(probs: torch.Tensor, p_min: float = 0.75, std_max: float = 0.05
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """DPL's uncertainty filter on MC samples ``(T, C, X, Y, Z)``, T >= 2.

    The label is the argmax of the MC mean probability. A voxel is kept when the mean
    probability of that class is ``> p_min`` and its standard deviation over the T samples
    is ``< std_max``. The standard deviation is the sample one (Bessel's ``T - 1``), as
    ``torch.std`` in DPL's code. (DPL's prototype-based denoising is not used.)

    Returns:
        ``label`` ``(1, X, Y, Z)`` int64 and ``mask`` ``(1, X, Y, Z)`` bool (True = kept),
        on the device of ``probs``.
    """
    p = torch.as_tensor(probs).float()
    if p.ndim < 3 or p.shape[0] < 2:
        raise ValueError(f"need (T, C, *S) MC samples with T >= 2, got {tuple(p.shape)}")
    label = argmax_segmentation(predictive_mean(p))
    index = label[None, None].expand(p.shape[0], 1, *label.shape)
    chosen = p.gather(1, index)[:, 0]  # (T, *S): each sample's probability of the label
    mask = (chosen.mean(dim=0) > p_min) & (chosen.std(dim=0, correction=1) < std_max)
    return label[None], mask[None]


def pseudo_label(model: nn.Module, image: Image, mc_samples: int = 10, mc_batch: int = 10,
                 seed: int = 0, p_min: float = 0.75, std_max: float = 0.05,
                 amp: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Pseudo-label and keep mask of one unlabelled ``(1, X, Y, Z)`` image (CPU tensors).

    ``mc_predict`` with dropout ``seed``, then ``pseudo_label_from_probs``.
    """
    x = _image(image, "image")
    probs = mc_predict(model, x, mc_samples, mc_batch, amp=amp, seed=seed,
                       output_device="cpu")
    return pseudo_label_from_probs(probs, p_min, std_max)


def pseudo_labelled_cases(model: nn.Module, images: Sequence[Image], mc_samples: int = 10,
                          mc_batch: int = 10, seed: int = 0, p_min: float = 0.75,
                          std_max: float = 0.05, amp: bool = False) -> list[dict[str, np.ndarray]]:
    """An unlabelled site's training cases: ``{"image", "label", "mask"}`` numpy arrays.

    ``image`` is the input as float32, ``label`` int64 and ``mask`` bool, all
    ``(1, X, Y, Z)``. Train on them with ``self_train_update``, which ignores voxels whose
    ``mask`` is False. The kept fraction (``mask.mean()``) is worth logging: a threshold
    that keeps almost nothing gives the site no signal.
    """
    cases = []
    for x in image_list(images):
        label, mask = pseudo_label(model, x, mc_samples, mc_batch, seed, p_min, std_max, amp)
        cases.append({"image": x.cpu().numpy().copy(), "label": label.numpy(),
                      "mask": mask.numpy()})
    return cases


def with_ignore(label: Image, mask: Image, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """``label`` with ``ignore_index`` where ``mask`` is False (int64 numpy, same shape)."""
    lab = np.asarray(label).astype(np.int64)
    m = np.asarray(mask).astype(bool)
    if lab.shape != m.shape:
        raise ValueError(f"label and mask shapes differ: {lab.shape} vs {m.shape}")
    return np.where(m, lab, ignore_index)


def self_train_update(model: nn.Module, cases: Sequence[Mapping[str, np.ndarray]],
                      params: TrainParams, steps: int, round_seed: int,
                      global_state: dict[str, torch.Tensor] | None = None, mu: float = 0.0,
                      start_step: int = 0, total_steps: int | None = None
                      ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """A federated local update on pseudo-labelled cases, rejected voxels ignored.

    ``fedct.training.local.local_update`` (same batches, optimiser, schedule and FedProx
    term; see it for the arguments and the returned state and metrics) with
    ``MaskedDiceCELoss`` in place of DiceCE. Each case's ``mask`` is folded into its
    ``label`` as ``IGNORE_INDEX`` (``with_ignore``), which the random crops and flips
    carry along; border padding is labelled background, as for labelled sites.
    """
    train_cases = []
    for i, case in enumerate(cases):
        if "mask" not in case:
            raise ValueError(f"pseudo-labelled case {i} has no 'mask' (use "
                             f"pseudo_labelled_cases)")
        train_cases.append({"image": case["image"],
                            "label": with_ignore(case["label"], case["mask"])})
    # The training loss (``fedct.training.losses``) ignores IGNORE_INDEX voxels.
    return local.local_update(model, train_cases, params, steps, round_seed,
                              global_state=global_state, mu=mu, start_step=start_step,
                              total_steps=total_steps)


# --- (c) test-time adaptation --------------------------------------------------------------

# Normalisation layers whose affine parameters TENT adapts: instance norm (our U-Net),
# batch norm (an ablation), group and layer norm.
_NORMS = (nn.modules.instancenorm._InstanceNorm, nn.modules.batchnorm._BatchNorm,
          nn.GroupNorm, nn.LayerNorm)


def norm_affine_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The affine ``weight`` / ``bias`` of every normalisation layer, by state-dict name."""
    out = {}
    for prefix, module in model.named_modules():
        if isinstance(module, _NORMS):
            for name, param in module.named_parameters(recurse=False):
                out[f"{prefix}.{name}" if prefix else name] = param
    return out


def _entropy_of(logits: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
    """Mean voxel entropy (nats) of the softmax of ``(B, C, *S)`` logits (over the voxels
    where the ``(*S)`` bool ``gate`` is True, when given)."""
    logp = logits.float().log_softmax(dim=1)
    entropy = -(logp.exp() * logp).sum(dim=1)
    return entropy.mean() if gate is None else entropy[:, gate.to(entropy.device)].mean()


def _autocast(device: torch.device, amp: bool) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16,
                          enabled=use_amp(device, amp))


def prediction_entropy(model: nn.Module, images: Sequence[Image], amp: bool = False) -> float:
    """Mean voxel entropy (nats) of deterministic predictions (dropout off), over images.

    TENT's objective; log it before and after ``tent_adapt``. The model's modes are
    restored on return.
    """
    device = _device(model)
    previous = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.inference_mode(), _autocast(device, amp):
            values = [float(_entropy_of(model(x[None].to(device)))) for x in image_list(images)]
    finally:
        for m, training in previous.items():
            m.train(training)
    return float(np.mean(values))


def tent_adapt(model: nn.Module, target_images: Sequence[Image], steps: int = 10,
               lr: float = 1e-3, seed: int = 0, amp: bool = False,
               gates: Sequence[torch.Tensor] | None = None) -> nn.Module:
    """TENT: a copy of ``model`` whose normalisation affine parameters minimise the entropy
    of its predictions on the target's unlabelled images.

    The copy runs in eval mode (dropout off, so each prediction is deterministic); only
    ``norm_affine_parameters`` receive gradients (every other parameter is frozen during
    adaptation; their ``requires_grad`` flags are restored afterwards). Each of ``steps``
    Adam steps (learning rate ``lr``) takes one whole image, in a seeded random order
    that visits every image once per epoch. Batch norm (an ablation) keeps its running
    statistics, unlike TENT's original, which re-estimates them on the test batch; the
    default instance norm has none, so there the two agree. The input model is never
    modified. Entropy minimisation can collapse towards one confident class if run too
    long or too fast; compare ``prediction_entropy`` and keep ``steps * lr`` small.
    ``gates`` (one ``(X, Y, Z)`` bool mask per image; ``fedct.federation.adaptation``):
    the entropy is averaged over each image's gated voxels only (uncertainty-gated TENT).

    Returns:
        the adapted copy, in eval mode, on the input model's device.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    images = image_list(target_images)
    if gates is not None and (len(gates) != len(images) or any(
            tuple(g.shape) != tuple(x.shape[1:]) or not g.any()
            for g, x in zip(gates, images, strict=False))):
        raise ValueError("gates: one non-empty (X, Y, Z) mask per image")
    adapted = copy.deepcopy(model)
    params = norm_affine_parameters(adapted)
    if not params:
        raise ValueError("the model has no normalisation layer with affine parameters")
    flags = {name: p.requires_grad for name, p in adapted.named_parameters()}
    for p in adapted.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    adapted.eval()
    device = _device(adapted)
    opt = torch.optim.Adam(list(params.values()), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    try:
        with torch.enable_grad():
            for _ in range(steps):
                if not order:
                    order = torch.randperm(len(images), generator=generator).tolist()
                i = order.pop()
                opt.zero_grad(set_to_none=True)
                with _autocast(device, amp):
                    logits = adapted(images[i][None].to(device))
                loss = _entropy_of(logits, None if gates is None else gates[i])
                loss.backward()
                opt.step()
    finally:
        for name, p in adapted.named_parameters():
            p.requires_grad_(flags[name])
            p.grad = None
    return adapted.eval()
