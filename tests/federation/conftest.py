"""A tiny prepared cohort of two training sites (16x16x8 volumes), written in milliseconds,
and the TCP sockets that processes listen on (the loopback-only checks)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedct.config import TrainParams
from fedct.data.cases import case_path, save_case

# Site A: 2 training cases, site B: 3; one validation case each. C is a held-out site.
SPLITS = {"A": ["train", "train", "val"], "B": ["train", "train", "train", "val"],
          "C": ["test"]}
PARAMS = TrainParams(steps=6, channels=(4, 8), strides=(2,), patch_size=(16, 16, 8),
                     max_shift=(0, 0, 2), batch_size=2, val_checks=3, patience=0,
                     learning_rate=1e-2, seed=5, amp=False, device="cpu")


def _case(rng: np.random.Generator, bright: float) -> dict[str, np.ndarray]:
    """A bright cube labelled femur (2) on dark noise; sites differ in brightness."""
    img = rng.normal(0.1, 0.02, (1, 16, 16, 8)).astype(np.float32)
    lab = np.zeros((1, 16, 16, 8), dtype=np.uint8)
    x, y = rng.integers(2, 8, 2)
    img[0, x:x + 6, y:y + 6, 2:6] = bright
    lab[0, x:x + 6, y:y + 6, 2:6] = 2
    return {"image": img, "label": lab}


@pytest.fixture(scope="session")
def fed_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fedcohort")
    rng = np.random.default_rng(3)
    rows = []
    for site, splits in SPLITS.items():
        for i, split in enumerate(splits):
            key = f"{site}-{i}"
            save_case(case_path(root, key), _case(rng, 0.8 if site == "A" else 0.6))
            rows.append({"site": site, "split": split,
                         "role": "holdout" if site == "C" else "train",
                         "has_label": True, "series_key": key})
    pd.DataFrame(rows).to_csv(root / "cohort.csv", index=False)
    (root / "labels.json").write_text(json.dumps({"0": "background", "1": "muscle",
                                                  "2": "femur"}))
    (root / "spec.json").write_text(json.dumps({"spacing_mm": [7.0, 7.0, 7.0],
                                                "roi_size": [16, 16, 8], "hu_min": -200,
                                                "hu_max": 1200}))
    return root


def listening(procs: list) -> list[tuple[int, str, str, int]]:
    """``(pid, name, ip, port)`` of every TCP socket that one of ``procs`` (psutil
    processes) listens on; processes that are gone meanwhile are skipped."""
    import psutil

    found = []
    for p in procs:
        try:
            name = p.name()
            found += [(p.pid, name, c.laddr.ip, c.laddr.port)
                      for c in p.net_connections(kind="inet")
                      if c.status == psutil.CONN_LISTEN]
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return found


@pytest.fixture
def task_identity():
    """Flower stamps messages with the running task's identity; set one for the test
    (tests that build or handle messages outside a Flower run)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = None
