"""One injected factor at a time: single-factor variants of a routine acquisition.

The ablation asks which physical factor of the shifted sites lowers a model's Dice on
its own. Each factor below is a row: its name, the site whose protocol carries it
(``scanners.SHIFT_SITES``; empty for a vendor condition that no site injects), the
``scanners``/``anatomy`` row its values come from, what it changes, and its physical
reason. A variant is the *same patient* (anatomy, texture, scan range, table offset,
noise realisation) as the reference, scanned under the reference acquisition with
exactly that one factor changed; so reference and variant form a pair.

Anatomy factors act before the scan is planned (the localizer, and so the AEC dose,
sees the changed patient); condition and acquisition factors act after it.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from fedct.synth.anatomy import POPULATIONS, Anatomy, sample_anatomy
from fedct.synth.axial import PROFILES, AxialScan, draw_scan, simulate_axial
from fedct.synth.scanners import (
    BY_KEY,
    CONDITIONS,
    SITE_PROTOCOLS,
    UNILATERAL_CENTRE_MM,
    UNILATERAL_FOV_MM,
    Acquisition,
    Condition,
)

# The routine acquisition every variant departs from: a training site's protocol and
# its soft-tissue reference condition (no injected factor).
REFERENCE_SITE = "A"
REFERENCE_CONDITION = "canon_one_fc13"

AnatomyHook = Callable[[Anatomy, np.random.Generator], Anatomy]
ScanHook = Callable[[Anatomy, Condition, Acquisition], tuple[Condition, Acquisition]]


@dataclass(frozen=True)
class Factor:
    """One injectable factor; ``anatomy`` and ``scan`` are None where it leaves them."""

    name: str
    site: str  # the injected-shift site that carries it, "" if none
    source: str  # the row its values come from
    acts_on: str  # anatomy | condition | acquisition | none
    reason: str
    anatomy: AnatomyHook | None = None
    scan: ScanHook | None = None
    rescan: bool = False  # a new noise realisation (the control)


def _side(a: Anatomy, rng: np.random.Generator) -> int:
    """The affected hip: the patient's OA side, else a random one."""
    return a.oa_side or int(rng.choice([-1, 1]))


def _oa(a: Anatomy, rng: np.random.Generator) -> Anatomy:
    p = POPULATIONS["orthopaedic_oa"]
    return replace(a, oa_side=_side(a, rng), oa_severity=float(rng.uniform(*p["severity"])),
                   infiltration=float(rng.beta(*p["infil"])),
                   muscle_scale=float(rng.uniform(*p["bulk"])))


def _metal(a: Anatomy, rng: np.random.Generator) -> Anatomy:
    return replace(a, prosthesis_side=_side(a, rng))


def _large(a: Anatomy, rng: np.random.Generator) -> Anatomy:
    return replace(a, fat_mm=float(rng.uniform(*POPULATIONS["large"]["fat"])))


def _unilateral(a: Anatomy, cond: Condition, acq: Acquisition):
    side = a.oa_side or (1 if acq.iso[0] >= 0 else -1)
    return cond, replace(acq, centre=(side * UNILATERAL_CENTRE_MM, 0.0),
                         fov_mm=UNILATERAL_FOV_MM, unilateral=True)


_THICK = BY_KEY["canon_lightning_fc13_thick"]
_G80 = BY_KEY["canon_prime_fc30"]  # G's Canon row: 80 kVp, 40 mAs fixed, FC30 bone kernel
_OFFSET = max(CONDITIONS, key=lambda c: abs(c.hu_offset))
_CUPPING = max(CONDITIONS, key=lambda c: c.bh_residual)
_G_PHASE = max(SITE_PROTOCOLS["G"].contrast, key=SITE_PROTOCOLS["G"].contrast.get)


def _thick(a: Anatomy, cond: Condition, acq: Acquisition):
    return replace(cond, slice_thickness_mm=_THICK.slice_thickness_mm), acq


def _low_kvp(a: Anatomy, cond: Condition, acq: Acquisition):
    # Noise variance ~ 1 / (mAs kVp^2.8) (physics.dose_factor): the tube current is raised
    # so that quantum noise stays at the reference level and low dose stays its own factor.
    mas = acq.mas * (acq.kvp / _G80.kvp) ** 2.8
    return (replace(cond, kvp=_G80.kvp),
            replace(acq, kvp=_G80.kvp, mas=round(mas, 1), contrast=_G_PHASE))


def _low_dose(a: Anatomy, cond: Condition, acq: Acquisition):
    return replace(cond, mas=_G80.mas, aec=_G80.aec), replace(acq, mas=_G80.mas)


def _sharp(a: Anatomy, cond: Condition, acq: Acquisition):
    return replace(cond, sigma_f=_G80.sigma_f, boost=_G80.boost), acq


def _offset(a: Anatomy, cond: Condition, acq: Acquisition):
    return replace(cond, hu_offset=_OFFSET.hu_offset), acq


