"""Header reading: the three readers agree, every odd file gets the right reason.

Also holds the tiny-DICOM writers the catalogue tests reuse (8x8 CT slices with fake
identifiers; a file is ~1 KB, so hundreds take well under a second).
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    CTImageStorage,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    XRayRadiationDoseSRStorage,
    generate_uid,
)

from fedct import dicom

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)

# Fake identifiers: none of these strings may ever reach a catalogue output.
FAKE_PATIENTS = (
    {"name": "Fakename^Testpatient", "id": "FAKEID-90210", "birth": "19010203",
     "accession": "ACCFAKE777"},
    {"name": "Otherfake^Person", "id": "FAKEID-31337", "birth": "19020304",
     "accession": "ACCFAKE888"},
    {"name": "Thirdfake^Human", "id": "FAKEID-42424", "birth": "19030405",
     "accession": "ACCFAKE999"},
)


def ct_slice(*, study_uid: str, series_uid: str, z: float = 0.0,
             iop: Sequence[float] = AXIAL, ipp: Sequence[float] | None = None,
             rows: int = 8, cols: int = 8, pixel_spacing: float = 0.7,
             thickness: float = 1.0, manufacturer: str = "TOSHIBA",
             model: str = "Aquilion ONE", kernel: str | Sequence[str] = "FC13",
             image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
             institution: str = "Hospital A", patient: dict | None = None,
             modality: str = "CT", series_number: int = 2, instance: int = 1,
             sop_uid: str | None = None) -> Dataset:
    """One small CT slice with fake identifiers (file meta included)."""
    patient = patient or FAKE_PATIENTS[0]
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.StudyDate = "20190304"
    ds.Modality = modality
    ds.Manufacturer = manufacturer
    ds.ManufacturerModelName = model
    ds.InstitutionName = institution
    ds.ImageType = list(image_type)
    ds.PatientName = patient["name"]
    ds.PatientID = patient["id"]
    ds.PatientBirthDate = patient["birth"]
    ds.AccessionNumber = patient["accession"]
    ds.BodyPartExamined = "PELVIS"
    ds.SliceThickness = f"{thickness:g}"
    ds.KVP = "120"
    ds.Exposure = 150
    ds.ConvolutionKernel = list(kernel) if not isinstance(kernel, str) else kernel
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = list(ipp) if ipp is not None else [-2.8, -2.8, z]
    ds.ImageOrientationPatient = list(iop)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.PixelSpacing = [pixel_spacing, pixel_spacing]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept, ds.RescaleSlope = "0", "1"
    ds.PixelData = (np.arange(rows * cols, dtype=np.int16).reshape(rows, cols)).tobytes()
    return with_file_meta(ds)


def with_file_meta(ds: Dataset) -> Dataset:
    """Give a hand-made dataset the file meta of an explicit VR little endian file."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def write(ds: Dataset, path: Path, compress: bool = False, implicit: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        ds.compress(RLELossless, encoding_plugin="pydicom", generate_instance_uid=False)
    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


def write_series(folder: Path, n: int, *, dz: float = 1.0, z0: float = 0.0,
                 positions: Sequence[float] | None = None,
                 ipps: Sequence[Sequence[float]] | None = None, compress: bool = False,
                 study_uid: str | None = None, series_uid: str | None = None,
                 **kw) -> list[Path]:
    """``n`` slices of one series in ``folder`` (IM00001.dcm, ...); returns the paths.

    Positions: ``z0 + k * dz`` along z, or ``positions`` (z), or full ``ipps``.
    """
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    if ipps is None:
        zs = list(positions) if positions is not None else [z0 + k * dz for k in range(n)]
        ipps = [(-2.8, -2.8, z) for z in zs]
    paths = []
    for k, ipp in enumerate(ipps):
        ds = ct_slice(study_uid=study_uid, series_uid=series_uid, ipp=ipp, instance=k + 1,
                      **kw)
        paths.append(write(ds, folder / f"IM{k + 1:05d}.dcm", compress=compress))
    return paths


