from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fedct.analysis.seeds import report_pairs
from fedct.config import ConfigError, Params, load_params, to_dict

REPO_PARAMS = Path(__file__).parents[1] / "params.yaml"


def _write(tmp_path: Path, edit) -> Path:
    """The repository's params.yaml with ``edit(dict)`` applied."""
    raw = yaml.safe_load(REPO_PARAMS.read_text())
    edit(raw)
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def test_repository_params_load() -> None:
    params = load_params(REPO_PARAMS)
    assert isinstance(params, Params)
    assert params.synth.profile in {"tiny", "demo", "study"}


def test_code_defaults_equal_params_yaml() -> None:
    # One set of defaults: every dataclass default is what params.yaml says.
    assert to_dict(Params()) == to_dict(load_params(REPO_PARAMS))


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.yaml: params file not found"):
        load_params(tmp_path / "nope.yaml")


def test_missing_key_names_file_and_key(tmp_path: Path) -> None:
    p = _write(tmp_path, lambda raw: raw["cohort"].pop("val_fraction"))
    with pytest.raises(ConfigError, match=r"params.yaml.*missing.*cohort\.val_fraction"):
        load_params(p)
    p = _write(tmp_path, lambda raw: raw.pop("uncertainty"))
    with pytest.raises(ConfigError, match=r"missing.*uncertainty"):
        load_params(p)


def test_unknown_key_names_file_and_key(tmp_path: Path) -> None:
    p = _write(tmp_path, lambda raw: raw["train"].update(epohcs=3))
    with pytest.raises(ConfigError, match=r"params.yaml.*train.*epohcs"):
        load_params(p)


def test_types_are_checked_and_coerced(tmp_path: Path) -> None:
    def edit(raw: dict) -> None:
        raw["train"].update(learning_rate=1, channels=[8, 16])
        raw["cohort"]["holdout_sites"] = ["A"]

    params = load_params(_write(tmp_path, edit))
    assert params.train.learning_rate == 1.0 and params.train.channels == (8, 16)
    assert params.cohort.holdout_sites == ("A",)
    p = _write(tmp_path, lambda raw: raw["train"].update(steps="many"))
    with pytest.raises(ConfigError, match="train.steps"):
        load_params(p)
    p = _write(tmp_path, lambda raw: raw["synth"].update(profile="huge"))
    with pytest.raises(ConfigError, match="huge"):
        load_params(p)
    # A grid of two axes would otherwise crash deep in resampling with a raw traceback.
    p = _write(tmp_path, lambda raw: raw["cohort"].update(spacing_mm=[7.0, 7.0]))
    with pytest.raises(ConfigError, match=r"cohort\.spacing_mm: expected 3 values"):
        load_params(p)
    p = _write(tmp_path, lambda raw: raw["train"].update(patch_size=[64, 48, 16, 2]))
    with pytest.raises(ConfigError, match=r"train\.patch_size: expected 3 values"):
        load_params(p)
    p = _write(tmp_path, lambda raw: raw["cohort"].update(roi_size=[64, 48, "z"]))
    with pytest.raises(ConfigError, match=r"cohort\.roi_size\[2\]"):
        load_params(p)


def test_params_are_frozen_and_flatten() -> None:
    params = Params()
    with pytest.raises(AttributeError):
        params.train.steps = 3  # type: ignore[misc]
    flat = to_dict(params)
    assert flat["cohort.spacing_mm"] == list(params.cohort.spacing_mm)


def test_report_seeds_were_never_development_seeds() -> None:
    params = load_params(REPO_PARAMS)
    assert params.synth.seed not in params.synth.dev_seeds
    assert params.cohort.seed not in params.cohort.dev_seeds
    # The study's report seeds: at least 3 pairs, none a development seed, and the pair
    # that `dvc repro` runs is the first of them.
    pairs = report_pairs(params.synth.report_seeds, params.cohort.report_seeds,
                         params.synth.dev_seeds, params.cohort.dev_seeds)
    assert len(pairs) >= 3
    assert pairs[0] == (params.synth.seed, params.cohort.seed)
