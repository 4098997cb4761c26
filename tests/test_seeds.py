"""``fedct seeds``: what it refuses before running any experiment (the runs themselves are in
``tests/test_pipeline.py``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fedct import seeds
from fedct.config import Params
from fedct.errors import FedctError


@pytest.mark.parametrize("primary", ["fedavg", "no_such_method"])
def test_the_primary_label_free_method_must_be_a_label_free_method_that_runs(
        primary: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # not a repository: nothing could run anyway
    params = Params()
    params = dataclasses.replace(params, federate=dataclasses.replace(
        params.federate, primary_label_free=primary))
    with pytest.raises(FedctError, match=f"primary_label_free '{primary}'"):
        seeds.run(params, tmp_path / "out")


def test_a_label_free_method_that_is_not_run_is_refused(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    monkeypatch.chdir(tmp_path)
    params = Params()
    params = dataclasses.replace(params, federate=dataclasses.replace(
        params.federate, methods=("one_shot", "fedavg", "tent")))
    with pytest.raises(FedctError, match="uw_select.*\\['tent'\\]"):
        seeds.run(params, tmp_path / "out")


def test_without_fedavg_there_is_nothing_to_judge_against(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    monkeypatch.chdir(tmp_path)
    params = Params()
    params = dataclasses.replace(params, federate=dataclasses.replace(
        params.federate, methods=("fedprox", "tent", "uw_select"), select_from=("fedprox",)))
    with pytest.raises(FedctError, match="against FedAvg"):
        seeds.run(params, tmp_path / "out")
