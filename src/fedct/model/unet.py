"""The 3D Bayesian U-Net: architecture and its MC-dropout mode.

The network follows the lab's Bayesian U-Net (Hiasa et al., IEEE TMI 2019; Soufi et al.,
Sci Rep 2025): dropout after every encoder and decoder block (p = 0.5 there, with 32 or
more channels at full resolution; ``train.dropout`` sets it, 0.25 for the demo's 8),
kept active at test time so that T stochastic forward passes sample the approximate
posterior predictive.
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
from torch import nn
from torch.nn.modules.dropout import _DropoutNd

from fedct.model.blocks import Convolution

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


def _conv(in_ch: int, out_ch: int, norm: Norm, stride: int = 1) -> Convolution:
    """3x3x3 convolution -> norm -> LeakyReLU (no dropout: that follows the whole block)."""
    norm_layer = ("instance", {"affine": True}) if norm == "instance" else "batch"
    # No bias: the norm that follows removes it.
    return Convolution(3, in_ch, out_ch, strides=stride, kernel_size=3, norm=norm_layer,
                       bias=False, act=("leakyrelu", {"negative_slope": 0.01, "inplace": True}),
                       adn_ordering="NA")


class Block(nn.Module):
    """Two 3x3x3 conv-norm-LeakyReLU layers (the first may stride to downsample), with a
    residual connection when ``residual``, then dropout: one block of the U-Net."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, dropout: float, norm: Norm,
                 residual: bool) -> None:
        # dropout == 0: a level without dropout (``dropout_depth``); no layer, so MC
        # sampling and ``dropout_modules`` see only the levels that sample.
        super().__init__()
        self.convs = nn.Sequential(_conv(in_ch, out_ch, norm, stride), _conv(out_ch, out_ch, norm))
        self.skip: nn.Module | None = None
        if residual:
            self.skip = (nn.Identity() if in_ch == out_ch and stride == 1 else
                         nn.Conv3d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False))
        self.dropout: nn.Module = MCDropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.convs(x)
        if self.skip is not None:
            y = y + self.skip(x)
        return self.dropout(y)


class BayesianUNet(nn.Module):
    """3D U-Net with a full-resolution level and dropout after the blocks of chosen levels.

    Levels ``i = 0 .. L-1`` have ``channels[i]`` features; level 0 works at the input's
    resolution (its first convolution has stride 1), level ``i`` at the input's size divided
    by ``strides[0] * ... * strides[i-1]``. Encoder: one ``Block`` per level, the first
    convolution of each block below level 0 strides down. Decoder: per level from the
    bottom up, a transposed convolution with kernel = stride (no checkerboard overlap)
    -> norm -> LeakyReLU to the finer level, concatenation with that level's encoder output (the
    skip), and a ``Block``. The encoder and decoder blocks of the ``dropout_depth``
    coarsest levels (default: all, the lab's default) end with dropout, as the lab's code
    switches dropout per level
    (``dropout_enables``); the logits come
    from a plain 3x3x3 convolution of the full-resolution decoder block, with no dropout
    after it (dropout on the 2-9 class channels would inject noise unrelated to the data).
    """

    def __init__(self, n_classes: int, channels: Sequence[int], strides: Sequence[int],
                 dropout: float, num_res_units: int, norm: Norm,
                 dropout_depth: int | None = None) -> None:
        super().__init__()
        residual = num_res_units > 0
        first = 0 if dropout_depth is None else max(0, len(channels) - int(dropout_depth))

        def p(level: int) -> float:
            return dropout if level >= first else 0.0

        self.encoder = nn.ModuleList()
        in_ch = 1
        for i, ch in enumerate(channels):
            stride = 1 if i == 0 else int(strides[i - 1])
            self.encoder.append(Block(in_ch, ch, stride, p(i), norm, residual))
            in_ch = ch
        self.up = nn.ModuleList()
        self.decoder = nn.ModuleList()
        norm_layer = ("instance", {"affine": True}) if norm == "instance" else "batch"
        for i in reversed(range(len(channels) - 1)):
            s = int(strides[i])
            self.up.append(Convolution(3, channels[i + 1], channels[i], strides=s,
                                       kernel_size=s, padding=0, output_padding=0,
                                       norm=norm_layer, bias=False,
                                       act=("leakyrelu", {"negative_slope": 0.01,
                                                          "inplace": True}),
                                       adn_ordering="NA", is_transposed=True))
            self.decoder.append(Block(2 * channels[i], channels[i], 1, p(i), norm, residual))
        self.classifier = nn.Conv3d(channels[0], n_classes, kernel_size=3, padding=1)
        self.down_factor = math.prod(int(s) for s in strides)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
        x = skips.pop()
        for up, block in zip(self.up, self.decoder, strict=True):
            x = block(torch.cat([up(x), skips.pop()], dim=1))
        return self.classifier(x)


