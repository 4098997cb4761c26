"""MONAI's ``Convolution`` block in plain torch, for the arguments the U-Net uses.

``import monai`` runs MONAI's ``__init__``, which imports every submodule (transforms,
datasets, handlers...): about 10 CPU-seconds, paid by every process that builds a model,
``fedct predict`` included, for a block that is a convolution, a norm and an activation.
This module builds the same ``nn.Sequential``: the same submodule names (``conv``, then
``adn`` holding ``N`` and ``A`` in ``adn_ordering``), so the same ``state_dict`` keys, and
the same layers with the same arguments, so the same outputs
(``tests/model/test_blocks.py`` builds both and compares them).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

# (name, kwargs) or name, as MONAI's factories take them.
LayerSpec = tuple[str, Mapping[str, Any]] | str


def _split(spec: LayerSpec) -> tuple[str, dict[str, Any]]:
    if isinstance(spec, str):
        return spec.lower(), {}
    name, kwargs = spec
    return name.lower(), dict(kwargs)


def _norm(spec: LayerSpec, dims: int, channels: int) -> nn.Module:
    """MONAI's ``get_norm_layer``: the ``dims``-D instance or batch norm of ``channels``."""
    name, kwargs = _split(spec)
    kinds = {"instance": "InstanceNorm", "batch": "BatchNorm"}
    if name not in kinds:
        raise ValueError(f"norm {name!r}: only {sorted(kinds)} are supported")
    kwargs.setdefault("num_features", channels)
    return getattr(nn, f"{kinds[name]}{dims}d")(**kwargs)


def _act(spec: LayerSpec) -> nn.Module:
    """MONAI's ``get_act_layer`` for the activations the U-Net uses."""
    name, kwargs = _split(spec)
    kinds = {"leakyrelu": nn.LeakyReLU, "relu": nn.ReLU, "prelu": nn.PReLU}
    if name not in kinds:
        raise ValueError(f"act {name!r}: only {sorted(kinds)} are supported")
    return kinds[name](**kwargs)


class ADN(nn.Sequential):
    """Norm ("N") and activation ("A") in ``ordering``; dropout ("D") is never built (the
    U-Net's dropout follows whole blocks), so a "D" adds nothing, as in MONAI without one."""

    def __init__(self, ordering: str, in_channels: int, act: LayerSpec | None,
                 norm: LayerSpec | None, norm_dim: int) -> None:
        super().__init__()
        ops = {"N": _norm(norm, norm_dim, in_channels) if norm is not None else None,
               "D": None, "A": _act(act) if act is not None else None}
        for item in ordering.upper():
            if item not in ops:
                raise ValueError(f"adn_ordering {ordering!r}: a string of N, D and A")
            if ops[item] is not None:
                self.add_module(item, ops[item])


class Convolution(nn.Sequential):
    """Convolution (or transposed convolution) -> ``ADN``, as
    ``monai.networks.blocks.Convolution`` builds it for the same arguments.

    Padding defaults to MONAI's "same" padding, ``(kernel_size - 1) // 2``; a transposed
    convolution's ``output_padding`` to ``strides - 1``.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int,
                 strides: int = 1, kernel_size: int = 3, adn_ordering: str = "NDA",
                 act: LayerSpec | None = "prelu", norm: LayerSpec | None = "instance",
                 dilation: int = 1, groups: int = 1, bias: bool = True,
                 is_transposed: bool = False, padding: int | None = None,
                 output_padding: int | None = None) -> None:
        super().__init__()
        self.spatial_dims, self.in_channels, self.out_channels = (spatial_dims, in_channels,
                                                                  out_channels)
        self.is_transposed = is_transposed
        if padding is None:
            padding = (kernel_size - 1) // 2 * dilation
        if is_transposed:
            conv: nn.Module = getattr(nn, f"ConvTranspose{spatial_dims}d")(
                in_channels, out_channels, kernel_size=kernel_size, stride=strides,
                padding=padding,
                output_padding=strides - 1 if output_padding is None else output_padding,
                groups=groups, bias=bias, dilation=dilation)
        else:
            conv = getattr(nn, f"Conv{spatial_dims}d")(
                in_channels, out_channels, kernel_size=kernel_size, stride=strides,
                padding=padding, dilation=dilation, groups=groups, bias=bias)
        self.add_module("conv", conv)
        if act is not None or norm is not None:
            self.add_module("adn", ADN(adn_ordering, out_channels, act, norm, spatial_dims))
