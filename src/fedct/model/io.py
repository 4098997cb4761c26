"""Save and load a model with its model card: data, never code.

A model is a folder of two files:

- ``model.safetensors``: the state dict in the safetensors format (tensors and a JSON
  header, nothing executable) with the architecture in its header (``arch``), so MC
  dropout works after loading with no code of the stage that trained it;
- ``model_card.json``: the card for people and for ``predict``, with
  ``weights_sha256``, the SHA-256 of the weights file it belongs to:

  - ``labels``: label value -> structure name (from the cohort's labels file);
  - ``preprocessing``: the grid and HU window the network expects (``spacing_mm``,
    ``roi_size``, ``hu_min``, ``hu_max``);
  - ``site``: the training site, or ``pooled``; ``reference_ml``: mean training volume
    per structure (label-free volume checks); ``fingerprint``: params + training data;
  - ``training``: the params it was trained with.

Loading never unpickles: a pickled ``model.pt`` of an earlier fedct is refused with the
command that converts a trusted one (``fedct convert-model``). Every load checks the
weights' digest against the card's, and against the digest a caller recorded (the
registry, the evaluate stage) when it passes one.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fedct.errors import FedctError
from fedct.model.unet import build_bayesian_unet

CARD_FORMAT = "fedct-model-card/2"
CARD_FILE = "model_card.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_FORMAT = "fedct-weights/1"  # the safetensors header's ``format``
LEGACY_FILE = "model.pt"  # pickled models of earlier fedct: refused, see convert_legacy
DIGEST_KEY = "weights_sha256"  # in the card: SHA-256 of the weights file


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


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save_model(model: torch.nn.Module, path: Path, arch: Mapping[str, Any],
               card: Mapping[str, Any]) -> str:
    """Write the weights to ``path`` (``*.safetensors``, normally ``WEIGHTS_FILE``) and
    ``model_card.json`` beside it; returns the weights' SHA-256 (also in the card)."""
    from safetensors.torch import save

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: fedct writes weights as .safetensors only")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    data = save(state, metadata={"format": WEIGHTS_FORMAT,
                                 "arch": json.dumps(dict(arch), sort_keys=True)})
    digest = sha256(data)
    reserved = {"format", "arch", "weights_file", DIGEST_KEY}
    full = {"format": CARD_FORMAT, "arch": dict(arch),
            **{k: v for k, v in card.items() if k not in reserved},
            "weights_file": path.name, DIGEST_KEY: digest}
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, data)
    _write_atomic(path.parent / CARD_FILE,
                  json.dumps(full, indent=1, default=str).encode())
    return digest


def card_amp(card: Mapping[str, Any]) -> bool:
    """Whether MC inference may run under bf16 autocast: as the model trained (``train.amp``,
    kept in its card's ``training``); a card without training settings (a model made
    elsewhere) allows it. It acts only where the device computes bf16
    (``fedct.devices.use_amp``)."""
    return bool((card.get("training") or {}).get("amp", True))


def _legacy(path: Path) -> FedctError:
    return FedctError(
        f"{path}: a pickled model (torch.save, earlier fedct); fedct loads weights only as "
        f"{WEIGHTS_FILE} and never unpickles a model. If you trust this file, convert it "
        f"once: `fedct convert-model {path} <new folder>`; otherwise retrain it")


def _is_pickle(data: bytes) -> bool:
    # torch.save writes a zip archive (PK), older torch and pickle.dump a protocol byte.
    return data[:4] == b"PK\x03\x04" or data[:1] == b"\x80"


def weights_path(path: Path) -> Path:
    """The weights file of ``path`` (a model folder or the file itself); a folder that
    holds only a pickled ``model.pt`` is refused (``fedct convert-model``)."""
    path = Path(path)
    if path.is_dir():
        if not (path / WEIGHTS_FILE).is_file() and (path / LEGACY_FILE).is_file():
            raise _legacy(path / LEGACY_FILE)
        return path / WEIGHTS_FILE
    if path.suffix == ".pt":
        raise _legacy(path)
    return path


def find_weights(root: Path, pattern: str = "*") -> list[Path]:
    """The weights files of the model folders ``root/<pattern>``, sorted; a folder that
    holds only a pickled ``model.pt`` is refused (``fedct convert-model``), not skipped."""
    found = []
    for folder in sorted(p for p in Path(root).glob(pattern) if p.is_dir()):
        if (folder / WEIGHTS_FILE).is_file():
            found.append(folder / WEIGHTS_FILE)
        elif (folder / LEGACY_FILE).is_file():
            raise _legacy(folder / LEGACY_FILE)
    return found


def _parse(path: Path, data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict and header metadata of safetensors bytes (nothing is executed)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    if _is_pickle(data):
        raise _legacy(path)
    try:
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + n])
        meta = dict(header.get("__metadata__") or {})
        return load(data), meta
    except (SafetensorError, ValueError, UnicodeDecodeError, AttributeError) as exc:
        raise FedctError(f"{path}: not a safetensors weights file ({exc})") from exc


