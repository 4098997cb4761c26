from __future__ import annotations

import pytest
import torch
from torch import nn

from fedct import devices
from fedct.model.mc import mc_predict, mc_predict_loop
from fedct.model.unet import (
    Block,
    MCDropout,
    build_bayesian_unet,
    dropout_modules,
    enable_mc_dropout,
    keep_mask,
    mc_dropout,
)

N_CLASSES = 3
SIZE = 16


def tiny_unet(norm: str = "instance", dropout: float = 0.5) -> nn.Module:
    torch.manual_seed(0)
    return build_bayesian_unet(
        N_CLASSES, channels=(4, 8, 16), strides=(2, 2), dropout=dropout, norm=norm
    )


@pytest.fixture
def image() -> torch.Tensor:
    return torch.randn(1, SIZE, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def set_dropout_p(model: nn.Module, p: float) -> None:
    for m in dropout_modules(model):
        m.p = p


def test_every_block_has_dropout_and_the_classifier_has_none() -> None:
    model = build_bayesian_unet(N_CLASSES, channels=(16, 32, 64, 128), strides=(2, 2, 2),
                                dropout=0.5)
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    # 4 encoder blocks (one per level) + 3 decoder blocks, each ending with dropout.
    assert len(blocks) == 7
    assert all(type(b.dropout) is MCDropout and b.dropout.p == 0.5 for b in blocks)
    assert len(dropout_modules(model)) == len(blocks)
    # The last dropout acts on the full 16-channel top block, not on the class channels;
    # the logits come from a bare 3x3x3 convolution, as in the lab's network.
    modules = list(model.modules())
    last_dropout = max(i for i, m in enumerate(modules) if isinstance(m, nn.Dropout))
    convs_after = [m for m in modules[last_dropout:] if isinstance(m, nn.Conv3d)]
    assert len(convs_after) == 1
    assert convs_after[0].in_channels == 16 and convs_after[0].out_channels == N_CLASSES
    assert convs_after[0].kernel_size == (3, 3, 3)


def test_dropout_depth_puts_dropout_in_the_coarsest_levels_only(image: torch.Tensor) -> None:
    model = build_bayesian_unet(N_CLASSES, channels=(4, 8, 16, 32), strides=(2, 2, 2),
                                dropout=0.5, dropout_depth=2)
    # Level i's encoder block is encoder.i; the decoder runs from level 2 up to level 0.
    level_of = {**{f"encoder.{i}": i for i in range(4)},
                **{f"decoder.{j}": 2 - j for j in range(3)}}
    sampling = {name: type(model.get_submodule(name).dropout) is MCDropout
                for name in level_of}
    assert sampling == {name: level >= 2 for name, level in level_of.items()}
    assert len(dropout_modules(model)) == 3  # encoder 2, 3 and decoder 2
    # The coarse levels alone still make the MC samples differ.
    probs = mc_predict(model.eval(), image[:, :16, :16, :16], n_samples=3, batch=3, seed=0)
    assert not torch.allclose(probs[0], probs[1])
    # Every level, as the lab's default, when no depth is given.
    assert len(dropout_modules(build_bayesian_unet(N_CLASSES, channels=(4, 8, 16, 32),
                                                   strides=(2, 2, 2)))) == 7


def test_dropout_depth_below_one_is_refused_and_above_the_levels_means_all() -> None:
    with pytest.raises(ValueError, match="dropout_depth must be >= 1"):
        build_bayesian_unet(N_CLASSES, channels=(4, 8, 16, 32), strides=(2, 2, 2),
                            dropout_depth=0)
    deep = build_bayesian_unet(N_CLASSES, channels=(4, 8), strides=(2,), dropout_depth=4)
    assert len(dropout_modules(deep)) == 3  # both levels' encoder blocks + the decoder


def test_a_full_resolution_level_exists() -> None:
    # The first block keeps the input's size (no stride-2 first convolution), and the block
    # that feeds the classifier works at full resolution too.
    model = tiny_unet().eval()
    sizes: dict[str, tuple[int, ...]] = {}
    for name in ("encoder.0", "decoder.1"):
        model.get_submodule(name).register_forward_hook(
            lambda _m, _a, out, name=name: sizes.__setitem__(name, tuple(out.shape)))
    with torch.no_grad():
        model(torch.zeros(1, 1, SIZE, SIZE, 8))
    assert sizes == {"encoder.0": (1, 4, SIZE, SIZE, 8), "decoder.1": (1, 4, SIZE, SIZE, 8)}


def test_residual_and_plain_blocks() -> None:
    plain = build_bayesian_unet(N_CLASSES, channels=(4, 8), strides=(2,), num_res_units=0)
    res = build_bayesian_unet(N_CLASSES, channels=(4, 8), strides=(2,), num_res_units=1)
    assert all(b.skip is None for b in plain.modules() if isinstance(b, Block))
    assert all(b.skip is not None for b in res.modules() if isinstance(b, Block))
    x = torch.randn(2, 1, 8, 8, 8)
    assert plain.eval()(x).shape == res.eval()(x).shape == (2, N_CLASSES, 8, 8, 8)


def test_output_shape_and_norm_choice(image: torch.Tensor) -> None:
    model = tiny_unet().eval()
    assert model(image[None]).shape == (1, N_CLASSES, SIZE, SIZE, SIZE)
    assert any(isinstance(m, nn.InstanceNorm3d) for m in model.modules())
    assert any(isinstance(m, nn.BatchNorm3d) for m in tiny_unet("batch").modules())


def test_build_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="n_classes"):
        build_bayesian_unet(1)
    with pytest.raises(ValueError, match="strides"):
        build_bayesian_unet(3, channels=(4, 8, 16), strides=(2,))


