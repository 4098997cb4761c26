"""Read the image to segment: a DICOM CT series folder or a NIfTI (any SimpleITK) volume.

Contract: :class:`InputImage` holds the volume as a 3D SimpleITK image in HU (float32,
LPS, spacing in mm) and, for DICOM, the source slices' headers (pydicom, no pixel data)
in the image's slice order, which the DICOM SEG references. Bad input is a
:class:`FedctError` naming the file or folder: no DICOM in a folder, a file that is
corrupt or cut short, a modality other than CT, several series, fewer slices than the
catalogue's ``min_slices`` rule (an axial 3D stack of >= 32 slices), or a volume file with
no negative value (a label map, or values not in HU: NIfTI carries no modality).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from fedct.catalogue.series import spacing_regular
from fedct.config import CatalogueParams
from fedct.dicom.readers import read_headers
from fedct.dicom.tags import DICOMDIR, NOT_CT, NOT_DICOM
from fedct.dicom.values import image_type_class, orientation_class, parse_floats, slice_normal
from fedct.dicom.volume import read_volume
from fedct.errors import FedctError

# The catalogue's usability rule (catalogue.min_slices; the dataclass default equals
# params.yaml): fewer slices are not a 3D stack the models were trained on.
MIN_SLICES = CatalogueParams().min_slices
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha", ".mhd")
# Files without these suffixes that are not DICOM are skipped (notes, exports' indexes);
# with them a file that is not DICOM is a corrupt image.
DICOM_SUFFIXES = ("", ".dcm", ".dicom", ".ima")


@dataclass(frozen=True)
class InputImage:
    """The volume to segment (HU) and where it came from."""

    image: sitk.Image
    kind: str  # "dicom" or "volume"
    source: Path
    datasets: list[Any] = field(default_factory=list)  # DICOM headers in slice order


def read_input(path: Path, min_slices: int = MIN_SLICES) -> InputImage:
    """A DICOM series folder or a volume file (NIfTI, NRRD, MHA) as an :class:`InputImage`."""
    path = Path(path)
    if path.is_dir():
        out = read_dicom_series(path, min_slices)
    elif path.is_file():
        if not path.name.lower().endswith(VOLUME_SUFFIXES):
            raise FedctError(f"{path}: expected a DICOM series folder or a NIfTI volume "
                             f"({', '.join(VOLUME_SUFFIXES)})")
        out = read_volume_file(path)
    else:
        raise FedctError(f"{path}: no such file or folder")
    n = out.image.GetSize()[2]
    if n < min_slices:
        raise FedctError(f"{path}: {n} slices, fewer than {min_slices} (not a 3D stack "
                         "the models can segment: the catalogue's min_slices rule)")
    return out


def read_volume_file(path: Path) -> InputImage:
    """A 3D volume file in HU. NIfTI carries no modality: CT is the caller's promise."""
    try:
        image = sitk.ReadImage(str(path), sitk.sitkFloat32)
    except RuntimeError as exc:
        raise FedctError(f"{path}: cannot read the volume "
                         f"({str(exc).strip().splitlines()[-1]})") from exc
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise FedctError(f"{path}: expected one 3D scalar volume, got "
                         f"{image.GetDimension()}D with "
                         f"{image.GetNumberOfComponentsPerPixel()} components")
    check_hounsfield(sitk.GetArrayViewFromImage(image), path)
    return InputImage(image, "volume", path)


# A label map has a handful of integer values; a CT in HU has thousands.
LABEL_MAP_MAX_VALUES = 64


def check_hounsfield(values: np.ndarray, path: Path) -> None:
    """Refuse a volume that cannot be CT in Hounsfield units (NIfTI has no modality).

    Every CT of a body holds fat (about -100 HU) and air (-1000 HU), so a volume without a
    negative value is not CT in HU: a label map passed by mistake (it would be segmented,
    and only flagged), or stored values saved without DICOM's rescale slope and intercept.
    """
    finite = values[np.isfinite(values)] if np.isnan(values).any() else values
    if finite.size == 0:
        raise FedctError(f"{path}: no finite voxel value (all NaN): not a CT volume")
    if float(finite.min()) < 0.0:
        return
    distinct = np.unique(finite)
    if distinct.size <= LABEL_MAP_MAX_VALUES and np.all(distinct == np.round(distinct)):
        what = (f"a label map, not CT ({distinct.size} integer values "
                f"{int(distinct[0])}-{int(distinct[-1])})")
    else:
        what = (f"not CT in Hounsfield units (values {float(distinct[0]):g} to "
                f"{float(distinct[-1]):g}: no fat or air, which are negative in HU; "
                "stored values without the rescale slope and intercept?)")
    raise FedctError(f"{path}: no voxel below 0: {what}; pass the CT volume in HU")


