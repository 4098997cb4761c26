"""Per-file rows: the PHI-free index row of each file, read from its DICOM header.

:func:`parse_files` runs in the scan's workers; everything else here is its helpers.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fedct import dicom
from fedct.catalogue import arrow
from fedct.catalogue.pseudonym import Hasher

INDEX_SCHEMA = pa.schema([
    ("relpath", pa.string()),  # as text: undecodable bytes of a name become escapes
    # The path's exact bytes (os.fsencode) where it is not valid UTF-8, else null: the
    # text above cannot hold such a name, and the cohort must open the very file.
    ("relpath_bytes", pa.binary()),
    ("path_hash", pa.int64()),
    ("size", pa.int64()),
    ("mtime_ns", pa.int64()),
    ("reader", pa.string()),
    ("reason", pa.string()),  # null: catalogued
    ("detail", pa.string()),
    ("sop_key", pa.string()),
    ("patient_key", pa.string()),
    ("study_key", pa.string()),
    ("series_key", pa.string()),
    ("bucket", pa.int32()),
    ("institution", pa.string()),
    ("sop_class", pa.string()),
    ("transfer_syntax", pa.string()),
    ("modality", pa.string()),
    ("image_type", pa.string()),
    ("manufacturer", pa.string()),
    ("model", pa.string()),
    ("kernel", pa.string()),
    ("body_part", pa.string()),
    ("study_ym", pa.string()),
    ("series_number", pa.int32()),
    ("rows", pa.int32()),
    ("cols", pa.int32()),
    ("ps_row", pa.float64()),
    ("ps_col", pa.float64()),
    ("thickness", pa.float64()),
    ("kvp", pa.float64()),
    ("exposure", pa.float64()),
    ("iop_key", pa.string()),
    ("orientation", pa.string()),
    ("pos_n", pa.float64()),  # ImagePositionPatient projected on the slice normal (mm)
    ("n_frames", pa.int32()),
    ("frame_pos", pa.list_(pa.float64())),  # per-frame pos_n of multi-frame images
    ("frames_consistent", pa.bool_()),
    # The file's archive path contains its own PatientID (compared here, never stored):
    # the tables that hold paths then hold an identifier.
    ("path_has_patient_id", pa.bool_()),
])
_FILE_COLUMNS = ("relpath", "path_hash", "size", "mtime_ns", "reader", "reason", "detail")


def path_hash(relpath: str, _blake2b: Any = hashlib.blake2b,
              _from_bytes: Any = int.from_bytes) -> int:
    """64-bit hash of a relative path: the index's lookup key (collisions ~ n^2 / 2^65)."""
    digest = _blake2b(relpath.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return _from_bytes(digest, "little", signed=True)


# Shorter PatientIDs ("12", "A1") turn up in paths by chance (series numbers, dates).
MIN_ID_IN_PATH = 4
# Name parts shorter than this ("Li", "Al") are not compared: they match by chance.
MIN_NAME_PART = 3
# PatientName words of de-identified, phantom or test data: folder names too, no person.
NAME_PLACEHOLDERS = frozenset({"anonymous", "anonymized", "anonymised", "anon", "patient",
                               "unknown", "phantom", "test", "research", "study", "subject"})


def _holds_token(path: str, token: str) -> bool:
    """Whether casefolded ``path`` contains casefolded ``token`` not inside a longer word or
    number (its neighbours are not letters or digits)."""
    start = path.find(token)
    while start >= 0:
        end = start + len(token)
        if (start == 0 or not path[start - 1].isalnum()) and \
                (end == len(path) or not path[end].isalnum()):
            return True
        start = path.find(token, start + 1)
    return False


def _id_tokens(patient_id: str | None, name: str | None, birth_date: str | None
               ) -> tuple[str, ...]:
    """The casefolded tokens that ``path_holds_id`` looks for (see there)."""
    tokens = []
    pid = (patient_id or "").strip().casefold()
    if len(pid) >= MIN_ID_IN_PATH:
        tokens.append(pid)
    # PN: components by "^", groups by "=", values by "\\"; only words of letters count,
    # and not the placeholders of de-identified or test data ("ANONYMOUS", "PATIENT^001").
    tokens += [part for part in re.split(r"[\s^,=\\]+", (name or "").casefold())
               if len(part) >= MIN_NAME_PART and part.isalpha()
               and part not in NAME_PLACEHOLDERS]
    date = (birth_date or "").strip()
    if len(date) == 8 and date.isdigit():
        tokens += [date, f"{date[:4]}-{date[4:6]}-{date[6:]}"]
    return tuple(tokens)


def path_holds_id(relpath: str, patient_id: str | None, name: str | None = None,
                  birth_date: str | None = None) -> bool:
    """Whether ``relpath`` spells out its own patient: the PatientID, a part of the
    PatientName or the PatientBirthDate as a whole token, in any letter case.

    An export laid out as ``<PatientID>/<study>/...``, ``DOE^JOHN/...``,
    ``Doe_John_19650312/...`` or ``.../1965-03-12/...``, but not an ID's digits inside a
    longer number or a name part inside another word. IDs under ``MIN_ID_IN_PATH``
    characters, name parts that are not words of at least ``MIN_NAME_PART`` letters or
    are placeholders (``NAME_PLACEHOLDERS``) are not compared; a birth date only as its 8
    digits (YYYYMMDD) or in ISO form (YYYY-MM-DD).
    """
    path = relpath.casefold()
    return any(_holds_token(path, t) for t in _id_tokens(patient_id, name, birth_date))


class _PathIdCheck:
    """``path_holds_id`` over a chunk: the tokens once per patient, the folder once per
    folder and patient, then only each file's own name (a token without "/" cannot
    straddle the last "/", which is no letter or digit, so this is the same answer)."""

    def __init__(self) -> None:
        self._tokens: dict[tuple, tuple[tuple[str, ...], bool]] = {}
        self._parts: dict[tuple, bool] = {}  # (folder or file name, tokens) -> holds one

    def _part(self, part: str, tokens: tuple[str, ...]) -> bool:
        hit = self._parts.get((part, tokens))
        if hit is None:
            folded = part.casefold()
            hit = self._parts[(part, tokens)] = any(_holds_token(folded, t) for t in tokens)
        return hit

    def __call__(self, relpath: str, patient_id: str | None, name: str | None,
                 birth_date: str | None) -> bool:
        key = (patient_id, name, birth_date)
        hit = self._tokens.get(key)
        if hit is None:
            tokens = _id_tokens(patient_id, name, birth_date)
            hit = self._tokens[key] = (tokens, any("/" in t for t in tokens))
        tokens, slash = hit
        if not tokens:
            return False
        if slash:
            return path_holds_id(relpath, patient_id, name, birth_date)
        folder, _, file = relpath.rpartition("/")
        return self._part(folder, tokens) or self._part(file, tokens)


def display_path(relpath: str) -> str:
    """A relative path as text; undecodable bytes of a file name become escapes."""
    return relpath.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _utf8(relpath: str) -> bool:
    """Whether ``relpath`` is valid UTF-8 text (no undecodable bytes escaped in it)."""
    if relpath.isascii():
        return True
    try:
        relpath.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _geometry(iop_text: str | None, cache: dict) -> tuple[str, tuple | None, str | None]:
    """(orientation class, unit normal, rounded IOP text), memoised per IOP string.

    All files of a series share one IOP string, so the cache turns a per-file parse
    into a dictionary lookup.
    """
    hit = cache.get(iop_text)
    if hit is None:
        iop = dicom.parse_floats(iop_text, 6)
        normal = dicom.slice_normal(iop) if iop else None
        key = "\\".join(f"{round(v, 3) + 0.0:.3f}" for v in iop) if iop else None
        hit = cache[iop_text] = (dicom.orientation_class(iop) if iop_text else None,
                                 normal, key)
    return hit


def _floats(texts: list[str | None], n: int = 1) -> np.ndarray:
    """(len, n) float array of backslash-separated numbers; NaN where absent or malformed.

    One numpy conversion for the whole chunk; only a chunk with a malformed value pays
    the per-value parse.
    """
    nan = "\\".join(["nan"] * n)
    try:
        if n == 1:
            out = np.array([t if t else "nan" for t in texts], dtype=np.float64)
        else:
            flat = [t if t and t.count("\\") == n - 1 else nan for t in texts]
            out = np.array("\\".join(flat).split("\\") if flat else [],
                           dtype=np.float64).reshape(-1, n)
    except ValueError:
        if n == 1:
            out = np.array([np.nan if (v := dicom.parse_float(t)) is None else v
                            for t in texts], dtype=np.float64)
        else:
            out = np.array([dicom.parse_floats(t, n) or (np.nan,) * n for t in texts],
                           dtype=np.float64).reshape(-1, n)
    out[~np.isfinite(out)] = np.nan
    return out if n > 1 else out.reshape(-1)


def _ints(texts: list[str | None], default: int | None = None) -> pa.Array:
    values = _floats(texts)
    missing = np.isnan(values)
    if default is not None:
        values[missing] = default
        missing[:] = False
    ints = np.where(missing, 0, np.clip(np.nan_to_num(values), -2**31, 2**31 - 1))
    return arrow.numbers(ints.astype(np.int32), pa.int32(), ~missing)


def _study_ym(date: str | None) -> str | None:
    return f"{date[:4]}-{date[4:6]}" if date and len(date) >= 6 and date[:6].isdigit() \
        else None


def parse_files(root: str, items: Sequence[tuple[str, int, int]], secret: bytes,
                engine: str = "auto") -> pa.RecordBatch:
    """Read the headers of ``items`` (relpath, size, mtime_ns) into PHI-free index rows.

    Runs in a worker process (or on a Dask worker): identifiers are hashed here, so
    that no raw identifier leaves the worker. Values are converted column-wise for the
    whole chunk (numpy), which keeps the Python cost per file well below the scanner's.
    """
    base = os.path.join(root, "")
    paths = [rel if rel.startswith("/") else base + rel for rel, _, _ in items]
    read = dicom.read_columns(paths, [size for _, size, _ in items], engine=engine)
    hasher = Hasher(secret)
    holds_id = _PathIdCheck()

    def col(kw: str) -> list[str | None]:  # None for rejected files: every column null
        return read.values[kw]

    sop, study, series, pid = (col(k) for k in ("SOPInstanceUID", "StudyInstanceUID",
                                                "SeriesInstanceUID", "PatientID"))
    # Read only to check each file's own path; neither is stored (SCAN_TAGS).
    names, births = col("PatientName"), col("PatientBirthDate")
    series_key = [hasher("series", u, memo=True) if u else None for u in series]
    # No PatientID: each study is its own patient rather than all sharing one.
    patient_key = [
        (hasher("patient", p, memo=True) if p else hasher("patient-of-study", st, memo=True))
        if st else None for p, st in zip(pid, study, strict=True)]
    geometry_cache: dict = {}
    geo = [_geometry(t, geometry_cache) for t in col("ImageOrientationPatient")]
    normals = np.array([g[1] if g[1] else (np.nan,) * 3 for g in geo],
                       dtype=np.float64).reshape(-1, 3)
    pos_n = np.einsum("ij,ij->i", _floats(col("ImagePositionPatient"), 3), normals)
    ps = _floats(col("PixelSpacing"), 2)
    kernels: dict[str | None, str | None] = {}
    frame_pos = []
    for positions, g in zip(read.frame_positions, geo, strict=True):
        fp = None
        if positions and g[1]:
            nx, ny, nz = g[1]
            fp = [x * nx + y * ny + z * nz for x, y, z in positions]
        frame_pos.append(fp)
    arrays = {
        "relpath": [r if r.isascii() else display_path(r) for r, _, _ in items],
        "relpath_bytes": [None if _utf8(r) else os.fsencode(r) for r, _, _ in items],
        "path_hash": [path_hash(r) for r, _, _ in items],
        "size": [s for _, s, _ in items],
        "mtime_ns": [m for _, _, m in items],
        "reader": read.reader,
        "reason": read.reject,
        "detail": read.detail,
        "sop_key": [hasher("sop", u) if u else None for u in sop],
        "patient_key": patient_key,
        "study_key": [hasher("study", u, memo=True) if u else None for u in study],
        "series_key": series_key,
        "bucket": arrow.array([int(k[:4], 16) if k else None for k in series_key], pa.int32()),
        "institution": col("InstitutionName"),
        "sop_class": [a or b for a, b in zip(col("SOPClassUID"), col("MediaStorageSOPClassUID"),
                                             strict=True)],
        "transfer_syntax": col("TransferSyntaxUID"),
        "modality": col("Modality"),
        "image_type": col("ImageType"),
        "manufacturer": col("Manufacturer"),
        "model": col("ManufacturerModelName"),
        "kernel": [kernels[k] if k in kernels else
                   kernels.setdefault(k, dicom.normalise_kernel(k) or None)
                   for k in col("ConvolutionKernel")],
        "body_part": col("BodyPartExamined"),
        "study_ym": [_study_ym(d) for d in col("StudyDate")],
        "series_number": _ints(col("SeriesNumber")),
        "rows": _ints(col("Rows")),
        "cols": _ints(col("Columns")),
        "ps_row": arrow.floats(ps[:, 0]),
        "ps_col": arrow.floats(ps[:, 1]),
        "thickness": arrow.floats(_floats(col("SliceThickness"))),
        "kvp": arrow.floats(_floats(col("KVP"))),
        "exposure": arrow.floats(_floats(col("Exposure"))),
        "iop_key": [g[2] for g in geo],
        "orientation": [g[0] for g in geo],
        "pos_n": arrow.floats(pos_n),
        "n_frames": _ints(col("NumberOfFrames"), default=1),
        "frame_pos": arrow.array(frame_pos, pa.list_(pa.float64())),
        "frames_consistent": read.frames_consistent,
        "path_has_patient_id": [holds_id(r, p, n, b) for (r, _, _), p, n, b in
                                zip(items, pid, names, births, strict=True)],
    }
    ok = arrow.booleans([r is None for r in read.reject])
    columns = []
    for name, typ in zip(INDEX_SCHEMA.names, INDEX_SCHEMA.types, strict=True):
        arr = arrays[name]
        arr = arr if isinstance(arr, pa.Array) else arrow.array(arr, typ)
        if name in ("n_frames", "frames_consistent"):  # defaults only mean something if ok
            arr = pc.if_else(ok, arr, pa.nulls(len(arr), typ))
        columns.append(arr.cast(typ) if arr.type != typ else arr)
    return pa.RecordBatch.from_arrays(columns, schema=INDEX_SCHEMA)