def load_model(path: Path, sha256_expected: str | None = None
               ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model in eval mode (use ``fedct.model.mc`` to sample) and its card.

    ``path``: a model folder or its weights file. The weights file is read once; its
    SHA-256 must equal the card's ``weights_sha256`` and, when given, ``sha256_expected``
    (the digest the registry or the evaluate stage recorded). Any mismatch, a pickled
    file or a malformed one is a FedctError naming the file; nothing is unpickled. The
    card returned carries the verified digest (``card["weights_sha256"]``).
    """
    path = weights_path(path)
    card_path = path.parent / CARD_FILE
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise FedctError(f"{path}: cannot load the model ({exc})") from exc
    if _is_pickle(data):
        raise _legacy(path)
    try:
        card = json.loads(card_path.read_text())
    except (OSError, ValueError) as exc:
        raise FedctError(f"{card_path}: cannot read the model card of {path.name} "
                         f"({exc})") from exc
    if not isinstance(card, dict):
        raise FedctError(f"{card_path}: not a fedct model card")
    digest = sha256(data)
    recorded = card.get(DIGEST_KEY)
    if recorded is None:
        raise FedctError(f"{card_path}: records no {DIGEST_KEY} of its weights (not a "
                         f"{CARD_FORMAT} card); convert or retrain the model")
    if digest != recorded:
        raise FedctError(f"{path}: SHA-256 {digest[:16]}... is not the {str(recorded)[:16]}"
                         f"... its card {CARD_FILE} records: weights swapped or altered; "
                         "refusing to load them")
    if sha256_expected is not None and digest != sha256_expected:
        raise FedctError(f"{path}: SHA-256 {digest[:16]}... is not the "
                         f"{sha256_expected[:16]}... recorded for this model: weights "
                         "swapped or altered; refusing to load them")
    state, meta = _parse(path, data)
    if meta.get("format") != WEIGHTS_FORMAT or "arch" not in meta:
        raise FedctError(f"{path}: not fedct weights (no {WEIGHTS_FORMAT} header with the "
                         "architecture)")
    try:
        arch = json.loads(meta["arch"])
    except ValueError as exc:
        raise FedctError(f"{path}: unreadable architecture in its header ({exc})") from exc
    if card.get("arch") is not None and card["arch"] != arch:
        raise FedctError(f"{card_path}: its architecture is not the one of {path.name}")
    try:
        model = build_from_arch(arch)
    except FedctError as exc:
        raise FedctError(f"{path}: {exc}") from exc
    try:
        model.load_state_dict(state)
    except (KeyError, RuntimeError) as exc:
        raise FedctError(f"{path}: the weights do not fit the model's architecture "
                         f"({str(exc).splitlines()[0]})") from exc
    return model.eval(), card


def _unpickling_reason(exc: BaseException) -> str:
    """torch's refusal in one line (its first line would advise unsafe loading)."""
    text = str(exc)
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        return f"it names {found.group(1)}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    why = next((ln for ln in lines if ln.startswith("Unsupported")),
               lines[0] if lines else type(exc).__name__)
    return why[:200]


def read_checkpoint(path: Path, what: str, map_location: Any = "cpu") -> dict:
    """A checkpoint (training, federation) read with ``torch.load(weights_only=True)``:
    tensors and plain containers only, so a planted pickle payload is refused with a
    FedctError naming ``path``, never run."""
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" in str(exc):
            raise FedctError(f"{path}: the {what} holds objects other than tensors and "
                             f"plain containers ({_unpickling_reason(exc)}); not loaded: "
                             "delete it to start afresh") from exc
        raise FedctError(f"{path}: cannot read the {what} ({_unpickling_reason(exc)}); "
                         "delete it to start afresh") from exc
    except (OSError, RuntimeError, EOFError) as exc:
        raise FedctError(f"{path}: cannot read the {what} ({_unpickling_reason(exc)}); "
                         "delete it to start afresh") from exc
    if not isinstance(state, dict):
        raise FedctError(f"{path}: not a fedct {what}; delete it to start afresh")
    return state


def convert_legacy(old: Path, out_dir: Path) -> Path:
    """Re-export a pickled ``model.pt`` of an earlier fedct as ``out_dir/model.safetensors``
    and its card; returns the new weights file.

    For a file you trust (your own older run): it is read with
    ``torch.load(weights_only=True)``, which rebuilds only tensors and plain containers
    and refuses any other object, so a payload is refused rather than run. The card file
    beside ``old`` (which promotion may have extended) wins over the copy inside it.
    """
    old, out_dir = Path(old), Path(out_dir)
    try:
        blob = torch.load(old, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise FedctError(f"{old}: holds objects other than tensors and plain containers "
                         f"({_unpickling_reason(exc)}); not converted") from exc
    except (OSError, RuntimeError, EOFError) as exc:
        raise FedctError(f"{old}: cannot read the old model ({exc})") from exc
    if not (isinstance(blob, dict) and {"state_dict", "arch", "card"} <= set(blob)):
        raise FedctError(f"{old}: not a fedct model (no weights, architecture or card)")
    card = blob["card"]
    side = old.parent / CARD_FILE
    if side.is_file():
        try:
            card = json.loads(side.read_text())
        except ValueError as exc:
            raise FedctError(f"{side}: not readable JSON ({exc})") from exc
    try:
        model = build_from_arch(blob["arch"])
        model.load_state_dict(blob["state_dict"])
    except (KeyError, RuntimeError) as exc:
        raise FedctError(f"{old}: the weights do not fit the model's architecture "
                         f"({str(exc).splitlines()[0]})") from exc
    out = out_dir / WEIGHTS_FILE
    save_model(model, out, blob["arch"], card)
    return out
