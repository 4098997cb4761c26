"""DICOM reading for fedct.

Sections:

1. Header scanning for the catalogue: read only headers (never pixel data) of many
   files fast, say why a file cannot be catalogued, and normalise the few header
   values the study sorts by (vendor, orientation, image type, kernel).

(Series -> volume reading, with SimpleITK, belongs in a later section of this module.)
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import struct
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

# ============================================================================
# 1. Header scanning (catalogue)
# ============================================================================
#
# Three readers, fastest first; each one declines what it cannot read exactly and the
# next one takes over. None of them decodes pixel data.
#
# 1. ``walk``: a strict walk over the top-level data elements in Python (explicit or
#    implicit VR little endian, the syntaxes of nearly every archived CT file,
#    compressed ones included). It reads the first few KB of a file, jumps over values
#    and sequences it does not need and stops after the last wanted tag. Measured
#    (benchmarks/catalogue.py, CPU time per file of a ~200-element CT header): the
#    whole scan ~230 us, python-gdcm's Scanner alone ~640 us (about 3 us per
#    element), pydicom ``stop_before_pixels`` ~1200 us.
# 2. ``gdcm``: python-gdcm's ``gdcm.Scanner`` over the files the walk declined
#    (big endian, deflated, no preamble, an unknown VR, ...).
# 3. ``pydicom``: what the scanner cannot read or express (enhanced multi-frame
#    images keep their geometry in functional-group sequences), and the slow, exact
#    checks (truncation) of files that look wrong.
#
# ``engine`` selects where to start: "auto" (walk), "gdcm" or "pydicom".

# Keyword -> tag of every value the catalogue reads. PatientID is read only so that the
# caller can pseudonymise it; PatientName, PatientBirthDate and AccessionNumber are
# never read at all.
SCAN_TAGS: dict[str, tuple[int, int]] = {
    "MediaStorageSOPClassUID": (0x0002, 0x0002),
    "TransferSyntaxUID": (0x0002, 0x0010),
    "SpecificCharacterSet": (0x0008, 0x0005),
    "ImageType": (0x0008, 0x0008),
    "SOPClassUID": (0x0008, 0x0016),
    "SOPInstanceUID": (0x0008, 0x0018),
    "StudyDate": (0x0008, 0x0020),
    "Modality": (0x0008, 0x0060),
    "Manufacturer": (0x0008, 0x0070),
    "InstitutionName": (0x0008, 0x0080),
    "ManufacturerModelName": (0x0008, 0x1090),
    "PatientID": (0x0010, 0x0020),
    "BodyPartExamined": (0x0018, 0x0015),
    "SliceThickness": (0x0018, 0x0050),
    "KVP": (0x0018, 0x0060),
    "Exposure": (0x0018, 0x1152),
    "ConvolutionKernel": (0x0018, 0x1210),
    "StudyInstanceUID": (0x0020, 0x000D),
    "SeriesInstanceUID": (0x0020, 0x000E),
    "SeriesNumber": (0x0020, 0x0011),
    "ImagePositionPatient": (0x0020, 0x0032),
    "ImageOrientationPatient": (0x0020, 0x0037),
    "SamplesPerPixel": (0x0028, 0x0002),
    "NumberOfFrames": (0x0028, 0x0008),
    "Rows": (0x0028, 0x0010),
    "Columns": (0x0028, 0x0011),
    "PixelSpacing": (0x0028, 0x0030),
    "BitsAllocated": (0x0028, 0x0100),
}
_KEYWORD_OF = {f"{g:04x},{e:04x}": kw for kw, (g, e) in SCAN_TAGS.items()}
# Text values that may carry non-ASCII characters in the file's character set.
_TEXT_KEYWORDS = ("Manufacturer", "InstitutionName", "ManufacturerModelName",
                  "BodyPartExamined", "ConvolutionKernel", "PatientID")

# Without these a file cannot be placed in a series of a study (identity) nor be an image.
REQUIRED = ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality",
            "Rows", "Columns")

# Reject reasons: a small fixed vocabulary, so that rejects can be counted by reason;
# the ``detail`` string of a rejected file says more (which tag, which modality, ...).
NOT_DICOM = "not DICOM"
TRUNCATED = "truncated"
MISSING_TAG = "missing required tag"
NOT_CT = "not CT"
DICOMDIR = "DICOMDIR"
UNREADABLE = "unreadable"
DUPLICATE = "duplicate SOPInstanceUID"  # decided by the catalogue, over all files
REJECT_REASONS = (NOT_DICOM, TRUNCATED, MISSING_TAG, NOT_CT, DICOMDIR, UNREADABLE, DUPLICATE)

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.2"
IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
EXPLICIT_VR_BE = "1.2.840.10008.1.2.2"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"
NATIVE_TRANSFER_SYNTAXES = frozenset({IMPLICIT_VR_LE, EXPLICIT_VR_LE, EXPLICIT_VR_BE})

_UNDEFINED_LENGTH = 0xFFFFFFFF
_SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
# pydicom fallback: values longer than this are skipped with a seek, not read.
_DEFER_BYTES = 1024


@dataclass(frozen=True, slots=True)
class Header:
    """Raw header values of one file, or why it cannot be catalogued.

    ``values`` maps a keyword of ``SCAN_TAGS`` to its text as stored (multiple values
    joined by a backslash, surrounding blanks stripped); absent or empty tags are left
    out. ``frame_positions`` holds the ImagePositionPatient of every frame (mm) of a
    multi-frame image, whose geometry lives in functional groups, else None.
    """

    path: str
    values: dict[str, str]
    reader: str  # "gdcm" or "pydicom"
    reject: str | None = None
    detail: str = ""
    frame_positions: tuple[tuple[float, float, float], ...] | None = field(default=None)
    frames_consistent: bool = True  # per-frame orientation/spacing agree (multi-frame)

    @property
    def ok(self) -> bool:
        return self.reject is None


Engine = str  # "auto" | "gdcm" | "pydicom"
ENGINES = ("auto", "gdcm", "pydicom")


def read_headers(paths: Sequence[str], sizes: Sequence[int] | None = None,
                 engine: Engine = "auto") -> list[Header]:
    """Read and check the headers of ``paths`` (one Header each, same order).

    Args:
        paths: file paths (absolute or relative to the working directory).
        sizes: their sizes in bytes when the caller already has them (saves a stat).
        engine: first reader to try: "auto" (Python walk, then gdcm, then pydicom),
            "gdcm" (gdcm.Scanner, then pydicom) or "pydicom" (the way to redo a chunk on
            which the C++ scanner crashed its process).

    Every file comes back either with values or with a reject reason; no exception
    escapes for a bad file, because one odd file must not stop an archive scan.
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown header engine {engine!r}; choose from {ENGINES}")
    if sizes is None:
        sizes = [_size(p) for p in paths]
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
                out[i] = Header(path, {}, "walk", UNREADABLE, _exc_detail(exc, path))
                continue
            out[i] = _safe_check(path, size, values, "walk", complete)
    if for_gdcm:
        gdcm_paths = [paths[i] for i in for_gdcm]
        for i, values in zip(for_gdcm, _scan_gdcm(gdcm_paths), strict=True):
            out[i] = _safe_check(paths[i], sizes[i], values, "gdcm")
    return [h for h in out if h is not None]


