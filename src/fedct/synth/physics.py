"""CT physics in the image domain, as a filtered back-projection scanner produces it.

- Attenuation by tube voltage: HU of bone and iodine rise steeply at low kVp (their
  photoelectric absorption grows towards the K-edges and calcium's higher Z); fat
  falls slightly; muscle barely changes.
- Resolution: the kernel's apodisation window W(f) times the system MTF (focal spot
  and detector), applied as a 2D filter to the noise-free image.
- Quantum noise: white noise shaped in 2D Fourier space by |f| W(f)^2 (the FBP noise
  power spectrum: the ramp filter amplifies projection noise in proportion to |f|),
  damped at high frequency by iterative reconstruction; its size follows the photons
  detected: sigma^2 ~ 1 / (mAs x slice thickness x kVp^2.8) x exp(mu x (WED - 300 mm)),
  WED the patient's water-equivalent diameter in that slice (noise doubles per ~8 cm).
- Beam hardening: water-corrected scanners keep a residual cupping that grows with
  patient size and at low kVp (HU drop in the centre of large patients).
- Truncation: tissue outside the scan field of view (500 mm) is not measured; the
  image brightens towards the edge of the field and nothing is shown outside it.

Frequencies are in cycles/mm. The NPS-shaped noise is checked against noise from a
real projector + FBP (``projector``) in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from fedct.synth import anatomy as an

REFERENCE_PIXEL_MM = 0.78  # clinical sampling (400 mm / 512): where noise is quoted
SFOV_MM = 500.0  # scan field of view: the detector's extent at the isocentre
MU_WATER = {80: 0.0215, 100: 0.0203, 120: 0.0192, 140: 0.0185}  # 1/mm, effective energy
NOISE_REF = dict(mas=150.0, thickness_mm=2.0, kvp=120.0, wed_mm=300.0)
MU_NOISE = 0.0173  # 1/mm: noise x2 per ~80 mm of water (exp(MU_NOISE x 80 / 2) = 2)
METAL_HU = {an.METAL_FEMUR: 23000.0, an.METAL_CUP: 6000.0}  # CoCr head/stem, Ti cup


@dataclass(frozen=True)
class Kernel:
    """A reconstruction kernel: Gaussian apodisation window of width ``sigma_f``
    (cycles/mm) with a mid-frequency boost (edge enhancement of bone kernels)."""

    sigma_f: float
    boost: float = 0.0

    def window(self, f: np.ndarray) -> np.ndarray:
        g = np.exp(-0.5 * (f / self.sigma_f) ** 2)
        return g * (1.0 + self.boost * (f / self.sigma_f) ** 2)


def system_mtf(f: np.ndarray) -> np.ndarray:
    """Focal spot x detector aperture: ~0.8 at 6 lp/cm."""
    return np.exp(-0.5 * (f / 0.9) ** 2)


def mtf(kernel: Kernel, f: np.ndarray) -> np.ndarray:
    return kernel.window(f) * system_mtf(f)


def mtf50_lp_cm(kernel: Kernel) -> float:
    """Frequency (lp/cm) where the MTF first falls below 0.5."""
    f = np.linspace(0, 2.0, 4001)
    m = mtf(kernel, f)
    return float(f[np.argmax(m < 0.5)] * 10.0)


def _freq(shape: tuple[int, int], pixel_mm: float) -> np.ndarray:
    fy = np.fft.fftfreq(shape[0], pixel_mm)
    fx = np.fft.rfftfreq(shape[1], pixel_mm)
    return np.hypot(fy[:, None], fx[None, :])


def ir_damping(f: np.ndarray, ir_strength: float) -> np.ndarray:
    """Iterative/DL reconstruction removes fine-grained noise first (blotchy texture)."""
    return 1.0 - ir_strength * (1.0 - np.exp(-0.5 * (f / 0.15) ** 2))


def nps_filter(f: np.ndarray, kernel: Kernel, ir_strength: float = 0.0) -> np.ndarray:
    """Amplitude filter whose square is the FBP NPS shape |f| W(f)^2 (x IR damping^2)."""
    return np.sqrt(f) * kernel.window(f) * ir_damping(f, ir_strength)


@lru_cache(maxsize=256)
def _nps_integral(kernel: Kernel, ir_strength: float, pixel_mm: float) -> float:
    """Integral of the NPS shape over the band of a grid of ``pixel_mm`` (cycles^2/mm^2)."""
    f = _freq((512, 512), pixel_mm)
    full = np.concatenate([f, f[:, 1:-1]], axis=1)  # both half-planes of rfft
    return float((nps_filter(full, kernel, ir_strength) ** 2).mean() / pixel_mm**2)


def dose_factor(mas: float, thickness_mm: float, kvp: float, wed_mm: float | np.ndarray):
    """Noise variance relative to the reference acquisition (photons detected)."""
    r = NOISE_REF
    return ((r["mas"] * r["thickness_mm"]) / (mas * thickness_mm) * (r["kvp"] / kvp) ** 2.8
            * np.exp(MU_NOISE * (np.asarray(wed_mm) - r["wed_mm"])))


# Noise variance per unit NPS integral, set so that a standard kernel (sigma_f 0.34)
# at the reference acquisition and clinical sampling gives 14 HU.
NOISE_K = 14.0**2 / _nps_integral(Kernel(0.34), 0.0, REFERENCE_PIXEL_MM)


def noise_sigma(kernel: Kernel, ir_strength: float, pixel_mm: float, mas: float,
                thickness_mm: float, kvp: float, wed_mm) -> np.ndarray:
    """Quantum noise std (HU) of an image sampled at ``pixel_mm`` (band-limited)."""
    var = NOISE_K * _nps_integral(kernel, ir_strength, pixel_mm) * dose_factor(
        mas, thickness_mm, kvp, wed_mm)
    return np.sqrt(var)


def shaped_noise(shape: tuple[int, int, int], kernel: Kernel, ir_strength: float,
                 pixel_mm: float, rng: np.random.Generator) -> np.ndarray:
    """Unit-variance noise per slice with the FBP NPS shape, (n, rows, cols) float32."""
    f = _freq(shape[1:], pixel_mm)
    filt = nps_filter(f, kernel, ir_strength)
    white = rng.standard_normal(shape).astype(np.float32)
    n = np.fft.irfft2(np.fft.rfft2(white) * filt, s=shape[1:]).astype(np.float32)
    full = nps_filter(np.hypot(np.fft.fftfreq(shape[1], pixel_mm)[:, None],
                               np.fft.fftfreq(shape[2], pixel_mm)[None, :]), kernel, ir_strength)
    return n / max(float(np.sqrt((full**2).mean())), 1e-12)


def apply_mtf(img: np.ndarray, kernel: Kernel, pixel_mm: float, pad: int = 16) -> np.ndarray:
    """Blur (and edge-enhance) each slice of ``img`` (n, rows, cols) by the kernel's MTF."""
    padded = np.pad(img, ((0, 0), (pad, pad), (pad, pad)), mode="edge")
    f = _freq(padded.shape[1:], pixel_mm)
    out = np.fft.irfft2(np.fft.rfft2(padded) * mtf(kernel, f), s=padded.shape[1:])
    return out[:, pad:-pad, pad:-pad].astype(np.float32)


