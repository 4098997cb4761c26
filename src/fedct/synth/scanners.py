"""Simulated CT scanners: each acquisition condition's physics, and each site's mix.

An *acquisition condition* is vendor + model + reconstruction kernel + protocol. It
changes, in this image-domain model (documented simplification of a real
reconstruction chain):

- sharpness (MTF): Gaussian blur of width ``mtf_sigma_mm``; sharp (bone/lung) kernels
  add edge enhancement ``sharpen`` (unsharp masking: over/undershoot at edges);
- noise magnitude ``noise_hu`` (std of the final image in a uniform region) and texture
  (noise power spectrum): white noise low-passed with correlation length
  ``noise_corr_mm``; sharp kernels keep more high frequencies (``noise_highpass``);
- iterative / deep-learning reconstruction (AIDR 3D, AiCE, ASiR-V, iDose, ADMIRE)
  ``ir_strength``: shifts the noise spectrum to low frequencies ("blotchy" texture)
  at the same sigma;
- HU calibration ``hu_scale``/``hu_offset`` (tube, beam hardening correction and
  calibration differ between vendors and drift over time);
- slice thickness and spacing (partial volume along z);
- in-plane field of view (pixel spacing = FOV / matrix).

Magnitudes follow the literature in shared/STUDY.md: soft-tissue kernels ~10-20 HU
noise at routine dose, sharp kernels ~40-100+ HU (more on thin, low-dose slices);
sharp kernels MTF50 about twice the soft ones. At the demo/tiny profiles pixels are
several mm wide; kernel widths and noise correlation lengths then shrink less than the
pixels grow (see ``kernel_px``), so each condition keeps its clinical look at that
coarser sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

REFERENCE_PIXEL_MM = 0.78  # 400 mm FOV / 512 matrix: the clinical sampling of the table


@dataclass(frozen=True)
class Condition:
    """One acquisition condition; distances in mm, attenuation in HU."""

    key: str
    vendor: str  # normalised vendor
    manufacturer: str  # DICOM Manufacturer as the scanner writes it
    model: str
    kernel: tuple[str, ...]  # ConvolutionKernel values (GE/Siemens may write two)
    mtf_sigma_mm: float
    sharpen: float
    noise_hu: float
    noise_corr_mm: float
    noise_highpass: float
    ir_strength: float
    hu_scale: float
    hu_offset: float
    slice_thickness_mm: float
    fov_mm: float
    kvp: float
    reason: str


# fmt: off
CONDITIONS: tuple[Condition, ...] = (
    Condition("canon_one_fc13", "CANON", "TOSHIBA", "Aquilion ONE", ("FC13",),
              0.90, 0.0, 12.0, 1.2, 0.0, 0.30, 1.000, 0.0, 2.0, 420.0, 120.0,
              "Soft-tissue body kernel with AIDR 3D: routine reference condition."),
    Condition("canon_prism_fc03", "CANON", "CANON_MEC", "Aquilion ONE PRISM", ("FC03",),
              1.00, 0.0, 9.0, 1.4, 0.0, 0.60, 1.000, 3.0, 2.0, 420.0, 120.0,
              "Smooth kernel with AiCE deep-learning reconstruction: low, blotchy noise."),
    Condition("canon_lightning_fc13_thick", "CANON", "TOSHIBA", "Aquilion Lightning",
              ("FC13",), 0.95, 0.0, 7.0, 1.2, 0.0, 0.20, 1.000, 0.0, 5.0, 440.0, 120.0,
              "Older 16-row scanner archiving only 5 mm slices: strong partial volume "
              "along z (muscle borders and femoral head blur), lower noise per slice."),
    Condition("canon_prime_fc30", "CANON", "TOSHIBA", "Aquilion PRIME SP", ("FC30",),
              0.40, 1.20, 130.0, 0.45, 0.7, 0.00, 1.000, 0.0, 1.0, 400.0, 120.0,
              "Bone kernel used as the routine musculoskeletal protocol on 1 mm slices at "
              "low dose: sharp edges with overshoot, fine-grained noise ~130 HU that buries "
              "the ~150 HU muscle/fat contrast."),
    Condition("ge_revolution_standard", "GE", "GE MEDICAL SYSTEMS", "Revolution CT",
              ("STANDARD",), 0.85, 0.0, 14.0, 1.0, 0.0, 0.30, 1.000, -5.0, 2.5, 420.0, 120.0,
              "GE STANDARD (~Siemens B43f) with ASiR-V 30%; slight negative HU offset."),
    Condition("ge_discovery_soft", "GE", "GE MEDICAL SYSTEMS", "Discovery CT750 HD",
              ("SOFT",), 1.10, 0.0, 11.0, 1.3, 0.0, 0.20, 1.000, 0.0, 2.5, 420.0, 120.0,
              "GE SOFT (~Siemens B35f), smooth."),
    Condition("ge_optima_bone", "GE", "GE MEDICAL SYSTEMS", "Optima CT660", ("BONE",),
              0.45, 0.90, 110.0, 0.5, 0.6, 0.00, 1.000, 0.0, 1.25, 400.0, 120.0,
              "GE BONE on 1.25 mm slices: sharp, noisy."),
    Condition("philips_iqon_b", "PHILIPS", "Philips", "IQon - Spectral CT", ("B",),
              0.90, 0.0, 13.0, 1.1, 0.0, 0.30, 1.000, 8.0, 2.0, 420.0, 120.0,
              "Philips B (standard) with iDose4; spectral calibration reads ~8 HU high."),
    Condition("philips_brilliance_c", "PHILIPS", "Philips", "Brilliance 64", ("C",),
              0.70, 0.30, 22.0, 0.8, 0.3, 0.10, 1.000, 0.0, 3.0, 420.0, 120.0,
              "Philips C: sharper than B, more noise."),
    Condition("siemens_edge_br40", "SIEMENS", "SIEMENS", "SOMATOM Definition Edge",
              ("Br40", "3"), 0.85, 0.0, 14.0, 1.0, 0.0, 0.30, 1.000, 0.0, 2.0, 420.0, 120.0,
              "Siemens Br40 with ADMIRE strength 3: routine soft tissue."),
    Condition("siemens_force_bf37", "SIEMENS", "SIEMENS", "SOMATOM Force", ("Bf37", "3"),
              0.95, 0.0, 11.0, 1.2, 0.0, 0.30, 1.000, 0.0, 2.0, 420.0, 100.0,
              "Siemens Bf37 at 100 kVp: smooth; lower kVp raises muscle HU slightly."),
    Condition("siemens_force_br64", "SIEMENS", "SIEMENS", "SOMATOM Force", ("Br64", "3"),
              0.35, 1.40, 150.0, 0.4, 0.8, 0.00, 1.000, 0.0, 1.0, 400.0, 120.0,
              "Siemens Br64 sharp bone kernel on 1 mm slices: ~150 HU fine-grained noise, "
              "edge overshoot."),
)
# fmt: on
BY_KEY = {c.key: c for c in CONDITIONS}

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
# conditions. Two sites carry the injected shift:
#   G: its Canon and Siemens scanners run bone kernels as the routine protocol
#      (markedly sharper and noisier);
#   C: its Canon fleet archives only 5 mm slices (thick-slice partial volume).
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
SHIFT_SITES: dict[str, str] = {"G": "sharp_noisy_kernel", "C": "thick_slices_short_range"}

# Scan range per site as fractions of the knee (0) to iliac-crest (1) extent. Protocols
# differ in where a scan starts and stops; here every site covers the whole range except
# C, whose hip protocol starts in the distal thigh: the 20 % nearest the knee is never
# scanned. Anatomy then sits higher in the volume than models trained elsewhere expect (a
# protocol shift that survives resampling to any model grid, unlike kernel noise, which
# coarse grids average away), and distal structures are cut short. C's shift thus mixes
# thick slices, a shorter range and the recentring it causes.
SCAN_RANGE: dict[str, tuple[float, float]] = {"C": (0.2, 1.0)}


def scan_range(site: str) -> tuple[float, float]:
    """``(start, stop)`` of the scanned extent at ``site``, fractions of knee-to-crest."""
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


def acquire(
    hu: np.ndarray,
    fine_z: np.ndarray,
    slice_z: np.ndarray,
    cond: Condition,
    pixel_mm: float,
    rng: np.random.Generator,
    noise: bool = True,
) -> np.ndarray:
    """Simulate the acquisition of one axial series.

    Args:
        hu: true attenuation on a fine z grid, (n_fine, rows, cols), HU, already at the
            series' in-plane sampling.
        fine_z: z (mm) of each fine plane.
        slice_z: reconstructed slice centres (mm).
        cond: the acquisition condition.
        pixel_mm: in-plane pixel spacing (mm).
        rng: noise generator (seeded by the caller).
        noise: False gives the noiseless image (for tests of sharpness).

    Returns:
        (n_slices, rows, cols) float32 HU image as the scanner would store it.
    """
    # Partial volume along z: a box slice profile of the nominal thickness.
    half = cond.slice_thickness_mm / 2.0
    out = np.empty((len(slice_z),) + hu.shape[1:], dtype=np.float32)
    for k, zc in enumerate(slice_z):
        sel = np.abs(fine_z - zc) <= half + 1e-6
        out[k] = hu[sel].mean(axis=0) if sel.any() else hu[np.argmin(np.abs(fine_z - zc))]
    px = kernel_px(pixel_mm)
    # HU calibration acts on attenuation relative to water.
    out = out * cond.hu_scale + cond.hu_offset
    # MTF: in-plane blur, then edge enhancement for sharp kernels.
    out = ndimage.gaussian_filter(out, sigma=(0, px(cond.mtf_sigma_mm), px(cond.mtf_sigma_mm)))
    if cond.sharpen > 0:
        wide = ndimage.gaussian_filter(out, sigma=(0, px(1.5), px(1.5)))
        out = out + cond.sharpen * (out - wide)
    if noise and cond.noise_hu > 0:
        out += shaped_noise(out.shape, cond, px, rng)
    return out.astype(np.float32)


def kernel_px(pixel_mm: float):
    """mm of the table -> pixels at this sampling.

    At clinical sampling (<= 0.78 mm) distances apply as they are. Coarser (demo)
    pixels would make every kernel look alike, so widths shrink only with the square
    root of the pixel size: each condition keeps its distinct look at 4 mm pixels.
    """
    effective = float(np.sqrt(max(pixel_mm, REFERENCE_PIXEL_MM) * REFERENCE_PIXEL_MM))
    if pixel_mm <= REFERENCE_PIXEL_MM:
        effective = pixel_mm
    return lambda mm: mm / effective


def shaped_noise(shape: tuple[int, ...], cond: Condition, px, rng: np.random.Generator
                 ) -> np.ndarray:
    """Stationary noise with the condition's texture and exactly ``noise_hu`` std."""
    white = rng.standard_normal(shape).astype(np.float32)
    n = ndimage.gaussian_filter(white, sigma=(0, px(cond.noise_corr_mm), px(cond.noise_corr_mm)))
    if cond.noise_highpass > 0:
        # Sharp kernels boost high frequencies: subtract part of a wider low-pass.
        n = n - cond.noise_highpass * ndimage.gaussian_filter(n, sigma=(0, px(1.2), px(1.2)))
    if cond.ir_strength > 0:
        # IR/DLR removes fine grain first: mix towards a low-passed copy.
        low = ndimage.gaussian_filter(n, sigma=(0, px(2.0), px(2.0)))
        n = (1.0 - cond.ir_strength) * n + cond.ir_strength * low
    # Thicker slices average more photons: sigma ~ 1 / sqrt(thickness) around 2 mm is
    # already folded into noise_hu of each condition, so only normalise here.
    std = float(n.std())
    return n * (cond.noise_hu / std) if std > 0 else n