@pytest.mark.parametrize("start_in_train", [True, False])
def test_mc_dropout_only_dropout_trains_and_modes_are_restored(start_in_train: bool) -> None:
    model = tiny_unet("batch").train(start_in_train)
    with mc_dropout(model):
        for m in model.modules():
            assert m.training == isinstance(m, nn.Dropout), type(m).__name__
    assert all(m.training == start_in_train for m in model.modules())


def test_enable_mc_dropout_returns_model_in_mc_mode() -> None:
    model = tiny_unet("batch").train()
    assert enable_mc_dropout(model) is model
    assert not model.training
    assert all(m.training for m in dropout_modules(model))


def test_mc_samples_differ_while_plain_eval_is_deterministic(image: torch.Tensor) -> None:
    model = tiny_unet().eval()
    with torch.no_grad():
        assert torch.equal(model(image[None]), model(image[None]))
    probs = mc_predict(model, image, n_samples=4, batch=4, seed=0)
    for i in range(4):
        for j in range(i + 1, 4):
            # Distinct samples inside one batch: each batch element draws its own masks.
            assert not torch.allclose(probs[i], probs[j])


def test_batch_norm_statistics_untouched_by_mc_prediction(image: torch.Tensor) -> None:
    model = tiny_unet("batch").train()  # train mode: a naive model.train() would update them
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm3d)]
    for bn in bns:
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mc_predict(model, image, n_samples=4, batch=2, seed=0)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training


def test_without_dropout_randomness_mc_equals_eval_forward(image: torch.Tensor) -> None:
    # With p ~ 0 (p = 0 is refused as "no dropout") the only difference between MC mode and
    # eval is the norm mode, so this fails if normalisation used batch statistics.
    model = tiny_unet("batch")
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm3d)):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    set_dropout_p(model, 1e-12)
    with torch.no_grad():
        expected = model.eval()(image[None]).softmax(dim=1)
    probs = mc_predict(model, image, n_samples=3, batch=3)
    torch.testing.assert_close(probs, expected.expand(3, -1, -1, -1, -1))


@pytest.mark.parametrize("shape", [(1, SIZE, SIZE, SIZE), (1, 1, SIZE, SIZE, SIZE)])
def test_probabilities_shape_and_normalisation(shape: tuple[int, ...]) -> None:
    img = torch.randn(*shape)
    probs = mc_predict(tiny_unet(), img, n_samples=5, batch=2, seed=0)
    assert probs.shape == (5, N_CLASSES, SIZE, SIZE, SIZE)
    assert probs.dtype == torch.float32
    assert probs.min() >= 0
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(5, SIZE, SIZE, SIZE))


