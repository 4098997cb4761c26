"""Search outputs for the fake patient identifiers a test archive carries.

Identifiers with letters (names, IDs, accession numbers, UIDs) are found as plain
substrings, in any letter case: wherever they sit, even packed against other bytes as
SQLite packs a row's cells. Identifiers made of digits only (birth dates) are found only
when not part of a longer number, and in their ISO spelling too: a plain search for an
8-digit date finds it by chance inside a 19-digit file mtime or hash once an output holds
a few thousand of them. Parquet (compressed pages) and SQLite files are also searched
cell by cell, decoded, each cell on its own line, so that a date stored as a value is
bounded there; zip (npz) and gzip files also decompressed. Formats are told by their
bytes as well as their names: a DVC remote stores files under their hashes.
"""
from __future__ import annotations

import gzip
import io
import re
import sqlite3
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

# Name parts shorter than this ("REN", "EMI") are English substrings: not searched alone.
MIN_NAME_PART = 6


def spellings(values: Iterable[object]) -> set[str]:
    """Every spelling of the identifiers to search for.

    A DICOM PN value (``FAMILY^GIVEN^...``) also as space-joined text and by its long
    components; an 8-digit DA date also as ``YYYY-MM-DD``. Empty cells are skipped.
    """
    out: set[str] = set()
    for value in values:
        if value is None or pd.isna(value) or not str(value).strip():
            continue
        text = str(value).strip()
        out.add(text)
        if "^" in text:
            parts = [p for p in text.split("^") if p]
            out.add(" ".join(parts))
            out.update(p for p in parts if len(p) >= MIN_NAME_PART)
        if re.fullmatch(r"(19|20)\d{6}", text):
            out.add(f"{text[:4]}-{text[4:6]}-{text[6:]}")
    return out


def _is_numeric(spelling: str) -> bool:
    return re.fullmatch(r"[\d-]+", spelling) is not None


def find_identifier(data: bytes, values: Iterable[object]) -> str | None:
    """The first spelling of ``values`` found in ``data`` (any letter case), or None.

    One fast substring search per spelling (a regex alternation of hundreds of
    identifiers is too slow for megabytes); an all-digit spelling counts only where it
    is not part of a longer number.
    """
    found = spellings(values)
    assert found, "no identifiers to search for"
    low = data.lower()
    for spelling in sorted(found):
        needle = spelling.lower().encode()
        numeric = _is_numeric(spelling)
        i = low.find(needle)
        while i >= 0:
            j = i + len(needle)
            if not numeric or (not low[i - 1:i].isdigit() and not low[j:j + 1].isdigit()):
                return spelling
            i = low.find(needle, i + 1)
    return None


def _sqlite_cells(path: Path) -> bytes:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        lines = [str(cell) for t in tables for row in db.execute(f'SELECT * FROM "{t}"')
                 for cell in row]
    return "\n".join(lines).encode(errors="replace")


def _zip_members(data: bytes) -> bytes:
    """Each member decompressed; a .npy member's text arrays (stored as UTF-32) decoded."""
    out = []
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        for name in zf.namelist():
            raw = zf.read(name)
            out += [name.encode(), raw]
            if name.endswith(".npy"):
                arr = np.load(io.BytesIO(raw), allow_pickle=False)
                if arr.dtype.kind in "SU":
                    out.append("\n".join(map(str, arr.ravel())).encode(errors="replace"))
    return b"\n".join(out)


def readable_bytes(path: Path) -> bytes:
    """The file's bytes, followed for Parquet and SQLite by their decoded cells and for
    zip (npz) and gzip files by their decompressed contents."""
    data = path.read_bytes()
    if path.suffix == ".parquet" or (data[:4] == b"PAR1" and data[-4:] == b"PAR1"):
        cells = pd.read_parquet(path).to_numpy().ravel()
        data += b"\n" + "\n".join(map(str, cells)).encode(errors="replace")
    elif data.startswith(b"SQLite format 3\x00"):
        data += b"\n" + _sqlite_cells(path)
    elif data.startswith(b"PK\x03\x04"):
        data += b"\n" + _zip_members(data)
    elif data.startswith(b"\x1f\x8b"):
        data += b"\n" + gzip.decompress(data)
    return data


def assert_no_identifiers(paths: Iterable[Path], values: Iterable[object]) -> int:
    """Fail naming the file and the identifier if any of ``paths`` holds one.

    Folders are skipped, a path that does not exist is an error (a renamed output must
    not pass unsearched), and at least one file must be searched. Returns the count.
    """
    values = list(values)
    n = 0
    for path in paths:
        assert path.exists(), f"{path}: nothing to search (missing)"
        if path.is_dir():
            continue
        hit = find_identifier(readable_bytes(path), values)
        assert hit is None, f"{hit!r} found in {path}"
        n += 1
    assert n, "no file searched"
    return n
