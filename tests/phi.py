"""Search outputs for the fake patient identifiers a test archive carries.

A plain substring search gives false alarms on numbers: an 8-digit birth date such as
19650312 turns up by chance inside a 19-digit file mtime or hash once an output holds a
few thousand of them. An identifier counts as found only as a whole token (not inside a
longer run of letters and digits), and a date also in its ISO spelling.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import pandas as pd


def identifier_pattern(values: Iterable[str]) -> re.Pattern[bytes]:
    """One pattern for every identifier, each only as a whole token."""
    spellings: set[str] = set()
    for value in values:
        value = str(value).strip()
        if not value:
            continue
        spellings.add(value)
        if re.fullmatch(r"(19|20)\d{6}", value):  # a DICOM DA date: also as ISO text
            spellings.add(f"{value[:4]}-{value[4:6]}-{value[6:]}")
    assert spellings, "no identifiers to search for"
    alternatives = b"|".join(re.escape(s.encode()) for s in sorted(spellings, key=len,
                                                                   reverse=True))
    return re.compile(rb"(?<![A-Za-z0-9])(?:" + alternatives + rb")(?![A-Za-z0-9])")


def readable_bytes(path: Path) -> bytes:
    """The file's bytes; for Parquet (compressed pages) also its decoded cells."""
    data = path.read_bytes()
    if path.suffix == ".parquet":
        data += pd.read_parquet(path).astype(str).to_csv(index=False).encode()
    return data


def assert_no_identifiers(paths: Iterable[Path], values: Iterable[str]) -> None:
    """Fail naming the file and the identifier if any of ``paths`` holds one."""
    pattern = identifier_pattern(values)
    for path in paths:
        if not path.is_file():
            continue
        hit = pattern.search(readable_bytes(path))
        assert hit is None, f"{hit.group().decode(errors='replace')!r} found in {path}"