def hu_at(tissue: np.ndarray, a: an.Anatomy, side: np.ndarray, kvp: float,
          contrast: str, tex: np.ndarray) -> np.ndarray:
    """True HU of a tissue-code map at tube voltage ``kvp``.

    ``side`` (-1/+1 per pixel) selects the hip whose muscles osteoarthritis affects;
    ``tex`` is a smooth unit-variance field (heterogeneity and fat marbling).
    """
    bone_k = (120.0 / kvp) ** 0.75  # cortical bone ~1400 HU at 120 kVp -> ~1900 at 80
    iodine_k = (120.0 / kvp) ** 1.25  # iodine enhancement x1.66 at 80 kVp
    fat = a.fat_hu * (1.0 + 0.0025 * (120.0 - kvp)) + 4.0 * tex
    muscle = a.muscle_hu + 0.08 * (120.0 - kvp) + 4.0 * tex
    hu = np.full(tissue.shape, -1000.0, dtype=np.float32)
    hu[tissue == an.FAT] = fat[tissue == an.FAT]
    infil = np.where(side > 0, a.side_infiltration(1), a.side_infiltration(-1))
    # Fatty infiltration: a fat fraction that marbles the muscle (patchy, not uniform).
    frac = np.clip(infil * (0.55 + 0.35 * tex), 0.0, 1.0)
    m = np.isin(tissue, (*an.MUSCLE_LABELS, an.OTHER_MUSCLE))
    hu[m] = ((1 - frac) * muscle + frac * fat)[m]
    hu[tissue == an.VISCERA] = (30.0 + 8.0 * tex)[tissue == an.VISCERA]
    hu[tissue == an.SOFT] = 60.0
    hu[tissue == an.POLY] = -80.0
    art, ven = {"none": (0.0, 0.0), "arterial": (300.0, 60.0),
                "venous": (130.0, 150.0)}[contrast]
    hu[tissue == an.ARTERY] = 40.0 + art * iodine_k
    hu[tissue == an.VEIN] = 40.0 + ven * iodine_k
    cortical = a.cortical_hu() * bone_k
    for code in (an.PELVIS, an.FEMUR):
        hu[tissue == code] = cortical
    hu[tissue == an.VERTEBRA] = 0.5 * cortical
    marrow = a.marrow_hu() * bone_k + 30.0 * tex
    for code in (an.PELVIS_MARROW, an.FEMUR_MARROW):
        hu[tissue == code] = marrow[tissue == code]
    for code, v in METAL_HU.items():
        hu[tissue == code] = v
    return hu