def write_enhanced_ct(path: Path, n_frames: int, *, study_uid: str | None = None,
                      patient: dict | None = None, kernel: str = "FC13") -> Path:
    """An Enhanced CT (multi-frame) image: geometry in functional groups."""
    patient = patient or FAKE_PATIENTS[0]
    ds = Dataset()
    ds.SOPClassUID = EnhancedCTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyDate = "20200506"
    ds.Modality = "CT"
    ds.Manufacturer = "CANON_MEC"
    ds.ManufacturerModelName = "Aquilion ONE"
    ds.InstitutionName = "Hospital B"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.PatientName = patient["name"]
    ds.PatientID = patient["id"]
    ds.PatientBirthDate = patient["birth"]
    ds.AccessionNumber = patient["accession"]
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 3
    ds.NumberOfFrames = n_frames
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1
    shared = Dataset()
    orientation = Dataset()
    orientation.ImageOrientationPatient = list(AXIAL)
    shared.PlaneOrientationSequence = DicomSequence([orientation])
    measures = Dataset()
    measures.PixelSpacing = [0.7, 0.7]
    measures.SliceThickness = "1"
    shared.PixelMeasuresSequence = DicomSequence([measures])
    recon = Dataset()
    recon.ConvolutionKernel = kernel
    shared.CTReconstructionSequence = DicomSequence([recon])
    xray = Dataset()
    xray.KVP = "120"
    shared.CTXRayDetailsSequence = DicomSequence([xray])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    frames = []
    for k in range(n_frames):
        frame = Dataset()
        position = Dataset()
        position.ImagePositionPatient = [-2.8, -2.8, float(k)]
        frame.PlanePositionSequence = DicomSequence([position])
        frames.append(frame)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
    ds.PixelData = np.zeros((n_frames, 8, 8), dtype=np.int16).tobytes()
    return write(with_file_meta(ds), path)


def write_dose_sr(path: Path, study_uid: str | None = None) -> Path:
    ds = Dataset()
    ds.SOPClassUID = XRayRadiationDoseSRStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.PatientName = FAKE_PATIENTS[0]["name"]
    ds.PatientID = FAKE_PATIENTS[0]["id"]
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    return write(with_file_meta(ds), path)


def truncate_copy(src: Path, dst: Path, n_bytes: int) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(src.read_bytes()[:n_bytes])
    return dst


def copy_testdata(dst: Path) -> list[Path]:
    """pydicom's bundled test files (files only), keeping their relative layout."""
    root = Path(pydicom.data.__file__).parent / "test_files"
    out = []
    for f in get_testdata_files():
        p = Path(f)
        if not p.is_file():
            continue
        try:
            rel = p.relative_to(root)
        except ValueError:  # a cached download outside test_files
            rel = Path("external") / p.name
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, target)
        out.append(target)
    return out


# ---------------------------------------------------------------- normalisation


@pytest.mark.parametrize(("raw", "expected"), [
    ("TOSHIBA", "CANON"), ("TOSHIBA_MEC", "CANON"), ("CANON_MEC", "CANON"),
    ("Canon Medical Systems", "CANON"), ("GE MEDICAL SYSTEMS", "GE"),
    ("GE Healthcare", "GE"), ("GE", "GE"), ("Philips", "PHILIPS"),
    ("Philips Medical Systems", "PHILIPS"), ("SIEMENS", "SIEMENS"),
    ("Siemens Healthineers", "SIEMENS"), ("  Hitachi  Medical ", "HITACHI MEDICAL"),
    ("", "UNKNOWN"), (None, "UNKNOWN"), ("GENERIC", "GENERIC"),
])
def test_vendor_normalisation(raw: str | None, expected: str) -> None:
    assert dicom.vendor(raw) == expected


def _tilted(deg: float) -> tuple[float, ...]:
    """Axial plane tilted about the x axis (a gantry tilt)."""
    t = np.radians(deg)
    return (1.0, 0.0, 0.0, 0.0, float(np.cos(t)), float(np.sin(t)))


@pytest.mark.parametrize(("iop", "expected"), [
    (AXIAL, "axial"), (CORONAL, "coronal"), (SAGITTAL, "sagittal"),
    (_tilted(5), "axial"), (_tilted(30), "oblique"), (_tilted(80), "coronal"),
    ("1\\0\\0\\0\\1\\0", "axial"), ("garbage", "unknown"), (None, "unknown"),
    ((1, 0, 0, 1, 0, 0), "unknown"),  # degenerate: row == column
])
def test_orientation_classes(iop: object, expected: str) -> None:
    assert dicom.orientation_class(iop) == expected  # type: ignore[arg-type]


