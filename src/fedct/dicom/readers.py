"""Header scanning for the catalogue: read only headers (never pixel data) of many
files fast, and say why a file cannot be catalogued.

Three readers, fastest first; each one declines what it cannot read exactly and the
next one takes over. None of them decodes pixel data.

1. ``walk``: a strict walk over the top-level data elements in Python (explicit or
   implicit VR little endian, the syntaxes of nearly every archived CT file,
   compressed ones included). It reads the first few KB of a file, jumps over values
   and sequences it does not need and stops after the last wanted tag. Measured
   (benchmarks/catalogue.py, CPU time per file of a ~200-element CT header): the
   whole scan ~230 us, python-gdcm's Scanner alone ~640 us (about 3 us per
   element), pydicom ``stop_before_pixels`` ~1200 us.
2. ``gdcm``: python-gdcm's ``gdcm.Scanner`` over the files the walk declined
   (big endian, deflated, no preamble, an unknown VR, ...).
3. ``pydicom``: what the scanner cannot read or express (enhanced multi-frame
   images keep their geometry in functional-group sequences), and the slow, exact
   checks (truncation) of files that look wrong.

0. ``batch`` (:mod:`fedct.dicom.batch`): the same walk over a whole chunk of files at
   once in numpy, for the plain files (whole single-frame CT images, ASCII values); what
   it does not vouch for goes through 1-3. ``read_columns`` starts there.

``engine`` selects where to start: "auto" (batch, then walk), "walk", "gdcm" or "pydicom".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from fedct.dicom.batch import read_batch
from fedct.dicom.files import (
    exc_detail,
    file_size,
    has_dicm_magic,
    not_dicom_detail,
    quiet_pydicom,
)
from fedct.dicom.integrity import integrity, pixel_data_complete
from fedct.dicom.pydicom_reader import enhanced_geometry, pydicom_values
from fedct.dicom.scanner import scan_gdcm
from fedct.dicom.tags import (
    DICOMDIR,
    ENHANCED_CT_IMAGE_STORAGE,
    IMPLAUSIBLE,
    MEDIA_STORAGE_DIRECTORY,
    MISSING_TAG,
    NOT_CT,
    NOT_DICOM,
    REQUIRED,
    SCAN_TAGS,
    UNREADABLE,
    Header,
)
from fedct.dicom.values import implausible, parse_int
from fedct.dicom.walk import PARTIAL, WalkDeclined, walk_header

Engine = str  # "auto" | "walk" | "gdcm" | "pydicom"
ENGINES = ("auto", "walk", "gdcm", "pydicom")


@dataclass
class Columns:
    """``read_headers``' answer for many files as columns, file ``i`` at index ``i``:
    ``values[kw][i]`` for every keyword of ``SCAN_TAGS`` (None: absent, or rejected), and
    the fields of ``Header`` (reader, reject, detail, frame_positions, frames_consistent)."""

    values: dict[str, list[str | None]]
    reader: list[str]
    reject: list[str | None]
    detail: list[str]
    frame_positions: list[tuple[tuple[float, float, float], ...] | None] = field(repr=False)
    frames_consistent: list[bool] = field(repr=False)


def read_columns(paths: Sequence[str], sizes: Sequence[int], engine: Engine = "auto"
                 ) -> Columns:
    """``read_headers`` of ``paths`` (their sizes in bytes) as ``Columns``.

    With "auto" the batch walk reads the plain files of the chunk together and
    ``read_headers`` the rest; any other engine is ``read_headers``' own (where "walk"
    starts at the per-file walk, the batch walk's reference).
    """
    n = len(paths)
    if engine == "auto":
        batch = read_batch(paths, sizes)
        values, rest = batch.values, np.flatnonzero(~batch.ok).tolist()
    else:
        values, rest = {kw: [None] * n for kw in SCAN_TAGS}, list(range(n))
    out = Columns(values, ["walk"] * n, [None] * n, [""] * n, [None] * n, [True] * n)
    headers = read_headers([paths[i] for i in rest], [sizes[i] for i in rest],
                           engine="auto" if engine == "walk" else engine)
    for i, h in zip(rest, headers, strict=True):
        for kw, v in h.values.items():
            if kw in values:
                values[kw][i] = v
        out.reader[i], out.reject[i], out.detail[i] = h.reader, h.reject, h.detail
        out.frame_positions[i], out.frames_consistent[i] = (h.frame_positions,
                                                            h.frames_consistent)
    return out


def read_headers(paths: Sequence[str], sizes: Sequence[int] | None = None,
                 engine: Engine = "auto") -> list[Header]:
    """Read and check the headers of ``paths`` (one Header each, same order).

    Args:
        paths: file paths (absolute or relative to the working directory).
        sizes: their sizes in bytes when the caller already has them (saves a stat).
        engine: first reader to try: "auto" or "walk" (Python walk, then gdcm, then
            pydicom),
            "gdcm" (gdcm.Scanner, then pydicom) or "pydicom" (the way to redo a chunk on
            which the C++ scanner crashed its process).

    Every file comes back either with values or with a reject reason; no exception
    escapes for a bad file, because one odd file must not stop an archive scan.
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown header engine {engine!r}; choose from {ENGINES}")
    if sizes is None:
        sizes = [file_size(p) for p in paths]
    out: list[Header | None] = [None] * len(paths)
    for_gdcm: list[int] = []
    for i, (path, size) in enumerate(zip(paths, sizes, strict=True)):
        if engine == "pydicom":
            out[i] = _safe_check(path, size, None, "pydicom")
        elif engine == "gdcm" or size <= 0:
            for_gdcm.append(i)
        else:
            try:
                values, complete = walk_header(path, size)
            except WalkDeclined:
                for_gdcm.append(i)
                continue
            except OSError as exc:
                out[i] = Header(path, {}, "walk", UNREADABLE, exc_detail(exc, path))
                continue
            out[i] = _safe_check(path, size, values, "walk", complete)
    if for_gdcm:
        gdcm_paths = [paths[i] for i in for_gdcm]
        for i, values in zip(for_gdcm, scan_gdcm(gdcm_paths), strict=True):
            out[i] = _safe_check(paths[i], sizes[i], values, "gdcm")
    return [h for h in out if h is not None]