@pytest.mark.parametrize("shape", [(SIZE, SIZE, SIZE), (2, SIZE, SIZE, SIZE), (1, 2, 4, 4, 4)])
def test_rejects_anything_but_one_single_channel_volume(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="single-channel"):
        mc_predict(tiny_unet(), torch.zeros(shape), n_samples=2)


def test_model_without_dropout_is_refused(image: torch.Tensor) -> None:
    model = build_bayesian_unet(N_CLASSES, channels=(4, 8), strides=(2,), dropout=0.0)
    with pytest.raises(ValueError, match="no dropout with p > 0"):
        mc_predict(model, image)


def test_samples_are_drawn_in_batches(image: torch.Tensor) -> None:
    model = tiny_unet()
    sizes: list[int] = []
    model.register_forward_hook(lambda _m, args, _out: sizes.append(args[0].shape[0]))
    mc_predict(model, image, n_samples=5, batch=2)
    assert sizes == [2, 2, 1]
    sizes.clear()
    mc_predict_loop(model, image, n_samples=3)
    assert sizes == [1, 1, 1]


def test_same_seed_same_samples_and_caller_rng_untouched(image: torch.Tensor) -> None:
    model = tiny_unet()
    state = torch.get_rng_state()
    a = mc_predict(model, image, n_samples=4, batch=2, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, mc_predict(model, image, n_samples=4, batch=2, seed=7))
    assert not torch.equal(a, mc_predict(model, image, n_samples=4, batch=2, seed=8))
    loop = mc_predict_loop(model, image, n_samples=4, seed=7)
    assert torch.equal(loop, mc_predict_loop(model, image, n_samples=4, seed=7))
    torch.manual_seed(3)
    b = mc_predict(model, image, n_samples=2)
    torch.manual_seed(3)
    assert torch.equal(b, mc_predict(model, image, n_samples=2))


def test_batched_and_loop_sample_the_same_distribution() -> None:
    model = tiny_unet()
    img = torch.randn(1, 8, 8, 8, generator=torch.Generator().manual_seed(2))
    batched = mc_predict(model, img, n_samples=300, batch=100, seed=0)
    loop = mc_predict_loop(model, img, n_samples=300, seed=1)
    assert batched.shape == loop.shape
    # Monte-Carlo error of a mean of 300 probabilities is ~0.02 at worst; a batching bug
    # (shared masks, mixed samples) shows up as a collapsed spread, caught by the std.
    assert (batched.mean(0) - loop.mean(0)).abs().max() < 0.06
    ratio = batched.std(0).mean() / loop.std(0).mean()
    assert 0.9 < ratio < 1.1


def test_amp_is_ignored_on_a_cpu_without_native_bf16(image: torch.Tensor,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: False)
    model = tiny_unet()
    a = mc_predict(model, image, n_samples=2, seed=0, amp=True)
    assert a.dtype == torch.float32
    assert torch.equal(a, mc_predict(model, image, n_samples=2, seed=0, amp=False))


def test_amp_runs_bf16_on_a_cpu_with_native_bf16(image: torch.Tensor,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # bf16 is computed (emulated where the CPU lacks it), so this runs on any CPU.
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: True)
    model = tiny_unet()
    a = mc_predict(model, image, n_samples=2, seed=0, amp=True)
    b = mc_predict(model, image, n_samples=2, seed=0, amp=False)
    assert a.dtype == torch.float32  # probabilities always come back as float32
    assert not torch.equal(a, b)  # bf16 rounding: autocast was on
    assert (a - b).abs().max() < 0.05  # the same samples (same dropout masks)
    assert torch.allclose(a.sum(1), torch.ones_like(a.sum(1)), atol=1e-4)


def test_use_amp_rule() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert devices.use_amp(cuda, True) and not devices.use_amp(cuda, False)
    assert devices.use_amp(cpu, True) == devices.cpu_has_bf16()
    assert not devices.use_amp(cpu, False)


