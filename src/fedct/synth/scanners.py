"""Simulated CT scanners: each acquisition condition's physics, and each site's protocol.

An *acquisition condition* is vendor + model + reconstruction kernel + protocol; a
*site protocol* is what a hospital does around it (patients, contrast, field of view).
Both are tables: every row gives its parameters and the physical reason for them.
The image chain of ``acquire`` follows a real scanner (``physics``, ``projector``):

1. slice profile: the fine z planes averaged over the slice thickness (partial volume);
2. projections of a body-covering coarse grid: photon starvation (metal, large
   patients at low dose) and dense-object beam hardening give streaks (``projector``);
3. water beam-hardening residual (cupping) by patient size and kVp; the vendor's
   calibration offset;
4. the kernel's MTF on the noise-free image; the streaks carry the kernel's filter;
5. quantum noise with the FBP spectrum |f| W(f)^2, sized by mAs, slice thickness, kVp
   and the slice's water-equivalent diameter;
6. the scan field of view (truncation) and the stored range (-1024..3071 HU).

Tissue HU depend on kVp and contrast phase (``physics.hu_at``), applied when the
phantom is rendered for a series.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from fedct.synth import physics
from fedct.synth.physics import Kernel
from fedct.synth.projector import starvation_artefact


@dataclass(frozen=True)
class Condition:
    """One acquisition condition; distances in mm, attenuation in HU, dose in mAs."""

    key: str
    vendor: str  # normalised vendor
    manufacturer: str  # DICOM Manufacturer as the scanner writes it
    model: str
    kernel: tuple[str, ...]  # ConvolutionKernel values (GE/Siemens may write two)
    sigma_f: float  # kernel apodisation width (cycles/mm)
    boost: float  # kernel mid-frequency boost (edge enhancement)
    ir_strength: float  # iterative / DL reconstruction: fine noise removed
    hu_offset: float  # vendor calibration offset
    bh_residual: float  # water beam-hardening correction left over (1 = typical)
    slice_thickness_mm: float
    fov_mm: float  # display field of view (bilateral)
    kvp: float
    mas: float  # effective mAs of a 300 mm patient
    aec: float  # automatic exposure control: mAs ~ (WED / 300 mm)^aec
    reason: str

    @property
    def recon_kernel(self) -> Kernel:
        return Kernel(self.sigma_f, self.boost)


# fmt: off
CONDITIONS: tuple[Condition, ...] = (
    Condition("canon_one_fc13", "CANON", "TOSHIBA", "Aquilion ONE", ("FC13",),
              0.34, 0.0, 0.30, 0.0, 1.0, 2.0, 420.0, 120.0, 150.0, 1.0,
              "Soft-tissue body kernel with AIDR 3D: routine reference condition."),
    Condition("canon_prism_fc03", "CANON", "CANON_MEC", "Aquilion ONE PRISM", ("FC03",),
              0.30, 0.0, 0.60, 3.0, 0.8, 2.0, 420.0, 120.0, 120.0, 1.0,
              "Smooth kernel with AiCE deep-learning reconstruction: low, blotchy noise at "
              "lower dose; calibration reads ~3 HU high."),
    Condition("canon_lightning_fc13_thick", "CANON", "TOSHIBA", "Aquilion Lightning",
              ("FC13",), 0.34, 0.0, 0.20, 0.0, 1.4, 5.0, 440.0, 120.0, 200.0, 1.0,
              "Older 16-row scanner archiving only 5 mm slices: partial volume along z; "
              "older beam-hardening correction leaves more cupping."),
    Condition("canon_prime_fc30", "CANON", "TOSHIBA", "Aquilion PRIME SP", ("FC30",),
              0.42, 0.8, 0.00, 0.0, 1.0, 1.0, 400.0, 80.0, 40.0, 0.0,
              "Low-dose 80 kVp contrast protocol on 1 mm slices, bone kernel: bone and "
              "iodine HU rise, few photons through the hips (starvation streaks), noise "
              "boosted at high frequency by the sharp window."),
    Condition("ge_revolution_standard", "GE", "GE MEDICAL SYSTEMS", "Revolution CT",
              ("STANDARD",), 0.35, 0.0, 0.30, -5.0, 1.0, 2.5, 420.0, 120.0, 150.0, 1.0,
              "GE STANDARD (~Siemens B43f) with ASiR-V 30%; calibration ~5 HU low."),
    Condition("ge_discovery_soft", "GE", "GE MEDICAL SYSTEMS", "Discovery CT750 HD",
              ("SOFT",), 0.30, 0.0, 0.20, 0.0, 1.0, 2.5, 420.0, 120.0, 150.0, 1.0,
              "GE SOFT (~Siemens B35f), smooth."),
    Condition("ge_optima_bone", "GE", "GE MEDICAL SYSTEMS", "Optima CT660", ("BONE",),
              0.40, 0.7, 0.00, 0.0, 1.0, 1.25, 400.0, 80.0, 50.0, 0.0,
              "GE BONE at 80 kVp low dose on 1.25 mm slices: sharp, noisy, bright bone."),
    Condition("philips_iqon_b", "PHILIPS", "Philips", "IQon - Spectral CT", ("B",),
              0.34, 0.0, 0.30, 8.0, 0.8, 2.0, 420.0, 120.0, 140.0, 1.0,
              "Philips B (standard) with iDose4; spectral calibration reads ~8 HU high."),
    Condition("philips_brilliance_c", "PHILIPS", "Philips", "Brilliance 64", ("C",),
              0.42, 0.2, 0.10, 0.0, 1.2, 3.0, 420.0, 120.0, 160.0, 1.0,
              "Philips C: sharper than B, more noise; older correction, more cupping."),
    Condition("siemens_edge_br40", "SIEMENS", "SIEMENS", "SOMATOM Definition Edge",
              ("Br40", "3"), 0.36, 0.0, 0.30, 0.0, 1.0, 2.0, 420.0, 120.0, 150.0, 1.0,
              "Siemens Br40 with ADMIRE strength 3: routine soft tissue."),
    Condition("siemens_force_bf37", "SIEMENS", "SIEMENS", "SOMATOM Force", ("Bf37", "3"),
              0.32, 0.0, 0.30, 0.0, 0.8, 2.0, 420.0, 100.0, 180.0, 1.0,
              "Siemens Bf37 at 100 kVp (CARE kV): smooth; bone ~12 % brighter."),
    Condition("siemens_force_br64", "SIEMENS", "SIEMENS", "SOMATOM Force", ("Br64", "3"),
              0.44, 0.85, 0.00, 0.0, 1.0, 1.0, 400.0, 80.0, 40.0, 0.0,
              "Siemens Br64 sharp bone kernel at 80 kVp, low dose, 1 mm: fine-grained "
              "noise, edge overshoot, starvation streaks in large patients."),
)
# fmt: on
BY_KEY = {c.key: c for c in CONDITIONS}


@dataclass(frozen=True)
class SiteProtocol:
    """What a site does around its scanners: patients, contrast, field of view."""

    population: str  # key of anatomy.POPULATIONS
    contrast: dict[str, float]  # phase -> probability (none, arterial, venous)
    unilateral: float  # probability of a small FOV centred on the affected hip
    table_mm: float  # std of patient off-centring on the table (x and y)
    reason: str


_ROUTINE_SITE = SiteProtocol("general", {"none": 0.8, "venous": 0.2}, 0.0, 8.0,
                             "Routine hip/thigh CT of a general population; some scans "
                             "are part of a contrast-enhanced abdomen-pelvis exam.")
# fmt: off
SITE_PROTOCOLS: dict[str, SiteProtocol] = {
    **{s: _ROUTINE_SITE for s in "ABDEFHIJ"},
    "C": SiteProtocol("orthopaedic_oa", {"none": 1.0}, 0.5, 12.0,
                      "Orthopaedic centre: elderly hip-osteoarthritis patients (atrophy, "
                      "fatty infiltration), half with a metal hip prosthesis (streaks, "
                      "starvation); half reconstructed unilaterally (260 mm FOV on the "
                      "affected hip) for surgical planning."),
    "G": SiteProtocol("large", {"arterial": 1.0}, 0.0, 15.0,
                      "Trauma/vascular centre: CT angiography run-off at 80 kVp with "
                      "arterial contrast and low dose in a heavier population: bright "
                      "bone and arteries, starvation streaks through the hips."),
}
# fmt: on
UNILATERAL_FOV_MM = 260.0
UNILATERAL_CENTRE_MM = 95.0  # |x| of the hip a unilateral reconstruction is centred on

# CT exam counts by vendor and site, 2018-03 to 2025-12 (the source study's table).
EXAM_COUNTS: dict[str, dict[str, int]] = {
    "CANON": dict(A=107200, B=189048, C=1775148, D=577924, E=1345462, F=440212, G=948054,
                  H=439246, I=165620, J=221016),
    "GE": dict(A=0, B=381000, C=0, D=327474, E=0, F=334410, G=219084, H=47520, I=20016, J=0),
    "PHILIPS": dict(A=49948, B=0, C=196878, D=25570, E=0, F=0, G=0, H=514, I=69356,
                    J=201932),
    "SIEMENS": dict(A=0, B=0, C=0, D=214, E=0, F=13284, G=389384, H=0, I=11468, J=0),
}
SITES: tuple[str, ...] = tuple("ABCDEFGHIJ")

# Which condition each vendor's exams use at each site. Routine sites use soft-tissue
# conditions at 100-120 kVp. The injected-shift sites (see SHIFT_SITES, SITE_PROTOCOLS):
#   G: its Canon and Siemens scanners (and half its GE exams) run a low-dose 80 kVp
#      contrast protocol reconstructed with bone kernels;
#   C: its Canon fleet is an older 16-row scanner archiving 5 mm slices.
_ROUTINE = {
    "CANON": {"canon_one_fc13": 0.6, "canon_prism_fc03": 0.4},
    "GE": {"ge_revolution_standard": 0.6, "ge_discovery_soft": 0.4},
    "PHILIPS": {"philips_iqon_b": 0.7, "philips_brilliance_c": 0.3},
    "SIEMENS": {"siemens_edge_br40": 0.5, "siemens_force_bf37": 0.5},
}
_OVERRIDES = {
    ("G", "CANON"): {"canon_prime_fc30": 1.0},
    ("G", "SIEMENS"): {"siemens_force_br64": 1.0},
    ("G", "GE"): {"ge_optima_bone": 0.5, "ge_revolution_standard": 0.5},
    ("C", "CANON"): {"canon_lightning_fc13_thick": 1.0},
}
# The injected shifts: each factor acts through the image (attenuation, artefacts,
# anatomy), not through where the anatomy sits in the volume.
SHIFT_SITES: dict[str, tuple[str, ...]] = {
    "C": ("fatty_infiltration_atrophy", "metal_prosthesis", "unilateral_small_fov",
          "thick_slices"),
    "G": ("low_kvp_contrast", "low_dose_starvation", "sharp_kernel"),
}

# Scan range per site, fractions of the profile's extent downwards from the iliac
# crest. Every site scans crest to proximal thigh; the start varies per patient by a
# few mm (positioning), not by site, so no shift acts through position alone.
SCAN_RANGE: dict[str, tuple[float, float]] = {}


def scan_range(site: str) -> tuple[float, float]:
    """``(start, stop)`` of the scanned extent at ``site``, fractions of the extent."""
    return SCAN_RANGE.get(site, (0.0, 1.0))


def site_mix(site: str) -> dict[str, float]:
    """Probability of each condition key at ``site`` (vendor share x vendor's mix)."""
    total = sum(EXAM_COUNTS[v][site] for v in EXAM_COUNTS)
    mix: dict[str, float] = {}
    for vendor, counts in EXAM_COUNTS.items():
        share = counts[site] / total
        if share == 0:
            continue
        for key, p in _OVERRIDES.get((site, vendor), _ROUTINE[vendor]).items():
            mix[key] = mix.get(key, 0.0) + share * p
    return mix


def allocate(mix: dict[str, float], n: int) -> list[str]:
    """Largest-remainder allocation of ``n`` exams to conditions (deterministic).

    Sampling would leave a 6-patient site without its dominant condition by chance;
    allocation keeps every site's mix faithful even in the tiny profile.
    """
    keys = sorted(mix)
    quota = np.array([mix[k] * n for k in keys])
    counts = np.floor(quota).astype(int)
    order = np.argsort(-(quota - counts), kind="stable")
    for i in order[: n - counts.sum()]:
        counts[i] += 1
    return [k for k, c in zip(keys, counts, strict=True) for _ in range(c)]


N_REF = 4.0e5  # photons per detector element in air per 100 mAs x 1 mm at 120 kVp
SCOUT_N, SCOUT_PIXEL_MM = 64, 9.0  # body-covering grid of the projector (576 mm)


@dataclass(frozen=True)
class Acquisition:
    """The factors of one series beyond its condition (recorded in the truth)."""

    kvp: float
    mas: float
    contrast: str  # none | arterial | venous
    fov_mm: float
    centre: tuple[float, float]  # reconstruction centre, patient x/y (mm)
    iso: tuple[float, float]  # scanner isocentre in patient x/y (table off-centring)
    unilateral: bool

    def n0(self, thickness_mm: float) -> float:
        """Photons per detector element in air (tube output ~ kVp^2.5)."""
        return N_REF * self.mas / 100.0 * thickness_mm * (self.kvp / 120.0) ** 2.5


def draw_acquisition(site: str, cond: Condition, oa_side: int, wed: float, width: float,
                     rng: np.random.Generator) -> Acquisition:
    """Contrast phase, dose (with AEC), field of view and centring of one series.

    ``wed`` and ``width`` (mm) are the patient's water-equivalent diameter and widest
    extent from the localizer: the display FOV is widened to fit the body, up to the
    scan FOV (beyond it the body is truncated).
    """
    proto = SITE_PROTOCOLS[site]
    phases = sorted(proto.contrast)
    contrast = str(rng.choice(phases, p=[proto.contrast[k] for k in phases]))
    mas = cond.mas * (wed / 300.0) ** cond.aec * float(np.exp(rng.normal(0.0, 0.1)))
    iso = tuple(float(v) for v in rng.normal(0.0, proto.table_mm, 2))
    unilateral = bool(rng.random() < proto.unilateral)
    if unilateral:
        side = oa_side or int(rng.choice([-1, 1]))
        centre, fov = (side * UNILATERAL_CENTRE_MM, 0.0), UNILATERAL_FOV_MM
    else:
        centre = (iso[0], iso[1])
        fov = float(min(max(cond.fov_mm, 10.0 * np.ceil((width + 20.0) / 10.0)),
                        physics.SFOV_MM))
    return Acquisition(cond.kvp, round(mas, 1), contrast, fov, centre, iso, unilateral)


def acquire(
    hu: np.ndarray,
    fine_z: np.ndarray,
    slice_z: np.ndarray,
    cond: Condition,
    acq: Acquisition,
    xs: np.ndarray,
    ys: np.ndarray,
    scout: np.ndarray,
    rng: np.random.Generator,
    noise: bool = True,
) -> tuple[np.ndarray, dict]:
    """Simulate the acquisition and reconstruction of one axial series.

    Args:
        hu: true HU on a fine z grid at the series' pixel centres, (n_fine, rows, cols),
            at the series' kVp and contrast phase (metal at its true attenuation).
        fine_z: z (mm) of each fine plane.
        slice_z: reconstructed slice centres (mm).
        cond, acq: the condition and this series' factors.
        xs, ys: the series' column (x) and row (y) coordinates (mm, patient).
        scout: true HU at each slice centre on the body-covering grid of
            ``SCOUT_N`` x ``SCOUT_PIXEL_MM`` centred on the isocentre, (n_slices, n, n).
        rng: noise generator (seeded by the caller).
        noise: False gives the noise- and streak-free image (tests of sharpness).

    Returns:
        (n_slices, rows, cols) float32 HU as the scanner stores it, and a dict of the
        series' measured factors (WED, noise sigma, fewest photons, truncation).
    """
    thick, kernel = cond.slice_thickness_mm, cond.recon_kernel
    pixel = float(xs[1] - xs[0])
    half = thick / 2.0
    out = np.empty((len(slice_z),) + hu.shape[1:], dtype=np.float32)
    for k, zc in enumerate(slice_z):
        sel = np.abs(fine_z - zc) <= half + 1e-6
        out[k] = hu[sel].mean(axis=0) if sel.any() else hu[np.argmin(np.abs(fine_z - zc))]
    wed = physics.wed_mm(scout, SCOUT_PIXEL_MM)
    mu_w = physics.MU_WATER[int(acq.kvp)]
    info: dict = {"wed_mm": round(float(wed.mean()), 1), "min_photons": np.nan}
    streaks = np.zeros_like(out)
    metal = bool((scout > 4000).any())
    # Projections only where they matter: metal, or a fixed low-dose protocol.
    if noise and (metal or cond.aec == 0.0):
        mu = mu_w * (1.0 + np.clip(scout, -1000.0, None) / 1000.0)
        art, lam = starvation_artefact(mu, SCOUT_PIXEL_MM, acq.n0(thick), kernel, rng,
                                       mu_water=mu_w, metal_mu=2.0 * mu_w)
        info["min_photons"] = round(lam, 3)
        c = (SCOUT_N - 1) / 2
        cols = (xs - acq.iso[0]) / SCOUT_PIXEL_MM + c
        rows = (ys - acq.iso[1]) / SCOUT_PIXEL_MM + c
        rr, cc = np.meshgrid(rows, cols, indexing="ij")
        for k in range(len(slice_z)):
            streaks[k] = ndimage.map_coordinates(art[k], [rr, cc], order=1, mode="nearest")
    out += physics.cupping(out, wed, acq.kvp, cond.bh_residual) + cond.hu_offset
    out = physics.apply_mtf(np.minimum(out, 3071.0), kernel, pixel)
    out += streaks
    sigma = physics.noise_sigma(kernel, cond.ir_strength, pixel, acq.mas, thick, acq.kvp, wed)
    if noise:
        out += sigma[:, None, None].astype(np.float32) * physics.shaped_noise(
            out.shape, kernel, cond.ir_strength, pixel, rng)
    clinical = physics.noise_sigma(kernel, cond.ir_strength, physics.REFERENCE_PIXEL_MM,
                                   acq.mas, thick, acq.kvp, wed)
    at7 = physics.noise_sigma(kernel, cond.ir_strength, 7.0, acq.mas, thick, acq.kvp, wed)
    info.update(noise_sigma_hu=round(float(sigma.mean()), 2),
                noise_sigma_clinical_hu=round(float(clinical.mean()), 2),
                noise_sigma_7mm_hu=round(float(at7.mean() * np.sqrt(min(thick / 7.0, 1.0))), 3))
    xx, yy = np.meshgrid(xs, ys)
    lost = physics.truncated_fraction(scout, SCOUT_PIXEL_MM)
    out = physics.truncate(out, xx, yy, acq.iso, lost)
    info["truncated_fraction"] = round(float(lost.max()), 4)
    return np.clip(out, -1024.0, 3071.0).astype(np.float32), info
