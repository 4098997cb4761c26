"""Profile overlays on ``params.yaml`` (``profiles/study.yaml``): a subset of its keys
that differ, checked like it, and the ``study`` key of what ``make study`` runs besides."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedct.config import ConfigError, Params, Rules, from_dict, to_dict


@dataclass(frozen=True)
class StudyRuns:
    """The ``study`` key of a profile overlay (``profiles/study.yaml``): what `make study`
    runs besides the params. Each report seed pair (``synth.report_seeds[i]``,
    ``cohort.report_seeds[i]`` of the overlay) runs once per training seed (``train.seed``
    and ``federate.seed`` set to it)."""

    train_seeds: tuple[int, ...] = (0, 1)


STUDY_RULES: Rules = [
    (("train_seeds",), lambda v: len(v) >= 1 and len(set(v)) == len(v),
     "one or more distinct seeds"),
]


def _merge(base: dict, over: dict, where: str) -> dict:
    out = dict(base)
    for key, value in over.items():
        if key not in base:
            raise ConfigError(f"{where}.{key}: unknown key; known: {sorted(base)}")
        out[key] = (_merge(base[key], value, f"{where}.{key}")
                    if isinstance(value, dict) and isinstance(base[key], dict) else value)
    return out


def load_overlay(path: str | Path, params_path: str | Path = "params.yaml"
                 ) -> tuple[Params, StudyRuns, dict[str, Any]]:
    """A profile overlay on ``params.yaml``: the merged, checked params; its ``study`` key;
    and the overridden keys as ``{"stage.key": value}`` (what ``dvc exp run -S`` sets).

    The overlay holds a subset of params.yaml's keys (unknown ones are errors naming the
    key, as in params.yaml) and a ``study`` key (:class:`StudyRuns`)."""
    path = Path(path)
    base_path = Path(params_path)
    try:
        over = yaml.safe_load(path.read_text()) or {}
        base = yaml.safe_load(base_path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"{exc.filename}: cannot read the params ({exc.strerror})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(over, dict) or not isinstance(over.get("study", {}), dict):
        raise ConfigError(f"{path}: top level must be a mapping of stage -> params")
    runs = from_dict(StudyRuns, {"train_seeds": [0, 1], **over.pop("study", {})},
                     f"{path}:study", STUDY_RULES)
    params = from_dict(Params, _merge(base, over, str(path)), where=str(path))
    flat = {k: v for k, v in to_dict(params).items()
            if k.split(".")[0] in over and k.split(".")[1] in over[k.split(".")[0]]}
    return params, runs, flat