def build_bayesian_unet(
    n_classes: int,
    channels: Sequence[int] = (16, 32, 64, 128),
    strides: Sequence[int] = (2, 2, 2),
    dropout: float = 0.5,
    num_res_units: int = 1,
    norm: Norm = "instance",
    dropout_depth: int | None = None,
) -> BayesianUNet:
    """Build the 3D Bayesian U-Net (1 input channel, ``n_classes`` logits).

    ``channels[0]`` is the full-resolution level: the input is never downsampled before
    the first block, so boundaries are segmented at the grid's own resolution (a stride-2
    first convolution caps Dice by what a half-resolution map upsampled can draw).

    ``norm="instance"`` (default, with a learnt affine) because (a) training uses batches
    of 2 volumes, too few for reliable batch statistics; (b) instance norm has no running
    statistics, so MC sampling cannot corrupt them and FedAvg only averages weights, not
    per-site statistics; (c) each scan is normalised by its own statistics, which removes a
    global intensity offset between sites. The affine weights are what TENT-style test-time
    adaptation and FedBN-style local layers act on. ``"batch"`` is kept for ablations.

    Args:
        n_classes: output classes including background (0).
        channels: feature widths per resolution level, full resolution first.
        strides: down-sampling factor between consecutive levels (``len(channels) - 1``
            entries); input sizes must be divisible by their product.
        dropout: dropout probability after every block (0.5 in the lab's code).
        num_res_units: 0 = plain two-convolution blocks; >= 1 = residual blocks.
        norm: normalisation layer type.
        dropout_depth: how many levels, counted from the coarsest, end their encoder and
            decoder blocks with dropout; ``None`` or at least the number of levels: every
            level. Dropout in a narrow
            full-resolution level, whose features feed the classifier directly, costs
            accuracy that the sampling at that scale does not repay (Bayesian SegNet's
            finding; here ``benchmarks/convergence.py``).
    """
    if n_classes < 2:
        raise ValueError(f"n_classes must be >= 2 (background + structures), got {n_classes}")
    if len(strides) != len(channels) - 1:
        raise ValueError(
            f"need len(strides) == len(channels) - 1, got {len(strides)} and {len(channels)}"
        )
    if dropout_depth is not None and int(dropout_depth) < 1:
        raise ValueError(f"dropout_depth must be >= 1 (levels with dropout), got {dropout_depth}")
    # Channels-last ("NDHWC") weights: oneDNN's 3D convolutions then run without
    # reordering their operands, and their outputs stay channels-last. On an AMD EPYC
    # (AVX512-BF16) a bf16 training step of the demo's network ran x1.20 (1 thread) and
    # x1.25 (2 threads) faster than in the default layout, fp32 x1.25-1.33, a batch of 10
    # MC samples x1.01-1.11 (benchmarks/train_throughput.py; results/benchmarks/
    # train-step-*.json). Only the layout changes: the state dict has the same keys,
    # shapes and values (saved contiguous by save_model), the outputs agree to rounding.
    return BayesianUNet(n_classes, channels, strides, dropout, num_res_units, norm,
                        dropout_depth).to(memory_format=torch.channels_last_3d)


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


