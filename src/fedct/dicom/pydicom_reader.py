"""Tier 3 of the header scan: pydicom, for what the faster readers cannot read or express.

Enhanced multi-frame images keep their geometry in functional-group sequences, which
only a full parse reaches; broken files get their reject reason here.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any

from fedct.dicom import deflated
from fedct.dicom.files import exc_detail, has_dicm_magic, not_dicom_detail, quiet_pydicom
from fedct.dicom.tags import NOT_DICOM, SCAN_TAGS, TRUNCATED, UNREADABLE, Header


def pydicom_values(path: str) -> tuple[dict[str, str] | None, Header | None, Any]:
    """Header values read by pydicom, or a rejected Header when it cannot be read."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with quiet_pydicom():
            # pydicom inflates a deflated data set whole, pixel data included (a bomb
            # of a few MB can be GBs): its header is read from a bounded prefix instead.
            ds = (deflated.read_header(path) if deflated.is_deflated(path)
                  else pydicom.dcmread(path, stop_before_pixels=True))
    except InvalidDicomError as exc:
        if has_dicm_magic(path):
            return None, Header(path, {}, "pydicom", TRUNCATED, "DICOM preamble but no "
                                f"readable header ({exc_detail(exc, path)})"), None
        return None, Header(path, {}, "pydicom", NOT_DICOM, not_dicom_detail(path)), None
    except (EOFError, struct.error) as exc:
        return None, Header(path, {}, "pydicom", TRUNCATED, exc_detail(exc, path)), None
    except OSError as exc:
        return None, Header(path, {}, "pydicom", UNREADABLE, exc_detail(exc, path)), None
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on broken files
        if has_dicm_magic(path):
            return None, Header(path, {}, "pydicom", TRUNCATED, "header cannot be parsed "
                                f"({exc_detail(exc, path)})"), None
        return None, Header(path, {}, "pydicom", NOT_DICOM, not_dicom_detail(path)), None
    values: dict[str, str] = {}
    with quiet_pydicom():
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
    from pydicom.valuerep import PersonName

    if isinstance(value, PersonName):  # iterable over its characters, but one value
        return str(value)
    if isinstance(value, Iterable):
        return "\\".join(str(v) for v in value)
    return str(value)


def enhanced_geometry(ds: Any, values: dict[str, str]
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