def _cupping(a: Anatomy, cond: Condition, acq: Acquisition):
    return replace(cond, bh_residual=_CUPPING.bh_residual), acq


# fmt: off
FACTORS: tuple[Factor, ...] = (
    Factor("fatty_infiltration_atrophy", "C", "anatomy.POPULATIONS['orthopaedic_oa']",
           "anatomy",
           "Hip osteoarthritis: muscle atrophy and fatty infiltration (worst on the affected "
           "side) lower muscle HU towards fat and widen the fat planes; same skeleton.",
           anatomy=_oa),
    Factor("metal_prosthesis", "C", "anatomy._prosthesis (CoCr head/stem, Ti cup)",
           "anatomy",
           "Total hip arthroplasty: metal starves the rays through it (streaks across the "
           "hips in the projector) and replaces the femoral head and canal.",
           anatomy=_metal),
    Factor("unilateral_small_fov", "C", f"scanners.UNILATERAL_FOV_MM = {UNILATERAL_FOV_MM:g}",
           "acquisition",
           "Surgical planning: a 260 mm field centred on one hip; the other side is cut off "
           "and the volume's centre moves to the hip (acts partly through position).",
           scan=_unilateral),
    Factor("thick_slices", "C", _THICK.key, "condition",
           f"{_THICK.slice_thickness_mm:g} mm slices: partial volume along z.", scan=_thick),
    Factor("low_kvp_contrast", "G", f"{_G80.key} + SITE_PROTOCOLS['G']", "acquisition",
           f"{_G80.kvp:g} kVp with {_G_PHASE} contrast: bone and iodine HU rise, cupping "
           "deepens; mAs raised so that quantum noise stays at the reference level.",
           scan=_low_kvp),
    Factor("low_dose_starvation", "G", _G80.key, "condition",
           f"A fixed {_G80.mas:g} mAs (no AEC): more quantum noise, and photon starvation "
           "streaks through the hips of larger patients (projector).", scan=_low_dose),
    Factor("sharp_kernel", "G", _G80.key, "condition",
           "Bone kernel (FC30): higher MTF with edge overshoot and high-frequency noise; "
           "at a coarse working grid the anti-aliasing low-pass removes most of it.",
           scan=_sharp),
    Factor("large_patients", "G", "anatomy.POPULATIONS['large']", "anatomy",
           "A heavier population: thicker subcutaneous fat raises the water-equivalent "
           "diameter, hence dose (AEC), noise and cupping.", anatomy=_large),
    Factor("calibration_offset", "", _OFFSET.key, "condition",
           f"Vendor calibration: water reads {_OFFSET.hu_offset:+g} HU.", scan=_offset),
    Factor("cupping", "", _CUPPING.key, "condition",
           f"Older beam-hardening correction (residual x{_CUPPING.bh_residual:g}): a deeper "
           "HU drop in the body's centre.", scan=_cupping),
)
# fmt: on
CONTROL = Factor("control", "", REFERENCE_CONDITION, "none",
                 "Rescan of the same patient under the reference acquisition: only the "
                 "quantum noise realisation differs (the null of the ablation).", rescan=True)
BY_NAME: dict[str, Factor] = {f.name: f for f in (*FACTORS, CONTROL)}


def _factor_rng(patient_seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([patient_seed, 11, zlib.crc32(name.encode())])


def patient_seed(seed: int, role: int, index: int) -> int:
    """The seed of patient ``index`` of ``role`` (0 train, 1 val, 2 test) for ``seed``.

    The archive derives its patients from ``[seed, site index 0..9, i]``; ``role`` is
    offset past the sites so that ablation patients are new patients of the same stream.
    """
    return int(np.random.default_rng([seed, 100 + role, index]).integers(2**31))


def variant(factor: Factor | None, seed: int, profile: str = "demo") -> AxialScan:
    """Patient ``seed`` under the reference acquisition with ``factor`` injected alone.

    ``factor=None`` gives the reference scan itself; every variant of one ``seed`` shares
    the patient, the scan plan's random draws and (except the control) the noise seed.
    """
    prof = PROFILES[profile]
    rng = np.random.default_rng([seed, 1])
    ref_site = SITE_PROTOCOLS[REFERENCE_SITE]
    a = sample_anatomy(rng, ref_site.population)
    cond = BY_KEY[REFERENCE_CONDITION]
    frng = _factor_rng(seed, factor.name) if factor is not None else None
    if factor is not None and factor.anatomy is not None:
        a = factor.anatomy(a, frng)
    plan = draw_scan(a, cond, REFERENCE_SITE, prof, rng)
    if factor is not None and factor.scan is not None:
        cond, acq = factor.scan(a, cond, plan.acq)
        plan = replace(plan, acq=acq)
    noise_seed = None
    if factor is not None and factor.rescan:
        noise_seed = int(_factor_rng(seed, "rescan").integers(2**31))
    return simulate_axial(a, cond, plan, prof, seed, noise_seed)
