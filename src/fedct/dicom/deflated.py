"""Deflated files (Deflated Explicit VR Little Endian) read with bounded memory.

The whole data set of such a file is one deflate stream, so a few MB on disk can
inflate to many GB (a deflate bomb): pydicom inflates all of it in memory before it
parses a tag. Here only the first ``HEADER_BYTES`` of the inflated data set are kept
(the header; pixel data comes last), and the rest is inflated chunk by chunk and
counted, never kept, and only as far as the header says the data set reaches. A header
that disagrees with its pixel data is rejected before anything more is inflated.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Any

from fedct.dicom.tags import (
    DEFLATED_LE,
    IMPLAUSIBLE,
    MISSING_TAG,
    PIXEL_DATA,
    TRUNCATED,
    UNDEFINED_LENGTH,
    UNREADABLE,
)
from fedct.dicom.values import parse_int

# Inflated bytes of a data set kept in memory: its header must fit (pixel data comes last).
HEADER_BYTES = 8 << 20
# Inflated bytes allowed after the pixel data (trailing padding, digital signatures).
TRAILING_BYTES = 1 << 20
_CHUNK = 1 << 20  # compressed bytes read, and inflated bytes made, per step
_META_BYTES = 1 << 16  # the file meta group is read from the file's first bytes
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC",
                       b"UN", b"UR", b"UT", b"UV"})
_STREAM_CUT = "deflated data set ends early (incomplete or truncated stream)"


def data_set_start(head: bytes) -> tuple[int, str] | None:
    """(offset of the data set, TransferSyntaxUID) from a file's first bytes, or None.

    The file meta group (0002) is explicit VR little endian, after the 128-byte
    preamble and ``DICM`` (or at the start of a file without a preamble).
    """
    pos = 132 if head[128:132] == b"DICM" else 0
    ts = ""
    while len(head) >= pos + 8 and head[pos:pos + 2] == b"\x02\x00":
        elem, vr = struct.unpack_from("<H2s", head, pos + 2)
        if vr in _LONG_VRS:
            if len(head) < pos + 12:
                return None
            start, length = pos + 12, struct.unpack_from("<I", head, pos + 8)[0]
        else:
            start, length = pos + 8, struct.unpack_from("<H", head, pos + 6)[0]
        if elem == 0x0010:
            ts = head[start:start + length].decode("ascii", "replace").strip(" \x00")
        pos = start + length
    return (pos, ts) if len(head) >= pos else None


def is_deflated(path: str) -> bool:
    """Whether ``path`` declares the Deflated Explicit VR Little Endian transfer syntax."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(_META_BYTES)
    except OSError:
        return False
    found = data_set_start(head)
    return found is not None and found[1] == DEFLATED_LE


@dataclass
class _Stream:
    """The inflated data set: its first bytes kept, the rest inflated on demand."""

    fh: Any
    inflater: Any
    kept: bytes = b""
    total: int = 0  # inflated bytes made so far
    cut: bool = False  # the file ended inside the deflate stream
    pending: bytes = b""  # compressed input not inflated yet (output was capped)

    def step(self) -> bytes:
        """Inflate up to ``_CHUNK`` more bytes (b"" at the end or where the stream is cut)."""
        while not self.inflater.eof:
            data = self.pending or self.fh.read(_CHUNK)
            if not data:
                self.cut = True
                return b""
            try:
                out = self.inflater.decompress(data, _CHUNK)
            except zlib.error:
                self.cut = True
                return b""
            self.pending = self.inflater.unconsumed_tail
            if out:
                self.total += len(out)
                return out
        return b""


def _open(path: str, keep: int) -> _Stream:
    fh = open(path, "rb")  # noqa: SIM115 - closed by the callers
    found = data_set_start(fh.read(_META_BYTES))
    if found is None:
        fh.close()
        raise ValueError("file meta header cannot be parsed")
    fh.seek(found[0])
    stream = _Stream(fh, zlib.decompressobj(-zlib.MAX_WBITS))
    parts, n = [], 0
    while n < keep and (out := stream.step()):
        parts.append(out)
        n += len(out)
    stream.kept = b"".join(parts)
    return stream