def read_header_pydicom(path: str, size: int | None = None) -> Header:
    """Read one file with pydicom (slow, tolerant) and check it like ``read_headers``."""
    size = _size(path) if size is None else size
    return _safe_check(path, size, None, "pydicom")


def _safe_check(path: str, size: int, values: dict[str, str] | None, reader: str,
                complete: bool | None = None) -> Header:
    try:
        return _check(path, size, values, reader, complete)
    except Exception as exc:  # noqa: BLE001 - one odd file must not stop the scan
        return Header(path, {}, "pydicom", UNREADABLE, _exc_detail(exc, path))


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return -1


# --- tier 1: the top-level element walk ----------------------------------------------

# Key the walk adds to the values of a file that ended inside an element (its value:
# the offset it needed): the values are partial until ``integrity`` has decided.
PARTIAL = "_partial_until_byte"


class WalkDeclined(Exception):
    """The walk cannot read this file exactly; a slower reader will."""


_WANTED = {(g << 16) | e: kw for kw, (g, e) in SCAN_TAGS.items()}
_LAST_WANTED = max(_WANTED)
# Values the catalogue reads whose dictionary VR is binary (needed in implicit VR).
_BINARY_VR = {"Rows": "US", "Columns": "US", "SamplesPerPixel": "US", "BitsAllocated": "US"}
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC",
                       b"UN", b"UR", b"UT", b"UV"})
_SHORT_VRS = frozenset({b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD",
                        b"IS", b"LO", b"LT", b"PN", b"SH", b"SL", b"SS", b"ST", b"TM",
                        b"UI", b"UL", b"US"})
# Header length of an explicit-VR element by its VR: 12 (4-byte length) or 8.
_HEADER_LENGTH = {**{vr: 12 for vr in _LONG_VRS}, **{vr: 8 for vr in _SHORT_VRS}}
_NUMBER_FORMATS = {b"US": "H", b"SS": "h", b"UL": "I", b"SL": "i", b"FL": "f", b"FD": "d"}
_EXPLICIT_SHORT = struct.Struct("<HH2sH").unpack_from
_IMPLICIT = struct.Struct("<HHI").unpack_from
_UINT32 = struct.Struct("<I").unpack_from
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
# Transfer syntaxes whose data set is not little endian or not plain (deflated).
_WALK_REFUSES = frozenset({EXPLICIT_VR_BE, DEFLATED_LE, "1.2.840.10008.1.2.4.95"})
_WINDOW = 16384  # first read: the header of most files fits
_MAX_HEADER = 64 << 20  # a "header" beyond this is not one
_MAX_DEPTH = 16


