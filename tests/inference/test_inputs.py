"""Reading the image to segment: a DICOM series in slice order, a NIfTI volume, and one
clear error per bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from fedct.errors import FedctError
from fedct.inference.inputs import check_hounsfield, read_input
from tests.dicom.writers import truncate_copy
from tests.inference.conftest import N_SLICES, SLICE_MM, phantom, write_series


def test_dicom_series_is_read_in_slice_order_in_hu(dicom_series: Path) -> None:
    inp = read_input(dicom_series)
    assert inp.kind == "dicom" and inp.image.GetSize() == (16, 16, N_SLICES)
    assert inp.image.GetOrigin()[2] == pytest.approx(100.0)  # the lowest slice first
    assert inp.image.GetSpacing()[2] == pytest.approx(SLICE_MM)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(inp.image), phantom())
    z = [float(ds.ImagePositionPatient[2]) for ds in inp.datasets]
    assert z == sorted(z) and len(z) == N_SLICES
    assert all("PixelData" not in ds for ds in inp.datasets)  # headers only


def test_nifti_volume_keeps_its_geometry(nifti_volume: Path) -> None:
    inp = read_input(nifti_volume)
    ref = sitk.ReadImage(str(nifti_volume))
    assert inp.kind == "volume" and inp.datasets == []
    assert inp.image.GetSize() == ref.GetSize()
    np.testing.assert_allclose(inp.image.GetDirection(), ref.GetDirection())
    np.testing.assert_allclose(inp.image.GetOrigin(), ref.GetOrigin())


def test_non_ct_series_is_refused_naming_a_file(tmp_path: Path) -> None:
    write_series(tmp_path / "MR", modality="MR")
    with pytest.raises(FedctError, match=r"IM\d+\.dcm: Modality MR; fedct segments CT only"):
        read_input(tmp_path / "MR")


def test_short_series_is_refused(tmp_path: Path) -> None:
    write_series(tmp_path / "thick", n_slices=31)
    with pytest.raises(FedctError, match="thick: 31 slices, fewer than 32"):
        read_input(tmp_path / "thick")


def test_short_nifti_is_refused(tmp_path: Path) -> None:
    image = sitk.GetImageFromArray(phantom(20).astype(np.float32))
    sitk.WriteImage(image, str(tmp_path / "short.nii.gz"))
    with pytest.raises(FedctError, match="short.nii.gz: 20 slices, fewer than 32"):
        read_input(tmp_path / "short.nii.gz")


def test_corrupt_file_is_named(dicom_series: Path, tmp_path: Path) -> None:
    folder = tmp_path / "cut"
    shutil.copytree(dicom_series, folder)
    victim = folder / "IM00007.dcm"
    truncate_copy(victim, victim, victim.stat().st_size - 40)
    with pytest.raises(FedctError, match=r"IM00007\.dcm: truncated"):
        read_input(folder)


def test_unreadable_nifti_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "junk.nii.gz"
    bad.write_bytes(b"not an image at all" * 10)
    with pytest.raises(FedctError, match="junk.nii.gz: cannot read the volume"):
        read_input(bad)


def test_folder_without_dicom(tmp_path: Path) -> None:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("export log\n")
    with pytest.raises(FedctError, match="notes: no DICOM image files"):
        read_input(tmp_path / "notes")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FedctError, match="empty: no DICOM image files"):
        read_input(tmp_path / "empty")


def test_folder_with_two_series(tmp_path: Path) -> None:
    write_series(tmp_path / "two" / "a")
    write_series(tmp_path / "two" / "b")
    with pytest.raises(FedctError, match="two: holds 2 series"):
        read_input(tmp_path / "two")


def test_other_files_and_missing_paths(tmp_path: Path) -> None:
    (tmp_path / "scan.png").write_bytes(b"png")
    with pytest.raises(FedctError, match="scan.png: expected a DICOM series folder or a NIfTI"):
        read_input(tmp_path / "scan.png")
    with pytest.raises(FedctError, match="nothing: no such file or folder"):
        read_input(tmp_path / "nothing")


def _edit(folder: Path, change) -> None:
    import pydicom

    for k, path in enumerate(sorted(folder.glob("*.dcm"), key=lambda p: -int(p.stem[2:]))):
        ds = pydicom.dcmread(path)
        change(ds, k)
        ds.save_as(path)


def test_a_coronal_reformat_is_refused_as_the_catalogue_refuses_it(tmp_path: Path) -> None:
    write_series(tmp_path / "MPR")

    def coronal(ds, k):
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # rows along x, columns along -z
        ds.ImagePositionPatient = [-7.5, -7.5 + 2.0 * k, 100.0]  # stacked along y
        ds.ImageType = ["DERIVED", "SECONDARY", "MPR"]

    _edit(tmp_path / "MPR", coronal)
    with pytest.raises(FedctError, match=r"MPR: coronal slices; a derived reformat: not an "
                                         r"axial 3D stack"):
        read_input(tmp_path / "MPR")


def test_irregular_slice_spacing_is_refused(tmp_path: Path) -> None:
    write_series(tmp_path / "gaps")
    # Alternating 2 mm and 3 mm gaps: one grid spacing would misplace half the slices.
    _edit(tmp_path / "gaps", lambda ds, k: setattr(
        ds, "ImagePositionPatient", [-7.5, -7.5, 100.0 + 2.5 * k + 0.5 * (k % 2)]))
    with pytest.raises(FedctError, match=r"gaps: irregular slice spacing \(2.00-3.00 mm\)"):
        read_input(tmp_path / "gaps")


def test_derived_axial_images_are_still_segmented(tmp_path: Path) -> None:
    # The catalogue keeps derived axial recons (e.g. from volume data); so does predict.
    write_series(tmp_path / "recon")
    _edit(tmp_path / "recon", lambda ds, k: setattr(ds, "ImageType",
                                                    ["DERIVED", "SECONDARY", "AXIAL"]))
    assert read_input(tmp_path / "recon").image.GetSize() == (16, 16, N_SLICES)


def test_a_label_map_passed_as_ct_is_refused(tmp_path: Path) -> None:
    # The label map of the phantom: 0 air, 1 body, 2 bone (NIfTI has no modality to check).
    hu = phantom()
    labels = np.where(hu == 700, 2, np.where(hu == 40, 1, 0)).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(labels), str(tmp_path / "seg.nii.gz"))
    with pytest.raises(FedctError, match=r"seg.nii.gz: no voxel below 0: a label map, not CT "
                                         r"\(3 integer values 0-2\)"):
        read_input(tmp_path / "seg.nii.gz")


def test_stored_values_without_the_rescale_are_refused(tmp_path: Path) -> None:
    # CT saved as its stored values (HU + 1024): thousands of values, none negative.
    rng = np.random.default_rng(0)
    raw = (phantom() + 1024 + rng.integers(0, 200, phantom().shape)).astype(np.uint16)
    sitk.WriteImage(sitk.GetImageFromArray(raw), str(tmp_path / "raw.nii.gz"))
    with pytest.raises(FedctError, match="raw.nii.gz: no voxel below 0: not CT in Hounsfield"):
        read_input(tmp_path / "raw.nii.gz")


def test_a_volume_in_hu_with_fat_is_accepted(tmp_path: Path) -> None:
    # A tight field of view inside the body: no air, but fat is negative in HU.
    vol = phantom().astype(np.float32)
    vol[vol == -1000] = -100
    sitk.WriteImage(sitk.GetImageFromArray(vol), str(tmp_path / "body.nii.gz"))
    assert read_input(tmp_path / "body.nii.gz").image.GetSize()[2] == vol.shape[0]


def test_nan_outside_the_field_of_view_is_not_a_reason_to_refuse(tmp_path: Path) -> None:
    vol = phantom().astype(np.float32)
    vol[:, :2, :2] = np.nan  # outside the reconstruction circle
    sitk.WriteImage(sitk.GetImageFromArray(vol), str(tmp_path / "nan.nii.gz"))
    assert read_input(tmp_path / "nan.nii.gz").kind == "volume"
    with pytest.raises(FedctError, match=r"empty.nii.gz: no finite voxel value"):
        check_hounsfield(np.full_like(vol, np.nan), tmp_path / "empty.nii.gz")
