"""Tier 1 of the header scan: a strict walk over the top-level data elements.

The walk reads explicit or implicit VR little endian (the syntaxes of nearly every
archived CT file, compressed ones included) in Python: it reads the first few KB of a
file, jumps over values and sequences it does not need and stops after the last wanted
tag. Anything it cannot read exactly raises ``WalkDeclined`` and a slower reader
(``fedct.dicom.readers``) takes the file.
"""

from __future__ import annotations

import struct
from typing import Any

from fedct.dicom.files import file_size
from fedct.dicom.integrity import pixel_data_complete
from fedct.dicom.tags import (
    DEFLATED_LE,
    EXPLICIT_VR_BE,
    IMPLICIT_VR_LE,
    PIXEL_DATA,
    SCAN_TAGS,
    UNDEFINED_LENGTH,
)
from fedct.dicom.values import decode_text

# Key the walk adds to the values of a file that ended inside an element (its value:
# the offset it needed): the values are partial until ``integrity`` has decided.
PARTIAL = "_partial_until_byte"


class WalkDeclined(Exception):
    """The walk cannot read this file exactly; a slower reader will."""


WANTED = {(g << 16) | e: kw for kw, (g, e) in SCAN_TAGS.items()}
LAST_WANTED = max(WANTED)
# Values the catalogue reads whose dictionary VR is binary (needed in implicit VR).
BINARY_VR = {"Rows": "US", "Columns": "US", "SamplesPerPixel": "US", "BitsAllocated": "US"}
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC",
                       b"UN", b"UR", b"UT", b"UV"})
_SHORT_VRS = frozenset({b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD",
                        b"IS", b"LO", b"LT", b"PN", b"SH", b"SL", b"SS", b"ST", b"TM",
                        b"UI", b"UL", b"US"})
# Header length of an explicit-VR element by its VR: 12 (4-byte length) or 8.
HEADER_LENGTH = {**{vr: 12 for vr in _LONG_VRS}, **{vr: 8 for vr in _SHORT_VRS}}
NUMBER_FORMATS = {b"US": "H", b"SS": "h", b"UL": "I", b"SL": "i", b"FL": "f", b"FD": "d"}
_EXPLICIT_SHORT = struct.Struct("<HH2sH").unpack_from
_IMPLICIT = struct.Struct("<HHI").unpack_from
_UINT32 = struct.Struct("<I").unpack_from
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
# Transfer syntaxes whose data set is not little endian or not plain (deflated).
WALK_REFUSES = frozenset({EXPLICIT_VR_BE, DEFLATED_LE, "1.2.840.10008.1.2.4.95"})
WINDOW = 16384  # first read: the header of most files fits
_MAX_HEADER = 64 << 20  # a "header" beyond this is not one
_MAX_DEPTH = 16


class _Window:
    """Bytes of a file from ``base``; grows or moves so that a requested range is in it."""

    __slots__ = ("fh", "size", "base", "buf")

    def __init__(self, fh: Any, size: int) -> None:
        self.fh, self.size, self.base = fh, size, 0
        self.buf = fh.read(WINDOW)

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
        if self.base <= pos <= end and pos + n - self.base <= 4 * WINDOW:
            self.fh.seek(end)
            self.buf += self.fh.read(max(pos + n - end, WINDOW))
        else:  # jump over a long value: start a new window at pos
            self.fh.seek(pos)
            self.base = pos
            self.buf = self.fh.read(max(n, WINDOW))
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
    size = file_size(path) if size is None else size
    with open(path, "rb") as fh:
        win = _Window(fh, size)
        buf = win.buf
        if len(buf) < 132 or buf[128:132] != b"DICM":
            raise WalkDeclined("no DICOM preamble")
        raw: dict[str, bytes | str] = {}
        try:
            pos = _walk_meta(win, raw)
            ts = _text(raw.get("TransferSyntaxUID", b""))
            if not ts or ts in WALK_REFUSES:
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
    rule with ``HEADER_LENGTH`` for speed.
    """
    hdr = HEADER_LENGTH.get(vr)
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
        kw = WANTED.get((g << 16) | e)
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
    wanted, header_length = WANTED, HEADER_LENGTH
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
        if tag > LAST_WANTED:
            return pos, tag == PIXEL_DATA
        pos += hdr
        if ln == UNDEFINED_LENGTH:
            # A sequence (or UN holding one, encoded implicit VR): skip it item by item.
            pos = skip_sequence(win, pos, explicit and vr != b"UN", 0)
            buf, base = win.buf, win.base
            end = base + len(buf)
            continue
        kw = wanted.get(tag)
        if kw is not None:
            voff = win.need(pos, ln)
            buf, base = win.buf, win.base
            end = base + len(buf)
            value = buf[voff:voff + ln]
            fmt = NUMBER_FORMATS.get(vr) if explicit else None
            if fmt is None and not explicit and kw in BINARY_VR:
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


def skip_sequence(win: _Window, pos: int, explicit: bool, depth: int) -> int:
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
        if ln != UNDEFINED_LENGTH:
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
            if ln == UNDEFINED_LENGTH:
                pos = skip_sequence(win, pos, explicit and vr != b"UN", depth + 1)
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
    decode_text(values)
    return values
