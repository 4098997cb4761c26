"""The segmentation loss of every fedct training: Dice + cross-entropy with ignored voxels.

Voxels labelled ``IGNORE_INDEX`` (255) take no part in either term. Labelled sites never
use it, and then the loss equals ``monai.losses.DiceCELoss(to_onehot_y=True,
softmax=True)``; the self-training method marks pseudo-labels that fail the confidence
filter with it (``fedct.federation.label_free``), so one training step, local or federated,
serves both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn

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
