"""Arrow arrays of the index rows, built from their buffers.

``pa.array`` asks pandas whether its argument is a pandas object, importing pandas (a
second or more of CPU) in every process that calls it, numpy arrays included. The scan's
workers build their record batches here from numpy buffers instead, so that a worker
imports pyarrow and numpy but never pandas (``tests/catalogue/test_scan.py`` checks).
Values these builders do not take (text that is not UTF-8, say) go to ``pa.array``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

# numpy dtype of the fixed-width Arrow types of the index (``to_pandas_dtype`` imports pandas).
_DTYPES = {pa.int32(): np.int32, pa.int64(): np.int64, pa.float64(): np.float64}


def _validity(valid: np.ndarray) -> tuple[pa.Buffer | None, int]:
    nulls = len(valid) - int(np.count_nonzero(valid))
    if not nulls:
        return None, 0
    return pa.py_buffer(np.packbits(valid, bitorder="little")), nulls


def numbers(values: np.ndarray, typ: pa.DataType, valid: np.ndarray | None = None
            ) -> pa.Array:
    """A fixed-width array (ints, floats) of ``values``; null where ``valid`` is False."""
    data = np.ascontiguousarray(values, dtype=_DTYPES[typ])
    bitmap, nulls = _validity(valid) if valid is not None else (None, 0)
    return pa.Array.from_buffers(typ, len(data), [bitmap, pa.py_buffer(data)], nulls)


def floats(values: np.ndarray) -> pa.Array:
    """float64, NaN as null (``pa.array(values, from_pandas=True)``)."""
    values = np.asarray(values, dtype=np.float64)
    return numbers(values, pa.float64(), ~np.isnan(values))


def booleans(values: Sequence[bool | None]) -> pa.Array:
    if None in values:
        flags = np.array([bool(v) for v in values], dtype=bool)
        bitmap, nulls = _validity(_valid(values))
    else:
        flags, bitmap, nulls = np.array(values, dtype=bool).reshape(-1), None, 0
    bits = pa.py_buffer(np.packbits(flags, bitorder="little"))
    return pa.Array.from_buffers(pa.bool_(), len(flags), [bitmap, bits], nulls)


def _offsets(lengths: Sequence[int]) -> pa.Buffer:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.py_buffer(offsets)


def strings(values: Sequence[Any], typ: pa.DataType | None = None) -> pa.Array:
    """string (UTF-8 text, the default) or binary (bytes) values; None as null."""
    typ = typ or pa.string()
    n = len(values)
    empty = b"" if typ == pa.binary() else ""
    nulls = values.count(None) if isinstance(values, list) else sum(v is None for v in values)
    parts = values if not nulls else [empty if v is None else v for v in values]
    joined = empty.join(parts)
    try:
        data = joined if typ == pa.binary() else joined.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: whatever pyarrow makes of it
        return pa.array(list(values), typ)
    if len(data) == len(joined):  # one byte per character
        lengths = np.fromiter(map(len, parts), dtype=np.int32, count=n)
    else:
        lengths = np.fromiter((len(p.encode("utf-8")) for p in parts), dtype=np.int32, count=n)
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    bitmap = None
    if nulls:
        bitmap = pa.py_buffer(np.packbits(_valid(values), bitorder="little"))
    return pa.Array.from_buffers(typ, n, [bitmap, pa.py_buffer(offsets), pa.py_buffer(data)],
                                 nulls)


def _valid(values: Sequence[Any]) -> np.ndarray:
    return np.array([v is not None for v in values], dtype=bool).reshape(-1)


def float_lists(values: Sequence[Sequence[float] | None]) -> pa.Array:
    """list<float64>; None as null."""
    n = len(values)
    valid = _valid(values)
    lengths = [0 if v is None else len(v) for v in values]
    flat = np.fromiter((x for v in values if v is not None for x in v), dtype=np.float64)
    bitmap, nulls = _validity(valid)
    child = numbers(flat, pa.float64())
    return pa.Array.from_buffers(pa.list_(pa.float64()), n, [bitmap, _offsets(lengths)], nulls,
                                 children=[child])


def array(values: Sequence[Any], typ: pa.DataType) -> pa.Array:
    """``values`` (a list) as an array of ``typ``, one of the index's column types."""
    if pa.types.is_string(typ) or pa.types.is_binary(typ):
        return strings(values, typ)
    if pa.types.is_boolean(typ):
        return booleans(values)
    if pa.types.is_list(typ):
        return float_lists(values)
    valid = _valid(values)
    data = np.fromiter((0 if v is None else v for v in values),
                       dtype=_DTYPES[typ], count=len(values))
    return numbers(data, typ, valid)