def test_sliding_window_with_whole_image_window_matches_direct(image: torch.Tensor) -> None:
    # One window covering the image draws the same masks in the same order as the direct
    # path, so any mix-up in folding samples into channels would break equality.
    model = tiny_unet()
    direct = mc_predict(model, image, n_samples=4, batch=2, seed=5)
    windowed = mc_predict(model, image, n_samples=4, batch=2, seed=5, roi_size=(SIZE,) * 3)
    torch.testing.assert_close(windowed, direct)


def test_sliding_window_on_a_larger_volume(image: torch.Tensor) -> None:
    model = tiny_unet()
    probs = mc_predict(
        model, image, n_samples=3, batch=3, seed=0, roi_size=(8, 8, 8), sw_batch_size=2
    )
    assert probs.shape == (3, N_CLASSES, SIZE, SIZE, SIZE)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(3, SIZE, SIZE, SIZE))
    assert not torch.allclose(probs[0], probs[1])


@pytest.mark.parametrize("p", [0.5, 0.2])
def test_keep_mask_is_bernoulli_with_independent_elements(p: float) -> None:
    torch.manual_seed(3)
    mask = keep_mask(torch.Size((4, 5, 33, 17)), p, torch.device("cpu")).float()
    assert mask.shape == (4, 5, 33, 17) and set(mask.unique().tolist()) == {0.0, 1.0}
    n = mask.numel()
    assert abs(mask.mean().item() - (1 - p)) < 4 * ((p * (1 - p) / n) ** 0.5)
    # Neighbours (also within one 32-bit word for p = 0.5) are uncorrelated.
    flat = mask.flatten()
    corr = torch.corrcoef(torch.stack([flat[:-1], flat[1:]]))[0, 1].item()
    assert abs(corr) < 0.02
    # Same seed, same mask: MC predictions stay reproducible.
    torch.manual_seed(3)
    assert torch.equal(keep_mask(torch.Size((4, 5, 33, 17)), p, torch.device("cpu")).float(), mask)


def test_mc_dropout_layer_matches_torch_dropout_in_expectation() -> None:
    layer, x = MCDropout(0.5), torch.ones(20000)
    out = layer.train()(x)
    assert set(out.unique().tolist()) == {0.0, 2.0}  # kept values scaled by 1 / (1 - p)
    assert abs(out.mean().item() - 1.0) < 0.05
    assert torch.equal(layer.eval()(x), x)
    assert all(type(m) is MCDropout for m in dropout_modules(tiny_unet()))


def test_mc_dropout_layer_trains_gradients_through_the_mask() -> None:
    torch.manual_seed(0)
    x = torch.ones(1000, requires_grad=True)
    out = MCDropout(0.5).train()(x)
    out.sum().backward()
    assert x.grad is not None
    assert torch.equal(x.grad, out.detach())  # d(out)/dx = mask / (1 - p) = out / x


def test_weights_are_channels_last_and_compute_what_the_default_layout_computes(
        image: torch.Tensor) -> None:
    model = tiny_unet().eval()
    convs = [m.weight for m in model.modules() if isinstance(m, nn.Conv3d | nn.ConvTranspose3d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last_3d) for w in convs)
    # (a weight with one input channel or a 1x1x1 kernel is both layouts at once)
    assert sum(not w.is_contiguous() for w in convs) >= len(convs) // 2
    default = build_bayesian_unet(N_CLASSES, channels=(4, 8, 16), strides=(2, 2),
                                  dropout=0.5).to(memory_format=torch.contiguous_format).eval()
    default.load_state_dict(model.state_dict())
    assert all(p.is_contiguous() for p in default.parameters())
    with torch.no_grad():
        a, b = model(image[None]), default(image[None])
    assert a.shape == b.shape == (1, N_CLASSES, SIZE, SIZE, SIZE)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_channels_last_weights_survive_training_and_loading() -> None:
    model = tiny_unet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(2, 1, SIZE, SIZE, SIZE)
    model(x).mean().backward()
    opt.step()
    fresh = tiny_unet()
    fresh.load_state_dict({k: v.contiguous() for k, v in model.state_dict().items()})
    for (name, p), q in zip(model.named_parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q), name
        if p.dim() == 5:
            assert q.is_contiguous(memory_format=torch.channels_last_3d), name
