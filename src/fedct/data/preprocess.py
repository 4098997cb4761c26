"""Series -> network input: resample, crop/pad, normalise; cached as .npz per series.

Shape contract: a prepared case is ``image`` float32 (1, X, Y, Z) in [0, 1] and
``label`` uint8 (1, X, Y, Z) (or absent for unlabelled sites), on a grid of
``spacing_mm`` (x, y, z) in LPS orientation, centred on the scanned volume. Images are
low-passed before they are downsampled (no aliasing); labels are nearest-neighbour.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from fedct.errors import Rejected


@dataclass(frozen=True)
class PrepSpec:
    spacing_mm: tuple[float, float, float]
    roi_size: tuple[int, int, int]
    hu_min: float
    hu_max: float


# Full width at half maximum of a Gaussian in units of its sigma: 2 sqrt(2 ln 2).
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


def antialias_sigma_mm(in_spacing: np.ndarray, out_spacing: np.ndarray) -> np.ndarray:
    """Per-axis Gaussian sigma (mm) of the low-pass applied before downsampling.

    The rule: treat the input voxel as a blur of FWHM ``s_in`` and add just enough Gaussian
    blur that the total FWHM equals the output spacing, ``sigma = sqrt(s_out^2 - s_in^2) /
    2.355``. Its response is 0.41 at the output Nyquist frequency ``1 / (2 s_out)`` and
    0.03 at twice that, so detail (and noise) the output grid cannot represent is removed
    instead of folding back into low frequencies as aliasing, while structures a few output
    voxels wide pass almost unchanged. Axes whose output is as fine as or finer than the
    input (upsampling) get 0: nothing to remove there.
    """
    s_in = np.asarray(in_spacing, dtype=float)
    s_out = np.asarray(out_spacing, dtype=float)
    return np.sqrt(np.clip(s_out**2 - s_in**2, 0.0, None)) / FWHM_PER_SIGMA


def lowpass(image: sitk.Image, sigma_mm: np.ndarray) -> sitk.Image:
    """Separable Gaussian of ``sigma_mm`` (x, y, z; 0 = that axis untouched), float32.

    ``DiscreteGaussian`` (a sampled, truncated kernel) rather than the recursive filter:
    it is exact for the sub-voxel sigmas of thick-slice axes (5 -> 7 mm needs 0.4 voxel),
    where the recursive approximation is poor. Edges replicate the border voxel, so a
    scan's first and last slices are not darkened by the zero padding.
    """
    image = sitk.Cast(image, sitk.sitkFloat32)
    if not np.any(sigma_mm > 0):
        return image
    f = sitk.DiscreteGaussianImageFilter()
    f.SetUseImageSpacing(True)
    f.SetVariance([float(s) ** 2 for s in sigma_mm])
    f.SetMaximumError(0.001)
    f.SetMaximumKernelWidth(1024)
    return f.Execute(image)


def resample(image: sitk.Image, spec: PrepSpec, label: bool = False) -> sitk.Image:
    """Resample onto a ``roi_size`` grid of ``spacing_mm`` centred on the image.

    One step does both resampling and crop/pad, so the physical centre of every case
    lands in the centre of the network input; outside the scan is air (-1024 HU) or
    background (0). Images are low-passed first along every axis that is downsampled
    (``antialias_sigma_mm``), then linearly interpolated: a scanner's noise and blur at
    scales the grid resolves survive (they are the domain shift under study), but a
    difference above the grid's Nyquist frequency (kernel sharpness, fine noise grain)
    cannot alias into the input as it would not in a real pipeline. Labels are resampled
    by nearest neighbour, never smoothed.
    """
    size = np.array(image.GetSize())
    spacing = np.array(image.GetSpacing())
    direction = np.array(image.GetDirection()).reshape(3, 3)
    centre_index = (size - 1) / 2.0
    centre = np.array(image.GetOrigin()) + direction @ (centre_index * spacing)
    out_spacing = np.array(spec.spacing_mm, dtype=float)
    out_size = np.array(spec.roi_size)
    origin = centre - direction @ ((out_size - 1) / 2.0 * out_spacing)
    ref = sitk.Image([int(s) for s in out_size], sitk.sitkUInt8 if label else sitk.sitkFloat32)
    ref.SetSpacing(tuple(out_spacing))
    ref.SetOrigin(tuple(origin))
    ref.SetDirection(tuple(direction.ravel()))
    if label:
        return sitk.Resample(image, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                             sitk.sitkUInt8)
    # The grid shares the image's direction, so image axis i is output axis i.
    smooth = lowpass(image, antialias_sigma_mm(spacing, out_spacing))
    return sitk.Resample(smooth, ref, sitk.Transform(), sitk.sitkLinear, -1024.0,
                         sitk.sitkFloat32)


def normalise(hu: np.ndarray, spec: PrepSpec) -> np.ndarray:
    """Clip the HU window and scale to [0, 1]: MONAI's ``ScaleIntensityRange(a_min=hu_min,
    a_max=hu_max, b_min=0, b_max=1, clip=True)``, value for value (the same operations in
    the same precision; tests/data/test_preprocess.py compares them), without importing
    MONAI (about 10 CPU-seconds) in every process that prepares a volume."""
    scaled = (hu - spec.hu_min) / (spec.hu_max - spec.hu_min)
    return np.asarray(np.clip(scaled, 0.0, 1.0), dtype=np.float32)


def to_array(image: sitk.Image) -> np.ndarray:
    """SimpleITK (z, y, x) array -> (1, x, y, z), the channel-first layout MONAI uses."""
    return np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0))[None]


def grid_mismatch(image: sitk.Image, label: sitk.Image) -> str | None:
    """Why ``label`` is not on ``image``'s voxel grid, or None when it is.

    A label map must share its image's size, spacing, direction and origin (up to 1 % of
    a voxel, which covers NIfTI's float32 header), as nnU-Net requires: resampled alone,
    a label with flipped axes or another origin would land mirrored or shifted.
    """
    if image.GetSize() != label.GetSize():
        return f"size {list(label.GetSize())} != the image's {list(image.GetSize())}"
    spacing = np.array(image.GetSpacing())
    if not np.allclose(label.GetSpacing(), spacing, rtol=1e-3, atol=0):
        return (f"spacing {np.round(label.GetSpacing(), 4).tolist()} mm != the image's "
                f"{np.round(spacing, 4).tolist()} mm")
    if not np.allclose(label.GetDirection(), image.GetDirection(), atol=1e-3):
        return (f"direction {np.round(label.GetDirection(), 3).tolist()} != the image's "
                f"{np.round(image.GetDirection(), 3).tolist()} (reoriented or flipped axes)")
    gap = np.abs(np.array(label.GetOrigin()) - np.array(image.GetOrigin()))
    if np.any(gap > 0.01 * spacing.min()):
        return (f"origin {np.round(label.GetOrigin(), 3).tolist()} mm != the image's "
                f"{np.round(image.GetOrigin(), 3).tolist()} mm")
    return None


def prepare_case(image: sitk.Image, label: sitk.Image | None, spec: PrepSpec
                 ) -> dict[str, np.ndarray]:
    """One series (and its label) -> network-ready arrays."""
    img = normalise(to_array(resample(image, spec)), spec)
    out = {"image": img}
    if label is not None:
        out["label"] = to_array(resample(label, spec, label=True)).astype(np.uint8)
    return out


def prepare_volume(image: sitk.Image, label: sitk.Image | None, spec: PrepSpec,
                   n_classes: int | None = None) -> dict[str, np.ndarray]:
    """:func:`prepare_case` for the cohort: a series it cannot prepare raises
    :class:`~fedct.errors.Rejected` with a reason free of paths and identifiers (a label
    value beyond ``n_classes``, a resampling that fails), never stopping the run."""
    where = "series"
    try:
        case = prepare_case(image, label, spec)
    except (RuntimeError, ValueError, MemoryError) as exc:
        raise Rejected(where, f"cannot be resampled onto the cohort's grid "
                              f"({type(exc).__name__})") from exc
    if n_classes is not None and "label" in case and int(case["label"].max()) >= n_classes:
        raise Rejected(where, f"label value {int(case['label'].max())} is not in labels.json "
                              f"({n_classes} classes)")
    return case
