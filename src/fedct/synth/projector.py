"""A parallel-beam projector and filtered back-projection: the reference reconstruction.

Artefacts that come from the projections are simulated here: photon starvation
(rays through metal or through the hips of large, low-dose patients receive a few
photons; the log of a near-zero Poisson count is biased and wildly noisy, so
streaks run along those rays) and beam hardening by metal and bone (the dense part
of a ray is under-measured, giving dark bands between dense objects). The tests also
use it to check that the image-domain noise of ``physics`` has the FBP spectrum.

The projector is a sparse matrix of bilinear weights along each ray (``n_angles`` x
``n_bins`` rays, one sample per pixel length); its transpose back-projects.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy import sparse

from fedct.synth.physics import Kernel


@lru_cache(maxsize=4)
def system_matrix(n: int, n_angles: int) -> sparse.csr_matrix:
    """(n_angles * n_bins, n * n) ray-sampling matrix for an n x n image, unit pixels."""
    n_bins = int(np.ceil(n * np.sqrt(2))) | 1
    theta = np.pi * np.arange(n_angles) / n_angles
    t = np.arange(n_bins) - (n_bins - 1) / 2
    s = np.arange(n_bins) - (n_bins - 1) / 2
    c = (n - 1) / 2
    rows, cols, vals = [], [], []
    for i, th in enumerate(theta):
        # Sample points x = t cos - s sin, y = t sin + s cos (pixel units, centre c).
        x = t[:, None] * np.cos(th) - s[None, :] * np.sin(th) + c
        y = t[:, None] * np.sin(th) + s[None, :] * np.cos(th) + c
        x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
        fx, fy = x - x0, y - y0
        ray = np.broadcast_to((i * n_bins + np.arange(n_bins))[:, None], x.shape)
        for dx, dy, w in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)),
                          (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
            xi, yi = x0 + dx, y0 + dy
            ok = (xi >= 0) & (xi < n) & (yi >= 0) & (yi < n) & (w > 0)
            rows.append(ray[ok])
            cols.append((yi * n + xi)[ok])
            vals.append(w[ok])
    a = sparse.csr_matrix((np.concatenate(vals).astype(np.float32),
                           (np.concatenate(rows), np.concatenate(cols))),
                          shape=(n_angles * n_bins, n * n))
    a.sum_duplicates()
    return a


def project(img: np.ndarray, n_angles: int, pixel_mm: float) -> np.ndarray:
    """Line integrals of ``img`` (k, n, n) (per mm units) -> sinograms (k, angles, bins)."""
    k, n, _ = img.shape
    a = system_matrix(n, n_angles)
    sino = (a @ img.reshape(k, n * n).T.astype(np.float32)).T * pixel_mm
    return sino.reshape(k, n_angles, -1)


def fbp(sino: np.ndarray, n: int, pixel_mm: float, kernel: Kernel | None = None) -> np.ndarray:
    """Filtered back-projection of (k, angles, bins) sinograms -> (k, n, n) images."""
    k, n_angles, n_bins = sino.shape
    pad = 2 * int(2 ** np.ceil(np.log2(n_bins)))
    f = np.fft.rfftfreq(pad, pixel_mm)
    filt = np.abs(f) * (kernel.window(f) if kernel is not None else 1.0)
    q = np.fft.irfft(np.fft.rfft(sino, n=pad, axis=-1) * filt, n=pad, axis=-1)[..., :n_bins]
    a = system_matrix(n, n_angles)
    # Back-projection with the transpose: each pixel gathers ~one sample per ray.
    bp = (a.T @ q.reshape(k, -1).T.astype(np.float32)).T
    return (bp * (np.pi / n_angles)).reshape(k, n, n).astype(np.float32)


def starvation_artefact(mu: np.ndarray, pixel_mm: float, n0: float, kernel: Kernel,
                        rng: np.random.Generator, mu_water: float, n_angles: int = 72,
                        metal_mu: float | None = None, bh: float = 0.04,
                        starved: float = 50.0) -> tuple[np.ndarray, float]:
    """Streaks from starved rays and dense-object beam hardening, in HU (k, n, n).

    Args:
        mu: attenuation (1/mm) on a square grid covering the body, (k, n, n).
        n0: photons per ray in air (tube current x time x slice thickness x spectrum).
        kernel: the reconstruction kernel (the streaks carry its texture).
        metal_mu: attenuation above which a pixel counts as dense (bone, metal); the
            under-measured fraction of those rays is ``bh`` x (dense path)^2.
        starved: rays expecting fewer photons than this get Poisson counts (the
            image-domain noise model covers the rest).

    Returns the artefact image (HU, add it to the image) and the fewest expected
    photons of any ray.
    """
    p = project(mu, n_angles, pixel_mm)
    lam = n0 * np.exp(-p)
    meas = p.copy()
    if metal_mu is not None:
        dense = project(np.where(mu > metal_mu, mu - metal_mu, 0.0), n_angles, pixel_mm)
        meas -= bh * dense**2 / (1.0 + 0.05 * dense)
    low = lam < starved
    if low.any():
        counts = rng.poisson(lam[low]).astype(float)
        # Scanners clamp zero counts before the log; the clamp biases starved rays.
        meas[low] += -np.log(np.maximum(counts, 0.5) / lam[low])
    diff = meas - p
    if not np.any(diff):
        return np.zeros_like(mu, dtype=np.float32), float(lam.min())
    img = fbp(diff, mu.shape[1], pixel_mm, kernel)
    return (img / mu_water * 1000.0).astype(np.float32), float(lam.min())
