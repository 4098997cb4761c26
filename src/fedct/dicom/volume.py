"""Series to volume: the files of one DICOM series as a single 3D SimpleITK image."""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import SimpleITK as sitk

from fedct.errors import FedctError, Rejected

# Voxels of one volume read (float32: 4 GiB): a CT of 512 x 512 x 4096 slices fits; a
# header that asks for more is refused before any pixel is read.
MAX_VOXELS = 1 << 30


def read_volume(archive: Path, relpaths: Sequence[str]) -> sitk.Image:
    """A series as one 3D image (float32 HU, LPS, spacing in mm), slices in the given order.

    ``relpaths`` are the series' files relative to ``archive``, ordered along the slice
    normal (as the catalogue's ``series_files.parquet`` lists them); a name that is not
    UTF-8 comes surrogate-escaped (``os.fsdecode``). Raises :class:`~fedct.errors.Rejected`
    naming the series folder when the volume would exceed ``MAX_VOXELS``, SimpleITK
    cannot read the files, or the voxel spacing is not finite and positive.
    """
    archive = Path(archive)
    if not relpaths:
        raise FedctError(f"series under {archive}: no files to read")
    folder = f"series in {archive / Path(relpaths[0]).parent}"
    with _readable_names([os.path.join(archive, p) for p in relpaths]) as names:
        try:
            info = sitk.ImageFileReader()
            info.SetFileName(names[0])
            info.ReadImageInformation()
            size = info.GetSize()
        except RuntimeError as exc:
            raise Rejected(folder, "SimpleITK cannot read its first file") from exc
        n_voxels = math.prod(size[:2]) * len(names) * (size[2] if len(size) > 2 else 1)
        if n_voxels > MAX_VOXELS:
            raise Rejected(folder, f"{size[0]} x {size[1]} x {len(names)} voxels, more than "
                                   f"{MAX_VOXELS} (a header no CT has)")
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(names)
        reader.SetOutputPixelType(sitk.sitkFloat32)
        try:
            image = reader.Execute()
        except RuntimeError as exc:
            raise Rejected(folder, "SimpleITK could not read it") from exc
    spacing = image.GetSpacing()
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise Rejected(folder, "voxel spacing is not finite and positive (" +
                       " x ".join(f"{s:g}" for s in spacing) + " mm)")
    return image


@contextlib.contextmanager
def _readable_names(paths: list[str]) -> Iterator[list[str]]:
    """``paths`` as names SimpleITK can open: itself where all are UTF-8, else symbolic
    links with plain names (in a temporary folder) to the very same files.

    SimpleITK takes UTF-8 text; a file name with bytes that are not UTF-8 (kept exact,
    surrogate-escaped) cannot pass, but a link to it can.
    """
    try:
        for p in paths:
            p.encode("utf-8")
    except UnicodeEncodeError:
        pass
    else:
        yield paths
        return
    with tempfile.TemporaryDirectory(prefix="fedct-series-") as tmp:
        links = []
        for i, p in enumerate(paths):
            link = os.path.join(tmp, f"{i:06d}.dcm")
            os.symlink(os.path.abspath(p), link)
            links.append(link)
        yield links