class _Window:
    """Bytes of a file from ``base``; grows or moves so that a requested range is in it."""

    __slots__ = ("fh", "size", "base", "buf")

    def __init__(self, fh: Any, size: int) -> None:
        self.fh, self.size, self.base = fh, size, 0
        self.buf = fh.read(_WINDOW)

    def need(self, pos: int, n: int) -> int:
        """Make [pos, pos + n) available; returns its offset in ``buf``.

        Raises _Truncated when the file ends first.
        """
        if pos + n > self.size:
            raise _Truncated(pos + n)
        off = pos - self.base
        if 0 <= off and off + n <= len(self.buf):
            return off
        if pos > _MAX_HEADER:
            raise WalkDeclined(f"header beyond {_MAX_HEADER} bytes")
        end = self.base + len(self.buf)
        if self.base <= pos <= end and pos + n - self.base <= 4 * _WINDOW:
            self.fh.seek(end)
            self.buf += self.fh.read(max(pos + n - end, _WINDOW))
        else:  # jump over a long value: start a new window at pos
            self.fh.seek(pos)
            self.base = pos
            self.buf = self.fh.read(max(n, _WINDOW))
        off = pos - self.base
        if off + n > len(self.buf):
            raise _Truncated(pos + n)
        return off


class _Truncated(Exception):
    def __init__(self, needed: int) -> None:
        super().__init__(needed)
        self.needed = needed


def walk_header(path: str, size: int | None = None) -> tuple[dict[str, str], bool | None]:
    """Values of ``SCAN_TAGS`` by walking the top-level data elements of ``path``.

    Returns (values, complete): ``complete`` is True when the tail of the file shows
    the whole pixel data, False/None when it could not be confirmed (the caller then
    runs the exact, slow ``integrity`` check). Raises WalkDeclined for anything it
    cannot read exactly (no preamble, big endian, deflate, unknown VR, elements out of
    order, ...), so a misread can only cost speed, never a wrong value.
    """
    size = _size(path) if size is None else size
    with open(path, "rb") as fh:
        win = _Window(fh, size)
        buf = win.buf
        if len(buf) < 132 or buf[128:132] != b"DICM":
            raise WalkDeclined("no DICOM preamble")
        raw: dict[str, bytes | str] = {}
        try:
            pos = _walk_meta(win, raw)
            ts = _text(raw.get("TransferSyntaxUID", b""))
            if not ts or ts in _WALK_REFUSES:
                raise WalkDeclined(f"transfer syntax {ts!r}")
            pos, saw_pixels = _walk_dataset(win, pos, ts != IMPLICIT_VR_LE, raw)
        except _Truncated as exc:
            # Could also be a misread: the caller confirms with the exact check.
            values = _finish(raw)
            values[PARTIAL] = str(exc.needed)
            return values, False
        values = _finish(raw)
        if not saw_pixels and "Rows" in values:
            complete: bool | None = pixel_data_complete(path, size, values, fh)
        else:
            complete = None if "Rows" in values else True
        return values, complete


def _explicit_lengths(win: _Window, pos: int, vr: bytes, short_len: int, where: str
                      ) -> tuple[int, int]:
    """(value length, header length) of the explicit-VR element at ``pos``.

    Long VRs keep a 32-bit length after two reserved bytes (12-byte header); the others
    have the 16-bit length already unpacked (8 bytes). ``_walk_dataset`` inlines the same
    rule with ``_HEADER_LENGTH`` for speed.
    """
    hdr = _HEADER_LENGTH.get(vr)
    if hdr is None:
        raise WalkDeclined(f"{where} has VR {vr!r}")
    if hdr == 12:
        off = win.need(pos, 12)
        return _UINT32(win.buf, off + 8)[0], 12
    return short_len, 8


def _walk_meta(win: _Window, raw: dict[str, bytes | str]) -> int:
    """Group 0002 (always explicit VR little endian); returns the data set's offset."""
    pos = 132
    while True:
        off = win.need(pos, 8)
        g, e, vr, ln = _EXPLICIT_SHORT(win.buf, off)
        if g != 0x0002:
            return pos
        ln, hdr = _explicit_lengths(win, pos, vr, ln, f"meta element ({g:04X},{e:04X})")
        kw = _WANTED.get((g << 16) | e)
        if kw is not None:
            off = win.need(pos + hdr, ln)
            raw[kw] = win.buf[off:off + ln]
        pos += hdr + ln


