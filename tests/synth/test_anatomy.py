"""The phantom: adult proportions, individual muscles separated by fat, patient variation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import ndimage

from fedct.synth import anatomy as an
from fedct.synth import physics

XS = np.arange(-250.0, 250.0, 1.5) + 0.75


def _patient(seed: int = 0, population: str = "general", **kw) -> an.Anatomy:
    a = an.sample_anatomy(np.random.default_rng(seed), population)
    return dataclasses.replace(a, **kw)


def _plane(a: an.Anatomy, z: float) -> np.ndarray:
    return an.render_slice(a, z, XS, XS)


def _hu(a: an.Anatomy, tissue: np.ndarray, kvp: float = 120.0) -> np.ndarray:
    side = np.where(XS >= 0, 1, -1)[None, :].repeat(len(XS), 0)
    return physics.hu_at(tissue, a, side, kvp, "none", np.zeros(tissue.shape))


def test_adult_proportions() -> None:
    for seed in range(20):
        a = _patient(seed)
        assert 450.0 <= a.length_mm <= 550.0
    a = _patient(0, frame=1.0, leg_gap_mm=0.0)
    hip = _plane(a, -105.0)  # femoral heads
    femur = an.labels_of(hip) == an.FEMUR
    cols = np.nonzero(femur.any(axis=0))[0]
    left, right = XS[cols[XS[cols] > 0]].mean(), XS[cols[XS[cols] < 0]].mean()
    assert 150.0 < left - right < 230.0  # femoral heads ~18 cm apart
    body = np.nonzero((hip > 0).any(axis=0))[0]
    assert 300.0 < XS[body[-1]] - XS[body[0]] < 500.0  # hip width with soft tissue


def test_every_structure_appears_between_crest_and_thigh() -> None:
    a = _patient(1)
    seen = set()
    for z in np.arange(0.0, -260.0, -10.0):
        seen |= set(np.unique(an.labels_of(_plane(a, z))).tolist())
    assert seen == set(range(an.N_CLASSES))


def test_fat_planes_separate_muscles_by_intensity() -> None:
    """Between two touching muscles lies fat: a profile across the boundary dips below
    the muscle HU on both sides (no boundary defined by labels alone)."""
    a = _patient(2, infiltration=0.0, oa_side=0, oa_severity=0.0)
    dips = 0
    for z in (-180.0, -220.0, -260.0):
        tissue = _plane(a, z)
        lab = an.labels_of(tissue)
        hu = _hu(a, tissue)
        for m1 in an.MUSCLE_LABELS:
            near = ndimage.binary_dilation(lab == m1, iterations=4)
            for m2 in an.MUSCLE_LABELS:
                if m2 <= m1:
                    continue
                contact = near & ndimage.binary_dilation(lab == m2, iterations=4)
                if contact.sum() < 5:
                    continue
                between = contact & (lab == 0)
                assert between.any(), (z, m1, m2)
                assert hu[between].mean() < hu[lab == m1].mean() - 50
                assert hu[between].mean() < hu[lab == m2].mean() - 50
                dips += 1
    assert dips >= 5


def test_muscles_change_shape_and_position_along_z() -> None:
    a = _patient(3)
    cents, areas = [], []
    for z in (-170.0, -200.0, -230.0):
        lab = an.labels_of(_plane(a, z))
        m = (lab == 9) & (XS[None, :] > 0)  # left adductors
        yy, xx = np.nonzero(m)
        cents.append((XS[xx].mean(), XS[yy].mean()))
        areas.append(m.sum())
    assert np.hypot(*np.subtract(cents[0], cents[2])) > 10.0
    assert max(areas) > 1.2 * min(areas)


def test_tissue_hu_ranges() -> None:
    a = _patient(4, infiltration=0.05, oa_side=0, oa_severity=0.0)
    tissue = _plane(a, -110.0)
    hu = _hu(a, tissue)
    muscle = np.isin(tissue, an.MUSCLE_LABELS)
    assert 35.0 < hu[muscle].mean() < 65.0
    assert -120.0 < hu[tissue == an.FAT].mean() < -80.0
    assert 1000.0 <= hu[tissue == an.FEMUR].mean() <= 1800.0  # cortex
    assert 100.0 <= hu[tissue == an.FEMUR_MARROW].mean() <= 300.0
    assert (tissue == an.FEMUR_MARROW).sum() > (tissue == an.FEMUR).sum() * 0.3


def test_fatty_infiltration_and_oa_lower_muscle_hu_and_bulk() -> None:
    healthy = _patient(5, infiltration=0.05, oa_side=0, oa_severity=0.0)
    oa = dataclasses.replace(healthy, infiltration=0.4, oa_side=1, oa_severity=0.9)
    z = -60.0  # gluteal level
    th, to = _plane(healthy, z), _plane(oa, z)
    gl = lambda t, side: (t == 4) & ((XS[None, :] > 0) == (side > 0))  # noqa: E731
    hh, ho = _hu(healthy, th), _hu(oa, to)
    assert ho[gl(to, 1)].mean() < hh[gl(th, 1)].mean() - 30.0
    assert ho[gl(to, 1)].mean() < ho[gl(to, -1)].mean() - 10.0  # affected side worse
    assert gl(to, 1).sum() < 0.85 * gl(to, -1).sum()  # atrophy of the affected side


def test_prosthesis_is_metal_in_the_femur_label() -> None:
    a = _patient(6, prosthesis_side=-1, oa_side=-1, oa_severity=0.8)
    tissue = _plane(a, -105.0 * a.frame)
    metal = tissue == an.METAL_FEMUR
    assert metal.any() and (XS[np.nonzero(metal)[1]] < 0).all()
    assert (an.labels_of(tissue)[metal] == an.FEMUR).all()
    assert (_hu(a, tissue)[metal] > 10000).all()


@pytest.mark.parametrize("population", sorted(an.POPULATIONS))
def test_populations_draw_plausible_patients(population: str) -> None:
    rng = np.random.default_rng(0)
    ps = [an.sample_anatomy(rng, population) for _ in range(50)]
    assert all(0.0 <= p.infiltration <= 1.0 and 0.5 < p.muscle_scale < 1.3 for p in ps)
    if population == "orthopaedic_oa":
        assert np.mean([p.prosthesis_side != 0 for p in ps]) > 0.3
        assert np.mean([p.infiltration for p in ps]) > 0.25
    else:
        assert not any(p.prosthesis_side for p in ps)
        assert np.mean([p.infiltration for p in ps]) < 0.25
