"""The simulated scanners produce the physics their table states."""

from __future__ import annotations

import numpy as np
import pytest

from fedct.synth.scanners import BY_KEY, CONDITIONS, SHIFT_SITES, acquire, allocate, site_mix

PIXEL = 0.78  # clinical sampling: the table's distances apply unscaled


def _disc(n: int = 128, n_z: int = 40, inside: float = 60.0, outside: float = -100.0):
    """A uniform disc (muscle in fat) on a 1 mm fine z grid."""
    c = (np.arange(n) - (n - 1) / 2) * PIXEL
    xx, yy = np.meshgrid(c, c)
    plane = np.where(np.hypot(xx, yy) < 30.0, inside, outside).astype(np.float32)
    fine_z = np.arange(n_z, dtype=float)
    return np.repeat(plane[None], n_z, axis=0), fine_z


def _edge_width(profile: np.ndarray) -> float:
    """10-90 % rise distance (pixels) of a monotone-ish edge profile."""
    lo, hi = np.median(profile[:10]), np.median(profile[-10:])
    norm = (profile - lo) / (hi - lo)
    return float(np.argmax(norm >= 0.9) - np.argmax(norm >= 0.1))


@pytest.mark.parametrize("key", ["canon_one_fc13", "siemens_force_br64", "canon_prism_fc03"])
def test_noise_sigma_matches_table(key: str) -> None:
    cond = BY_KEY[key]
    vol, fz = _disc()
    img = acquire(vol, fz, np.array([20.0, 25.0]), cond, PIXEL, np.random.default_rng(0))
    clean = acquire(vol, fz, np.array([20.0, 25.0]), cond, PIXEL, np.random.default_rng(0),
                    noise=False)
    residual = (img - clean)[:, 44:84, 44:84]  # inside the disc: a uniform region
    assert residual.std() == pytest.approx(cond.noise_hu, rel=0.15)


def test_sharp_kernels_have_narrower_edges_and_overshoot() -> None:
    vol, fz = _disc()
    z = np.array([20.0])
    soft = acquire(vol, fz, z, BY_KEY["canon_one_fc13"], PIXEL, np.random.default_rng(0),
                   noise=False)[0, 64, :64]
    sharp = acquire(vol, fz, z, BY_KEY["siemens_force_br64"], PIXEL, np.random.default_rng(0),
                    noise=False)[0, 64, :64]
    assert _edge_width(sharp) < _edge_width(soft)
    assert sharp.max() > 60.0 + 10.0  # edge overshoot of the sharp kernel
    assert soft.max() <= 60.0 + 1.0


def test_sharp_noise_is_finer_grained_than_smooth_ir_noise() -> None:
    vol, fz = _disc()
    z = np.array([20.0])

    def lag1_corr(key: str) -> float:
        c = BY_KEY[key]
        n = acquire(vol, fz, z, c, PIXEL, np.random.default_rng(1))[0] - acquire(
            vol, fz, z, c, PIXEL, np.random.default_rng(1), noise=False)[0]
        return float(np.corrcoef(n[:, :-1].ravel(), n[:, 1:].ravel())[0, 1])

    assert lag1_corr("siemens_force_br64") < lag1_corr("canon_prism_fc03") - 0.3


def test_thick_slices_blur_along_z() -> None:
    n_z = 60
    vol = np.full((n_z, 8, 8), -100.0, dtype=np.float32)
    vol[30:] = 60.0  # a z edge at 30 mm
    fz = np.arange(n_z, dtype=float) + 0.5
    thin, thick = BY_KEY["canon_one_fc13"], BY_KEY["canon_lightning_fc13_thick"]
    z_thin = np.arange(1.0, 59.0, thin.slice_thickness_mm)
    z_thick = np.arange(2.5, 58.0, thick.slice_thickness_mm)
    a = acquire(vol, fz, z_thin, thin, PIXEL, np.random.default_rng(0), noise=False)[:, 4, 4]
    b = acquire(vol, fz, z_thick, thick, PIXEL, np.random.default_rng(0), noise=False)[:, 4, 4]
    mixed = lambda v: np.sum((v > -90) & (v < 50))  # noqa: E731 - partial-volume slices
    assert mixed(b) * thick.slice_thickness_mm >= mixed(a) * thin.slice_thickness_mm


def test_hu_offset_is_applied() -> None:
    vol, fz = _disc()
    cond = BY_KEY["philips_iqon_b"]
    img = acquire(vol, fz, np.array([20.0]), cond, PIXEL, np.random.default_rng(0), noise=False)
    assert img[0, 60:68, 60:68].mean() == pytest.approx(60.0 + cond.hu_offset, abs=1.0)


def test_site_mix_follows_exam_counts_and_injected_shift() -> None:
    for site in "ABCDEFGHIJ":
        assert sum(site_mix(site).values()) == pytest.approx(1.0)
    assert set(SHIFT_SITES) == {"G", "C"}
    sharp = {c.key for c in CONDITIONS if c.noise_hu >= 50}
    assert sum(p for k, p in site_mix("G").items() if k in sharp) > 0.7
    thick = {c.key for c in CONDITIONS if c.slice_thickness_mm >= 5}
    assert sum(p for k, p in site_mix("C").items() if k in thick) > 0.85
    # Site E has Canon only in the source table.
    assert {BY_KEY[k].vendor for k in site_mix("E")} == {"CANON"}


def test_allocate_is_exact_and_deterministic() -> None:
    mix = site_mix("G")
    a = allocate(mix, 7)
    assert len(a) == 7 and a == allocate(mix, 7)
    assert max(set(a), key=a.count) in {"canon_prime_fc30", "siemens_force_br64"}