def _check_usable(folder: Path, headers: list, positions: np.ndarray) -> None:
    """The catalogue's usability rule for a series to segment: an axial stack of original
    or derived axial images (no localizer, no reformat), regularly spaced slices.

    A coronal reformat or a stack with alternating gaps would otherwise be resampled onto
    a grid it does not have, and its label map would land in the wrong place.
    """
    orient = orientation_class(headers[0].values.get("ImageOrientationPatient"))
    kind = image_type_class(headers[0].values.get("ImageType"))
    reasons = []
    if orient != "axial":
        reasons.append(f"{orient} slices" if orient != "unknown" else "unknown orientation")
    if kind in ("localizer", "reformat"):
        reasons.append("a localizer" if kind == "localizer" else "a derived reformat")
    gaps = np.diff(positions)
    if not spacing_regular(gaps.min(), gaps.max(), np.median(gaps)):
        reasons.append(f"irregular slice spacing ({gaps.min():.2f}-{gaps.max():.2f} mm)")
    if reasons:
        raise FedctError(f"{folder}: {'; '.join(reasons)}: not an axial 3D stack the models "
                         "can segment (the catalogue's usability rule); pass the original "
                         "axial series")


def _slice_order(headers: list) -> tuple[list[int], np.ndarray]:
    """Indices of ``headers`` sorted along the slice normal (ImagePositionPatient), and
    the sorted positions (mm)."""
    iop = parse_floats(headers[0].values.get("ImageOrientationPatient"), 6)
    normal = slice_normal(iop) if iop is not None else None
    if normal is None:
        raise FedctError(f"{headers[0].path}: no valid ImageOrientationPatient")
    where = []
    for h in headers:
        ipp = parse_floats(h.values.get("ImagePositionPatient"), 3)
        if ipp is None:
            raise FedctError(f"{h.path}: no ImagePositionPatient; cannot place the slice")
        where.append(float(np.dot(ipp, normal)))
    order = sorted(range(len(headers)), key=where.__getitem__)
    pos = np.array([where[i] for i in order])
    if np.any(np.diff(pos) < 1e-3):
        k = int(np.argmax(np.diff(pos) < 1e-3))
        raise FedctError(f"{headers[order[k + 1]].path}: same slice position as "
                         f"{Path(headers[order[k]].path).name} (duplicate slice)")
    return order, pos


def read_dicom_series(folder: Path, min_slices: int = MIN_SLICES) -> InputImage:
    """One CT series in ``folder`` (files at any depth), slices ordered along the normal."""
    import pydicom

    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    headers = read_headers([str(p) for p in files])
    images = []
    for p, h in zip(files, headers, strict=True):
        if h.reject in (DICOMDIR,):
            continue
        if h.reject == NOT_DICOM and p.suffix.lower() not in DICOM_SUFFIXES:
            continue  # a note or index next to the images
        if h.reject == NOT_CT:
            raise FedctError(f"{p}: {h.detail or 'not CT'}; fedct segments CT only")
        if h.reject is not None:
            raise FedctError(f"{p}: {h.reject} ({h.detail})" if h.detail else f"{p}: {h.reject}")
        images.append(h)
    if not images:
        raise FedctError(f"{folder}: no DICOM image files")
    series = {h.values.get("SeriesInstanceUID") for h in images}
    if len(series) > 1:
        raise FedctError(f"{folder}: holds {len(series)} series; pass one series folder")
    multi = [h for h in images if h.frame_positions is not None]
    if multi:
        raise FedctError(f"{multi[0].path}: multi-frame (enhanced) CT is not supported; "
                         "export the series as single-frame CT images")
    if len(images) < min_slices:
        # Checked here too so that reading a short series' pixels is skipped.
        raise FedctError(f"{folder}: {len(images)} slices, fewer than {min_slices} (not a "
                         "3D stack the models can segment: the catalogue's min_slices rule)")
    order, positions = _slice_order(images)
    _check_usable(folder, images, positions)
    paths = [Path(images[i].path) for i in order]
    image = read_volume(folder, [str(p.relative_to(folder)) for p in paths])
    datasets = []
    for p in paths:
        try:
            datasets.append(pydicom.dcmread(p, stop_before_pixels=True))
        except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on bad files
            raise FedctError(f"{p}: cannot read the header ({exc})") from exc
    return InputImage(image, "dicom", folder, datasets)
