"""Aggregation of site models: pure functions over state dicts (``dict[str, torch.Tensor]``).

The one implementation used by the one-shot ``federate`` stage, the Flower strategy and the
label-free methods; nothing here reads files or talks to Flower.

Rules of :func:`weighted_average` (weights ``w_i >= 0`` normalised to sum 1):

- **Floating-point tensors** (weights, biases, normalisation affine parameters) get the
  weighted mean ``sum_i w_i * t_i``, computed in float64 and cast back to the input dtype.
- **Normalisation running statistics** (batch norm's ``running_mean`` and ``running_var``)
  are floating-point buffers and are averaged like the weights, as FedAvg does. The average
  of per-site variances ignores the spread of the per-site means, so after merging sites of
  very different intensity it under-estimates the pooled variance. The shipped U-Net uses
  instance norm, which has no running statistics (its affine parameters are ordinary
  weights).
- **Integer and boolean tensors** (counters such as batch norm's ``num_batches_tracked``)
  are never averaged, since the mean of a counter or an index means nothing: the element-wise
  maximum over the sites of positive weight is taken, so ``num_batches_tracked`` becomes the
  largest count any merged site reached.
- A site of weight 0 contributes nothing. Every state must have the same keys, shapes and
  dtypes; anything else is a :class:`~fedct.errors.FedctError` that names the key.

Default weights are each site's number of training cases (:func:`case_weights`, FedAvg);
:func:`site_weights` normalises any other non-negative per-site weights (e.g. weights from
uncertainty). :func:`server_step` applies the
merged weights on the server, with an optional server learning rate and momentum (FedAvgM;
``benchmarks/federation.py`` compares them: at lr 1 and momentum 0 it is FedAvg).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from fedct.errors import FedctError

State = Mapping[str, torch.Tensor]


def site_weights(weights: Mapping[str, float]) -> dict[str, float]:
    """Non-negative per-site weights normalised to sum 1 (site -> weight)."""
    if not weights:
        raise FedctError("aggregation: no sites to weight")
    bad = {s: w for s, w in weights.items()
           if not isinstance(w, int | float) or isinstance(w, bool) or not math.isfinite(w)
           or w < 0}
    if bad:
        raise FedctError(f"aggregation: site weights must be finite and >= 0, got {bad}")
    total = float(sum(weights.values()))
    if total <= 0:
        raise FedctError(f"aggregation: all site weights are zero ({dict(weights)})")
    return {s: float(w) / total for s, w in weights.items()}


def case_weights(n_cases: Mapping[str, int]) -> dict[str, float]:
    """FedAvg's default: each site weighted by its number of training cases, sum 1."""
    bad = {s: n for s, n in n_cases.items()
           if isinstance(n, bool) or not isinstance(n, int) or n < 0}
    if bad:
        raise FedctError(f"aggregation: case counts must be integers >= 0, got {bad}")
    return site_weights(dict(n_cases))


def _check_weights(weights: Sequence[float], n: int) -> list[float]:
    if len(weights) != n:
        raise FedctError(f"aggregation: {len(weights)} weights for {n} states")
    w = site_weights({str(i): v for i, v in enumerate(weights)})
    return [w[str(i)] for i in range(n)]


def weighted_average(states: Sequence[State] | Mapping[str, State],
                     weights: Sequence[float] | Mapping[str, float]) -> dict[str, torch.Tensor]:
    """The merged state dict of ``states`` under ``weights`` (rules in the module docstring).

    ``states`` and ``weights`` are either two sequences in the same order or two mappings
    with the same keys (site -> state, site -> weight). Weights need not sum to 1. The
    result is a new dict of new tensors (detached, on the first state's device).
    """
    if isinstance(states, Mapping):
        if not isinstance(weights, Mapping) or set(weights) != set(states):
            raise FedctError("aggregation: the sites of the weights "
                             f"({sorted(weights) if isinstance(weights, Mapping) else '?'}) "
                             f"are not the sites of the states ({sorted(states)})")
        order = list(states)
        states, weights = [states[s] for s in order], [weights[s] for s in order]
    elif isinstance(weights, Mapping):
        raise FedctError("aggregation: site -> weight mapping given for a list of states")
    states = list(states)
    if not states:
        raise FedctError("aggregation: no states to average")
    w = _check_weights(list(weights), len(states))
    keys = list(states[0])
    for i, s in enumerate(states[1:], start=1):
        if set(s) != set(keys):
            diff = sorted(set(s) ^ set(keys))
            raise FedctError(f"aggregation: state {i} has other keys than state 0 "
                             f"(differing: {diff[:5]})")
    merged: dict[str, torch.Tensor] = {}
    for key in keys:
        ref = states[0][key]
        for i, s in enumerate(states[1:], start=1):
            t = s[key]
            if t.shape != ref.shape or t.dtype != ref.dtype:
                raise FedctError(f"aggregation: {key!r} of state {i} is {t.dtype} "
                                 f"{list(t.shape)}, of state 0 {ref.dtype} {list(ref.shape)}")
        tensors = [s[key].detach().to(ref.device) for s in states]
        if ref.is_floating_point() or ref.is_complex():
            acc = torch.zeros(ref.shape, dtype=torch.complex128 if ref.is_complex()
                              else torch.float64, device=ref.device)
            for t, wi in zip(tensors, w, strict=True):
                acc += wi * t.to(acc.dtype)
            merged[key] = acc.to(ref.dtype)
        else:
            kept = [t for t, wi in zip(tensors, w, strict=True) if wi > 0]
            merged[key] = torch.stack(kept).amax(dim=0) if ref.dtype != torch.bool \
                else torch.stack(kept).any(dim=0)
    return merged


def server_step(global_state: State, merged: State, velocity: State | None,
                lr: float = 1.0, momentum: float = 0.0
                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The server's update from the round's merged weights (FedAvgM, Hsu et al. 2019).

    ``delta = merged - global`` is the averaged client update; ``v = momentum * v + delta``
    and the new global weights are ``global + lr * v``. With ``lr = 1`` and ``momentum = 0``
    this is plain FedAvg (the new weights are ``merged``). Integer and boolean tensors
    (counters) are taken from ``merged``. ``velocity`` is None in the first round; the
    returned velocity is the server's state for the next round (kept in its checkpoint).
    """
    if not math.isfinite(lr) or lr <= 0:
        raise FedctError(f"server step: lr must be finite and > 0, got {lr}")
    if not math.isfinite(momentum) or not 0 <= momentum < 1:
        raise FedctError(f"server step: momentum must be in [0, 1), got {momentum}")
    if set(global_state) != set(merged):
        diff = sorted(set(global_state) ^ set(merged))
        raise FedctError(f"server step: the merged state has other keys than the global "
                         f"one (differing: {diff[:5]})")
    new, vel = {}, {}
    for key, m in merged.items():
        g = global_state[key]
        if g.shape != m.shape:
            raise FedctError(f"server step: {key!r} is {list(m.shape)} merged, "
                             f"{list(g.shape)} global")
        if not m.is_floating_point():
            new[key] = m.detach().clone()
            continue
        delta = m.detach().double() - g.detach().to(m.device).double()
        v = delta if velocity is None or key not in velocity \
            else momentum * velocity[key].to(m.device).double() + delta
        vel[key] = v.to(m.dtype)
        new[key] = (g.detach().to(m.device).double() + lr * v).to(m.dtype)
    return new, vel
