"""Header values: parsed numbers, decoded text and the classes the study sorts by.

Pure functions over the text ``read_headers`` returns: numbers out of DS/IS strings,
text re-decoded by the file's character set, and the normalised vendor, orientation,
image type and kernel class of a series.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence

# Text values that may carry non-ASCII characters in the file's character set.
TEXT_KEYWORDS = ("Manufacturer", "InstitutionName", "ManufacturerModelName",
                 "BodyPartExamined", "ConvolutionKernel", "PatientID", "PatientName")


def decode_text(values: dict[str, str]) -> None:
    """Re-decode text the scanner passed through as raw bytes, by SpecificCharacterSet.

    gdcm hands byte strings to Python as UTF-8 with surrogate escapes; an
    InstitutionName in ISO 8859-1 or JIS (ISO 2022) must be decoded by the file's
    declared character set, or a mapping file would never match it.
    """
    if all(values.get(kw, "").isascii() and "\x1b" not in values.get(kw, "")
           for kw in TEXT_KEYWORDS):
        return
    from pydicom.charset import convert_encodings, decode_bytes

    charset = [c.strip() for c in values.get("SpecificCharacterSet", "").split("\\")]
    encodings = convert_encodings([c for c in charset if c] or None)
    for kw in TEXT_KEYWORDS:
        v = values.get(kw)
        if v and (not v.isascii() or "\x1b" in v):
            raw = v.encode("utf-8", "surrogateescape")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                values[kw] = decode_bytes(raw, encodings, {0x5C}).strip(" \x00")


def parse_int(text: str | None) -> int | None:
    """First value of an IS/US text as int (a decimal is cut); None when absent or malformed."""
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


def implausible(values: dict[str, str]) -> str | None:
    """Why the header ``values`` cannot be a CT image, or None.

    Rows and Columns within 1..MAX_MATRIX, NumberOfFrames within 1..MAX_FRAMES;
    SliceThickness, SpacingBetweenSlices and both PixelSpacing values, where present,
    finite and positive (mm). A reader would otherwise ask for GBs per slice, or a
    volume would get a NaN or negative voxel size. Absent values are not judged here.
    """
    from fedct.dicom.tags import MAX_FRAMES, MAX_MATRIX

    why = []
    for kw, top in (("Rows", MAX_MATRIX), ("Columns", MAX_MATRIX),
                    ("NumberOfFrames", MAX_FRAMES)):
        text = values.get(kw)
        n = parse_int(text) if text else None
        if text and (n is None or not 1 <= n <= top):
            why.append(f"{kw} {text[:20]} (not within 1-{top})")
    for kw, n in (("SliceThickness", 1), ("SpacingBetweenSlices", 1), ("PixelSpacing", 2)):
        text = values.get(kw)
        if not text:
            continue
        parts = text.split("\\")
        try:
            numbers = [float(p) for p in parts]
        except ValueError:
            numbers = []
        if len(numbers) != n or not all(math.isfinite(v) and v > 0 for v in numbers):
            what = "a positive number" if n == 1 else "two positive numbers"
            why.append(f"{kw} {text[:40]} (not {what} of mm)")
    return "; ".join(why) or None
