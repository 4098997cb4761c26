"""Cohort selection and patient-level splits."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from fedct.config import CohortParams
from fedct.stages.cohort import select_series, split_patients


def _catalogue(n_sites: int = 4, n_patients: int = 9, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_sites):
        site = "ABCDEFGHIJ"[s]
        for p in range(n_patients):
            for st in range(rng.integers(1, 3)):  # 1-2 studies per patient
                study = f"{site}-p{p}-s{st}"
                for se in range(3):
                    rows.append(dict(site=site, patient_key=f"{site}-p{p}", study_key=study,
                                     series_key=f"{study}-se{se}", usable=se != 2,
                                     n_slices=[80, 120, 20][se],
                                     slice_thickness=[1.0, 2.0, 5.0][se],
                                     series_number=se + 2))
    return pd.DataFrame(rows)


def test_one_series_per_study_by_the_documented_rule() -> None:
    cat = _catalogue()
    chosen = select_series(cat)
    assert chosen["study_key"].is_unique
    assert set(chosen["study_key"]) == set(cat["study_key"])
    assert chosen["usable"].all()
    assert (chosen["n_slices"] == 120).all()  # most slices wins over thinner slices
    tie = cat.assign(n_slices=100)
    assert (select_series(tie)["slice_thickness"] == 1.0).all()  # then thinnest


def test_split_is_by_patient_and_deterministic() -> None:
    params = CohortParams(holdout_sites=("D",), seed=3)
    chosen = select_series(_catalogue())
    a = split_patients(chosen, params)
    b = split_patients(chosen.sample(frac=1.0, random_state=1), params)
    key = ["series_key", "split"]
    pd.testing.assert_frame_equal(a[key].sort_values(key).reset_index(drop=True),
                                  b[key].sort_values(key).reset_index(drop=True))
    # No patient in two splits.
    assert (a.groupby("patient_key")["split"].nunique() == 1).all()
    for site, g in a[a["role"] == "train"].groupby("site"):
        counts = g.drop_duplicates("patient_key")["split"].value_counts()
        assert counts.get("test", 0) >= 1 and counts.get("val", 0) >= 1, site
        assert counts.get("train", 0) >= counts.get("test", 0)
    held = a[a["site"] == "D"]
    assert (held["split"] == "test").all() and (held["role"] == "holdout").all()
    other = split_patients(chosen, dataclasses.replace(params, seed=4))
    assert not other["split"].equals(a["split"])


def test_unlabelled_sites_are_marked() -> None:
    params = CohortParams(holdout_sites=(), unlabelled_sites=("B",))
    a = split_patients(select_series(_catalogue()), params)
    assert not a.loc[a["site"] == "B", "labelled"].any()
    assert a.loc[a["site"] != "B", "labelled"].all()


@pytest.mark.parametrize("n", [1, 2, 3])
def test_small_sites_still_get_a_training_patient(n: int) -> None:
    a = split_patients(select_series(_catalogue(n_sites=1, n_patients=n)), CohortParams())
    assert (a.drop_duplicates("patient_key")["split"] == "train").sum() >= 1