def test_orientation_tolerance_is_a_parameter() -> None:
    assert dicom.orientation_class(_tilted(12)) == "oblique"
    assert dicom.orientation_class(_tilted(12), tolerance_deg=15) == "axial"


@pytest.mark.parametrize(("image_type", "expected"), [
    ("ORIGINAL\\PRIMARY\\AXIAL", "original"), ("ORIGINAL\\PRIMARY\\LOCALIZER", "localizer"),
    ("DERIVED\\SECONDARY\\REFORMATTED", "reformat"), ("DERIVED\\SECONDARY\\AXIAL", "derived"),
    ("ORIGINAL\\PRIMARY\\TOPOGRAM", "localizer"), ("DERIVED\\SECONDARY\\MPR", "reformat"),
    (None, "unknown"),
])
def test_image_type_class(image_type: str | None, expected: str) -> None:
    assert dicom.image_type_class(image_type) == expected


@pytest.mark.parametrize(("vendor", "kernel", "expected"), [
    ("CANON", "FC13", "soft"), ("CANON", "FC30", "sharp"), ("CANON", "FC03", "soft"),
    ("SIEMENS", "Br40\\3", "soft"), ("SIEMENS", "Bf37", "soft"), ("SIEMENS", "Br64\\3", "sharp"),
    ("GE", "STANDARD", "soft"), ("GE", "BONE", "sharp"), ("GE", "SOFT", "soft"),
    ("PHILIPS", "B", "soft"), ("PHILIPS", "C", "soft"), ("PHILIPS", "YB", "sharp"),
    ("HITACHI", "X1", "unknown"), ("GE", None, "unknown"),
])
def test_kernel_class(vendor: str, kernel: str | None, expected: str) -> None:
    assert dicom.kernel_class(vendor, kernel) == expected


# ---------------------------------------------------------------- reading


