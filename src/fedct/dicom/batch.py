"""Tier 0 of the header scan: the walk of :mod:`fedct.dicom.walk` over many files at once.

The per-file walk spends most of its time in the Python interpreter, one data element
after the other (about a microsecond each). Here the first ``FIRST_WINDOW`` bytes of every
file of a chunk (``WINDOW`` for the few that need more) go into one numpy array and the
walk advances all files together: step k decodes the k-th element header of every file
still walking with a few array operations, so the interpreter's cost is per step and per
chunk, not per element and per file.

It follows the same rules as ``walk_header`` (explicit or implicit VR little endian, a
strict order of tags, known VRs only, sequences skipped item by item, stop after the last
wanted tag) and vouches only for the plain case: a whole single-frame CT image whose
values are all ASCII, every required tag present, none implausible, its pixel data
confirmed complete. Every other file (truncated, rejected, non-ASCII text, multi-frame,
a value beyond the window, anything the walk would decline...) is left to
``read_headers``, which gives its exact answer, so a file this module does not accept
costs speed, never a different result; ``tests/dicom/test_batch.py`` checks that both
give the same headers.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedct.dicom.integrity import pixel_data_complete
from fedct.dicom.tags import (
    ENHANCED_CT_IMAGE_STORAGE,
    EXPLICIT_VR_LE,
    IMPLICIT_VR_LE,
    MAX_MATRIX,
    MEDIA_STORAGE_DIRECTORY,
    REQUIRED,
    UNDEFINED_LENGTH,
)
from fedct.dicom.values import implausible
from fedct.dicom.walk import (
    BINARY_VR,
    HEADER_LENGTH,
    LAST_WANTED,
    NUMBER_FORMATS,
    WALK_REFUSES,
    WANTED,
    WINDOW,
    WalkDeclined,
    skip_sequence,
)

_TAGS = np.array(sorted(WANTED), dtype=np.int64)
_KEYWORDS = [WANTED[int(t)] for t in _TAGS]
_KW = {kw: i for i, kw in enumerate(_KEYWORDS)}
_TS = _KW["TransferSyntaxUID"]
# Keyword index of a tag (-1: not wanted) as _KEYWORD_OF[_GROUP_ROW[group] << 16 | element]:
# two lookups instead of a binary search; groups not wanted index the last row, all -1.
_GROUPS = sorted({int(t) >> 16 for t in _TAGS})
_GROUP_ROW = np.full(1 << 16, len(_GROUPS), dtype=np.intp)
_GROUP_ROW[_GROUPS] = np.arange(len(_GROUPS))
_KEYWORD_OF = np.full((len(_GROUPS) + 1) << 16, -1, dtype=np.int8)
for _k, _t in enumerate(_TAGS.tolist()):
    _KEYWORD_OF[_GROUP_ROW[_t >> 16] << 16 | _t & 0xFFFF] = _k
_N_META = int(np.count_nonzero(_TAGS >> 16 == 0x0002))  # group 0002 sorts first
_REQUIRED = [_KW[kw] for kw in REQUIRED]
# Header length of an explicit-VR element by its VR read as a little-endian uint16.
_VR_HEADER = np.zeros(1 << 16, dtype=np.int64)
for _vr, _hl in HEADER_LENGTH.items():
    _VR_HEADER[_vr[0] | _vr[1] << 8] = _hl
_VR_US = b"US"[0] | b"US"[1] << 8
_VR_UN = b"UN"[0] | b"UN"[1] << 8
_FORMAT_OF_VR = {v[0] | v[1] << 8: f for v, f in NUMBER_FORMATS.items()}
_NUMERIC_VRS = np.array(sorted(v[0] | v[1] << 8 for v in NUMBER_FORMATS), dtype=np.int64)
_BINARY_IMPLICIT = np.array([_KW[kw] for kw in BINARY_VR], dtype=np.int64)
_SEP = 0x1F  # between values while decoding; a value holding it is left to read_headers
_SPECIAL = np.zeros(256, dtype=bool)  # bytes that send a value to read_headers:
_SPECIAL[0x80:] = True  # non-ASCII (decoded by the character set there)
_SPECIAL[[0x1B, _SEP]] = True  # ISO 2022 escapes; the separator
_PAD = np.zeros(256, dtype=bool)
_PAD[[0x20, 0x00]] = True  # stripped from both ends of a value, as walk_header does
# First read: the header up to the last wanted tag, and the pixel data's element header of
# a small file, lie in it for nearly every file; copying fewer bytes costs less (files the
# walk cannot vouch for in it are read again up to WINDOW).
FIRST_WINDOW = 8192
_NATIVE = (IMPLICIT_VR_LE, EXPLICIT_VR_LE)  # pixel data checked in the window


@dataclass
class Batch:
    """What the batch walk read: ``ok[i]`` when file ``i`` is a plain CT image it vouches
    for, and then ``values[kw][i]`` its value of each keyword of ``SCAN_TAGS`` (stripped
    text as ``walk_header`` gives it; None when absent or empty, and for files not ok)."""

    ok: np.ndarray
    values: dict[str, list[str | None]]


class _Row:
    """One file's window as ``walk.skip_sequence`` reads it (``need``/``buf``); whatever
    lies beyond the window or the file declines the file."""

    __slots__ = ("buf", "base", "size")

    def __init__(self, buf: bytes, size: int) -> None:
        self.buf, self.base, self.size = buf, 0, size

    def need(self, pos: int, n: int) -> int:
        if pos + n > len(self.buf) or pos + n > self.size:
            raise WalkDeclined("beyond the window")
        return pos


def read_batch(paths: Sequence[str], sizes: Sequence[int]) -> Batch:
    """Walk the headers of ``paths`` (their sizes in bytes) together; see the module.

    The first ``FIRST_WINDOW`` bytes of each file hold most headers; the files the walk
    could not vouch for with that much, and that have more, are read again up to
    ``WINDOW`` (a walk that succeeds in fewer bytes takes the same steps in more).
    """
    n = len(paths)
    size = np.asarray(sizes, dtype=np.int64).reshape(n)
    ok, table, got = _read(paths, size, FIRST_WINDOW)
    retry = np.flatnonzero(~ok & (got == FIRST_WINDOW) & (size > FIRST_WINDOW))
    # In parts no larger than the first read's buffer, which they reuse.
    step = max(1, n * FIRST_WINDOW // WINDOW)
    for part in (retry[i:i + step] for i in range(0, len(retry), step)):
        again, again_table, _ = _read([paths[i] for i in part.tolist()], size[part], WINDOW)
        ok[part] = again
        table[:, part[again]] = again_table[:, again]
    return Batch(ok, dict(zip(_KEYWORDS, table.tolist(), strict=True)))


def _read(paths: Sequence[str], size: np.ndarray, window: int
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The batch walk of ``paths`` over their first ``window`` bytes: (ok, table of values
    (keyword x file, None for files not ok), bytes read)."""
    n = len(paths)
    flat = _buffer(n, window)
    rows = flat[: n * window].reshape(n, window)
    got = np.full(n, -1, dtype=np.int64)
    read, op, pread, close = [], os.open, os.preadv, os.close
    for path, row in zip(paths, rows, strict=True):  # a view per row, made in C
        try:
            fd = op(path, os.O_RDONLY)
        except (OSError, ValueError):
            read.append(-1)
            continue  # read_headers says why
        try:
            read.append(pread(fd, [row], 0))
        except OSError:
            read.append(-1)
        finally:
            close(fd)
    got[:] = read
    # Not DICOM, or shorter than when it was listed: read_headers decides.
    ok = (got == np.minimum(size, window)) & (got >= 132)
    ok[ok] = (rows[ok, 128:132] == np.frombuffer(b"DICM", np.uint8)).all(axis=1)
    walked, hits = _walk(flat, window, got, size, ok)
    ok, table = _accept(paths, flat, window, got, size, walked, hits)
    return ok, table, got


