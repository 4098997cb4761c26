"""Per-file rows: the PHI-free index row of each file, read from its DICOM header.

:func:`parse_files` runs in the scan's workers; everything else here is its helpers.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fedct import dicom
from fedct.catalogue import arrow
from fedct.catalogue.pathids import paths_hold_ids
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


def _geometry(iop_text: str | None) -> tuple[str | None, tuple | None, str | None]:
    """(orientation class, unit normal, rounded IOP text) of one IOP string."""
    iop = dicom.parse_floats(iop_text, 6)
    normal = dicom.slice_normal(iop) if iop else None
    key = "\\".join(f"{round(v, 3) + 0.0:.3f}" for v in iop) if iop else None
    return dicom.orientation_class(iop) if iop_text else None, normal, key


def _codes(values: Sequence[Any]) -> tuple[list[Any], np.ndarray]:
    """The distinct ``values`` (first seen first) and each value's index among them.

    Most columns of a chunk repeat a few values (all files of a series share its UIDs,
    its orientation, its kernel): work per distinct value, then one gather per column.
    """
    index = {v: i for i, v in enumerate(dict.fromkeys(values))}
    return list(index), np.fromiter(map(index.__getitem__, values), dtype=np.intp,
                                    count=len(values))


def _gather(distinct: Sequence[Any], codes: np.ndarray) -> list[Any]:
    """``[distinct[c] for c in codes]`` in one numpy gather."""
    table = np.empty(len(distinct), dtype=object)
    for i, value in enumerate(distinct):  # one by one: a tuple stays one element
        table[i] = value
    return table[codes].tolist()


def _mapped(values: Sequence[Any], fn: Any) -> list[Any]:
    """``[fn(v) for v in values]``, ``fn`` called once per distinct value."""
    table = dict.fromkeys(values)
    for v in table:
        table[v] = fn(v)
    return list(map(table.__getitem__, values))


def _floats(texts: list[str | None], n: int = 1) -> np.ndarray:
    """(len, n) float array of backslash-separated numbers; NaN where absent or malformed.

    One numpy conversion of the chunk's distinct texts; only a chunk with a malformed
    value pays the per-value parse.
    """
    distinct, codes = _codes(texts)
    return _parse_floats(distinct, n)[codes]


def _parse_floats(texts: list[str | None], n: int) -> np.ndarray:
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


def _path_hashes(relpaths: Sequence[str], _blake2b: Any = hashlib.blake2b) -> np.ndarray:
    """``path_hash`` of every path, as int64 (one buffer, no Python int per path)."""
    return np.frombuffer(b"".join([_blake2b(r.encode("utf-8", "surrogateescape"),
                                            digest_size=8).digest() for r in relpaths]),
                         dtype="<i8")


def _frame_positions(read: dicom.Columns, normals: list[tuple | None]) -> pa.Array:
    """Per-frame pos_n of the multi-frame files (null for the others)."""
    typ = pa.list_(pa.float64())
    if read.frame_positions.count(None) == len(normals):
        return pa.nulls(len(normals), typ)
    out = []
    for positions, normal in zip(read.frame_positions, normals, strict=True):
        fp = None
        if positions and normal:
            nx, ny, nz = normal
            fp = [x * nx + y * ny + z * nz for x, y, z in positions]
        out.append(fp)
    return arrow.array(out, typ)


def _full_paths(root: str, relpaths: list[str]) -> list[str]:
    """``relpaths`` under ``root`` (an absolute one as it is), joined as one string: no
    path holds a NUL."""
    joined = "\0".join(relpaths)
    base = os.path.join(root, "")
    if not relpaths or "\0/" in "\0" + joined:
        return [r if r.startswith("/") else base + r for r in relpaths]
    return (base + joined.replace("\0", "\0" + base)).split("\0")


def parse_files(root: str, items: Sequence[tuple[str, int, int]], secret: bytes,
                engine: str = "auto") -> pa.RecordBatch:
    """Read the headers of ``items`` (relpath, size, mtime_ns) into PHI-free index rows.

    Runs in a worker process (or on a Dask worker): identifiers are hashed here, so
    that no raw identifier leaves the worker. Values are converted column-wise for the
    whole chunk (numpy), and what is derived from a repeated value (a series' pseudonym,
    an orientation) is computed once per distinct value, which keeps the Python cost per
    file well below the scanner's.
    """
    n = len(items)
    rels = [r for r, _, _ in items]
    sizes = [s for _, s, _ in items]
    read = dicom.read_columns(_full_paths(root, rels), sizes, engine=engine)
    hasher = Hasher(secret)

    def col(kw: str) -> list[str | None]:  # None for rejected files: every column null
        return read.values[kw]

    study, pid = col("StudyInstanceUID"), col("PatientID")
    series_key = hasher.column("series", col("SeriesInstanceUID"))
    # No PatientID: each study is its own patient rather than all sharing one.
    patient_key = _mapped(list(zip(pid, study, strict=True)), lambda ps: (
        hasher("patient", ps[0]) if ps[0] else hasher("patient-of-study", ps[1]))
        if ps[1] else None)
    iops, iop_codes = _codes(col("ImageOrientationPatient"))
    geo = [_geometry(t) for t in iops]
    normals_of = np.array([g[1] if g[1] else (np.nan,) * 3 for g in geo],
                          dtype=np.float64).reshape(-1, 3)
    pos_n = np.einsum("ij,ij->i", _floats(col("ImagePositionPatient"), 3),
                      normals_of[iop_codes])
    ps = _floats(col("PixelSpacing"), 2)
    ascii_paths = "".join(rels).isascii()
    sop_class, media_class = col("SOPClassUID"), col("MediaStorageSOPClassUID")
    if None in sop_class or "" in sop_class:
        sop_class = [a or b for a, b in zip(sop_class, media_class, strict=True)]
    buckets = _mapped(series_key, lambda k: int(k[:4], 16) if k else None)
    arrays = {
        "relpath": rels if ascii_paths else [display_path(r) for r in rels],
        "relpath_bytes": pa.nulls(n, pa.binary()) if ascii_paths else
        [None if _utf8(r) else os.fsencode(r) for r in rels],
        "path_hash": arrow.numbers(_path_hashes(rels), pa.int64()),
        "size": arrow.numbers(np.array(sizes, dtype=np.int64), pa.int64()),
        "mtime_ns": arrow.numbers(np.array([m for _, _, m in items], dtype=np.int64),
                                  pa.int64()),
        "reader": read.reader,
        "reason": read.reject,
        "detail": read.detail,
        "sop_key": hasher.column("sop", col("SOPInstanceUID"), distinct=True),
        "patient_key": patient_key,
        "study_key": hasher.column("study", study),
        "series_key": series_key,
        "bucket": arrow.array(buckets, pa.int32()),
        "institution": col("InstitutionName"),
        "sop_class": sop_class,
        "transfer_syntax": col("TransferSyntaxUID"),
        "modality": col("Modality"),
        "image_type": col("ImageType"),
        "manufacturer": col("Manufacturer"),
        "model": col("ManufacturerModelName"),
        "kernel": _mapped(col("ConvolutionKernel"),
                          lambda k: dicom.normalise_kernel(k) or None),
        "body_part": col("BodyPartExamined"),
        "study_ym": _mapped(col("StudyDate"), _study_ym),
        "series_number": _ints(col("SeriesNumber")),
        "rows": _ints(col("Rows")),
        "cols": _ints(col("Columns")),
        "ps_row": arrow.floats(ps[:, 0]),
        "ps_col": arrow.floats(ps[:, 1]),
        "thickness": arrow.floats(_floats(col("SliceThickness"))),
        "kvp": arrow.floats(_floats(col("KVP"))),
        "exposure": arrow.floats(_floats(col("Exposure"))),
        "iop_key": _gather([g[2] for g in geo], iop_codes),
        "orientation": _gather([g[0] for g in geo], iop_codes),
        "pos_n": arrow.floats(pos_n),
        "n_frames": _ints(col("NumberOfFrames"), default=1),
        "frame_pos": _frame_positions(read, _gather([g[1] for g in geo], iop_codes)),
        "frames_consistent": read.frames_consistent,
        "path_has_patient_id": paths_hold_ids(rels, pid, col("PatientName"),
                                              col("PatientBirthDate")),
    }
    # Read only to check each file's own path, PatientName and PatientBirthDate are
    # never stored (SCAN_TAGS).
    ok = None if read.reject.count(None) == n else \
        arrow.booleans([r is None for r in read.reject])
    columns = []
    for name, typ in zip(INDEX_SCHEMA.names, INDEX_SCHEMA.types, strict=True):
        arr = arrays[name]
        arr = arr if isinstance(arr, pa.Array) else arrow.array(arr, typ)
        if ok is not None and name in ("n_frames", "frames_consistent"):
            # defaults only mean something if ok
            arr = pc.if_else(ok, arr, pa.nulls(len(arr), typ))
        columns.append(arr.cast(typ) if arr.type != typ else arr)
    return pa.RecordBatch.from_arrays(columns, schema=INDEX_SCHEMA)
