"""A saved model is data: it loads with its card and keeps MC dropout, its weights are
digest-checked, and no load path unpickles (a pickle payload planted anywhere is refused,
never run)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from fedct.cli import main
from fedct.errors import FedctError
from fedct.model.factory import model_arch
from fedct.model.io import (
    CARD_FILE,
    DIGEST_KEY,
    LEGACY_FILE,
    WEIGHTS_FILE,
    convert_legacy,
    load_model,
    save_model,
)
from fedct.model.unet import dropout_modules
from fedct.training.loop import train_model
from tests.model.payload import Payload, planted
from tests.training.test_loop import LABELS, PARAMS, _cases


def _tiny(tmp_path: Path) -> tuple[torch.nn.Module, dict]:
    model, _ = train_model(PARAMS, LABELS, _cases(2), [], None, "fp")
    return model, model_arch(PARAMS, LABELS)


def test_saved_model_keeps_dropout(tmp_path: Path) -> None:
    model, arch = _tiny(tmp_path)
    digest = save_model(model, tmp_path / WEIGHTS_FILE, arch,
                        {"site": "A", "labels": LABELS.to_json()})
    loaded, card = load_model(tmp_path)  # the folder or the weights file
    assert card["site"] == "A" and card["labels"] == {"0": "background", "1": "muscle",
                                                       "2": "femur"}
    assert json.loads((tmp_path / CARD_FILE).read_text()) == card
    assert card[DIGEST_KEY] == digest
    assert any(isinstance(m, torch.nn.Dropout) for m in loaded.modules())
    x = torch.as_tensor(_cases(1)[0]["image"])[None]
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    # Bit-identical weights: the format changes nothing of the numbers.
    for (ka, va), (kb, vb) in zip(model.state_dict().items(),
                                  load_model(tmp_path / WEIGHTS_FILE)[0].state_dict().items(),
                                  strict=True):
        assert ka == kb and torch.equal(va, vb)


def test_load_model_refuses_a_file_that_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(FedctError, match="model_card.json: cannot read the model card"):
        load_model(tmp_path / "junk.safetensors")
    (tmp_path / CARD_FILE).write_text(json.dumps({DIGEST_KEY: "0" * 64}))
    with pytest.raises(FedctError, match=r"junk.safetensors: SHA-256 .* weights swapped"):
        load_model(tmp_path / "junk.safetensors")


def test_swapped_weights_are_refused_by_name(tmp_path: Path) -> None:
    model, arch = _tiny(tmp_path)
    save_model(model, tmp_path / "a" / WEIGHTS_FILE, arch, {"site": "A"})
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    save_model(model, tmp_path / "b" / WEIGHTS_FILE, arch, {"site": "B"})
    # B's weights under A's card: the card's digest names the file.
    (tmp_path / "a" / WEIGHTS_FILE).write_bytes((tmp_path / "b" / WEIGHTS_FILE).read_bytes())
    with pytest.raises(FedctError) as err:
        load_model(tmp_path / "a")
    assert str(err.value).startswith(f"{tmp_path / 'a' / WEIGHTS_FILE}: SHA-256")
    assert "\n" not in str(err.value)
    # A digest recorded elsewhere (registry, evaluate) is checked too.
    with pytest.raises(FedctError, match="recorded for this model"):
        load_model(tmp_path / "b", sha256_expected="f" * 64)


def test_a_model_of_another_architecture_is_refused_with_its_path(tmp_path: Path) -> None:
    model, arch = _tiny(tmp_path)
    old = {k: v for k, v in arch.items() if k != "net"}  # layout 1
    save_model(model, tmp_path / "old.safetensors", old, {"site": "A"})
    with pytest.raises(FedctError, match="old.safetensors: .*retrain"):
        load_model(tmp_path / "old.safetensors")


def test_dropout_depth_is_saved_and_old_models_keep_dropout_at_every_level(
        tmp_path: Path) -> None:
    params = dataclasses.replace(PARAMS, dropout_depth=1)
    model, _ = train_model(params, LABELS, _cases(2), [], None, "fp")
    arch = model_arch(params, LABELS)
    assert arch["dropout_depth"] == 1
    save_model(model, tmp_path / "m" / WEIGHTS_FILE, arch, {"site": "A"})
    assert len(dropout_modules(load_model(tmp_path / "m")[0])) == 1  # the coarse level's
    # A model saved before the depth existed had dropout after every block.
    old = {k: v for k, v in arch.items() if k != "dropout_depth"}
    save_model(model, tmp_path / "old" / WEIGHTS_FILE, old, {"site": "A"})
    assert len(dropout_modules(load_model(tmp_path / "old")[0])) == 3  # 2 levels + decoder


# --- the attack: a pickle payload where a model is loaded --------------------------------

def test_a_pickled_model_pt_with_a_payload_is_refused_and_never_run(tmp_path: Path) -> None:
    folder = tmp_path / "A"
    folder.mkdir()
    marker = planted(folder / LEGACY_FILE, tmp_path / "pwned")
    for where in (folder, folder / LEGACY_FILE):
        with pytest.raises(FedctError, match="fedct convert-model"):
            load_model(where)
    assert not marker.exists(), "loading the model ran the code inside it"


def test_a_payload_named_like_safetensors_is_refused_and_never_run(tmp_path: Path) -> None:
    model, arch = _tiny(tmp_path)
    save_model(model, tmp_path / WEIGHTS_FILE, arch, {"site": "A"})
    marker = planted(tmp_path / WEIGHTS_FILE, tmp_path / "pwned")
    # Even with the card's digest updated to match, the bytes are never unpickled.
    card = json.loads((tmp_path / CARD_FILE).read_text())
    card[DIGEST_KEY] = hashlib.sha256((tmp_path / WEIGHTS_FILE).read_bytes()).hexdigest()
    (tmp_path / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(FedctError, match="pickled model"):
        load_model(tmp_path)
    assert not marker.exists()


# --- re-exporting a trusted old model ---------------------------------------------------

def _legacy_model(folder: Path, model: torch.nn.Module, arch: dict) -> Path:
    """A model.pt as fedct wrote it before safetensors (state dict, arch, card)."""
    folder.mkdir(parents=True, exist_ok=True)
    card = {"format": "fedct-model-card/1", "arch": arch, "site": "A",
            "labels": LABELS.to_json()}
    torch.save({"state_dict": model.state_dict(), "arch": arch, "card": card},
               folder / LEGACY_FILE)
    (folder / CARD_FILE).write_text(json.dumps({**card, "failure": {"threshold": 0.3}}))
    return folder / LEGACY_FILE


def test_convert_model_re_exports_a_trusted_old_model(tmp_path: Path) -> None:
    model, arch = _tiny(tmp_path)
    old = _legacy_model(tmp_path / "old", model, arch)
    result = CliRunner().invoke(main, ["convert-model", str(old), str(tmp_path / "new")])
    assert result.exit_code == 0, result.output
    loaded, card = load_model(tmp_path / "new")
    assert card["failure"] == {"threshold": 0.3}  # the card file beside it wins
    for (ka, va), (kb, vb) in zip(model.state_dict().items(), loaded.state_dict().items(),
                                  strict=True):
        assert ka == kb and torch.equal(va, vb)


def test_convert_model_refuses_a_payload_without_running_it(tmp_path: Path) -> None:
    marker = planted(tmp_path / LEGACY_FILE, tmp_path / "pwned")
    with pytest.raises(FedctError, match="holds objects other than tensors"):
        convert_legacy(tmp_path / LEGACY_FILE, tmp_path / "new")
    assert not marker.exists()
    assert not (tmp_path / "new" / WEIGHTS_FILE).exists()


def test_the_payload_helper_does_run_when_unpickled(tmp_path: Path) -> None:
    # The attack tests are only meaningful if the planted file does run under pickle.
    marker = planted(tmp_path / "p.pt", tmp_path / "pwned")
    torch.load(tmp_path / "p.pt", weights_only=False)
    assert marker.read_text() == "pwned"
    assert Payload.__reduce__  # the class whose __reduce__ writes the marker
