"""The 3D Bayesian U-Net and Monte-Carlo-dropout sampling.

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
from typing import Literal, cast

import torch
from monai.inferers import sliding_window_inference
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


@contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed the generator that dropout on ``device`` draws from, restoring it afterwards.

    ``nn.Dropout`` takes no generator argument; it draws from the global generator of the
    tensor's device. Forking that generator keeps a seeded prediction reproducible without
    changing the caller's random stream. ``seed=None`` draws from the global stream as is.
    """
    if seed is None:
        yield
        return
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else []):
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        else:
            torch.default_generator.manual_seed(seed)
        yield


def _autocast(device: torch.device, amp: bool) -> torch.autocast:
    """bf16 autocast where the GPU supports it, else fp16; a no-op on CPU or without ``amp``."""
    enabled = amp and device.type == "cuda"
    dtype = torch.bfloat16
    if enabled and not torch.cuda.is_bf16_supported():
        dtype = torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)


def _as_batch(image: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``(1, X, Y, Z)`` or ``(1, 1, X, Y, Z)`` -> ``(1, 1, X, Y, Z)`` float on ``device``."""
    if image.ndim == 4 and image.shape[0] == 1:
        image = image.unsqueeze(0)
    if image.ndim != 5 or image.shape[:2] != (1, 1):
        raise ValueError(
            f"expected one single-channel volume (1, X, Y, Z) or (1, 1, X, Y, Z), "
            f"got {tuple(image.shape)}"
        )
    return image.to(device=device, dtype=torch.float32)


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _check_has_dropout(model: nn.Module) -> None:
    # Without dropout every "sample" is identical and the uncertainty silently reads zero.
    if not any(m.p > 0 for m in dropout_modules(model)):
        raise ValueError(
            "model has no dropout with p > 0; MC dropout would return T identical maps"
        )


def _sample_probs(
    model: nn.Module,
    x: torch.Tensor,
    n: int,
    amp: bool,
    roi_size: Sequence[int] | None,
    sw_batch_size: int,
    overlap: float,
    output_device: torch.device,
) -> torch.Tensor:
    """``n`` MC samples of one ``(1, 1, X, Y, Z)`` image in one batched forward: ``(n, C, ...)``.

    With ``roi_size`` the image goes through MONAI's sliding window; each window is
    repeated ``n`` times along the batch so that one forward still carries all ``n``
    samples, and the samples travel folded into the channel axis (``n * C`` channels)
    because the sliding window stitches one output per input batch element. Overlapping
    windows are blended per sample on softmax probabilities, so the result still sums to 1;
    in overlaps a sample averages two dropout masks, which slightly lowers its variance there.
    """
    device = x.device

    def forward(windows: torch.Tensor) -> torch.Tensor:
        with _autocast(device, amp):
            logits = model(windows.repeat_interleave(n, dim=0))
        return logits.float().softmax(dim=1)

    if roi_size is None:
        return forward(x).to(output_device)

    def folded(windows: torch.Tensor) -> torch.Tensor:
        probs = forward(windows)
        return probs.reshape(windows.shape[0], -1, *probs.shape[2:])

    stitched = sliding_window_inference(
        x,
        roi_size=tuple(roi_size),
        sw_batch_size=sw_batch_size,
        predictor=folded,
        overlap=overlap,
        device=output_device,
    )
    # A tensor-returning predictor gives a tensor back (tuples/dicts only for multi-output).
    stitched = cast(torch.Tensor, stitched)
    return stitched.reshape(n, -1, *stitched.shape[2:])


def mc_predict(
    model: nn.Module,
    image: torch.Tensor,
    n_samples: int = 10,
    batch: int = 10,
    amp: bool = False,
    seed: int | None = None,
    roi_size: Sequence[int] | None = None,
    sw_batch_size: int = 1,
    overlap: float = 0.25,
    output_device: torch.device | str | None = None,
) -> torch.Tensor:
    """MC-dropout softmax probabilities of one image, ``batch`` samples per forward pass.

    The image is repeated along the batch axis so that one forward draws ``batch``
    independent dropout masks (every layer draws its mask per batch element, and instance
    norm / eval-mode batch norm act on each element alone, so the samples are independent
    and distributed exactly as single passes). This replaces T small forwards by T/batch
    large ones, which use the hardware better (see ``benchmarks/mc_dropout.py``).

    Args:
        model: network with dropout layers; its mode is restored on return.
        image: ``(1, X, Y, Z)`` or ``(1, 1, X, Y, Z)`` preprocessed volume.
        n_samples: T, the number of MC samples.
        batch: samples per forward pass; lower it if memory is short.
        amp: autocast (bf16, or fp16 where bf16 is unsupported) on CUDA; ignored on CPU.
        seed: seeds dropout for this call only (the caller's RNG state is restored). The
            same seed, ``n_samples``, ``batch`` and device give identical samples (on CUDA,
            up to cuDNN's own non-determinism). ``None`` uses the global RNG, so
            ``torch.manual_seed`` before the call works too.
        roi_size: if given, sliding-window inference with windows of this size (voxels).
        sw_batch_size: windows per forward in sliding-window mode (times ``batch`` samples).
        overlap: sliding-window overlap fraction.
        output_device: where the probabilities are gathered; default the model's device.
            Use ``"cpu"`` for large volumes on a GPU.

    Returns:
        ``(T, C, X, Y, Z)`` float32 probabilities summing to 1 over ``C``.
    """
    if n_samples < 1 or batch < 1:
        raise ValueError(f"n_samples and batch must be >= 1, got {n_samples} and {batch}")
    _check_has_dropout(model)
    device = _model_device(model)
    out_device = torch.device(output_device) if output_device is not None else device
    x = _as_batch(image, device)
    chunks = []
    with mc_dropout(model), torch.inference_mode(), _seeded(seed, device):
        for start in range(0, n_samples, batch):
            n = min(batch, n_samples - start)
            chunks.append(
                _sample_probs(model, x, n, amp, roi_size, sw_batch_size, overlap, out_device)
            )
    # One chunk (batch >= T, the usual case) is returned as is: cat would copy T x C x X x Y x Z.
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks)


def mc_predict_loop(
    model: nn.Module,
    image: torch.Tensor,
    n_samples: int = 10,
    amp: bool = False,
    seed: int | None = None,
) -> torch.Tensor:
    """Reference MC dropout: T separate single-image forward passes.

    Kept only as the baseline for ``benchmarks/mc_dropout.py`` and as the definition the
    batched ``mc_predict`` is tested against; use ``mc_predict`` in the pipeline. Same
    arguments and ``(T, C, X, Y, Z)`` output as ``mc_predict`` without batching or windows.
    """
    return mc_predict(model, image, n_samples=n_samples, batch=1, amp=amp, seed=seed)