def wed_mm(hu: np.ndarray, pixel_mm: float) -> np.ndarray:
    """Water-equivalent diameter (mm) of each slice of ``hu`` (n, rows, cols) (AAPM 220)."""
    body = hu > -500
    area = (np.clip(hu, -1000, 3000) / 1000.0 + 1.0) * body
    return 2.0 * np.sqrt(area.sum(axis=(1, 2)) * pixel_mm**2 / np.pi)


def cupping(hu: np.ndarray, wed: np.ndarray, kvp: float, residual: float) -> np.ndarray:
    """Residual beam-hardening cupping (HU, <= 0): deepest in the body's centre.

    ``residual`` is the vendor's correction left over (1 = 12 HU at the centre of a
    300 mm patient at 120 kVp); the drop grows with size squared and at low kVp.
    """
    out = np.zeros_like(hu)
    depth = residual * 12.0 * (120.0 / kvp) ** 1.5 * (wed / 300.0) ** 2
    for k in range(hu.shape[0]):
        body = hu[k] > -500
        if not body.any():
            continue
        rows, cols = np.nonzero(body)
        cy, cx = rows.mean(), cols.mean()
        ry, rx = max(np.ptp(rows) / 2, 1), max(np.ptp(cols) / 2, 1)
        yy, xx = np.ogrid[: hu.shape[1], : hu.shape[2]]
        r2 = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
        out[k] = np.where(body, -depth[k] * np.clip(1.0 - r2, 0.0, 1.0), 0.0)
    return out


def truncated_fraction(scout: np.ndarray, pixel_mm: float) -> np.ndarray:
    """Per slice: the fraction of the body outside the scan field of view.

    ``scout`` (n, m, m) is centred on the isocentre with ``pixel_mm`` pixels.
    """
    m = scout.shape[1]
    c = (np.arange(m) - (m - 1) / 2) * pixel_mm
    outside = np.hypot(c[None, :], c[:, None]) > SFOV_MM / 2
    body = scout > -500
    return (body & outside[None]).sum(axis=(1, 2)) / np.maximum(body.sum(axis=(1, 2)), 1)


def truncate(hu: np.ndarray, xx: np.ndarray, yy: np.ndarray, iso: tuple[float, float],
             lost: np.ndarray) -> np.ndarray:
    """Apply the scan field of view: nothing is reconstructed outside it, and where the
    body extends past it (``lost``, per slice) the image brightens towards its edge
    (the missing projection data is extrapolated)."""
    r = np.hypot(xx - iso[0], yy - iso[1])
    outside = r > SFOV_MM / 2
    rim = np.exp(-np.clip(SFOV_MM / 2 - r, 0, None) / 20.0)
    body = hu > -500
    out = hu + (2000.0 * lost)[:, None, None] * rim[None] * body
    out[:, outside] = -1024.0
    return out.astype(np.float32)