@pytest.fixture(scope="module")
def odd_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One file per case the reader must tell apart."""
    d = tmp_path_factory.mktemp("odd")
    study = generate_uid()
    files: dict[str, Path] = {}
    files["ct"] = write(ct_slice(study_uid=study, series_uid=generate_uid()), d / "ct.dcm")
    files["rle"] = write(ct_slice(study_uid=study, series_uid=generate_uid()), d / "rle.dcm",
                         compress=True)
    files["implicit"] = write(ct_slice(study_uid=study, series_uid=generate_uid()),
                              d / "implicit.dcm", implicit=True)
    latin = ct_slice(study_uid=study, series_uid=generate_uid(), institution="Hôpital Sud")
    files["latin1"] = write(latin, d / "latin1.dcm")
    with_sq = ct_slice(study_uid=study, series_uid=generate_uid())
    ref = Dataset()
    ref.ReferencedSOPClassUID = CTImageStorage
    ref.ReferencedSOPInstanceUID = generate_uid()
    inner = Dataset()
    inner.CodeValue = "1"
    ref.PurposeOfReferenceCodeSequence = DicomSequence([inner])
    with_sq.ReferencedImageSequence = DicomSequence([ref, ref])
    with_sq.ReferencedImageSequence.is_undefined_length = True
    with_sq.add_new((0x0029, 0x0010), "LO", "PRIVATE CREATOR")
    with_sq.add_new((0x0029, 0x1010), "OB", b"\x00" * 3000)  # a long private blob
    files["sequence"] = write(with_sq, d / "sequence.dcm")
    no_series = ct_slice(study_uid=study, series_uid=generate_uid())
    del no_series.SeriesInstanceUID
    files["no_series_uid"] = write(no_series, d / "no_series_uid.dcm")
    files["enhanced"] = write_enhanced_ct(d / "enhanced.dcm", 5, study_uid=study)
    files["sr"] = write_dose_sr(d / "sr.dcm", study)
    files["random"] = d / "random.dcm"
    files["random"].write_bytes(np.random.default_rng(0).integers(0, 256, 2048,
                                                                  dtype=np.uint8).tobytes())
    files["empty"] = d / "empty.dcm"
    files["empty"].write_bytes(b"")
    files["text"] = d / "notes.txt"
    files["text"].write_text("transfer log\n")
    size = files["ct"].stat().st_size
    files["trunc_pixels"] = truncate_copy(files["ct"], d / "trunc_pixels.dcm", size - 30)
    files["trunc_header"] = truncate_copy(files["ct"], d / "trunc_header.dcm", 200)
    files["trunc_rle"] = truncate_copy(files["rle"], d / "trunc_rle.dcm",
                                       files["rle"].stat().st_size - 5)
    files["dicomdir"] = d / "DICOMDIR"
    shutil.copyfile(get_testdata_file("DICOMDIR"), files["dicomdir"])
    return files


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


def test_fast_path_reads_common_files_without_fallback(odd_files: dict[str, Path]) -> None:
    names = ["ct", "rle", "implicit", "latin1", "sequence"]
    headers = dicom.read_headers([str(odd_files[n]) for n in names])
    assert [h.reader for h in headers] == ["walk"] * len(names)
    assert headers[1].values["TransferSyntaxUID"] == RLELossless
    assert headers[3].values["InstitutionName"] == "Hôpital Sud"
    # Values after the undefined-length sequence and the long private blob are read.
    assert headers[4].values["Rows"] == "8"
    assert headers[4].values["PixelSpacing"] == "0.7\\0.7"


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


def test_phi_is_never_read(odd_files: dict[str, Path]) -> None:
    h = dicom.read_headers([str(odd_files["ct"])])[0]
    text = repr(h.values)
    for fake in (FAKE_PATIENTS[0]["name"], FAKE_PATIENTS[0]["birth"],
                 FAKE_PATIENTS[0]["accession"]):
        assert fake not in text
    assert "PatientName" not in dicom.SCAN_TAGS and "AccessionNumber" not in dicom.SCAN_TAGS


def test_every_cut_of_a_file_is_rejected(odd_files: dict[str, Path], tmp_path: Path) -> None:
    """A file cut anywhere is never catalogued as a good image."""
    for src in (odd_files["ct"], odd_files["rle"]):
        data = src.read_bytes()
        cuts = sorted(set(range(0, len(data), 23)) | {len(data) - 1, len(data) - 2, 140})
        paths = []
        for cut in cuts:
            p = tmp_path / f"{src.stem}_{cut:05d}.dcm"
            p.write_bytes(data[:cut])
            paths.append(str(p))
        for engine in ("auto", "gdcm"):
            headers = dicom.read_headers(paths, engine=engine)
            good = [p for p, h in zip(paths, headers, strict=True) if h.ok]
            assert good == [], (engine, good[:3])
            assert {h.reject for h in headers} <= {dicom.TRUNCATED, dicom.NOT_DICOM,
                                                  dicom.MISSING_TAG}
            # Cut inside the pixel data: exactly "truncated".
            assert headers[-1].reject == dicom.TRUNCATED


def test_walk_declines_what_it_cannot_read_exactly(tmp_path: Path) -> None:
    big = get_testdata_file("ExplVR_BigEnd.dcm")
    no_preamble = get_testdata_file("ExplVR_LitEndNoMeta.dcm")
    deflated = get_testdata_file("image_dfl.dcm")
    for f in (big, no_preamble, deflated):
        with pytest.raises(dicom.WalkDeclined):
            dicom.walk_header(f)
    headers = dicom.read_headers([big, no_preamble, deflated])
    assert all(h.reader != "walk" for h in headers)
    assert all(h.reject == dicom.NOT_CT for h in headers)  # all three are not CT


def test_walk_matches_pydicom_on_pydicom_test_files() -> None:
    """Differential test: wherever the walk reads a file, its values are pydicom's."""
    n_walked = 0
    for f in get_testdata_files():
        if not os.path.isfile(f):
            continue
        try:
            values, _ = dicom.walk_header(f)
        except dicom.WalkDeclined:
            continue
        if dicom.PARTIAL in values:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref, rejected, _ = dicom._pydicom_values(f)
        if ref is None:
            continue
        n_walked += 1
        for kw in dicom.SCAN_TAGS:
            a, b = values.get(kw), ref.get(kw)
            if a != b:
                # Numbers may be formatted differently ("1" vs "1.0"), not differ.
                assert a is not None and b is not None, (f, kw, a, b)
                assert [float(x) for x in a.split("\\")] == \
                    [float(x) for x in b.split("\\")], (f, kw, a, b)
    assert n_walked > 100


def test_unreadable_file_is_rejected_not_raised(tmp_path: Path) -> None:
    missing = tmp_path / "gone.dcm"
    headers = dicom.read_headers([str(missing), str(tmp_path)], sizes=[10, 10])
    assert [h.reject for h in headers] == [dicom.UNREADABLE, dicom.UNREADABLE]
