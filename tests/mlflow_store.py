"""A small MLflow store as the pipeline leaves it, for ``fedct ui``'s test and benchmark.

``write_study_store(root)`` writes ``root/mlflow.db`` with the ``fedct`` experiment (a run
``train-A`` and a ``promote`` run) and registered model ``fedct-seg`` version 1 under the
``champion`` alias, artifacts under ``root/mlruns``. It works in ``root`` and without
``MLFLOW_TRACKING_URI`` (as the pipeline's stages do there) and restores both afterwards,
so a benchmark can call it outside pytest.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from fedct import tracking
from tests.inference.conftest import make_model

RUN_NAME = "train-A"
MODEL = "fedct-seg"
ALIAS = "champion"


def write_study_store(root: Path) -> Path:
    """Write the store in ``root`` (an existing folder); returns the path of ``mlflow.db``."""
    saved = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        with contextlib.chdir(root):
            with tracking.start_run("train", run_name=RUN_NAME) as run:
                run.log_params({"site": "A"})
                run.log_metrics({"val_dice": 0.81})
            with tracking.start_run("promote") as run:
                logged = tracking.log_fedct_model(run, make_model(root / "model"),
                                                  registered_name=MODEL)
            tracking.set_champion(MODEL, logged.version, alias=ALIAS)
    finally:
        if saved is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved
    return root / tracking.DEFAULT_STORE