def read_header_pydicom(path: str, size: int | None = None) -> Header:
    """Read one file with pydicom (slow, tolerant) and check it like ``read_headers``."""
    size = file_size(path) if size is None else size
    return _safe_check(path, size, None, "pydicom")


def _safe_check(path: str, size: int, values: dict[str, str] | None, reader: str,
                complete: bool | None = None) -> Header:
    try:
        return _check(path, size, values, reader, complete)
    except Exception as exc:  # noqa: BLE001 - one odd file must not stop the scan
        return Header(path, {}, "pydicom", UNREADABLE, exc_detail(exc, path))


def _check(path: str, size: int, values: dict[str, str] | None, reader: str,
           complete: bool | None = None) -> Header:
    """Classify one file from its header values (None: not read yet, pydicom reads it).

    ``complete``: what the reader already knows of the pixel data (True: whole; None:
    unknown; False: looked cut short). Anything short of a confirmed complete image
    goes through the exact ``integrity`` check before a reason is given.
    """
    ds = None
    if size < 0:
        return Header(path, {}, reader, UNREADABLE, "cannot stat file")
    if size == 0:
        return Header(path, {}, reader, NOT_DICOM, "empty file")
    if values is not None and PARTIAL in values:
        reason, detail = integrity(path, size)
        if reason is not None:
            return Header(path, {}, reader, reason, detail)
        values = None  # the walk misread the file: let pydicom read it
    if values is None or _needs_pydicom(values):
        reader, complete = "pydicom", None
        values, rejected, ds = pydicom_values(path)
        if rejected is not None:
            return rejected
        assert values is not None
    sop_class = values.get("MediaStorageSOPClassUID") or values.get("SOPClassUID", "")
    if MEDIA_STORAGE_DIRECTORY in (sop_class, values.get("SOPClassUID")):
        return Header(path, {}, reader, DICOMDIR, "DICOMDIR (media directory, no image)")
    modality = values.get("Modality", "")
    if modality and modality.upper() != "CT":
        return Header(path, {}, reader, NOT_CT, f"Modality {modality}")
    if not any(values.get(k) for k in ("SOPInstanceUID", "StudyInstanceUID", "Modality",
                                        "SOPClassUID", "TransferSyntaxUID")):
        # A parser can read almost anything as a raw data set; with none of these it
        # was not a DICOM file.
        if not has_dicm_magic(path):
            return Header(path, {}, reader, NOT_DICOM, not_dicom_detail(path))
    why = implausible(values)
    if why is not None:
        return Header(path, {}, reader, IMPLAUSIBLE, why)
    frame_positions = None
    consistent = True
    frames = parse_int(values.get("NumberOfFrames")) or 1
    if frames > 1 or sop_class == ENHANCED_CT_IMAGE_STORAGE:
        if ds is None:
            reader = "pydicom"
            values, rejected, ds = pydicom_values(path)
            if rejected is not None:
                return rejected
            assert values is not None
        with quiet_pydicom():
            frame_positions, consistent = enhanced_geometry(ds, values)
    missing = [k for k in REQUIRED if not values.get(k)]
    if not missing and complete is None:
        complete = pixel_data_complete(path, size, values)
    if missing or not complete:
        reason, detail = integrity(path, size)
        if reason is not None:
            return Header(path, {}, reader, reason, detail)
        if missing:
            return Header(path, {}, reader, MISSING_TAG, "missing " + ", ".join(missing))
    return Header(path, values, reader, None, "", frame_positions, consistent)


def _needs_pydicom(values: dict[str, str]) -> bool:
    """Files the fast path reads but cannot fully express."""
    frames = parse_int(values.get("NumberOfFrames")) or 1
    sop = values.get("SOPClassUID") or values.get("MediaStorageSOPClassUID")
    return frames > 1 or sop == ENHANCED_CT_IMAGE_STORAGE
