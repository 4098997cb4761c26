"""Is the file whole? The cheap tail check and the slow, exact check with pydicom.

A file cut short in transfer must never be catalogued as a good image; a header that
merely lacks a required tag is a different reject. ``pixel_data_complete`` confirms the
common case from the last few bytes; ``integrity`` decides everything else.
"""

from __future__ import annotations

import os
import struct
import warnings
from typing import Any

from fedct.dicom import deflated
from fedct.dicom.files import exc_detail, file_size, quiet_pydicom
from fedct.dicom.tags import (
    CT_IMAGE_STORAGE,
    DEFLATED_LE,
    EXPLICIT_VR_LE,
    IMPLAUSIBLE,
    IMPLICIT_VR_LE,
    MISSING_TAG,
    NATIVE_TRANSFER_SYNTAXES,
    PIXEL_DATA,
    TRUNCATED,
    UNDEFINED_LENGTH,
)
from fedct.dicom.values import parse_int

_SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
# pydicom fallback: values longer than this are skipped with a seek, not read.
_DEFER_BYTES = 1024


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
                      * (parse_int(values.get("NumberOfFrames")) or 1)
                      * (parse_int(values.get("SamplesPerPixel")) or 1)
                      * (parse_int(values.get("BitsAllocated")) or 16))
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

    A deflated file (Deflated Explicit VR Little Endian) is judged on its inflated data
    set by ``fedct.dicom.deflated``, which never holds more than its header in memory.
    Native pixel data must have the size its header implies (IMPLAUSIBLE otherwise: a
    65535 x 65535 header over a few bytes of pixels).
    """
    import pydicom

    if deflated.is_deflated(path):
        return deflated.integrity(path)
    size = file_size(path) if size is None else size
    with quiet_pydicom():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                ds = pydicom.dcmread(path, force=True, defer_size=_DEFER_BYTES)
            except (EOFError, struct.error) as exc:
                return TRUNCATED, exc_detail(exc, path)
            except Exception as exc:  # noqa: BLE001 - any parse failure of a DICOM file
                return TRUNCATED, f"data set cannot be parsed ({exc_detail(exc, path)})"
        return _integrity_verdict(path, size, ds, caught)


def _integrity_verdict(path: str, size: int, ds: Any, caught: list) -> tuple[str | None, str]:
    for w in caught:
        msg = str(w.message).lower()
        if "end of file" in msg or "unexpected end" in msg:
            return TRUNCATED, f"file ends early ({exc_detail(w.message, path)})"
    meta = getattr(ds, "file_meta", None)
    group_length = meta.get("FileMetaInformationGroupLength") if meta is not None else None
    if isinstance(group_length, int):
        meta_end = 132 + 12 + group_length  # preamble, DICM, (0002,0000) itself
        if meta_end > size:
            return TRUNCATED, f"file meta header needs {meta_end} bytes, file has {size}"
    tags = sorted(ds.keys())
    if not tags and meta is not None and len(meta):
        return TRUNCATED, f"file ends after the file meta header ({size} bytes)"
    extent, has = size, f"file has {size}"
    end = None
    if tags:
        last = ds.get_item(tags[-1], keep_deferred=True)
        tell = getattr(last, "value_tell", None)
        length = getattr(last, "length", None)
        if tell is not None and length is not None and length != UNDEFINED_LENGTH:
            end = tell + length
            if end > extent:
                return TRUNCATED, f"element {last.tag} needs {end} bytes, {has}"
        elif tags[-1] == PIXEL_DATA:
            if _pread(path, max(size - 8, 0), 8) != _SEQUENCE_DELIMITER:
                # pydicom accepts a delimiter cut inside its length field; we do not.
                return TRUNCATED, "encapsulated pixel data without its closing delimiter"
    ts = str(meta.get("TransferSyntaxUID", "") or "") if meta is not None else ""
    pixels = ds.get_item(PIXEL_DATA, keep_deferred=True) if PIXEL_DATA in ds else None
    length = getattr(pixels, "length", None)
    if ts in NATIVE_TRANSFER_SYNTAXES and length not in (None, UNDEFINED_LENGTH):
        expected = deflated.native_pixel_bytes(ds)
        if expected is not None and length != expected:
            return IMPLAUSIBLE, (f"PixelData holds {length} bytes, its header (Rows x "
                                 f"Columns x frames x samples x bits) needs {expected}")
    sop = str(meta.get("MediaStorageSOPClassUID", "") or "") if meta is not None else ""
    is_image = (0x00280010 in ds) or sop.startswith(CT_IMAGE_STORAGE)
    if is_image and 0x7FE00010 not in ds:
        if end is not None and end < extent:
            return TRUNCATED, (f"image data set stops at byte {end} of {extent} "
                               "(cut mid-element)")
        return MISSING_TAG, (f"missing PixelData: image header ends cleanly at byte {extent} "
                             "(cut at an element boundary, or a header-only file)")
    return None, ""