def _walk_dataset(win: _Window, pos: int, explicit: bool, raw: dict[str, bytes | str]
                  ) -> tuple[int, bool]:
    """Top-level elements from ``pos`` up to the last wanted tag (or the pixel data).

    The loop is the hot path of a scan (~200 elements per CT header): the window is
    read through local names and only refilled when an element header crosses its end.
    """
    previous = -1
    size = win.size
    buf, base = win.buf, win.base
    end = base + len(buf)
    wanted, header_length = _WANTED, _HEADER_LENGTH
    unpack_explicit, unpack_implicit, unpack_u32 = _EXPLICIT_SHORT, _IMPLICIT, _UINT32
    while pos < size:
        if pos + 12 > end:  # refill (or the file ends: _Truncated)
            win.need(pos, min(12, size - pos) if size - pos >= 8 else 8)
            buf, base = win.buf, win.base
            end = base + len(buf)
        off = pos - base
        if explicit:
            g, e, vr, ln = unpack_explicit(buf, off)
            hdr = header_length.get(vr)
            if hdr == 12:
                if pos + 12 > size:
                    raise _Truncated(pos + 12)
                ln = unpack_u32(buf, off + 8)[0]
            elif hdr is None:
                raise WalkDeclined(f"element ({g:04X},{e:04X}) has VR {vr!r}")
        else:
            g, e, ln = unpack_implicit(buf, off)
            vr, hdr = b"", 8
        tag = (g << 16) | e
        if tag <= previous or g == 0xFFFE:
            raise WalkDeclined(f"element ({g:04X},{e:04X}) out of order")
        previous = tag
        if tag > _LAST_WANTED:
            return pos, tag == _PIXEL_DATA
        pos += hdr
        if ln == _UNDEFINED_LENGTH:
            # A sequence (or UN holding one, encoded implicit VR): skip it item by item.
            pos = _skip_sequence(win, pos, explicit and vr != b"UN", 0)
            buf, base = win.buf, win.base
            end = base + len(buf)
            continue
        kw = wanted.get(tag)
        if kw is not None:
            voff = win.need(pos, ln)
            buf, base = win.buf, win.base
            end = base + len(buf)
            value = buf[voff:voff + ln]
            fmt = _NUMBER_FORMATS.get(vr) if explicit else None
            if fmt is None and not explicit and kw in _BINARY_VR:
                fmt = "H"
            if fmt is not None:
                width = struct.calcsize(fmt)
                if ln % width:
                    raise WalkDeclined(f"{kw}: {ln} bytes for VR {vr!r}")
                raw[kw] = "\\".join(str(v) for v in struct.unpack(f"<{ln // width}{fmt}",
                                                                     value))
            else:
                raw[kw] = value
        pos += ln
    return pos, False


def _skip_sequence(win: _Window, pos: int, explicit: bool, depth: int) -> int:
    """Offset after the delimiter of an undefined-length sequence starting at ``pos``."""
    if depth > _MAX_DEPTH:
        raise WalkDeclined("sequences nested too deep")
    while True:
        off = win.need(pos, 8)
        g, e, ln = _IMPLICIT(win.buf, off)
        tag = (g << 16) | e
        pos += 8
        if tag == _SEQ_END:
            return pos
        if tag != _ITEM:
            raise WalkDeclined(f"({g:04X},{e:04X}) where a sequence item was expected")
        if ln != _UNDEFINED_LENGTH:
            pos += ln
            continue
        # An undefined-length item: walk its elements to the item delimiter.
        while True:
            off = win.need(pos, 8)
            if explicit:
                g, e, vr, ln = _EXPLICIT_SHORT(win.buf, off)
                tag = (g << 16) | e
                if tag == _ITEM_END:
                    pos += 8
                    break
                ln, hdr = _explicit_lengths(win, pos, vr, ln, f"nested ({g:04X},{e:04X})")
            else:
                g, e, ln = _IMPLICIT(win.buf, off)
                vr, hdr = b"", 8
                tag = (g << 16) | e
                if tag == _ITEM_END:
                    pos += 8
                    break
            pos += hdr
            if ln == _UNDEFINED_LENGTH:
                pos = _skip_sequence(win, pos, explicit and vr != b"UN", depth + 1)
            else:
                pos += ln


def _text(value: bytes | str) -> str:
    if isinstance(value, str):
        return value
    return value.decode("ascii", "surrogateescape").strip(" \x00")


def _finish(raw: dict[str, bytes | str]) -> dict[str, str]:
    """Decode the raw values: ASCII directly, other text by SpecificCharacterSet."""
    values: dict[str, str] = {}
    for kw, v in raw.items():
        text = v if isinstance(v, str) else v.decode("ascii", "surrogateescape")
        text = text.strip(" \x00")
        if text:
            values[kw] = text
    _decode_text(values)
    return values


# --- tier 2: gdcm.Scanner --------------------------------------------------------

def _gdcm_safe(path: str) -> bool:
    """gdcm takes UTF-8 names; undecodable bytes (surrogates) or newlines go to pydicom."""
    if "\n" in path:
        return False
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _scan_gdcm(paths: Sequence[str]) -> list[dict[str, str] | None]:
    """Values of ``SCAN_TAGS`` per path via ``gdcm.Scanner``; None where it could not read.

    The scanner's text dump (``str(scanner)``) is parsed rather than calling
    ``GetValue`` per tag and file: one C++ call instead of ~30 per file, which makes
    the Python side about twice as fast. The dump is checked file by file; if it is
    not as expected (a value with a newline, say) the chunk is read with ``GetValue``.
    """
    import gdcm

    gdcm.Trace.WarningOff()  # the scanner warns on stderr for every non-DICOM file
    gdcm.Trace.ErrorOff()
    safe = [p for p in paths if _gdcm_safe(p)]
    result: dict[str, dict[str, str]] = {}
    if safe:
        scanner = gdcm.Scanner()
        tags = [gdcm.Tag(g, e) for g, e in SCAN_TAGS.values()]
        for tag in tags:
            scanner.AddTag(tag)
        scanner.Scan(list(safe))
        parsed = _parse_scanner_dump(str(scanner), safe)
        if parsed is None:
            parsed = {}
            for p in safe:
                if scanner.IsKey(p):
                    vals = {}
                    for kw, tag in zip(SCAN_TAGS, tags, strict=True):
                        v = scanner.GetValue(p, tag)
                        if v is not None:
                            vals[kw] = v
                    parsed[p] = _clean(vals)
        result = parsed
    return [result.get(p) for p in paths]


