"""fedct's torch-only ``Convolution`` is MONAI's: same state_dict keys, same outputs.

The U-Net is built from ``fedct.model.blocks.Convolution`` so that building a model does
not import all of MONAI; these tests build MONAI's block and the whole network both ways
and compare them, so a model trained with either loads into the other unchanged.
"""

from __future__ import annotations

import pytest
import torch

from fedct.model import blocks, unet
from fedct.model.unet import build_bayesian_unet

monai_blocks = pytest.importorskip("monai.networks.blocks")

INSTANCE = ("instance", {"affine": True})
LEAKY = ("leakyrelu", {"negative_slope": 0.01, "inplace": True})


def _same_weights(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    """Random weights (norm affines included) in ``src``, copied into ``dst`` by key."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in src.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    dst.load_state_dict(src.state_dict(), strict=True)


def _layers(block: torch.nn.Module) -> list[str]:
    """The torch layers with every argument (their repr), containers left out."""
    return [repr(m) for m in block.modules() if not list(m.children())]


@pytest.mark.parametrize("kwargs", [
    {"strides": 1, "kernel_size": 3, "norm": INSTANCE},  # an encoder/decoder conv
    {"strides": 2, "kernel_size": 3, "norm": INSTANCE},  # the strided first conv
    {"strides": 2, "kernel_size": 3, "norm": "batch"},  # the ablation's batch norm
    {"strides": 2, "kernel_size": 2, "padding": 0, "output_padding": 0, "norm": INSTANCE,
     "is_transposed": True},  # the decoder's up-convolution
])
def test_the_block_equals_monais(kwargs: dict) -> None:
    args = dict(spatial_dims=3, in_channels=4, out_channels=6, bias=False, act=LEAKY,
                adn_ordering="NA", **kwargs)
    ours, theirs = blocks.Convolution(**args), monai_blocks.Convolution(**args)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert _layers(ours) == _layers(theirs)
    _same_weights(theirs, ours)
    x = torch.randn(2, 4, 8, 6, 4, generator=torch.Generator().manual_seed(1))
    ours.train(), theirs.train()  # batch norm: batch statistics, running ones updated
    torch.testing.assert_close(ours(x.clone()), theirs(x.clone()), rtol=0, atol=0)
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(x.clone()), theirs(x.clone()), rtol=0, atol=0)
    torch.testing.assert_close(ours.state_dict(), theirs.state_dict(), rtol=0, atol=0)


@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_the_unet_equals_the_one_built_from_monais_blocks(monkeypatch: pytest.MonkeyPatch,
                                                          norm: str) -> None:
    kwargs = dict(n_classes=3, channels=(4, 8, 16), strides=(2, 2), dropout=0.25,
                  num_res_units=1, norm=norm, dropout_depth=2)
    ours = build_bayesian_unet(**kwargs)
    monkeypatch.setattr(unet, "Convolution", monai_blocks.Convolution)
    theirs = build_bayesian_unet(**kwargs)
    assert any(isinstance(m, monai_blocks.Convolution) for m in theirs.modules())
    assert not any(isinstance(m, monai_blocks.Convolution) for m in ours.modules())
    assert {k: v.shape for k, v in ours.state_dict().items()} == \
        {k: v.shape for k, v in theirs.state_dict().items()}
    assert _layers(ours) == _layers(theirs)
    _same_weights(theirs, ours)
    ours.eval(), theirs.eval()
    x = torch.randn(1, 1, 16, 12, 8, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)


def test_unsupported_layers_are_refused_not_guessed() -> None:
    with pytest.raises(ValueError, match="norm 'group'"):
        blocks.Convolution(3, 2, 2, norm="group")
    with pytest.raises(ValueError, match="act 'gelu'"):
        blocks.Convolution(3, 2, 2, act="gelu")
    with pytest.raises(ValueError, match="adn_ordering"):
        blocks.Convolution(3, 2, 2, adn_ordering="NX")
