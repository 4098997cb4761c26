"""Series to volume: the files of one DICOM series as a single 3D SimpleITK image."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import SimpleITK as sitk

from fedct.errors import FedctError


def read_volume(archive: Path, relpaths: Sequence[str]) -> sitk.Image:
    """A series as one 3D image (float32 HU, LPS, spacing in mm), slices in the given order.

    ``relpaths`` are the series' files relative to ``archive``, ordered along the slice
    normal (as the catalogue's ``series_files.parquet`` lists them). Raises FedctError
    naming the series folder when SimpleITK cannot read the files.
    """
    archive = Path(archive)
    if not relpaths:
        raise FedctError(f"series under {archive}: no files to read")
    folder = archive / Path(relpaths[0]).parent
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(archive / p) for p in relpaths])
    reader.SetOutputPixelType(sitk.sitkFloat32)
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise FedctError(f"series in {folder}: "
                         f"SimpleITK could not read it ({str(exc).splitlines()[-1]})") from exc
