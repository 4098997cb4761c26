"""Header reading: the three readers agree, every odd file gets the right reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedct import dicom
from tests.dicom.writers import FAKE_PATIENTS

EXPECTED_REJECT = {
    "ct": None, "rle": None, "implicit": None, "latin1": None, "sequence": None,
    "enhanced": None, "no_series_uid": dicom.MISSING_TAG, "sr": dicom.NOT_CT,
    "random": dicom.NOT_DICOM, "empty": dicom.NOT_DICOM, "text": dicom.NOT_DICOM,
    "trunc_pixels": dicom.TRUNCATED, "trunc_header": dicom.TRUNCATED,
    "trunc_rle": dicom.TRUNCATED, "dicomdir": dicom.DICOMDIR,
}


@pytest.mark.parametrize("engine", ["auto", "gdcm", "pydicom"])
def test_every_reader_gives_the_same_verdicts(odd_files: dict[str, Path], engine: str) -> None:
    names = list(EXPECTED_REJECT)
    headers = dicom.read_headers([str(odd_files[n]) for n in names], engine=engine)
    got = {n: h.reject for n, h in zip(names, headers, strict=True)}
    assert got == EXPECTED_REJECT
    by_name = dict(zip(names, headers, strict=True))
    assert by_name["no_series_uid"].detail == "missing SeriesInstanceUID"
    assert by_name["sr"].detail == "Modality SR"
    for name, h in by_name.items():
        if h.reject is not None:
            assert h.values == {}, f"{name}: a rejected file must carry no values"
            assert str(odd_files[name]) not in h.detail


def test_values_agree_between_readers(odd_files: dict[str, Path]) -> None:
    names = ["ct", "rle", "implicit", "latin1", "sequence", "enhanced"]
    paths = [str(odd_files[n]) for n in names]
    runs = {e: dicom.read_headers(paths, engine=e) for e in ("auto", "gdcm", "pydicom")}
    for i, name in enumerate(names):
        ref = runs["pydicom"][i].values
        for engine in ("auto", "gdcm"):
            vals = runs[engine][i].values
            for kw in ("SOPInstanceUID", "SeriesInstanceUID", "Modality", "Manufacturer",
                       "InstitutionName", "ConvolutionKernel", "Rows", "Columns",
                       "TransferSyntaxUID"):
                assert vals.get(kw) == ref.get(kw), (name, engine, kw)
            for kw in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
                       "SliceThickness"):
                assert dicom.parse_floats(vals.get(kw), len(ref[kw].split("\\"))) == \
                    dicom.parse_floats(ref.get(kw), len(ref[kw].split("\\"))), (name, kw)


def test_enhanced_ct_geometry_comes_from_functional_groups(odd_files: dict[str, Path]) -> None:
    h = dicom.read_headers([str(odd_files["enhanced"])])[0]
    assert h.ok and h.reader == "pydicom"
    assert h.values["NumberOfFrames"] == "5"
    assert h.values["ConvolutionKernel"] == "FC13"
    assert h.values["PixelSpacing"] == "0.7\\0.7"
    assert dicom.orientation_class(h.values["ImageOrientationPatient"]) == "axial"
    assert h.frame_positions is not None and len(h.frame_positions) == 5
    assert [p[2] for p in h.frame_positions] == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_phi_is_read_only_for_the_path_check(odd_files: dict[str, Path]) -> None:
    # The name and birth date are read so that the catalogue can count paths that spell
    # them out (tests/catalogue/test_index.py: never stored); the accession number never.
    h = dicom.read_headers([str(odd_files["ct"])])[0]
    assert FAKE_PATIENTS[0]["accession"] not in repr(h.values)
    assert "AccessionNumber" not in dicom.SCAN_TAGS
    assert {"PatientName", "PatientBirthDate"} <= set(dicom.SCAN_TAGS)


def test_unreadable_file_is_rejected_not_raised(tmp_path: Path) -> None:
    missing = tmp_path / "gone.dcm"
    headers = dicom.read_headers([str(missing), str(tmp_path)], sizes=[10, 10])
    assert [h.reject for h in headers] == [dicom.UNREADABLE, dicom.UNREADABLE]