def _parse_scanner_dump(text: str, paths: Sequence[str]) -> dict[str, dict[str, str]] | None:
    """Parse ``gdcm.Scanner.Print`` output; None when it does not look exactly as expected.

    Layout: a "Values:" section, then "Mapping:" and per file a line
    "Filename: NAME (could be read)" followed by lines "(gggg,eeee) -> [value]".
    """
    marker = f"Mapping:\nFilename: {paths[0]} ("
    start = text.find(marker)
    if start < 0:
        return None
    blocks = text[start + len("Mapping:\nFilename: "):].split("\nFilename: ")
    if len(blocks) != len(paths):
        return None
    plain = text.isascii() and "\x1b" not in text
    keyword_of = _KEYWORD_OF
    out: dict[str, dict[str, str]] = {}
    try:
        for name, block in zip(paths, blocks, strict=True):
            lines = block.split("\n")
            if lines[0] == f"{name} (could not be read)":
                continue
            if lines[0] != f"{name} (could be read)":
                return None
            vals = {keyword_of[ln[1:10]]: ln[16:-1].strip(" \x00") for ln in lines[1:] if ln}
            if "" in vals.values():
                vals = {k: v for k, v in vals.items() if v}
            if not plain:
                _decode_text(vals)
            out[name] = vals
    except KeyError:  # a line that is not "(gggg,eeee) -> [...]": a value had a newline
        return None
    return out


def _clean(values: dict[str, str]) -> dict[str, str]:
    """Strip blanks and NUL padding, drop empty values, decode non-ASCII text values."""
    out = {kw: v.strip(" \x00") for kw, v in values.items()}
    out = {kw: v for kw, v in out.items() if v}
    _decode_text(out)
    return out


def _decode_text(values: dict[str, str]) -> None:
    """Re-decode text the scanner passed through as raw bytes, by SpecificCharacterSet.

    gdcm hands byte strings to Python as UTF-8 with surrogate escapes; an
    InstitutionName in ISO 8859-1 or JIS (ISO 2022) must be decoded by the file's
    declared character set, or a mapping file would never match it.
    """
    if all(values.get(kw, "").isascii() and "\x1b" not in values.get(kw, "")
           for kw in _TEXT_KEYWORDS):
        return
    from pydicom.charset import convert_encodings, decode_bytes

    charset = [c.strip() for c in values.get("SpecificCharacterSet", "").split("\\")]
    encodings = convert_encodings([c for c in charset if c] or None)
    for kw in _TEXT_KEYWORDS:
        v = values.get(kw)
        if v and (not v.isascii() or "\x1b" in v):
            raw = v.encode("utf-8", "surrogateescape")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                values[kw] = decode_bytes(raw, encodings, {0x5C}).strip(" \x00")


# --- tier 3: pydicom -------------------------------------------------------------

