"""One axial CT scan of a phantom patient, in memory: where it lies, how it is acquired,
what the scanner stores. ``fedct.synth.archive`` writes it as DICOM and NIfTI files;
``fedct.synth.factors`` rescans the same patient under other settings.

``Profile`` sets the archive's size (matrix, z extent, sampling), which every scan follows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from fedct.synth import physics
from fedct.synth.anatomy import N_CLASSES, Anatomy, labels_of, render_slice
from fedct.synth.scanners import (
    SCOUT_N,
    SCOUT_PIXEL_MM,
    Acquisition,
    Condition,
    acquire,
    draw_acquisition,
    scan_range,
)


@dataclass(frozen=True)
class Profile:
    """Archive size. Slice thickness stays physical; the z extent sets slice counts."""

    patients_per_site: int
    matrix: int
    length_mm: float
    supersample: int
    fine_dz_mm: float
    thick_recon_mm: float = 10.0  # the "thick" distractor: must give < 32 slices
    reformat_slices: int = 36


PROFILES: dict[str, Profile] = {
    "tiny": Profile(patients_per_site=3, matrix=24, length_mm=205.0, supersample=1,
                    fine_dz_mm=4.0, reformat_slices=8),
    "demo": Profile(patients_per_site=8, matrix=96, length_mm=200.0, supersample=2,
                    fine_dz_mm=1.0),
    # The study (issue 23, profiles/study.yaml): the demo's grid, twice its patients, so
    # that every site gives >= 4 calibration and >= 8 test patients.
    "study": Profile(patients_per_site=16, matrix=96, length_mm=200.0, supersample=2,
                     fine_dz_mm=1.0),
    # Clinical-size volumes (GPU): 512 x 512 pixels, 400 mm of legs.
    "clinical": Profile(patients_per_site=40, matrix=512, length_mm=400.0, supersample=1,
                        fine_dz_mm=0.5, reformat_slices=64, thick_recon_mm=20.0),
}


def _grid(xs: np.ndarray, supersample: int) -> np.ndarray:
    """Sub-sample centres of pixels centred at ``xs`` (increasing)."""
    step = xs[1] - xs[0]
    offs = (np.arange(supersample) - (supersample - 1) / 2) * step / supersample
    return (xs[:, None] + offs[None, :]).ravel()


def render_volume(a: Anatomy, xs: np.ndarray, ys: np.ndarray, fine_z: np.ndarray,
                  slice_z: np.ndarray, thickness: float, supersample: int, kvp: float,
                  contrast: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """True HU (n_fine, len(ys), len(xs)) at ``kvp`` and ``contrast``, and the labels
    of each slice (n_slices, len(ys), len(xs)).

    Each pixel is the mean of ``supersample``^2 sub-samples (in-plane partial volume).
    A smooth patient texture makes tissue non-uniform and marbles infiltrated muscle.
    A voxel's label is the structure most of its sub-samples (in-plane and over the
    slice's planes) lie in.
    """
    fx, fy = _grid(xs, supersample), _grid(ys, supersample)
    side = np.where(fx >= 0, 1, -1)[None, :].repeat(len(fy), 0)
    nx, ny, ss = len(xs), len(ys), supersample
    tex = ndimage.gaussian_filter(rng.standard_normal((len(fine_z), ny, nx)).astype(np.float32),
                                  (1.5, 1.0, 1.0))
    tex /= max(float(tex.std()), 1e-6)
    vol = np.empty((len(fine_z), ny, nx), dtype=np.float32)
    sub_labels = np.empty((len(fine_z), ny * ss, nx * ss), dtype=np.uint8)
    for k, z in enumerate(fine_z):
        tissue = render_slice(a, float(z), fx, fy)
        t = np.repeat(np.repeat(tex[k], ss, 0), ss, 1)
        hu = physics.hu_at(tissue, a, side, kvp, contrast, t)
        vol[k] = hu.reshape(ny, ss, nx, ss).mean(axis=(1, 3))
        sub_labels[k] = labels_of(tissue)
    labels = np.empty((len(slice_z), ny, nx), dtype=np.uint8)
    pixel_of = (np.arange(ny)[:, None, None, None] * nx
                + np.arange(nx)[None, None, :, None]) + np.zeros((1, ny, ss, nx, ss), np.int64)
    for k, zc in enumerate(slice_z):
        dist = np.abs(fine_z - zc)
        sel = (dist <= thickness / 2 + 1e-6) | (dist == dist.min())
        lab = sub_labels[sel].reshape(-1, ny, ss, nx, ss).astype(np.int64)
        votes = np.bincount((pixel_of * N_CLASSES + lab).ravel(),
                            minlength=ny * nx * N_CLASSES).reshape(ny, nx, N_CLASSES)
        labels[k] = votes.argmax(axis=-1)
    return vol, labels


def scout_volume(a: Anatomy, acq: Acquisition, slice_z: np.ndarray, step_mm: float = 0.0
                 ) -> np.ndarray:
    """True HU at each slice centre on the projector's body-covering grid; rendered
    every ``step_mm`` (nearest plane reused in between: the body changes slowly)."""
    c = (np.arange(SCOUT_N) - (SCOUT_N - 1) / 2) * SCOUT_PIXEL_MM
    xs, ys = c + acq.iso[0], c + acq.iso[1]
    side = np.where(xs >= 0, 1, -1)[None, :].repeat(SCOUT_N, 0)
    zero = np.zeros((SCOUT_N, SCOUT_N), dtype=np.float32)
    dz = float(slice_z[1] - slice_z[0]) if len(slice_z) > 1 else 1.0
    every = max(1, int(round(step_mm / dz)))
    planes = np.stack([physics.hu_at(render_slice(a, float(z), xs, ys), a, side, acq.kvp,
                                     acq.contrast, zero) for z in slice_z[every // 2::every]])
    idx = np.minimum(np.arange(len(slice_z)) // every, len(planes) - 1)
    return planes[idx]


@dataclass(frozen=True)
class ScanPlan:
    """Where one axial scan lies and how it is acquired: every draw made before imaging.

    ``z1`` (mm) is the top of the scan, ``start`` its bottom edge, ``covered`` its extent.
    """

    z1: float
    start: float
    covered: float
    acq: Acquisition


def _slice_centres(start: float, covered: float, thickness_mm: float) -> np.ndarray:
    """Centres (mm) of the contiguous slices that fit in ``covered`` from ``start``."""
    n_sl = int(covered // thickness_mm)
    return start + thickness_mm * (np.arange(n_sl) + 0.5)


def draw_scan(a: Anatomy, cond: Condition, site: str, profile: Profile,
              rng: np.random.Generator) -> ScanPlan:
    """Scan range, localizer-based dose (AEC), contrast, field of view and centring."""
    # The scan starts at the iliac crest (give or take positioning) and runs the
    # profile's extent towards the knee; slices contiguous.
    z1 = a.frame * float(rng.uniform(0.0, 15.0))
    lo, hi = scan_range(site)
    start, covered = z1 - hi * profile.length_mm, (hi - lo) * profile.length_mm
    slice_z = _slice_centres(start, covered, cond.slice_thickness_mm)
    n_sl = len(slice_z)
    # The localizer gives the patient's size, which sets the dose (AEC).
    centred = Acquisition(cond.kvp, cond.mas, "none", cond.fov_mm, (0.0, 0.0), (0.0, 0.0),
                          False)
    pre = scout_volume(a, centred, slice_z[:: max(1, n_sl // 8)])
    wed = float(physics.wed_mm(pre, SCOUT_PIXEL_MM).mean())
    cols = np.nonzero((pre > -500).any(axis=(0, 1)))[0]
    width = float(np.ptp(cols) + 1) * SCOUT_PIXEL_MM if len(cols) else 0.0
    acq = draw_acquisition(site, cond, a.oa_side, wed, width, rng)
    return ScanPlan(z1, start, covered, acq)


@dataclass(frozen=True)
class AxialScan:
    """One simulated axial series in memory (what the archive writes as DICOM + NIfTI).

    ``image`` (n_slices, rows, cols) float32 HU as the scanner stores it; ``labels``
    uint8 of the same shape; ``truth`` the true HU on the fine planes ``fine_z``;
    ``xs``/``ys`` column/row centres and ``slice_z`` slice centres (mm, LPS).
    """

    image: np.ndarray
    labels: np.ndarray
    truth: np.ndarray
    xs: np.ndarray
    ys: np.ndarray
    slice_z: np.ndarray
    fine_z: np.ndarray
    dz: float
    pixel: float
    thickness: float
    measured: dict


def simulate_axial(a: Anatomy, cond: Condition, plan_: ScanPlan, profile: Profile,
                   seed: int, noise_seed: int | None = None) -> AxialScan:
    """Render the phantom and acquire it under ``cond`` and ``plan_.acq``.

    ``seed`` seeds the patient's tissue texture and, unless ``noise_seed`` is given, the
    scanner's noise (a rescan of the same patient differs only in ``noise_seed``).
    """
    acq, thick = plan_.acq, cond.slice_thickness_mm
    slice_z = _slice_centres(plan_.start, plan_.covered, thick)
    pixel = acq.fov_mm / profile.matrix
    xs = acq.centre[0] + (np.arange(profile.matrix) - (profile.matrix - 1) / 2.0) * pixel
    ys = acq.centre[1] + (np.arange(profile.matrix) - (profile.matrix - 1) / 2.0) * pixel
    # Two planes per slice (partial volume along z), or the profile's step if finer.
    dz = max(profile.fine_dz_mm, thick / 2)
    fine_z = np.arange(plan_.start + dz / 2, plan_.z1, dz)
    truth_vol, lab = render_volume(a, xs, ys, fine_z, slice_z, thick, profile.supersample,
                                   acq.kvp, acq.contrast, np.random.default_rng([seed, 2]))
    scout = scout_volume(a, acq, slice_z, step_mm=10.0)
    img, measured = acquire(truth_vol, fine_z, slice_z, cond, acq, xs, ys, scout,
                            np.random.default_rng([seed if noise_seed is None else noise_seed,
                                                   3]))
    return AxialScan(img, lab, np.minimum(truth_vol, 3071.0), xs, ys, slice_z, fine_z,
                     float(dz), float(pixel), float(thick), measured)
