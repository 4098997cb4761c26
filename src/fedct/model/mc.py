"""Monte-Carlo-dropout sampling of a Bayesian U-Net (``fedct.model.unet``).

T stochastic forward passes with only the dropout layers sampling give the approximate
posterior predictive. Shape contract: an image is ``(1, X, Y, Z)`` (channel first,
normalised by preprocessing); MC probabilities are ``(T, C, X, Y, Z)`` float32 softmax
outputs that sum to 1 over ``C`` at every voxel.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import cast

import torch
from torch import nn

from fedct.devices import use_amp
from fedct.model.unet import dropout_modules, mc_dropout


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
    """bf16 autocast where the device supports it (a GPU without bf16: fp16; a CPU without
    native bf16: off, ``fedct.devices.use_amp``); a no-op without ``amp``."""
    enabled = use_amp(device, amp)
    dtype = torch.bfloat16
    if enabled and device.type == "cuda" and not torch.cuda.is_bf16_supported():
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

    from monai.inferers import sliding_window_inference  # ~10 s: only where windows are used

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
        amp: bf16 autocast where the device computes bf16 natively (a GPU without bf16:
            fp16; ``fedct.devices.use_amp``); off elsewhere.
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
