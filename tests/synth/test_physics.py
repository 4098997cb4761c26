"""The image-domain CT physics behaves as a projector + FBP scanner does."""

from __future__ import annotations

import numpy as np
import pytest

from fedct.synth import physics, projector
from fedct.synth.physics import Kernel
from fedct.synth.scanners import BY_KEY, CONDITIONS


def _radial_nps(noise: np.ndarray, pixel_mm: float, bins: np.ndarray) -> np.ndarray:
    """Radially averaged NPS of (k, n, n) noise images at the bin centres (cycles/mm)."""
    n = noise.shape[-1]
    ps = (np.abs(np.fft.fft2(noise - noise.mean(axis=(1, 2), keepdims=True))) ** 2).mean(0)
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(n, pixel_mm), np.fft.fftfreq(n, pixel_mm)))
    idx = np.digitize(f.ravel(), bins)
    return np.array([ps.ravel()[idx == i].mean() for i in range(1, len(bins))])


def test_fbp_reconstructs_attenuation() -> None:
    n, px = 64, 2.0
    c = (np.arange(n) - (n - 1) / 2) * px
    xx, yy = np.meshgrid(c, c)
    mu = np.where(np.hypot(xx, yy) < 40, 0.02, 0.0)[None].astype(np.float32)
    rec = projector.fbp(projector.project(mu, 90, px), n, px)
    assert rec[0, 28:36, 28:36].mean() == pytest.approx(0.02, rel=0.03)
    assert abs(rec[0, :5, :5].mean()) < 0.001


def test_shaped_noise_has_the_nps_of_fbp_from_noisy_projections() -> None:
    """Reference: white noise in the projections, reconstructed by FBP with the same
    kernel. Both spectra rise from ~0 at f = 0 (the ramp), peak at mid frequency and
    fall with the kernel's window; their shapes agree."""
    n, px, kernel = 64, 2.0, Kernel(0.12)
    rng = np.random.default_rng(0)
    n_bins = projector.system_matrix(n, 90).shape[0] // 90
    sino = rng.standard_normal((40, 90, n_bins)).astype(np.float32)
    ref = projector.fbp(sino, n, px, kernel)[:, 16:48, 16:48]  # inside the scanned circle
    ours = physics.shaped_noise((40, 32, 32), kernel, 0.0, px, rng)
    bins = np.linspace(0.0, 0.25, 9)
    a, b = _radial_nps(ref, px, bins), _radial_nps(ours, px, bins)
    # The back-projector interpolates linearly (amplitude response ~sinc^2): FBP noise
    # theory includes the interpolator, so divide it out of the reference.
    f = (bins[1:] + bins[:-1]) / 2
    a = a / np.sinc(f * px) ** 4
    a, b = a / a.max(), b / b.max()
    for nps in (a, b):
        assert nps[0] < 0.5 * nps.max()  # low at f = 0: FBP noise is not white
        assert 0 < int(np.argmax(nps)) < len(nps) - 1  # peak at mid frequency
    assert np.abs(a - b).max() < 0.2
    assert np.corrcoef(a, b)[0, 1] > 0.95


def test_noise_sigma_scales_with_dose_thickness_and_size() -> None:
    k = Kernel(0.34)

    def sigma(mas=150.0, t=2.0, kvp=120.0, wed=300.0):
        return float(physics.noise_sigma(k, 0.0, 0.78, mas, t, kvp, wed))

    assert sigma(mas=37.5) == pytest.approx(2 * sigma(), rel=1e-6)  # 1/sqrt(mAs)
    assert sigma(t=0.5) == pytest.approx(2 * sigma(), rel=1e-6)  # 1/sqrt(thickness)
    assert sigma(wed=380.0) == pytest.approx(2 * sigma(), rel=0.01)  # x2 per 80 mm
    assert sigma(kvp=80.0) > 1.5 * sigma()
    assert 8.0 < sigma() < 20.0  # soft-tissue kernel at routine dose


def test_measured_noise_matches_the_model() -> None:
    k = Kernel(0.34)
    rng = np.random.default_rng(1)
    n = physics.shaped_noise((8, 96, 96), k, 0.3, 0.78, rng)
    assert n.std() == pytest.approx(1.0, rel=0.05)


