"""The label set: which integer in a label map is which structure.

It comes from a labels file written beside the label maps (``labels.json``, like the
``labels`` of nnU-Net's ``dataset.json``), never from the code that made the data, so a
real archive with its own structures works unchanged. Two spellings are accepted::

    {"0": "background", "1": "femur_left", ...}                 # value -> name
    {"labels": {"background": 0, "femur_left": 1, ...}}         # nnU-Net: name -> value

Values must be 0..N-1 with 0 the background; the background is never scored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fedct.errors import FedctError

LABELS_FILE = "labels.json"


@dataclass(frozen=True)
class LabelSet:
    """``names[k]`` is the structure of label value ``k``; ``names[0]`` is the background."""

    names: tuple[str, ...]

    @property
    def n_classes(self) -> int:
        """Classes including the background (the network's output channels)."""
        return len(self.names)

    @property
    def structures(self) -> dict[int, str]:
        """Foreground label value -> name, in value order."""
        return {k: n for k, n in enumerate(self.names) if k > 0}

    def to_json(self) -> dict[str, str]:
        return {str(k): n for k, n in enumerate(self.names)}


def parse_labels(data: object, where: str) -> LabelSet:
    """A :class:`LabelSet` from either accepted spelling; ``where`` names the source."""
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
    return LabelSet(names)


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