def read_header(path: str) -> Any:
    """The header of a deflated file as a pydicom Dataset (file meta included, no pixel
    data), from at most ``HEADER_BYTES`` of inflated data. Raises what pydicom raises on
    a cut or malformed header, ValueError when the header is longer than that."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import read_dataset, read_file_meta_info

    meta = read_file_meta_info(path)
    stream = _open(path, HEADER_BYTES)
    stream.fh.close()
    if stream.cut:  # a cut value would read as a shorter one ("C" for "CT")
        raise EOFError(_STREAM_CUT)
    fp = DicomBytesIO(stream.kept)
    fp.is_little_endian, fp.is_implicit_VR = True, False
    ds = read_dataset(fp, False, True, stop_when=_at_pixel_data)
    if fp.tell() >= HEADER_BYTES:
        raise ValueError(f"header longer than {HEADER_BYTES} inflated bytes")
    ds.file_meta = meta
    return ds


def _at_pixel_data(tag: Any, vr: Any, length: int) -> bool:
    return int(tag) >= PIXEL_DATA


def integrity(path: str) -> tuple[str | None, str]:
    """(reason, detail) of a deflated file that is cut short, lacks its pixel data or
    whose pixel data disagrees with its header, else (None, ""); bounded memory.

    The pixel data must hold exactly Rows x Columns x Frames x Samples x BitsAllocated
    / 8 bytes (deflated data sets are native), and the data set must end within
    ``TRAILING_BYTES`` after it: a stream that inflates further is a deflate bomb,
    rejected once that bound is passed.
    """
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import read_dataset

    try:
        stream = _open(path, HEADER_BYTES)
    except (OSError, ValueError) as exc:
        return UNREADABLE, f"deflated file: {type(exc).__name__}: {exc}"[:200]
    try:
        if stream.cut:
            return TRUNCATED, _STREAM_CUT
        fp = DicomBytesIO(stream.kept)
        fp.is_little_endian, fp.is_implicit_VR = True, False
        try:
            ds = read_dataset(fp, False, True, stop_when=_at_pixel_data)
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types on cut data
            return TRUNCATED, f"deflated data set cannot be parsed ({type(exc).__name__})"
        pos = fp.tell()
        if pos + 12 > len(stream.kept):
            if len(stream.kept) >= HEADER_BYTES:
                return UNREADABLE, f"header longer than {HEADER_BYTES} inflated bytes"
            if 0x00280010 in ds:
                return MISSING_TAG, (f"missing PixelData: image header ends cleanly at byte "
                                     f"{len(stream.kept)} of the inflated data set")
            return None, ""
        tag_group, tag_elem, vr, length = struct.unpack_from("<HH2s2xI", stream.kept, pos)
        if (tag_group << 16 | tag_elem) != PIXEL_DATA:
            return None, ""  # no pixel data; nothing after the header to bound
        if vr not in (b"OB", b"OW") or length == UNDEFINED_LENGTH:
            return IMPLAUSIBLE, "deflated file with encapsulated or malformed pixel data"
        expected = native_pixel_bytes(ds)
        if expected is not None and length != expected:
            return IMPLAUSIBLE, (f"PixelData holds {length} bytes, its header (Rows x "
                                 f"Columns x frames x samples x bits) needs {expected}")
        end = pos + 12 + length
        limit = end + TRAILING_BYTES
        while stream.total <= limit and stream.step():
            pass
        if stream.cut:
            return TRUNCATED, _STREAM_CUT
        if stream.total < end:
            return TRUNCATED, (f"element {PIXEL_DATA:08X} needs {end} bytes, inflated data "
                               f"set has {stream.total}")
        if stream.total > limit:
            return IMPLAUSIBLE, (f"deflated data set inflates beyond its pixel data (over "
                                 f"{limit} bytes): a deflate bomb")
        return None, ""
    finally:
        stream.fh.close()


def native_pixel_bytes(ds: Any) -> int | None:
    """Bytes of native pixel data that the header of ``ds`` implies (even length)."""
    rows, cols = parse_int(str(ds.get("Rows", "") or "")), \
        parse_int(str(ds.get("Columns", "") or ""))
    if not rows or not cols:
        return None
    frames = parse_int(str(ds.get("NumberOfFrames", "") or "")) or 1
    samples = parse_int(str(ds.get("SamplesPerPixel", "") or "")) or 1
    bits = parse_int(str(ds.get("BitsAllocated", "") or "")) or 16
    n = (rows * cols * frames * samples * bits + 7) // 8
    return n + (n & 1)
