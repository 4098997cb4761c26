"""What the evaluate stage scored, so that promote verifies its inputs instead of trusting them.

``scored.json`` sits beside ``cases.csv`` in the evaluate stage's outputs:

- ``format``: ``fedct-scored/1``;
- ``cases_sha256``: SHA-256 of ``cases.csv`` as written;
- ``models``: candidate name -> ``kind`` (``local``, ``pooled``, ``federated``) and
  ``weights``: one entry per model file scored, ``site`` (the held-out site it was
  scored on; null: every site), ``file`` (as given to evaluate, for people) and
  ``sha256`` (of the weights as loaded, checked against the model's card);
- ``selection_sha256`` (only with ``evaluate.best_local_on: val``): SHA-256 of
  ``selection.csv``, the local models on the training sites' validation cases, on which
  the best local model is chosen (promote checks it as it checks ``cases.csv``).

Promote reads ``cases.csv`` once, compares its digest with ``cases_sha256`` and parses
those bytes; it reads each weights file it relies on once and compares its digest with the
one recorded here. A table edited after evaluate, or a weights file swapped in, is then a
FedctError naming the file, not a promotion.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedct.errors import FedctError

FILE = "scored.json"
FORMAT = "fedct-scored/1"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_scored(path: Path, cases: bytes,
                 models: Mapping[str, tuple[str, Sequence[tuple[str | None, Path, str]]]],
                 selection: bytes | None = None) -> dict[str, Any]:
    """Write ``scored.json``: ``cases`` are the bytes of ``cases.csv`` as written;
    ``models``: name -> (kind, [(site or None, weights file, SHA-256 as loaded)]);
    ``selection``: the bytes of ``selection.csv`` when the best local model is chosen on
    validation cases."""
    record: dict[str, Any] = {
        "format": FORMAT, "cases_sha256": sha256(cases),
        "models": {name: {"kind": kind,
                          "weights": [{"site": site, "file": str(file), "sha256": d}
                                      for site, file, d in weights]}
                   for name, (kind, weights) in models.items()}}
    if selection is not None:
        record["selection_sha256"] = sha256(selection)
    Path(path).write_text(json.dumps(record, indent=1))
    return record


def read_scored(path: Path) -> dict[str, Any]:
    """``scored.json``, its shape checked; a missing or malformed one names the file."""
    path = Path(path)
    if not path.is_file():
        raise FedctError(f"{path}: not found; run `fedct evaluate` (it records the digests "
                         "of the table and of every model it scored)")
    try:
        record = json.loads(path.read_text())
        ok = (record.get("format") == FORMAT and isinstance(record.get("cases_sha256"), str)
              and all(isinstance(m.get("kind"), str)
                      and all(isinstance(w.get("sha256"), str) for w in m["weights"])
                      for m in record["models"].values()))
    except (OSError, ValueError, AttributeError, KeyError, TypeError) as exc:
        raise FedctError(f"{path}: not a readable {FORMAT} record ({exc})") from exc
    if not ok:
        raise FedctError(f"{path}: not a {FORMAT} record of the evaluate stage")
    return record


def check_cases(record: Mapping[str, Any], cases_file: Path, data: bytes) -> None:
    """``data`` (the bytes of ``cases_file`` just read) must be the table evaluate wrote."""
    got = sha256(data)
    if got != record["cases_sha256"]:
        raise FedctError(f"{cases_file}: SHA-256 {got[:16]}... is not the "
                         f"{record['cases_sha256'][:16]}... the evaluate stage recorded in "
                         f"{FILE}: the comparison table was changed after evaluate; rerun "
                         "`fedct evaluate`")


def check_selection(record: Mapping[str, Any], selection_file: Path, data: bytes) -> None:
    """``data`` (the bytes of ``selection_file`` just read) must be the validation table
    evaluate wrote and recorded (``selection_sha256``)."""
    want = record.get("selection_sha256")
    got = sha256(data)
    if not isinstance(want, str) or got != want:
        raise FedctError(f"{selection_file}: SHA-256 {got[:16]}... is not the "
                         f"{str(want)[:16]}... the evaluate stage recorded in {FILE}: the "
                         "validation table that picks the best local model was changed "
                         "after evaluate; rerun `fedct evaluate`")


def check_weights(record: Mapping[str, Any], name: str, path: Path, data: bytes) -> str:
    """``data`` (the bytes of ``path`` just read) must be the one weights file evaluate
    scored as ``name`` on every held-out site; returns its SHA-256."""
    entry = record["models"].get(name)
    if entry is None:
        raise FedctError(f"{FILE}: the evaluate stage scored no model {name!r}")
    weights = entry["weights"]
    if len(weights) != 1 or weights[0].get("site") is not None:
        raise FedctError(f"{FILE}: {name!r} was scored as per-site models "
                         f"({[w.get('site') for w in weights]}), not one model to promote")
    got = sha256(data)
    if got != weights[0]["sha256"]:
        raise FedctError(f"{path}: SHA-256 {got[:16]}... is not the "
                         f"{weights[0]['sha256'][:16]}... of the weights the evaluate stage "
                         f"scored as {name!r}: the model was swapped or changed after "
                         "evaluate; rerun `fedct evaluate`")
    return got
