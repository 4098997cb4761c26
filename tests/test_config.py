from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from fedct.analysis.seed_tables import report_pairs
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
        raw["train"].update(learning_rate=1, channels=[8, 16], strides=[2])
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


@pytest.mark.parametrize("section, changes, message", [
    ("train", {"batch_size": 0}, "train.batch_size = 0: expected >= 1"),
    ("train", {"steps": 0}, "train.steps = 0: expected >= 1"),
    ("train", {"strides": [2, 2]}, "train.strides = [2, 2]: expected one stride >= 1 "
                                   "between each two levels"),
    ("train", {"dropout": 1.0}, "train.dropout = 1.0: expected a probability in [0, 1)"),
    ("cohort", {"test_fraction": -0.1}, "cohort.test_fraction = -0.1: expected a fraction"),
    ("cohort", {"val_fraction": 0.5, "test_fraction": 0.5},
     "cohort.test_fraction = 0.5: expected a sum below 1"),
    ("cohort", {"hu_min": 1000.0}, "cohort.hu_max = 1000.0: expected hu_min < hu_max"),
    ("uncertainty", {"mc_samples": 1}, "uncertainty.mc_samples = 1: expected >= 2"),
    ("federate", {"self_train_rounds": 0}, "federate.self_train_rounds = 0: expected >= 1"),
    ("federate", {"methods": ["fedavg", "fedsgd"]},
     "federate.methods = ['fedavg', 'fedsgd']: expected methods among"),
    ("federate", {"select_from": ["fedavg", "uw_select"]},
     "federate.select_from = ['fedavg', 'uw_select']: expected uw_select choosing among"),
    ("federate", {"uw_signal": "volume_deviation"},
     "federate.uw_signal = 'volume_deviation': expected a signal uw_merge and uw_select"),
    ("federate", {"methods": ["fedavg", "steered"]},
     "federate.methods = ['fedavg', 'steered']: expected each uncertainty-guided method "
     "with its ablation"),
    ("federate", {"cwst_keep": [0.8, 0.5]}, "federate.cwst_keep = [0.8, 0.5]: expected"),
    ("evaluate", {"n_boot": 0}, "evaluate.n_boot = 0: expected >= 1"),
])
def test_values_out_of_range_are_one_error_naming_the_keys(
        tmp_path: Path, section: str, changes: dict, message: str) -> None:
    # Each would otherwise fail deep inside a stage as a traceback (a division by zero, a
    # shape error in the network, an empty split).
    raw = yaml.safe_load(REPO_PARAMS.read_text())
    raw[section].update(changes)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_params(path)


@pytest.mark.parametrize("change, match", [
    ({"schedule_steps": 500}, "schedule_steps"),   # beyond the 400-step cap
    ({"schedule_steps": -1}, "schedule_steps"),
    ({"final_div_factor": 0.5}, "final_div_factor"),
])
def test_a_schedule_outside_the_cap_is_refused(tmp_path, change, match) -> None:
    import yaml

    from fedct.config import ConfigError, load_params

    raw = yaml.safe_load(REPO_PARAMS.read_text())
    raw["train"].update(change)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=match):
        load_params(path)
