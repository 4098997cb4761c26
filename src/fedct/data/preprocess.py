"""Series -> network input: resample, crop/pad, normalise; cached as .npz per series.

Shape contract: a prepared case is ``image`` float32 (1, X, Y, Z) in [0, 1] and
``label`` uint8 (1, X, Y, Z) (or absent for unlabelled sites), on a grid of
``spacing_mm`` (x, y, z) in LPS orientation, centred on the scanned volume.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk


@dataclass(frozen=True)
class PrepSpec:
    spacing_mm: tuple[float, float, float]
    roi_size: tuple[int, int, int]
    hu_min: float
    hu_max: float


def resample(image: sitk.Image, spec: PrepSpec, label: bool = False) -> sitk.Image:
    """Resample onto a ``roi_size`` grid of ``spacing_mm`` centred on the image.

    One step does both resampling and crop/pad, so the physical centre of every case
    lands in the centre of the network input; outside the scan is air (-1024 HU) or
    background (0).
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
    # Linear interpolation: no extra smoothing, so a scanner's noise and blur survive
    # resampling (they are the domain shift under study).
    return sitk.Resample(sitk.Cast(image, sitk.sitkFloat32), ref, sitk.Transform(),
                         sitk.sitkLinear, -1024.0, sitk.sitkFloat32)


def normalise(hu: np.ndarray, spec: PrepSpec) -> np.ndarray:
    """Clip the HU window and scale to [0, 1] (MONAI ScaleIntensityRange)."""
    from monai.transforms import ScaleIntensityRange

    t = ScaleIntensityRange(a_min=spec.hu_min, a_max=spec.hu_max, b_min=0.0, b_max=1.0,
                            clip=True)
    return np.asarray(t(hu), dtype=np.float32)


def to_array(image: sitk.Image) -> np.ndarray:
    """SimpleITK (z, y, x) array -> (1, x, y, z), the channel-first layout MONAI uses."""
    return np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0))[None]


def prepare_case(image: sitk.Image, label: sitk.Image | None, spec: PrepSpec
                 ) -> dict[str, np.ndarray]:
    """One series (and its label) -> network-ready arrays."""
    img = normalise(to_array(resample(image, spec)), spec)
    out = {"image": img}
    if label is not None:
        out["label"] = to_array(resample(label, spec, label=True)).astype(np.uint8)
    return out
