"""The cohort's case selections and files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedct.data.cases import (
    case_path,
    evaluation_cases,
    load_case,
    read_cohort,
    save_case,
    training_cases,
)
from fedct.errors import FedctError


def test_training_cases_refuses_holdout_site() -> None:
    cohort = pd.DataFrame({"site": ["A", "A", "C"], "role": ["train", "train", "holdout"],
                           "split": ["train", "val", "test"], "has_label": [True] * 3,
                           "series_key": ["a", "b", "c"]})
    assert list(training_cases(cohort, "pooled")["series_key"]) == ["a", "b"]
    two = pd.concat([cohort, cohort.assign(site="B", series_key=["d", "e", "f"])
                     .iloc[:2]], ignore_index=True)
    assert list(training_cases(two, "pooled")["series_key"]) == ["a", "b", "d", "e"]
    # Pooled over the federated sites only.
    assert list(training_cases(two, "pooled", ["B"])["series_key"]) == ["d", "e"]
    with pytest.raises(FedctError, match="'C'"):
        training_cases(cohort, "C")


def test_evaluation_cases_are_every_case_not_trained_on() -> None:
    cohort = pd.DataFrame({"split": ["train", "val", "calib", "test", "test"],
                           "series_key": ["a", "b", "e", "c", "d"]})
    assert list(evaluation_cases(cohort)["series_key"]) == ["b", "e", "c", "d"]


def test_case_round_trip_and_clear_errors(tmp_path: Path) -> None:
    case = {"image": np.random.default_rng(0).random((1, 4, 4, 2), dtype=np.float32),
            "label": np.ones((1, 4, 4, 2), np.uint8)}
    save_case(case_path(tmp_path, "k1"), case)
    back = load_case(case_path(tmp_path, "k1"))
    assert set(back) == {"image", "label"} and np.array_equal(back["image"], case["image"])
    (tmp_path / "cases" / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(FedctError, match="bad.npz"):
        load_case(case_path(tmp_path, "bad"))
    with pytest.raises(FedctError, match="cohort.csv: not found"):
        read_cohort(tmp_path / "nowhere")