def test_kernel_mtf50_ordering_and_noise_texture() -> None:
    soft, std, sharp = (BY_KEY[k].recon_kernel for k in
                        ("canon_prism_fc03", "canon_one_fc13", "siemens_force_br64"))
    m = [physics.mtf50_lp_cm(k) for k in (soft, std, sharp)]
    assert m[0] < m[1] < m[2]
    assert 3.0 < m[0] < 4.5 and 6.0 < m[2] < 8.5  # STUDY.md: ~3-4 vs ~6-8 lp/cm
    # Sharp kernels: more noise, and finer grained (NPS peak at higher frequency).
    f = np.linspace(0.001, 1.0, 500)
    peak = [f[np.argmax(physics.nps_filter(f, k) ** 2)] for k in (soft, sharp)]
    assert peak[1] > 1.5 * peak[0]
    sig = [physics.noise_sigma(k, 0.0, 0.78, 150, 1.0, 120, 300) for k in (soft, sharp)]
    assert sig[1] > 2.5 * sig[0]
    # The difference lies above the 7 mm grid's Nyquist frequency: there, both kernels
    # pass the image alike.
    low = np.linspace(0, 0.5 / 7.0, 20)
    assert np.abs(physics.mtf(soft, low) - physics.mtf(sharp, low)).max() < 0.1


def test_sharp_kernel_overshoots_and_smooth_does_not() -> None:
    edge = np.full((1, 64, 64), -100.0, dtype=np.float32)
    edge[:, :, 32:] = 60.0
    soft = physics.apply_mtf(edge, BY_KEY["canon_prism_fc03"].recon_kernel, 0.5)[0, 32]
    sharp = physics.apply_mtf(edge, BY_KEY["siemens_force_br64"].recon_kernel, 0.5)[0, 32]
    assert sharp.max() > 60.0 + 8.0 and soft.max() < 60.0 + 2.0


def test_low_kvp_raises_bone_and_iodine_not_soft_tissue() -> None:
    from fedct.synth import anatomy as an

    a = an.sample_anatomy(np.random.default_rng(0))
    codes = np.array([an.FEMUR, an.ARTERY, an.FAT, 7])  # 7: the vasti (muscle)
    side = np.ones(4)

    def hu(kvp):
        return physics.hu_at(codes, a, side, kvp, "arterial", np.zeros(4))

    h80, h120 = hu(80), hu(120)
    assert h80[0] > 1.25 * h120[0]  # cortical bone
    assert h80[1] - 40 > 1.5 * (h120[1] - 40)  # iodine enhancement
    assert abs(h80[2] - h120[2]) < 15 and abs(h80[3] - h120[3]) < 10  # fat, muscle
    assert 1000 <= h120[0] <= 1800


def test_cupping_grows_with_size_and_low_kvp() -> None:
    n = 64
    c = np.arange(n) - (n - 1) / 2
    body = np.where(np.hypot(*np.meshgrid(c, c)) < 28, 40.0, -1000.0)[None].astype(np.float32)
    wed = np.array([300.0])
    centre = lambda cup: float(cup[0, 32, 32])  # noqa: E731
    small = centre(physics.cupping(body, wed, 120, 1.0))
    large = centre(physics.cupping(body, wed * 1.3, 120, 1.0))
    low = centre(physics.cupping(body, wed, 80, 1.0))
    assert large < small < 0 and low < small
    assert physics.cupping(body, wed, 120, 1.0)[0, 32, 1] == 0.0  # air untouched


def test_metal_makes_streaks_through_the_projector() -> None:
    n, px = 64, 9.0
    c = (np.arange(n) - (n - 1) / 2) * px
    xx, yy = np.meshgrid(c, c)
    mu_w = physics.MU_WATER[120]
    body = np.where(np.hypot(xx / 1.3, yy) < 150, mu_w, 0.0)
    metal = body + np.where(np.hypot(xx - 90, yy) < 14, 24 * mu_w, 0.0)  # CoCr head
    rng = np.random.default_rng(0)
    k = Kernel(0.34)
    n0 = 4e5 * 1.5 * 2
    clean, lam0 = projector.starvation_artefact(body[None], px, n0, k, rng, mu_w,
                                                metal_mu=2 * mu_w)
    art, lam1 = projector.starvation_artefact(metal[None], px, n0, k, rng, mu_w,
                                              metal_mu=2 * mu_w)
    assert lam1 < 1.0 < lam0  # metal starves its rays; the body alone does not
    inside = np.hypot(xx / 1.3, yy) < 140
    assert np.abs(clean[0][inside]).max() < 1.0
    assert art[0][inside & (np.hypot(xx - 90, yy) > 40)].std() > 20.0  # streaks, HU


@pytest.mark.parametrize("cond", CONDITIONS, ids=lambda c: c.key)
def test_every_condition_has_a_reason_and_physical_values(cond) -> None:
    assert len(cond.reason) > 20
    assert cond.kvp in physics.MU_WATER and 10 <= cond.mas <= 400
    assert abs(cond.hu_offset) <= 10
