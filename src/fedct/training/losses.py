"""The segmentation loss of every fedct training: Dice + cross-entropy with ignored voxels.

Voxels labelled ``IGNORE_INDEX`` (255) take no part in either term. Labelled sites never
use it, and then the loss equals ``monai.losses.DiceCELoss(to_onehot_y=True,
softmax=True)``; the self-training method marks pseudo-labels that fail the confidence
filter with it (``fedct.federation.label_free``), so one training step, local or federated,
serves both.

:func:`proximal_term` is FedProx's penalty ``mu / 2 * ||w - w_global||^2`` (squared L2
norm), which a federated client adds to its loss (``fedct.training.local``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn

from fedct.errors import FedctError

IGNORE_INDEX = 255


class MaskedDiceCELoss(nn.Module):
    """Dice + cross-entropy that ignores voxels labelled ``ignore_index``.

    Dice is MONAI's ``DiceLoss`` with ``ignore_index`` (ignored voxels leave the
    intersection and both volumes); cross-entropy is averaged over the kept voxels only (0
    when none is kept, where a plain mean would be NaN).

    ``forward(logits (B, C, X, Y, Z), target (B, 1, X, Y, Z) int)``.
    """

    def __init__(self, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.dice = DiceLoss(to_onehot_y=True, softmax=True, ignore_index=ignore_index)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if 0 <= self.ignore_index < logits.shape[1]:
            raise ValueError(f"ignore_index {self.ignore_index} is a class of this "
                             f"{logits.shape[1]}-class network")
        target = target.long()
        ce = F.cross_entropy(logits, target[:, 0], ignore_index=self.ignore_index,
                             reduction="sum")
        kept = (target != self.ignore_index).sum().clamp_min(1)
        return self.dice(logits, target) + ce / kept


def proximal_term(params: Iterable[torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                  global_params: Iterable[torch.Tensor] | Mapping[str, torch.Tensor],
                  mu: float) -> torch.Tensor:
    """FedProx's penalty ``mu / 2 * sum_k ||w_k - w_global_k||^2`` as a scalar tensor.

    ``params`` are the local parameters (``model.parameters()``, or
    ``model.named_parameters()`` when ``global_params`` is a name -> tensor mapping such as
    the global state dict); the global ones are constants (no gradient flows into them).
    The gradient with respect to ``w`` is ``mu * (w - w_global)``.
    """
    if not math.isfinite(mu) or mu < 0:
        raise FedctError(f"proximal term: mu must be finite and >= 0, got {mu}")
    if isinstance(global_params, Mapping):
        pairs = []
        for item in params:
            if not isinstance(item, tuple):
                raise FedctError("proximal term: pass named parameters "
                                 "(model.named_parameters()) with a global state dict")
            name, p = item
            if name not in global_params:
                raise FedctError(f"proximal term: {name!r} is not in the global state")
            pairs.append((p, global_params[name]))
    else:
        local = [p[1] if isinstance(p, tuple) else p for p in params]
        glob = list(global_params)
        if len(local) != len(glob):
            raise FedctError(f"proximal term: {len(local)} local and {len(glob)} global "
                             "parameters")
        pairs = list(zip(local, glob, strict=True))
    if not pairs:
        raise FedctError("proximal term: no parameters")
    total = None
    for p, g in pairs:
        if p.shape != g.shape:
            raise FedctError(f"proximal term: shapes {list(p.shape)} and {list(g.shape)} differ")
        sq = (p - g.detach().to(device=p.device, dtype=p.dtype)).pow(2).sum()
        total = sq if total is None else total + sq
    return 0.5 * mu * total
