from __future__ import annotations

from pathlib import Path

import pytest

from fedct.config import ConfigError, Params, load_params, to_dict


def test_repository_params_load() -> None:
    params = load_params(Path(__file__).parents[1] / "params.yaml")
    assert isinstance(params, Params)
    assert params.synth.profile in {"tiny", "demo", "study"}


def test_missing_file_gives_defaults(tmp_path: Path) -> None:
    assert load_params(tmp_path / "nope.yaml") == Params()


def test_unknown_key_names_file_and_key(tmp_path: Path) -> None:
    p = tmp_path / "params.yaml"
    p.write_text("train:\n  epohcs: 3\n")
    with pytest.raises(ConfigError, match=r"params.yaml.*train.*epohcs"):
        load_params(p)


def test_types_are_checked_and_coerced(tmp_path: Path) -> None:
    p = tmp_path / "params.yaml"
    p.write_text("train:\n  learning_rate: 1\n  channels: [8, 16]\ncohort:\n  holdout_sites: [A]\n")
    params = load_params(p)
    assert params.train.learning_rate == 1.0 and params.train.channels == (8, 16)
    assert params.cohort.holdout_sites == ("A",)
    p.write_text("train:\n  epochs: many\n")
    with pytest.raises(ConfigError, match="epochs"):
        load_params(p)
    p.write_text("synth:\n  profile: huge\n")
    with pytest.raises(ConfigError, match="huge"):
        load_params(p)


def test_params_are_frozen_and_flatten() -> None:
    params = Params()
    with pytest.raises(AttributeError):
        params.train.epochs = 3  # type: ignore[misc]
    flat = to_dict(params)
    assert flat["cohort.spacing_mm"] == list(params.cohort.spacing_mm)
