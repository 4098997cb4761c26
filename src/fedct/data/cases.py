"""The cohort's prepared cases on disk, and which of them each job uses.

A cohort folder holds ``cohort.csv`` (one row per series: site, split, role, labels),
``spec.json`` (the preprocessing grid), ``labels.json`` (the label set) and
``cases/<series_key>.npz`` with ``image`` float32 (1, X, Y, Z) in [0, 1] and, when
labelled, ``label`` uint8 (1, X, Y, Z).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from fedct.data.labels import LabelSet, read_labels
from fedct.errors import FedctError

POOLED = "pooled"  # the model trained on every training site's data (centralised bound)


def case_path(cohort_dir: Path, series_key: str) -> Path:
    return Path(cohort_dir) / "cases" / f"{series_key}.npz"


def save_case(path: Path, case: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **case)


def load_case(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise FedctError(f"{path}: cannot read the prepared case ({exc})") from exc


def load_image(path: Path) -> np.ndarray:
    """Only the image of a prepared case: its label is never read (label-free methods)."""
    try:
        with np.load(path) as z:
            return z["image"]
    except (OSError, ValueError, KeyError) as exc:
        raise FedctError(f"{path}: cannot read the prepared image ({exc})") from exc


def read_cohort(cohort_dir: Path) -> pd.DataFrame:
    path = Path(cohort_dir) / "cohort.csv"
    if not path.is_file():
        raise FedctError(f"{path}: not found; run `fedct cohort` first")
    return pd.read_csv(path)


def read_spec(cohort_dir: Path) -> dict:
    """The preprocessing grid of the cohort: spacing_mm, roi_size, hu_min, hu_max."""
    path = Path(cohort_dir) / "spec.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FedctError(f"{path}: cannot read the preprocessing spec ({exc})") from exc


def cohort_labels(cohort_dir: Path) -> LabelSet:
    return read_labels(Path(cohort_dir) / "labels.json")


def training_cases(cohort: pd.DataFrame, site: str,
                   pooled_sites: Sequence[str] | None = None) -> pd.DataFrame:
    """Labelled train/val cases of ``site``; for the pooled model, of ``pooled_sites`` (the
    sites whose local models are federated, so pooled and federated models see the same
    data), or of every training site when it is None."""
    c = cohort[(cohort["role"] == "train") & cohort["has_label"].astype(bool)]
    if site != POOLED:
        c = c[c["site"] == site]
    elif pooled_sites is not None:
        c = c[c["site"].isin(list(pooled_sites))]
    if c.empty or not (c["split"] == "train").any():
        raise FedctError(f"train: no labelled training cases for site {site!r} in the cohort "
                         f"(sites with training data: {sorted(set(cohort['site']))})")
    return c


#: The split of held-out patients whose images label-free methods adapt on (no label).
ADAPT = "adapt"


def adaptation_cases(cohort: pd.DataFrame) -> pd.DataFrame:
    """The held-out cases the label-free methods may read (images only).

    With an ``adapt`` split (``cohort.adapt_fraction`` > 0): those cases only, disjoint
    from the ``test`` cases every model is scored on. Without one: every held-out case
    (transductive: they adapt on the images they are scored on)."""
    held = cohort[cohort["role"] == "holdout"]
    if (held["split"] == ADAPT).any():
        held = held[held["split"] == ADAPT]
    return held.reset_index(drop=True)


def validation_cases(cohort: pd.DataFrame) -> pd.DataFrame:
    """Labelled validation cases of training sites: where the best local model is chosen
    (``evaluate.best_local_on: val``), never a held-out case."""
    keep = ((cohort["role"] == "train") & (cohort["split"] == "val")
            & cohort["has_label"].astype(bool))
    return cohort[keep].reset_index(drop=True)


def evaluation_cases(cohort: pd.DataFrame) -> pd.DataFrame:
    """Val, calib and test cases of training sites, all (test) cases of held-out sites."""
    return cohort[cohort["split"].isin(["val", "calib", "test"])].reset_index(drop=True)
