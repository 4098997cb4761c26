"""Device choice, one rule for every stage: ``auto`` is CUDA when present, else CPU."""

from __future__ import annotations

import torch

from fedct.errors import FedctError


def pick_device(name: str) -> torch.device:
    """``auto`` -> ``cuda`` if available else ``cpu``; otherwise the named device.

    Naming ``cuda`` on a machine without one is an error, not a silent CPU run.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise FedctError(f"device {name!r}: not a torch device ({exc})") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FedctError(f"device {name!r}: CUDA is not available on this machine")
    return device
