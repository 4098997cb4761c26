"""``fedct seeds``: what it refuses before running any experiment (the runs themselves are in
``tests/test_pipeline.py``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fedct import seeds
from fedct.config import Params
from fedct.errors import FedctError


@pytest.mark.parametrize(("federate", "reason"), [
    ({"primary_label_free": "fedavg"}, "primary_label_free 'fedavg': not one of"),
    ({"primary_label_free": "no_such_method"}, "primary_label_free 'no_such_method'"),
    # A label-free method that federate does not run.
    ({"methods": ("one_shot", "fedavg", "tent")}, "uw_select.*\\['tent'\\]"),
    # Nothing to judge it against.
    ({"methods": ("fedprox", "tent", "uw_select"), "select_from": ("fedprox",)},
     "against FedAvg"),
])
def test_the_label_free_question_must_be_answerable(federate: dict, reason: str,
                                                    tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # not a repository: nothing could run anyway
    params = Params()
    params = dataclasses.replace(params, federate=dataclasses.replace(params.federate,
                                                                      **federate))
    with pytest.raises(FedctError, match=reason):
        seeds.run(params, tmp_path / "out")