@contextlib.contextmanager
def _quiet_pydicom() -> Any:
    """Silence pydicom's per-file warnings and log lines while we read odd files.

    A scan meets thousands of odd files; their problems are reported as reject
    reasons, not as a wall of log lines.
    """
    logger = logging.getLogger("pydicom")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _pydicom_values(path: str) -> tuple[dict[str, str] | None, Header | None, Any]:
    """Header values read by pydicom, or a rejected Header when it cannot be read."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with _quiet_pydicom():
            ds = pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError as exc:
        if _has_dicm_magic(path):
            return None, Header(path, {}, "pydicom", TRUNCATED, "DICOM preamble but no "
                                f"readable header ({_exc_detail(exc, path)})"), None
        return None, Header(path, {}, "pydicom", NOT_DICOM, _not_dicom_detail(path)), None
    except (EOFError, struct.error) as exc:
        return None, Header(path, {}, "pydicom", TRUNCATED, _exc_detail(exc, path)), None
    except OSError as exc:
        return None, Header(path, {}, "pydicom", UNREADABLE, _exc_detail(exc, path)), None
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on broken files
        if _has_dicm_magic(path):
            return None, Header(path, {}, "pydicom", TRUNCATED, "header cannot be parsed "
                                f"({_exc_detail(exc, path)})"), None
        return None, Header(path, {}, "pydicom", NOT_DICOM, _not_dicom_detail(path)), None
    values: dict[str, str] = {}
    with _quiet_pydicom():
        for kw, (group, elem) in SCAN_TAGS.items():
            source = ds.file_meta if group == 0x0002 else ds
            try:
                element = source.get((group, elem)) if source is not None else None
                text = _element_text(element.value) if element is not None else ""
            except Exception:  # noqa: BLE001 - a malformed value is treated as absent
                text = ""
            text = text.strip(" \x00")
            if text:
                values[kw] = text
    return values, None, ds


def _element_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("ascii", "replace")
    if isinstance(value, str):
        return value
    if isinstance(value, Iterable):
        return "\\".join(str(v) for v in value)
    return str(value)


def _exc_detail(exc: object, path: str, limit: int = 200) -> str:
    """A reject detail from an error message: without the file's path (the rejects
    table has it already), one line, bounded length."""
    text = str(exc).replace(path, "<file>").replace(os.path.basename(path), "<file>")
    text = " ".join(text.split())
    name = type(exc).__name__
    prefix = "" if isinstance(exc, Warning | str) else f"{name}: "
    return (prefix + text)[:limit]


def _has_dicm_magic(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _not_dicom_detail(path: str) -> str:
    size = _size(path)
    return "empty file" if size == 0 else f"no DICOM header ({size} bytes)"


def _enhanced_geometry(ds: Any, values: dict[str, str]
                       ) -> tuple[tuple[tuple[float, float, float], ...] | None, bool]:
    """Fill geometry of a multi-frame image from its functional groups.

    Returns the per-frame positions (None when absent) and whether per-frame
    orientation and pixel spacing agree (an enhanced series with mixed planes is not
    one volume).
    """
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else None
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []

    def group_value(item: Any, seq_kw: str, kw: str) -> Any:
        seq = item.get(seq_kw) if item is not None else None
        return seq[0].get(kw) if seq else None

    def pick(seq_kw: str, kw: str) -> Any:
        v = group_value(shared, seq_kw, kw)
        if v is None and per_frame:
            v = group_value(per_frame[0], seq_kw, kw)
        return v

    for target, seq_kw, kw in (
        ("ImageOrientationPatient", "PlaneOrientationSequence", "ImageOrientationPatient"),
        ("PixelSpacing", "PixelMeasuresSequence", "PixelSpacing"),
        ("SliceThickness", "PixelMeasuresSequence", "SliceThickness"),
        ("ConvolutionKernel", "CTReconstructionSequence", "ConvolutionKernel"),
        ("KVP", "CTXRayDetailsSequence", "KVP"),
        ("Exposure", "CTExposureSequence", "ExposureInmAs"),
    ):
        if target not in values:
            v = pick(seq_kw, kw)
            text = _element_text(v).strip() if v is not None else ""
            if text:
                values[target] = text
    consistent = True
    for seq_kw, kw in (("PlaneOrientationSequence", "ImageOrientationPatient"),
                       ("PixelMeasuresSequence", "PixelSpacing")):
        seen = {_element_text(group_value(f, seq_kw, kw)) for f in per_frame
                if group_value(f, seq_kw, kw) is not None}
        if len(seen) > 1:
            consistent = False
    positions: list[tuple[float, float, float]] = []
    for frame in per_frame:
        ipp = group_value(frame, "PlanePositionSequence", "ImagePositionPatient")
        try:
            x, y, z = (float(v) for v in ipp)
        except (TypeError, ValueError):
            return None, consistent
        positions.append((x, y, z))
    if positions and "ImagePositionPatient" not in values:
        values["ImagePositionPatient"] = "\\".join(f"{c:g}" for c in positions[0])
    return (tuple(positions) if positions else None), consistent


# --- checks --------------------------------------------------------------------------

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
        values, rejected, ds = _pydicom_values(path)
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
        if not _has_dicm_magic(path):
            return Header(path, {}, reader, NOT_DICOM, _not_dicom_detail(path))
    frame_positions = None
    consistent = True
    frames = _int(values.get("NumberOfFrames")) or 1
    if frames > 1 or sop_class == ENHANCED_CT_IMAGE_STORAGE:
        if ds is None:
            reader = "pydicom"
            values, rejected, ds = _pydicom_values(path)
            if rejected is not None:
                return rejected
            assert values is not None
        with _quiet_pydicom():
            frame_positions, consistent = _enhanced_geometry(ds, values)
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
    frames = _int(values.get("NumberOfFrames")) or 1
    sop = values.get("SOPClassUID") or values.get("MediaStorageSOPClassUID")
    return frames > 1 or sop == ENHANCED_CT_IMAGE_STORAGE


def pixel_data_complete(path: str, size: int, values: dict[str, str],
                        fh: Any = None) -> bool:
    """Cheap check that the file holds all of its pixel data (reads 8-12 bytes).

    Pixel data is the last element of nearly every image file: native pixel data must
    end the file with exactly Rows x Columns x Frames x Samples x BitsAllocated / 8
    bytes behind its element header; encapsulated (compressed) pixel data must end
    with the sequence delimiter. True means complete; False means "could not confirm"
    (truncated, or an unusual layout): ``integrity`` then decides, slowly.
    """
    ts = values.get("TransferSyntaxUID", "")
    try:
        if ts in NATIVE_TRANSFER_SYNTAXES:
            n_bits = (int(values["Rows"]) * int(values["Columns"])
                      * (_int(values.get("NumberOfFrames")) or 1)
                      * (_int(values.get("SamplesPerPixel")) or 1)
                      * (_int(values.get("BitsAllocated")) or 16))
            expected = (n_bits + 7) // 8
            expected += expected & 1
            header_len = 8 if ts == IMPLICIT_VR_LE else 12
            offset = size - expected - header_len
            if offset < 0:
                return False
            head = _pread(path, offset, header_len, fh)
            if ts == IMPLICIT_VR_LE:
                return head == struct.pack("<HHI", 0x7FE0, 0x0010, expected)
            if ts == EXPLICIT_VR_LE:
                return (head[:4] == b"\xe0\x7f\x10\x00" and head[4:6] in (b"OW", b"OB")
                        and head[6:8] == b"\x00\x00"
                        and struct.unpack("<I", head[8:12])[0] == expected)
            return (head[:4] == b"\x7f\xe0\x00\x10" and head[4:6] in (b"OW", b"OB")
                    and head[6:8] == b"\x00\x00"
                    and struct.unpack(">I", head[8:12])[0] == expected)
        if ts and ts != DEFLATED_LE:
            return size >= 8 and _pread(path, size - 8, 8, fh) == _SEQUENCE_DELIMITER
    except (KeyError, ValueError, OSError, struct.error):
        return False
    return False


def _pread(path: str, offset: int, n: int, fh: Any = None) -> bytes:
    if fh is not None:
        fh.seek(offset)
        return fh.read(n)
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, n, offset)
    finally:
        os.close(fd)


def integrity(path: str, size: int | None = None) -> tuple[str | None, str]:
    """(reason, detail) when the file is cut short or an image lacks its pixel data,
    else (None, ""): the slow, exact check.

    pydicom parses the whole data set, skipping long values by seeking
    (``defer_size``), so the file offset of every top-level element is known: a last
    element that ends beyond the end of the file or an undefined-length item that
    never closes means the file was cut short (TRUNCATED). An image header that ends
    cleanly without pixel data lacks a type 1 attribute (MISSING_TAG): a file cut
    exactly at an element boundary, or a header-only stub.
    """
    import pydicom

    size = _size(path) if size is None else size
    with _quiet_pydicom():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                ds = pydicom.dcmread(path, force=True, defer_size=_DEFER_BYTES)
            except (EOFError, struct.error) as exc:
                return TRUNCATED, _exc_detail(exc, path)
            except Exception as exc:  # noqa: BLE001 - any parse failure of a DICOM file
                return TRUNCATED, f"data set cannot be parsed ({_exc_detail(exc, path)})"
        return _integrity_verdict(path, size, ds, caught)


def _integrity_verdict(path: str, size: int, ds: Any, caught: list) -> tuple[str | None, str]:
    for w in caught:
        msg = str(w.message).lower()
        if "end of file" in msg or "unexpected end" in msg:
            return TRUNCATED, f"file ends early ({_exc_detail(w.message, path)})"
    meta = getattr(ds, "file_meta", None)
    group_length = meta.get("FileMetaInformationGroupLength") if meta is not None else None
    if isinstance(group_length, int):
        meta_end = 132 + 12 + group_length  # preamble, DICM, (0002,0000) itself
        if meta_end > size:
            return TRUNCATED, f"file meta header needs {meta_end} bytes, file has {size}"
    tags = sorted(ds.keys())
    if not tags and meta is not None and len(meta):
        return TRUNCATED, f"file ends after the file meta header ({size} bytes)"
    end = None
    if tags:
        last = ds.get_item(tags[-1], keep_deferred=True)
        tell = getattr(last, "value_tell", None)
        length = getattr(last, "length", None)
        if tell is not None and length is not None and length != _UNDEFINED_LENGTH:
            end = tell + length
            if end > size:
                return TRUNCATED, f"element {last.tag} needs {end} bytes, file has {size}"
        elif tags[-1] == _PIXEL_DATA and _pread(path, max(size - 8, 0), 8) != \
                _SEQUENCE_DELIMITER:
            # pydicom accepts a delimiter cut inside its length field; we do not.
            return TRUNCATED, "encapsulated pixel data without its closing delimiter"
    sop = str(meta.get("MediaStorageSOPClassUID", "") or "") if meta is not None else ""
    is_image = (0x00280010 in ds) or sop.startswith(CT_IMAGE_STORAGE)
    if is_image and 0x7FE00010 not in ds:
        if end is not None and end < size:
            return TRUNCATED, f"image data set stops at byte {end} of {size} (cut mid-element)"
        return MISSING_TAG, (f"missing PixelData: image header ends cleanly at byte {size} "
                             "(cut at an element boundary, or a header-only file)")
    return None, ""


# --- value parsing and normalisation -------------------------------------------------

def _int(text: str | None) -> int | None:
    if not text:
        return None
    try:
        return int(float(text.split("\\")[0]))
    except ValueError:
        return None


def parse_float(text: str | None) -> float | None:
    """First value of a DS/IS/US text as float; None when absent or malformed."""
    if not text:
        return None
    try:
        v = float(text.split("\\")[0])
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def parse_floats(text: str | None, n: int) -> tuple[float, ...] | None:
    """Exactly ``n`` backslash-separated numbers (e.g. IOP: 6, IPP: 3), else None."""
    if not text:
        return None
    parts = text.split("\\")
    if len(parts) != n:
        return None
    try:
        out = tuple(float(p) for p in parts)
    except ValueError:
        return None
    return out if all(math.isfinite(v) for v in out) else None


ORIENTATION_TOLERANCE_DEG = 10.0


def slice_normal(iop: Sequence[float]) -> tuple[float, float, float] | None:
    """Unit normal (row x column direction cosines) of an image plane; None if degenerate."""
    rx, ry, rz, cx, cy, cz = iop
    nx, ny, nz = ry * cz - rz * cy, rz * cx - rx * cz, rx * cy - ry * cx
    norm = math.sqrt(nx * nx + ny * ny + nz * nz)
    if norm < 1e-6:
        return None
    return nx / norm, ny / norm, nz / norm


def orientation_class(iop: Sequence[float] | str | None,
                      tolerance_deg: float = ORIENTATION_TOLERANCE_DEG) -> str:
    """axial, coronal, sagittal, oblique (or unknown) from ImageOrientationPatient.

    A plane belongs to the anatomical plane whose axis its normal lies within
    ``tolerance_deg`` of; a gantry tilt beyond that makes the series oblique, which a
    3D model cannot take as an axial stack without resampling.
    """
    if isinstance(iop, str) or iop is None:
        iop = parse_floats(iop, 6)
    if iop is None or len(iop) != 6:
        return "unknown"
    normal = slice_normal(iop)
    if normal is None:
        return "unknown"
    axis = max(range(3), key=lambda i: abs(normal[i]))
    if abs(normal[axis]) >= math.cos(math.radians(tolerance_deg)):
        return ("sagittal", "coronal", "axial")[axis]
    return "oblique"


def vendor(manufacturer: str | None) -> str:
    """Normalised vendor: the four of the study by their many spellings, else upper-cased.

    Toshiba Medical became Canon Medical Systems in 2018, so TOSHIBA, TOSHIBA_MEC,
    CANON_MEC and "Canon Medical Systems" are one vendor (CANON).
    """
    if not manufacturer or not manufacturer.strip():
        return "UNKNOWN"
    s = " ".join(manufacturer.upper().replace("_", " ").split())
    if "TOSHIBA" in s or "CANON" in s:
        return "CANON"
    if s == "GE" or s.startswith(("GE ", "GEMS")) or "GENERAL ELECTRIC" in s:
        return "GE"
    if "PHILIPS" in s:
        return "PHILIPS"
    if "SIEMENS" in s:
        return "SIEMENS"
    return s


_LOCALIZER_WORDS = frozenset({"LOCALIZER", "LOCALISER", "SCOUT", "TOPOGRAM", "SURVIEW",
                              "SCANOGRAM"})
_REFORMAT_WORDS = frozenset({"REFORMATTED", "REFORMAT", "MPR", "CPR", "CURVED", "MIP",
                             "MINIP", "PROJECTION IMAGE", "VOLUME RENDER", "VOLUME_RENDER"})


def image_type_class(image_type: str | None) -> str:
    """localizer, reformat, derived or original, from the values of ImageType.

    Derived axial images (e.g. a recon from volume data) stay candidates for AI;
    localizers and reformats/projections do not.
    """
    if not image_type:
        return "unknown"
    values = [v.strip().upper() for v in image_type.split("\\")]
    if _LOCALIZER_WORDS.intersection(values):
        return "localizer"
    if _REFORMAT_WORDS.intersection(values):
        return "reformat"
    if values and values[0] == "DERIVED":
        return "derived"
    return "original"


def normalise_kernel(kernel: str | None) -> str:
    """ConvolutionKernel with each value stripped; several values joined by a backslash."""
    if not kernel:
        return ""
    return "\\".join(v.strip() for v in kernel.split("\\") if v.strip())


_SIEMENS_KERNEL = re.compile(r"^[A-Z][a-z]{0,2}(\d{2})")
_CANON_KERNEL = re.compile(r"^FC(\d{1,3})", re.IGNORECASE)


def kernel_class(vendor_name: str, kernel: str | None) -> str:
    """soft, sharp or unknown: a documented heuristic over vendor kernel names.

    Sharp kernels (bone/lung/edge) carry several times the noise of soft-tissue ones
    and shift segmentation (shared/STUDY.md), so the class is worth a column even
    though the names are vendor-specific. Rules: Siemens [letters]NN with NN >= 60;
    Canon/Toshiba FCnn with nn >= 30; GE names with BONE, LUNG or EDGE; Philips D, E,
    L and the Y-series. Names not covered are "unknown", never guessed.
    """
    if not kernel:
        return "unknown"
    first = kernel.split("\\")[0].strip()
    up = first.upper()
    if vendor_name == "SIEMENS":
        m = _SIEMENS_KERNEL.match(first)
        return ("sharp" if int(m.group(1)) >= 60 else "soft") if m else "unknown"
    if vendor_name == "CANON":
        m = _CANON_KERNEL.match(first)
        return ("sharp" if int(m.group(1)) >= 30 else "soft") if m else "unknown"
    if vendor_name == "GE":
        if any(w in up for w in ("BONE", "LUNG", "EDGE")):
            return "sharp"
        if any(w in up for w in ("SOFT", "STANDARD", "STND", "CHEST", "DETAIL")):
            return "soft"
        return "unknown"
    if vendor_name == "PHILIPS":
        if up in ("A", "B", "C", "UA", "UB", "UC"):
            return "soft"
        if up in ("D", "E", "EB", "L", "LA") or (up.startswith("Y") and len(up) <= 2):
            return "sharp"
        return "unknown"
    return "unknown"