_BUFFERS = threading.local()


def _buffer(n: int, window: int) -> np.ndarray:
    """``n`` windows and 16 bytes (an element header read at a row's end). Kept per
    thread: a fresh array would be paged in anew on every chunk."""
    flat = getattr(_BUFFERS, "flat", None)
    if flat is None or len(flat) < n * window + 16:
        flat = _BUFFERS.flat = np.empty(n * window + 16, dtype=np.uint8)
    return flat[: n * window + 16]


def _walk(flat: np.ndarray, window: int, got: np.ndarray, size: np.ndarray, ok: np.ndarray
          ) -> tuple[np.ndarray, np.ndarray]:
    """Element by element, all files at once, up to the first tag after the last wanted.

    Returns (walked, hits): ``walked[i]`` when file ``i`` reached that tag cleanly inside
    its window; ``hits`` one row (file, keyword index, value offset, length, VR code,
    explicit) per wanted value found.

    The state of the files still walking is kept aligned with ``active`` (their indices)
    and compacted only on a step where some file stops, so that a step costs a few array
    operations on the files that walk, not gathers from and scatters into per-file arrays.
    """
    n = len(got)
    walked = np.zeros(n, dtype=bool)
    ts_at = np.full((n, 2), -1, dtype=np.int64)  # the TransferSyntaxUID's offset, length
    hits: list[np.ndarray] = []
    active = np.flatnonzero(ok)
    base = active * window  # where each file's window starts in flat
    p = np.full(len(active), 132, dtype=np.int64)  # the next element header
    lim, end = got[active], size[active]  # bytes in the window; the file's size
    prev = np.full(len(active), -1, dtype=np.int64)  # the last tag
    explicit = np.ones(len(active), dtype=bool)
    meta = np.ones(len(active), dtype=bool)  # still in group 0002 (always explicit VR)
    twelve = np.arange(12, dtype=np.int64)
    while active.size:
        room = p + 8 <= lim
        if not room.all():
            active, base, p, lim, end, prev, explicit, meta = (
                x[room] for x in (active, base, p, lim, end, prev, explicit, meta))
            if not active.size:
                break
        head = flat[(base + p)[:, None] + twelve]  # (k, 12) element headers
        u16 = head.view("<u2")
        u32 = head.view("<u4")
        group, element = u16[:, 0], u16[:, 1]
        tag = group.astype(np.int64) << 16 | element
        all_explicit = explicit.all()
        if all_explicit:
            vr = u16[:, 2].astype(np.int64)
            hdr = _VR_HEADER[vr]
            length = np.where(hdr == 12, u32[:, 2], u16[:, 3]).astype(np.int64)
        else:
            vr = np.where(explicit, u16[:, 2], 0).astype(np.int64)
            hdr = np.where(explicit, _VR_HEADER[vr], 8)
            length = np.where(explicit, np.where(hdr == 12, u32[:, 2], u16[:, 3]),
                              u32[:, 1]).astype(np.int64)
        any_meta = meta.any()
        if any_meta:
            leaving = meta & (group != 0x0002)
            if leaving.any():
                # Out of group 0002: the transfer syntax says how the data set is encoded.
                out = np.flatnonzero(leaving)
                for ts, at in _by_text(flat, window, active[out], ts_at[active[out]]).items():
                    at = out[at]
                    if ts and ts not in WALK_REFUSES:
                        explicit[at], meta[at] = ts != IMPLICIT_VR_LE, False
                    else:  # big endian, deflated, none: read_headers
                        p[at] = lim[at]
                continue  # the same element again, now as one of the data set
        # What walk_header declines or could not read here: read_headers decides.
        bad = (hdr == 0) | (p + hdr > lim)
        if any_meta:
            data = ~meta
            bad |= data & ((tag <= prev) | (group == 0xFFFE))
            bad |= meta & (length == UNDEFINED_LENGTH)
            stop = data & ~bad & (tag > LAST_WANTED)
        else:
            bad |= (tag <= prev) | (group == 0xFFFE)
            stop = ~bad & (tag > LAST_WANTED)
        go = ~(bad | stop)
        if not go.all():
            walked[active[stop]] = True
            active, base, p, lim, end, explicit, meta, tag, hdr, length, vr, group, element = (
                x[go] for x in (active, base, p, lim, end, explicit, meta, tag, hdr, length,
                                vr, group, element))
        prev = tag
        p = p + hdr
        seq = length == UNDEFINED_LENGTH
        any_seq = seq.any()
        if any_seq:  # a sequence: item by item, as walk_header skips it
            for j in np.flatnonzero(seq):
                row = _Row(flat[base[j]: base[j] + lim[j]].tobytes(), int(end[j]))
                try:
                    p[j] = skip_sequence(row, int(p[j]), bool(explicit[j]) and vr[j] != _VR_UN,
                                         0)  # type: ignore[arg-type]
                except WalkDeclined:
                    p[j] = end[j]  # ends this file's walk, not walked
            length = np.where(seq, 0, length)
        k = _KEYWORD_OF[_GROUP_ROW[group] << 16 | element]
        wanted = k >= 0
        if any_seq:
            wanted &= ~seq
        if wanted.any():
            inside = p + length <= lim
            w = wanted & inside
            hits.append(np.stack([active[w], k[w], p[w], length[w], vr[w],
                                  explicit[w].astype(np.int64)], axis=1))
            is_ts = w & (k == _TS)
            if is_ts.any():
                ts_at[active[is_ts]] = np.stack([p[is_ts], length[is_ts]], axis=1)
            keep = ~(wanted & ~inside)
        else:
            keep = None
        p = p + length
        # Past the file's end, or a wanted value past the window: read_headers.
        within = p < end
        keep = within if keep is None else keep & within
        if not keep.all():
            active, base, p, lim, end, prev, explicit, meta = (
                x[keep] for x in (active, base, p, lim, end, prev, explicit, meta))
    table = np.concatenate(hits) if hits else np.empty((0, 6), dtype=np.int64)
    return walked, table


