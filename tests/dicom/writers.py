"""Tiny DICOM writers for the tests: 8x8 CT slices with fake identifiers, enhanced CT,
dose SR, cut files, pydicom's own test files.

A file is ~1 KB, so hundreds take well under a second. The catalogue's and the cohort's
tests build their archives with these too.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_files
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    XRayRadiationDoseSRStorage,
    generate_uid,
)

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


def write(ds: Dataset, path: Path, compress: bool = False, implicit: bool = False,
          deflate: bool = False) -> Path:
    """Save ``ds`` as explicit VR little endian, or RLE-compressed, implicit VR or deflated
    (Deflated Explicit VR Little Endian: the whole data set zlib-deflated by pydicom)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        ds.compress(RLELossless, encoding_plugin="pydicom", generate_instance_uid=False)
    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    if deflate:
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


def write_series(folder: Path, n: int, *, dz: float = 1.0, z0: float = 0.0,
                 positions: Sequence[float] | None = None,
                 ipps: Sequence[Sequence[float]] | None = None, compress: bool = False,
                 deflate: bool = False, study_uid: str | None = None,
                 series_uid: str | None = None, **kw) -> list[Path]:
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
        paths.append(write(ds, folder / f"IM{k + 1:05d}.dcm", compress=compress,
                           deflate=deflate))
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


def write_deflate_bomb(path: Path, inflated_bytes: int, *, rows: int = 8, cols: int = 8,
                       **kw) -> Path:
    """A Deflated Explicit VR Little Endian CT file whose Pixel Data inflates to
    ``inflated_bytes`` zero bytes while its header claims ``rows`` x ``cols``.

    The compressor is fed 1 MiB at a time, so writing a 1 GiB bomb keeps this process
    small; the file is about 1/1000 of the inflated size.
    """
    import zlib

    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info

    ds = ct_slice(study_uid=kw.pop("study_uid", None) or generate_uid(),
                  series_uid=kw.pop("series_uid", None) or generate_uid(),
                  rows=rows, cols=cols, **kw)
    del ds.PixelData
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    head = DicomBytesIO()
    head.is_little_endian, head.is_implicit_VR = True, False
    write_dataset(head, ds)
    inflated_bytes += inflated_bytes & 1
    # (7FE0,0010) OW, explicit VR little endian: tag, VR, 2 reserved bytes, 32-bit length.
    pixel_header = b"\xe0\x7f\x10\x00OW\x00\x00" + inflated_bytes.to_bytes(4, "little")
    meta = DicomBytesIO()
    meta.is_little_endian, meta.is_implicit_VR = True, False
    write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros = bytes(1 << 20)
    with open(path, "wb") as fh:
        fh.write(b"\x00" * 128 + b"DICM" + meta.getvalue())
        fh.write(deflater.compress(head.getvalue() + pixel_header))
        left = inflated_bytes
        while left:
            n = min(left, len(zeros))
            fh.write(deflater.compress(zeros[:n]))
            left -= n
        fh.write(deflater.flush())
    return path
