"""Single-factor variants change the one thing their row says, on the same patient."""

from __future__ import annotations

import numpy as np
import pytest

from fedct.synth.anatomy import FEMUR, MUSCLE_LABELS, PELVIS
from fedct.synth.archive import plan
from fedct.synth.axial import PROFILES
from fedct.synth.factors import (
    BY_NAME,
    CONTROL,
    FACTORS,
    REFERENCE_CONDITION,
    patient_seed,
    variant,
)
from fedct.synth.scanners import (
    BY_KEY,
    CONDITIONS,
    SHIFT_SITES,
    SITE_PROTOCOLS,
    UNILATERAL_CENTRE_MM,
    UNILATERAL_FOV_MM,
)

SEED = patient_seed(5, 2, 0)


@pytest.fixture(scope="module")
def ref():
    return variant(None, SEED, "tiny")


@pytest.fixture(scope="module")
def scans():
    return {}


def _scan(scans: dict, name: str):
    if name not in scans:
        scans[name] = variant(BY_NAME[name], SEED, "tiny")
    return scans[name]


def test_every_injected_site_factor_has_a_row_with_a_reason() -> None:
    injected = {f for factors in SHIFT_SITES.values() for f in factors}
    assert injected <= {f.name for f in FACTORS}
    for f in FACTORS:
        assert f.site in (*SHIFT_SITES, "") and len(f.reason) > 30
        # A site's factor is one of its injected shifts or its population.
        assert (f.site == "" or f.name in SHIFT_SITES[f.site]
                or SITE_PROTOCOLS[f.site].population in f.source)
        assert (f.anatomy is None) != (f.scan is None)  # exactly one hook: one factor


def test_ablation_patients_are_new_patients_of_the_seed_stream() -> None:
    archive_seeds = {p.seed for p in plan(PROFILES["demo"], 5)}
    ours = {patient_seed(5, role, i) for role in range(3) for i in range(20)}
    assert len(ours) == 60 and not ours & archive_seeds
    assert patient_seed(6, 2, 0) != SEED


@pytest.mark.parametrize("name", ["low_kvp_contrast", "low_dose_starvation", "sharp_kernel",
                                  "calibration_offset", "cupping", "control"])
def test_acquisition_factors_leave_the_anatomy_where_it_was(ref, scans, name: str) -> None:
    v = _scan(scans, name)
    assert v.image.shape == ref.image.shape
    np.testing.assert_array_equal(v.labels, ref.labels)
    np.testing.assert_array_equal(v.xs, ref.xs)
    np.testing.assert_array_equal(v.slice_z, ref.slice_z)
    assert not np.array_equal(v.image, ref.image)


def test_control_is_a_rescan_differing_only_by_noise(ref, scans) -> None:
    v = _scan(scans, "control")
    body = ref.labels > 0
    diff = (v.image - ref.image)[body]
    sigma = ref.measured["noise_sigma_hu"]
    assert abs(float(diff.mean())) < 0.2 * sigma
    assert float(diff.std()) == pytest.approx(np.sqrt(2) * sigma, rel=0.3)
    assert v.measured["noise_sigma_hu"] == ref.measured["noise_sigma_hu"]


def test_calibration_offset_is_the_largest_vendor_offset(ref, scans) -> None:
    v = _scan(scans, "calibration_offset")
    offset = max(abs(c.hu_offset) for c in CONDITIONS)
    inside = (ref.image > -500) & (ref.image < 1000)
    assert float(np.median((v.image - ref.image)[inside])) == pytest.approx(offset, abs=0.5)


def test_low_kvp_raises_bone_not_muscle_at_the_reference_noise(ref, scans) -> None:
    v = _scan(scans, "low_kvp_contrast")
    bone = np.isin(ref.labels, (PELVIS, FEMUR))
    muscle = np.isin(ref.labels, MUSCLE_LABELS)
    diff = (v.image - ref.image)[bone]  # cortex (~+500 HU) and marrow (~+70 HU)
    assert float(np.median(diff)) > 30.0 and float(np.percentile(diff, 90)) > 300.0
    assert abs(float(np.median((v.image - ref.image)[muscle]))) < 10.0
    assert v.measured["noise_sigma_hu"] == pytest.approx(ref.measured["noise_sigma_hu"],
                                                         rel=0.05)


def test_low_dose_raises_noise_and_runs_the_projector(ref, scans) -> None:
    v = _scan(scans, "low_dose_starvation")
    assert v.measured["noise_sigma_hu"] > 1.5 * ref.measured["noise_sigma_hu"]
    assert np.isfinite(v.measured["min_photons"]) and np.isnan(ref.measured["min_photons"])


def test_thick_slices_change_only_slice_thickness(ref, scans) -> None:
    v = _scan(scans, "thick_slices")
    thick = BY_KEY["canon_lightning_fc13_thick"].slice_thickness_mm
    assert v.thickness == thick != ref.thickness == BY_KEY[REFERENCE_CONDITION].slice_thickness_mm
    assert len(v.slice_z) == int(PROFILES["tiny"].length_mm // thick) < len(ref.slice_z)
    np.testing.assert_array_equal(v.xs, ref.xs)
    # The same anatomy: the scanned range is the same within a slice.
    assert abs(v.slice_z.mean() - ref.slice_z.mean()) < thick


def test_unilateral_fov_centres_on_one_hip(ref, scans) -> None:
    v = _scan(scans, "unilateral_small_fov")
    assert v.pixel * len(v.xs) == pytest.approx(UNILATERAL_FOV_MM)
    assert abs(v.xs.mean()) == pytest.approx(UNILATERAL_CENTRE_MM)
    np.testing.assert_array_equal(v.slice_z, ref.slice_z)


def test_metal_adds_a_prosthesis_and_its_streaks(ref, scans) -> None:
    v = _scan(scans, "metal_prosthesis")
    assert float(v.image.max()) > 2500.0 > float(ref.image.max())
    assert np.isfinite(v.measured["min_photons"])
    changed = v.labels != ref.labels
    assert changed.any() and changed.mean() < 0.02  # the hip, not the whole patient


def test_fatty_infiltration_lowers_muscle_hu(ref, scans) -> None:
    v = _scan(scans, "fatty_infiltration_atrophy")
    muscle_ref = ref.image[np.isin(ref.labels, MUSCLE_LABELS)]
    muscle_oa = v.image[np.isin(v.labels, MUSCLE_LABELS)]
    assert float(np.median(muscle_oa)) < float(np.median(muscle_ref)) - 10.0
    assert (v.labels > 0).sum() < (ref.labels > 0).sum()  # atrophy
    np.testing.assert_array_equal(v.slice_z, ref.slice_z)


def test_control_is_not_a_factor() -> None:
    assert CONTROL.rescan and CONTROL.name not in {f.name for f in FACTORS}