def _by_text(flat: np.ndarray, window: int, files: np.ndarray, at: np.ndarray
             ) -> dict[str | None, np.ndarray]:
    """Positions in ``files`` by the text of one value (offset, length per file; offset
    -1: absent), stripped as walk_header strips it; each distinct value decoded once."""
    width = int(max(at[:, 1].max(initial=0), 1))
    present = at[:, 0] >= 0
    index = (files * window + np.where(present, at[:, 0], 0))[:, None] + np.arange(width)
    raw = np.where(np.arange(width) < np.where(present, at[:, 1], 0)[:, None],
                   flat[np.minimum(index, len(flat) - 1)], 0).astype(np.uint8)
    keys, inverse = np.unique(raw.view(f"V{width}").ravel(), return_inverse=True)
    out: dict[str | None, list[np.ndarray]] = {}
    for j, key in enumerate(keys):
        text = key.tobytes().decode("ascii", "surrogateescape").strip(" \x00") or None
        out.setdefault(text, []).append(np.flatnonzero(inverse.ravel() == j))
    return {t: np.concatenate(f) for t, f in out.items()}


def _accept(paths: Sequence[str], flat: np.ndarray, window: int, got: np.ndarray,
            size: np.ndarray, walked: np.ndarray, hits: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray]:
    """Decode the values of the walked files; keep those that are plain CT images.
    Returns (ok, the keyword x file table of values, None for the files not ok)."""
    n = len(got)
    ok = walked.copy()
    hits = hits[ok[hits[:, 0]]]
    # A meta element twice (the walk checks the order of the data set's tags, not of
    # group 0002's): read_headers.
    meta = hits[hits[:, 1] < _N_META]
    key = meta[:, 0] * _N_META + meta[:, 1]
    uniq, count = np.unique(key, return_counts=True)
    ok[uniq[count > 1] // _N_META] = False
    # One row per keyword (cols[kw] is a view of it), one column per file.
    table = np.full((len(_KEYWORDS), n), None, dtype=object)
    cols = dict(zip(_KEYWORDS, table, strict=True))
    f, k, off, length, vr, exp = hits.T
    start = f * window + off
    binary = ((exp == 1) & np.isin(vr, _NUMERIC_VRS)) | ((exp == 0) & np.isin(k, _BINARY_IMPLICIT))
    number = _decode_binary(flat, table, ok, binary, f, k, start, length, vr, exp)
    _decode_text(flat, table, ok, ~binary, f, k, start, length)
    # The checks of readers._check, for the plain case only.
    ok &= cols["Modality"] == "CT"
    ok &= table[_REQUIRED].astype(bool).all(axis=0)
    ok &= ~cols["NumberOfFrames"].astype(bool)
    for kw in ("SOPClassUID", "MediaStorageSOPClassUID"):
        ok &= (cols[kw] != ENHANCED_CT_IMAGE_STORAGE) & (cols[kw] != MEDIA_STORAGE_DIRECTORY)
    # ``implausible``: the matrix from the numbers, each spacing text judged once.
    for kw in ("Rows", "Columns"):
        ok &= (number[kw] >= 1) & (number[kw] <= MAX_MATRIX)
    for kw in ("SliceThickness", "SpacingBetweenSlices", "PixelSpacing"):
        texts = cols[kw][ok]
        verdict = {t: t is None or implausible({kw: t}) is None for t in set(texts)}
        ok[ok] = [verdict[t] for t in texts]
    ok &= _complete(paths, flat, window, got, size, cols, number, ok)
    table[:, ~ok] = None
    return ok, table


def _decode_binary(flat, table, ok, sel, f, k, start, length, vr, exp  # noqa: ANN001
                   ) -> dict[str, np.ndarray]:
    """Binary numbers as walk_header writes them: the values' decimal text, by "\\".
    Returns the single US values of ``BINARY_VR``'s keywords as numbers (-1: not one)."""
    number = {kw: np.full(len(ok), -1, dtype=np.int64) for kw in BINARY_VR}
    us = sel & (length == 2) & ((exp == 0) | (vr == _VR_US))
    if us.any():
        fu, ku = f[us], k[us]
        value = flat[start[us]].astype(np.int64) | flat[start[us] + 1].astype(np.int64) << 8
        table[ku, fu] = value.astype(str).astype(object)
        for kw in BINARY_VR:
            m = ku == _KW[kw]
            number[kw][fu[m]] = value[m]
    for j in np.flatnonzero(sel & ~us):  # other numbers: rare in the tags read
        fmt = _FORMAT_OF_VR.get(int(vr[j]), "H") if exp[j] else "H"
        width = struct.calcsize(fmt)
        if length[j] % width:
            ok[f[j]] = False
            continue
        raw = flat[start[j]: start[j] + length[j]].tobytes()
        text = "\\".join(str(v) for v in struct.unpack(f"<{length[j] // width}{fmt}", raw))
        table[k[j], f[j]] = text or None
    return number


def _decode_text(flat, table, ok, sel, f, k, start, length) -> None:  # noqa: ANN001
    """ASCII text, blanks and NULs stripped at both ends; a file with any other byte in a
    value (a character set to decode, an escape) is left to read_headers."""
    f, k, s, n = f[sel], k[sel], start[sel].copy(), length[sel].copy()
    if not len(f):
        return
    for lead in (False, True):  # strip trailing, then leading padding
        todo = np.arange(len(n))
        while todo.size:
            at = s[todo] if lead else s[todo] + n[todo] - 1
            todo = todo[(n[todo] > 0) & _PAD[flat[at]]]
            n[todo] -= 1
            s[todo] += lead
    # One gather of every value, each followed by the separator (flat's last byte); int32
    # offsets where they fit gather about twice as fast as int64 ones.
    offset = np.int32 if len(flat) < 2**31 else np.int64
    s, n = s.astype(offset), n.astype(offset)
    flat[-1] = _SEP
    out = np.cumsum(n + 1, dtype=offset) - (n + 1)
    index = np.repeat(s - out, n + 1)
    index += np.arange(len(index), dtype=offset)
    index[out + n] = len(flat) - 1
    data = flat[index[:-1]]
    special = _SPECIAL[data]
    special[(out + n)[:-1]] = False
    if special.any():  # rare: find the values, leave their files to read_headers
        seg = np.repeat(np.arange(len(n)), n + 1)[:-1]
        ok[f[np.unique(seg[special])]] = False
        data[special] = ord("?")
    text = np.array(data.tobytes().decode("ascii").split(chr(_SEP)), dtype=object)
    text[n == 0] = None
    table[k, f] = text


def _complete(paths: Sequence[str], flat: np.ndarray, window: int, got: np.ndarray,
              size: np.ndarray,
              cols: dict[str, np.ndarray], number: dict[str, np.ndarray], ok: np.ndarray
              ) -> np.ndarray:
    """``pixel_data_complete`` of the files in ``ok``: native pixel data whose element
    header lies in the window is checked there, every other file by reading it."""
    ts = cols["TransferSyntaxUID"]
    implicit = ts == IMPLICIT_VR_LE
    rows, columns = number["Rows"], number["Columns"]
    samples = np.where(number["SamplesPerPixel"] > 0, number["SamplesPerPixel"], 1)
    bits = np.where(number["BitsAllocated"] > 0, number["BitsAllocated"], 16)
    # Absent values count as pixel_data_complete counts them; any other text: read.
    known = (rows >= 0) & (columns >= 0)
    for kw in ("SamplesPerPixel", "BitsAllocated"):
        known &= (number[kw] >= 0) | ~cols[kw].astype(bool)
    nbytes = (rows * columns * samples * bits + 7) // 8
    nbytes += nbytes & 1
    hl = np.where(implicit, 8, 12)
    at = size - nbytes - hl
    here = ok & known & (implicit | (ts == EXPLICIT_VR_LE)) & (at >= 0) & (at + hl <= got)
    head = flat[(np.flatnonzero(here) * window + at[here])[:, None] + np.arange(12)]
    u32 = head.view("<u4").astype(np.int64)
    tag = (head[:, :4] == np.frombuffer(b"\xe0\x7f\x10\x00", np.uint8)).all(axis=1)
    vr = head[:, 4:6].copy().view("<u2").ravel()
    explicit_ok = (tag & np.isin(vr, _PIXEL_VRS) & (head[:, 6] == 0) & (head[:, 7] == 0)
                   & (u32[:, 2] == nbytes[here]))
    done = np.zeros(len(got), dtype=bool)
    done[here] = np.where(implicit[here], tag & (u32[:, 1] == nbytes[here]), explicit_ok)
    for i in np.flatnonzero(ok & ~here):  # compressed, or the header beyond the window
        vals = {kw: cols[kw][i] for kw in _PIXELS if cols[kw][i]}
        done[i] = pixel_data_complete(paths[i], int(size[i]), vals)
    return done


_PIXELS = ("TransferSyntaxUID", "Rows", "Columns", "NumberOfFrames", "SamplesPerPixel",
           "BitsAllocated")
_PIXEL_VRS = np.array([v[0] | v[1] << 8 for v in (b"OW", b"OB")], dtype=np.uint16)
