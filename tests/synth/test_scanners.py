"""The simulated scanners produce the physics their tables state."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fedct.synth import physics
from fedct.synth.scanners import (
    BY_KEY,
    CONDITIONS,
    SCOUT_N,
    SCOUT_PIXEL_MM,
    SHIFT_SITES,
    SITE_PROTOCOLS,
    SITES,
    Acquisition,
    acquire,
    allocate,
    site_mix,
)

PIXEL = 0.78  # clinical sampling


def _disc(n: int = 128, n_z: int = 40, inside: float = 60.0, outside: float = -100.0,
          radius: float = 30.0):
    """A uniform disc (muscle in fat, in air beyond 45 mm) on a 1 mm fine z grid, and
    the scout of the same body on the projector grid."""
    c = (np.arange(n) - (n - 1) / 2) * PIXEL
    xx, yy = np.meshgrid(c, c)
    r = np.hypot(xx, yy)
    plane = np.where(r < radius, inside, np.where(r < 45.0, outside, -1000.0))
    s = (np.arange(SCOUT_N) - (SCOUT_N - 1) / 2) * SCOUT_PIXEL_MM
    rs = np.hypot(*np.meshgrid(s, s))
    scout_plane = np.where(rs < radius, inside, np.where(rs < 45.0, outside, -1000.0))
    fine_z = np.arange(n_z, dtype=float)
    return (np.repeat(plane[None], n_z, axis=0).astype(np.float32), fine_z, c,
            scout_plane.astype(np.float32))


def _acq(cond, **kw) -> Acquisition:
    base = Acquisition(cond.kvp, cond.mas, "none", cond.fov_mm, (0.0, 0.0), (0.0, 0.0), False)
    return dataclasses.replace(base, **kw)


def _run(key: str, z=(20.0, 25.0), noise: bool = True, seed: int = 0, **kw):
    cond = BY_KEY[key]
    vol, fz, c, scout = _disc()
    z = np.asarray(z)
    return acquire(vol, fz, z, cond, _acq(cond, **kw), c, c,
                   np.repeat(scout[None], len(z), 0), np.random.default_rng(seed), noise=noise)


@pytest.mark.parametrize("key", ["canon_one_fc13", "siemens_force_br64", "canon_prism_fc03"])
def test_measured_noise_matches_the_recorded_sigma(key: str) -> None:
    img, info = _run(key)
    clean, _ = _run(key, noise=False)
    residual = (img - clean)[:, 44:84, 44:84]  # inside the disc: a uniform region
    assert residual.std() == pytest.approx(info["noise_sigma_hu"], rel=0.15)


def test_noise_falls_with_the_square_root_of_dose() -> None:
    cond = BY_KEY["canon_one_fc13"]
    clean, _ = _run(cond.key, noise=False)
    low = (_run(cond.key, mas=40.0)[0] - clean)[:, 44:84, 44:84].std()
    high = (_run(cond.key, mas=160.0)[0] - clean)[:, 44:84, 44:84].std()
    assert low / high == pytest.approx(2.0, rel=0.12)


def test_sharp_kernels_have_narrower_edges_and_overshoot() -> None:
    def edge_width(profile: np.ndarray) -> float:
        lo, hi = np.median(profile[:6]), np.median(profile[-10:])
        norm = (profile - lo) / (hi - lo)
        return float(np.argmax(norm >= 0.9) - np.argmax(norm >= 0.1))

    soft = _run("canon_one_fc13", z=(20.0,), noise=False)[0][0, 64, 12:50]
    sharp = _run("siemens_force_br64", z=(20.0,), noise=False, kvp=120.0)[0][0, 64, 12:50]
    assert edge_width(sharp) < edge_width(soft)
    assert sharp.max() > 60.0 + 3.0  # edge overshoot of the sharp kernel
    assert soft.max() <= 60.0 + 2.0


def test_thick_slices_blur_along_z() -> None:
    n_z = 60
    vol = np.full((n_z, 8, 8), -100.0, dtype=np.float32)
    vol[30:] = 60.0  # a z edge at 30 mm
    fz = np.arange(n_z, dtype=float) + 0.5
    c = (np.arange(8) - 3.5) * PIXEL
    thin, thick = BY_KEY["canon_one_fc13"], BY_KEY["canon_lightning_fc13_thick"]
    scout = np.full((SCOUT_N, SCOUT_N), -1000.0, dtype=np.float32)

    def run(cond, z):
        return acquire(vol, fz, z, cond, _acq(cond), c, c, np.repeat(scout[None], len(z), 0),
                       np.random.default_rng(0), noise=False)[0][:, 4, 4]

    a = run(thin, np.arange(1.0, 59.0, thin.slice_thickness_mm))
    b = run(thick, np.arange(2.5, 58.0, thick.slice_thickness_mm))
    mixed = lambda v: np.sum((v > -90) & (v < 50))  # noqa: E731 - partial-volume slices
    assert mixed(b) * thick.slice_thickness_mm >= mixed(a) * thin.slice_thickness_mm


def test_calibration_offset_is_applied() -> None:
    img, _ = _run("philips_iqon_b", z=(20.0,), noise=False)
    ref, _ = _run("canon_one_fc13", z=(20.0,), noise=False)
    cond = BY_KEY["philips_iqon_b"]
    assert img[0, 60:68, 60:68].mean() - ref[0, 60:68, 60:68].mean() == pytest.approx(
        cond.hu_offset, abs=1.0)


def test_low_dose_protocol_starves_rays_in_a_large_body_only() -> None:
    cond = BY_KEY["siemens_force_br64"]
    vol, fz, c, _ = _disc()
    s = (np.arange(SCOUT_N) - (SCOUT_N - 1) / 2) * SCOUT_PIXEL_MM
    sx, sy = np.meshgrid(s, s)
    z = np.array([20.0])
    found = []
    for half_width in (120.0, 230.0):
        scout = np.where(np.hypot(sx / half_width, sy / 130.0) < 1.0, 40.0, -1000.0)
        _, info = acquire(vol, fz, z, cond, _acq(cond), c, c, scout[None].astype(np.float32),
                          np.random.default_rng(0))
        found.append(info["min_photons"])
    assert found[0] > 50 > found[1]


def test_truncation_blanks_outside_the_scan_field() -> None:
    n = 64
    c = (np.arange(n) - (n - 1) / 2) * 9.0
    xx, yy = np.meshgrid(c, c)
    body = np.where(np.hypot(xx / 290, yy / 150) < 1, 40.0, -1000.0)[None].astype(np.float32)
    lost = physics.truncated_fraction(body, 9.0)
    assert lost[0] > 0.02
    out = physics.truncate(body, xx, yy, (0.0, 0.0), lost)
    assert (out[0][np.hypot(xx, yy) > physics.SFOV_MM / 2] == -1024).all()
    edge = (np.abs(yy) < 10) & (np.abs(xx) > 220) & (np.abs(xx) < 245)
    assert out[0][edge].mean() > 40.0 + 20.0  # brightened towards the field's edge


def test_site_mix_and_protocols_carry_the_injected_shifts() -> None:
    for site in SITES:
        assert sum(site_mix(site).values()) == pytest.approx(1.0)
        assert len(SITE_PROTOCOLS[site].reason) > 20
    assert set(SHIFT_SITES) == {"G", "C"}
    low_kvp = {c.key for c in CONDITIONS if c.kvp <= 80}
    assert sum(p for k, p in site_mix("G").items() if k in low_kvp) > 0.7
    assert all(sum(p for k, p in site_mix(s).items() if k in low_kvp) == 0
               for s in SITES if s != "G")
    assert SITE_PROTOCOLS["G"].contrast == {"arterial": 1.0}
    assert SITE_PROTOCOLS["C"].population == "orthopaedic_oa"
    assert SITE_PROTOCOLS["C"].unilateral > 0.2
    assert all(SITE_PROTOCOLS[s].unilateral == 0 for s in SITES if s != "C")
    # Site E has Canon only in the source table.
    assert {BY_KEY[k].vendor for k in site_mix("E")} == {"CANON"}


def test_allocate_is_exact_and_deterministic() -> None:
    mix = site_mix("G")
    a = allocate(mix, 7)
    assert len(a) == 7 and a == allocate(mix, 7)
    assert max(set(a), key=a.count) in {"canon_prime_fc30", "siemens_force_br64"}
