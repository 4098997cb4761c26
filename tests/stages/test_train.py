"""The train stage's pooled model: same sites as the federation, matched epochs."""

from __future__ import annotations

import pandas as pd

from fedct.config import TrainParams
from fedct.stages.train import pooled_params


def test_pooled_sees_each_case_as_often_as_a_local_model() -> None:
    cases = pd.DataFrame({"site": ["A", "A", "B", "D", "D"]})
    params = pooled_params(TrainParams(steps=100), cases)
    assert params.steps == 300  # 3 sites: 3x the local cap
    assert params.channels == TrainParams().channels  # nothing else changes
