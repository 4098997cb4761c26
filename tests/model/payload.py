"""A pickle payload for the attack tests: unpickling it writes a marker file.

A load path that unpickles the planted file runs ``Path.write_text`` on the marker (a
harmless stand-in for arbitrary code); one that does not leaves no marker.
"""

from __future__ import annotations

from pathlib import Path

import torch


class Payload:
    """Pickles as a call of ``Path(marker).write_text("pwned")``."""

    def __init__(self, marker: Path) -> None:
        self.marker = Path(marker)

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def planted(path: Path, marker: Path, wrap: bool = True) -> Path:
    """Write a torch.save file at ``path`` whose unpickling writes ``marker``; returns the
    marker. ``wrap``: the payload sits inside a dict that looks like a checkpoint or a
    model (every key a loader reads), as an attacker would make it."""
    marker = Path(marker)
    marker.unlink(missing_ok=True)
    obj = Payload(marker)
    if wrap:
        obj = {"fingerprint": obj, "state_dict": obj, "arch": obj, "card": obj, "state": obj,
               "model": obj, "round": obj}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return marker
