"""File helpers of the header readers: size, DICM magic, reject details, a quiet pydicom."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from typing import Any


def file_size(path: str) -> int:
    """Size of ``path`` in bytes; -1 when it cannot be stat'ed."""
    try:
        return os.stat(path).st_size
    except OSError:
        return -1


def exact_path(relpath: str, relpath_bytes: bytes | None) -> str:
    """A file's own path from the catalogue's ``relpath`` and ``relpath_bytes``: a name
    that is not UTF-8 is kept as its bytes, which ``os.fsdecode`` turns back into the
    path (undecodable bytes surrogate-escaped), so the very file opens."""
    return os.fsdecode(relpath_bytes) if relpath_bytes is not None else relpath


def has_dicm_magic(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def not_dicom_detail(path: str) -> str:
    size = file_size(path)
    return "empty file" if size == 0 else f"no DICOM header ({size} bytes)"


def exc_detail(exc: object, path: str, limit: int = 200) -> str:
    """A reject detail from an error message: without the file's path (the rejects
    table has it already), one line, bounded length."""
    text = str(exc).replace(path, "<file>").replace(os.path.basename(path), "<file>")
    text = " ".join(text.split())
    name = type(exc).__name__
    prefix = "" if isinstance(exc, Warning | str) else f"{name}: "
    return (prefix + text)[:limit]


@contextlib.contextmanager
def quiet_pydicom() -> Any:
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
