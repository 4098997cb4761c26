"""The 3D Bayesian U-Net: architecture and its MC-dropout mode.

The network follows the lab's Bayesian U-Net (Hiasa et al., IEEE TMI 2019; Soufi et al.,
Sci Rep 2025): dropout with p = 0.5 after every encoder and decoder block, kept active at
test time so that T stochastic forward passes sample the approximate posterior predictive.
Only the dropout layers are stochastic at test time; normalisation stays in eval mode.

Shape contract: an image is ``(1, X, Y, Z)`` (channel first, intensities already
normalised by preprocessing); MC probabilities are ``(T, C, X, Y, Z)`` float32 softmax
outputs that sum to 1 over ``C`` at every voxel.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
from monai.networks.blocks import Convolution
from monai.networks.nets import UNet
from torch import nn
from torch.nn.modules.dropout import _DropoutNd

Norm = Literal["instance", "batch"]

_BIT_SHIFTS = torch.arange(8, dtype=torch.uint8)


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """Bernoulli(1 - p) keep mask of ``shape`` (uint8 for p = 0.5 on CPU, else bool).

    ``nn.Dropout`` on CPU draws each element with ``bernoulli_``, which runs one element at
    a time and took half of a batched MC-dropout forward (``benchmarks/mc_dropout.py``).
    For p = 0.5, the lab's rate, every random bit is a fair coin: 32-bit random words are
    unpacked into 32 mask elements, 32x fewer draws. Any other p compares uniform floats
    with p, still twice as fast as ``bernoulli_``. Both draw from torch's generator of
    ``device``, so ``torch.manual_seed`` and ``mc_predict(seed=...)`` still reproduce them.
    """
    n = math.prod(shape)
    if p == 0.5 and device.type == "cpu":
        words = torch.randint(-(2**31), 2**31, ((n + 31) // 32,), dtype=torch.int32)
        bits = (words.view(torch.uint8)[:, None] >> _BIT_SHIFTS) & 1
        return bits.view(-1)[:n].view(shape)
    return torch.rand(shape, device=device) >= p


class MCDropout(nn.Dropout):
    """Element-wise dropout, distributed exactly as ``nn.Dropout``, with a faster CPU mask.

    On CUDA it is ``nn.Dropout`` itself (fused there); on CPU the mask comes from
    ``keep_mask``. Kept values are scaled by ``1 / (1 - p)`` as in ``nn.Dropout``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu" or self.p == 1.0:
            return super().forward(x)
        mask = keep_mask(x.shape, self.p, x.device)
        return (x * mask).mul_(1.0 / (1.0 - self.p))


def _use_mc_dropout(model: nn.Module) -> None:
    """Replace every ``nn.Dropout`` that MONAI built by an ``MCDropout`` of the same rate."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.Dropout:
                setattr(parent, name, MCDropout(child.p))


class BayesianUNet(UNet):
    """MONAI ``UNet`` with dropout in every block and a dropout-free 3x3x3 classifier on top.

    Why the top layer is changed: MONAI's top decoder layer maps straight to
    ``out_channels`` and applies norm + dropout + activation to that map, so with
    ``out_channels = n_classes`` a p = 0.5 dropout would hit a 2-9 channel bottleneck right
    before the logits, injecting noise unrelated to the data that would dominate the MC
    uncertainty. The lab's U-Net instead ends its last ``channels[0]``-wide decoder block
    with dropout and predicts with a plain 3x3 convolution. So here the top decoder layer
    is MONAI's transposed convolution + norm/dropout/PReLU at ``channels[0]`` features,
    followed by a 3x3x3 convolution to ``n_classes`` logits. Every other block is MONAI's.
    """

    def __init__(
        self,
        n_classes: int,
        channels: Sequence[int],
        strides: Sequence[int],
        dropout: float,
        num_res_units: int,
        norm: Norm,
    ) -> None:
        # Read by _get_up_layer while UNet.__init__ builds the network.
        self.n_classes = n_classes
        super().__init__(
            spatial_dims=3,
            in_channels=1,
            out_channels=channels[0],
            channels=tuple(channels),
            strides=tuple(strides),
            num_res_units=num_res_units,
            dropout=dropout,
            norm=norm,
        )
        _use_mc_dropout(self)

    def _get_up_layer(
        self, in_channels: int, out_channels: int, strides: int, is_top: bool
    ) -> nn.Module:
        if not is_top:
            return super()._get_up_layer(in_channels, out_channels, strides, is_top)
        up = Convolution(
            self.dimensions,
            in_channels,
            out_channels,
            strides=strides,
            kernel_size=self.up_kernel_size,
            act=self.act,
            norm=self.norm,
            dropout=self.dropout,
            bias=self.bias,
            is_transposed=True,
            adn_ordering=self.adn_ordering,
        )
        classifier = Convolution(
            self.dimensions,
            out_channels,
            self.n_classes,
            kernel_size=self.kernel_size,
            bias=self.bias,
            conv_only=True,
        )
        return nn.Sequential(up, classifier)


def build_bayesian_unet(
    n_classes: int,
    channels: Sequence[int] = (16, 32, 64, 128),
    strides: Sequence[int] = (2, 2, 2),
    dropout: float = 0.5,
    num_res_units: int = 1,
    norm: Norm = "instance",
) -> BayesianUNet:
    """Build the 3D Bayesian U-Net (1 input channel, ``n_classes`` logits).

    MONAI 1.6's ``UNet`` builds every down, bottom and up block as conv -> norm ->
    dropout -> PReLU (``ADN`` ordering "NDA"), so passing ``dropout`` places one
    ``nn.Dropout`` in every block, as in the lab's network.

    ``norm="instance"`` (default) because (a) training uses batches of 2 volumes, too few
    for reliable batch statistics; (b) instance norm has no running statistics, so MC
    sampling cannot corrupt them and FedAvg only averages weights, not per-site
    statistics; (c) each scan is normalised by its own statistics, which removes a global
    intensity offset between sites. ``"batch"`` is kept for ablations.

    Args:
        n_classes: output classes including background (0).
        channels: feature widths per resolution level.
        strides: down-sampling strides between levels (``len(channels) - 1`` entries).
        dropout: dropout probability in every block (0.5 in the lab's code).
        num_res_units: residual units per block.
        norm: normalisation layer type.
    """
    if n_classes < 2:
        raise ValueError(f"n_classes must be >= 2 (background + structures), got {n_classes}")
    if len(strides) != len(channels) - 1:
        raise ValueError(
            f"need len(strides) == len(channels) - 1, got {len(strides)} and {len(channels)}"
        )
    return BayesianUNet(n_classes, channels, strides, dropout, num_res_units, norm)


def dropout_modules(model: nn.Module) -> list[_DropoutNd]:
    """All dropout layers of ``model`` (``nn.Dropout``, ``nn.Dropout3d``, alpha dropout...)."""
    return [m for m in model.modules() if isinstance(m, _DropoutNd)]


def enable_mc_dropout(model: nn.Module) -> nn.Module:
    """Put ``model`` in eval mode except its dropout layers, which sample (train mode).

    Normalisation, and anything else whose behaviour depends on ``training``, stays in eval,
    so batch-norm running statistics are used and never updated. Returns ``model``.
    """
    model.eval()
    for m in dropout_modules(model):
        m.train()
    return model


@contextmanager
def mc_dropout(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: MC-dropout mode inside, every module's previous mode restored after."""
    previous = {m: m.training for m in model.modules()}
    try:
        yield enable_mc_dropout(model)
    finally:
        for m, training in previous.items():
            m.train(training)


