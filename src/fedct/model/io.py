"""Save and load a model with its model card.

``model.pt`` holds the state dict, the architecture (so MC dropout works after loading,
with no code of the stage that trained it) and the card; ``model_card.json`` beside it is
the same card for people and for ``predict``:

- ``labels``: label value -> structure name (from the cohort's labels file);
- ``preprocessing``: the grid and HU window the network expects (``spacing_mm``,
  ``roi_size``, ``hu_min``, ``hu_max``);
- ``site``: the training site, or ``pooled``; ``reference_ml``: mean training volume per
  structure (label-free volume checks); ``fingerprint``: params + training data;
- ``training``: the params it was trained with.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fedct.errors import FedctError
from fedct.model.unet import build_bayesian_unet

CARD_FORMAT = "fedct-model-card/1"
CARD_FILE = "model_card.json"


# Names the network ``build_from_arch`` builds; bumped when the layer layout changes, so a
# model of an older layout is refused with a message instead of failing on its weights.
NET = "fedct-bayesian-unet/2"  # full-resolution level, dropout after the blocks


def architecture(n_classes: int, channels, strides, dropout: float,
                 num_res_units: int, norm: str = "instance",
                 dropout_depth: int | None = None) -> dict[str, Any]:
    """Everything needed to rebuild the network (saved with its weights)."""
    depth = len(channels) if dropout_depth is None else int(dropout_depth)
    return {"net": NET, "n_classes": int(n_classes), "channels": list(channels),
            "strides": list(strides), "dropout": float(dropout),
            "dropout_depth": depth,
            "num_res_units": int(num_res_units), "norm": norm}


def build_from_arch(arch: Mapping[str, Any]) -> torch.nn.Module:
    if arch.get("net") != NET:
        raise FedctError(f"model architecture {arch.get('net', 'fedct-bayesian-unet/1')!r} is "
                         f"not {NET!r}, the one this version builds; retrain the model")
    # Models saved before ``dropout_depth`` existed had dropout at every level.
    return build_bayesian_unet(arch["n_classes"], arch["channels"], arch["strides"],
                               arch["dropout"], arch["num_res_units"], arch["norm"],
                               arch.get("dropout_depth"))


def save_model(model: torch.nn.Module, path: Path, arch: Mapping[str, Any],
               card: Mapping[str, Any]) -> None:
    """Write ``path`` (weights + arch + card) and ``model_card.json`` beside it."""
    path = Path(path)
    full = {"format": CARD_FORMAT, "arch": dict(arch), **card}
    torch.save({"state_dict": model.state_dict(), "arch": dict(arch), "card": full}, path)
    (path.parent / CARD_FILE).write_text(json.dumps(full, indent=1, default=str))


def card_amp(card: Mapping[str, Any]) -> bool:
    """Whether MC inference may run under bf16 autocast: as the model trained (``train.amp``,
    kept in its card's ``training``); a card without training settings (a model made
    elsewhere) allows it. It acts only where the device computes bf16
    (``fedct.devices.use_amp``)."""
    return bool((card.get("training") or {}).get("amp", True))


def load_model(path: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model in eval mode (use ``fedct.model.mc`` to sample) and its card."""
    path = Path(path)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise FedctError(f"{path}: cannot load the model ({exc})") from exc
    if not isinstance(blob, dict) or "arch" not in blob or "card" not in blob:
        raise FedctError(f"{path}: not a fedct model (no architecture or model card)")
    try:
        model = build_from_arch(blob["arch"])
    except FedctError as exc:
        raise FedctError(f"{path}: {exc}") from exc
    try:
        model.load_state_dict(blob["state_dict"])
    except (KeyError, RuntimeError) as exc:
        raise FedctError(f"{path}: the weights do not fit the model's architecture "
                         f"({str(exc).splitlines()[0]})") from exc
    return model.eval(), blob["card"]
