"""A saved model loads with its card and keeps MC dropout."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from fedct.errors import FedctError
from fedct.model.io import CARD_FILE, load_model, save_model
from fedct.model.unet import dropout_modules
from fedct.training.loop import model_arch, train_model
from tests.training.test_loop import LABELS, PARAMS, _cases


def test_saved_model_keeps_dropout(tmp_path: Path) -> None:
    model, _ = train_model(PARAMS, LABELS, _cases(2), [], None, "fp")
    save_model(model, tmp_path / "m.pt", model_arch(PARAMS, LABELS),
               {"site": "A", "labels": LABELS.to_json()})
    loaded, card = load_model(tmp_path / "m.pt")
    assert card["site"] == "A" and card["labels"] == {"0": "background", "1": "muscle",
                                                       "2": "femur"}
    assert json.loads((tmp_path / CARD_FILE).read_text()) == card
    assert any(isinstance(m, torch.nn.Dropout) for m in loaded.modules())
    x = torch.as_tensor(_cases(1)[0]["image"])[None]
    with torch.no_grad():
        assert torch.allclose(loaded(x), model.eval()(x))


def test_load_model_refuses_a_file_that_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(FedctError, match="junk.pt"):
        load_model(tmp_path / "junk.pt")
    torch.save({"weights": 1}, tmp_path / "plain.pt")
    with pytest.raises(FedctError, match="plain.pt: not a fedct model"):
        load_model(tmp_path / "plain.pt")


def test_a_model_of_another_architecture_is_refused_with_its_path(tmp_path: Path) -> None:
    model, _ = train_model(PARAMS, LABELS, _cases(2), [], None, "fp")
    arch = {k: v for k, v in model_arch(PARAMS, LABELS).items() if k != "net"}  # layout 1
    save_model(model, tmp_path / "old.pt", arch, {"site": "A"})
    with pytest.raises(FedctError, match="old.pt: .*retrain"):
        load_model(tmp_path / "old.pt")


def test_dropout_depth_is_saved_and_old_models_keep_dropout_at_every_level(
        tmp_path: Path) -> None:
    params = dataclasses.replace(PARAMS, dropout_depth=1)
    model, _ = train_model(params, LABELS, _cases(2), [], None, "fp")
    arch = model_arch(params, LABELS)
    assert arch["dropout_depth"] == 1
    save_model(model, tmp_path / "m.pt", arch, {"site": "A"})
    assert len(dropout_modules(load_model(tmp_path / "m.pt")[0])) == 1  # the coarse level's
    # A model saved before the depth existed had dropout after every block.
    old = {k: v for k, v in arch.items() if k != "dropout_depth"}
    save_model(model, tmp_path / "old.pt", old, {"site": "A"})
    assert len(dropout_modules(load_model(tmp_path / "old.pt")[0])) == 3  # 2 levels + decoder
