"""The label set: which integer in a label map is which structure.

It comes from a labels file written beside the label maps (``labels.json``, like the
``labels`` of nnU-Net's ``dataset.json``), never from the code that made the data, so a
real archive with its own structures works unchanged. Two spellings are accepted::

    {"0": "background", "1": "femur_left", ...}                 # value -> name
    {"labels": {"background": 0, "femur_left": 1, ...}}         # nnU-Net: name -> value

Values must be 0..N-1 with 0 the background; the background is never scored.

Either spelling may add ``"codes"``: structure name -> ``[scheme, value, meaning]``, the
structure's standard code (SNOMED CT, ``"SCT"``) that the DICOM SEG of ``fedct predict``
types its segment with; a structure without one gets ``DEFAULT_CODE``::

    {"0": "background", "1": "femur", "codes": {"femur": ["SCT", "71341001", "Femur"]}}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedct.errors import FedctError

LABELS_FILE = "labels.json"

#: A coded concept: (coding scheme designator, code value, code meaning).
Code = tuple[str, str, str]
#: SNOMED CT "Anatomical Structure" (DICOM CID 7150): true of every structure, and what a
#: structure without a code of its own is typed as.
DEFAULT_CODE: Code = ("SCT", "91723000", "Anatomical Structure")


@dataclass(frozen=True)
class LabelSet:
    """``names[k]`` is the structure of label value ``k``; ``names[0]`` is the background."""

    names: tuple[str, ...]
    #: (structure name, code) for the structures that have a code, in label order.
    codes: tuple[tuple[str, Code], ...] = ()

    def code(self, k: int) -> Code:
        """The standard code of label value ``k``; ``DEFAULT_CODE`` when it has none."""
        return dict(self.codes).get(self.names[k], DEFAULT_CODE)

    @property
    def n_classes(self) -> int:
        """Classes including the background (the network's output channels)."""
        return len(self.names)

    @property
    def structures(self) -> dict[int, str]:
        """Foreground label value -> name, in value order."""
        return {k: n for k, n in enumerate(self.names) if k > 0}

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {str(k): n for k, n in enumerate(self.names)}
        if self.codes:
            out["codes"] = {name: list(code) for name, code in self.codes}
        return out


# DICOM value representations of a code: CodingSchemeDesignator and CodeValue are SH (16
# characters), CodeMeaning LO (64); none may hold a backslash (the value separator).
_CODE_LIMITS = (16, 16, 64)


def _parse_codes(codes: object, names: tuple[str, ...], where: str
                 ) -> tuple[tuple[str, Code], ...]:
    if not isinstance(codes, dict):
        raise FedctError(f"{where}: codes must map structure name -> [scheme, value, meaning]")
    unknown = sorted(set(map(str, codes)) - set(names[1:]))
    if unknown:
        raise FedctError(f"{where}: codes name structures not in the label set: {unknown}")
    out = {}
    for name, code in codes.items():
        if (not isinstance(code, (list, tuple)) or len(code) != 3
                or not all(isinstance(c, str) and c.strip() and "\\" not in c
                           and len(c) <= n for c, n in zip(code, _CODE_LIMITS, strict=True))):
            raise FedctError(f"{where}: code of {name!r} must be [scheme, value, meaning], "
                             "non-empty strings of at most 16, 16 and 64 characters, "
                             f"got {code!r}")
        out[str(name)] = tuple(c.strip() for c in code)
    return tuple((n, out[n]) for n in names if n in out)


def parse_labels(data: object, where: str) -> LabelSet:
    """A :class:`LabelSet` from either accepted spelling; ``where`` names the source."""
    codes = None
    if isinstance(data, dict) and "codes" in data:
        data = dict(data)
        codes = data.pop("codes")
    if isinstance(data, dict) and isinstance(data.get("labels"), dict):
        try:
            by_value = {int(v): str(k) for k, v in data["labels"].items()}
        except (TypeError, ValueError) as exc:
            raise FedctError(f"{where}: label values must be integers ({exc})") from exc
    elif isinstance(data, dict):
        try:
            by_value = {int(k): str(v) for k, v in data.items()}
        except (TypeError, ValueError) as exc:
            raise FedctError(f"{where}: keys must be label values 0..N-1 ({exc})") from exc
    else:
        raise FedctError(f"{where}: expected a mapping of label value -> structure name")
    if sorted(by_value) != list(range(len(by_value))) or len(by_value) < 2:
        raise FedctError(f"{where}: label values must be 0..N-1 with N >= 2, "
                         f"got {sorted(by_value)}")
    names = tuple(by_value[k] for k in range(len(by_value)))
    if len(set(names)) != len(names):
        raise FedctError(f"{where}: structure names repeat: {list(names)}")
    return LabelSet(names, () if codes is None else _parse_codes(codes, names, where))


def read_labels(path: str | Path) -> LabelSet:
    """Read a labels file; a missing or malformed one is a :class:`FedctError` naming it."""
    path = Path(path)
    if path.is_dir():
        path = path / LABELS_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise FedctError(f"{path}: labels file not found (label value -> structure name)"
                         ) from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise FedctError(f"{path}: cannot read the labels file ({exc})") from exc
    return parse_labels(data, str(path))


def write_labels(path: str | Path, labels: LabelSet) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / LABELS_FILE
    path.write_text(json.dumps(labels.to_json(), indent=1))
    return path
