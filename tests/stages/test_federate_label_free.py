"""Every label-free method of the registry, run by ``fedct federate`` on a cohort with an
adapt split (``cohort.adapt_fraction`` > 0): inductive, images only.

Each held-out site has adapt and test cases. The test cases' files are not cases at all
(any read fails) and every adapt case stores its label as an object array, which
``np.load`` refuses to unpickle: a method that read a scored image or any target label
would stop the run. The methods are taken from the registry, so a method added later is
held to the same rule without editing this test.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedct.config import FederateParams, TrainParams
from fedct.federation.methods import REGISTRY
from fedct.stages import federate as stage
from tests.stages.test_federate import _model
from tests.stages.tiny import LABELS, PATIENT, SPEC, tiny_case

LABEL_FREE = tuple(n for n, m in REGISTRY.items() if m.label_free)
# Their ablations run beside them (steered's reads no target image).
ABLATIONS = tuple(m.ablation for m in REGISTRY.values() if m.ablation and m.label_free)
# Training sites A and B (train and val cases); held-out C and G (adapt and test cases).
ROWS = [("A", "train"), ("A", "train"), ("A", "val"), ("B", "train"), ("B", "val"),
        ("C", "adapt"), ("C", "adapt"), ("C", "test"), ("G", "adapt"), ("G", "test")]


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("poisoned")
    rng = np.random.default_rng(5)
    (root / "cases").mkdir()
    records = []
    for i, (site, split) in enumerate(ROWS):
        key = f"k{i:02d}{site.lower()}"
        held = site in ("C", "G")
        path = root / "cases" / f"{key}.npz"
        case = tiny_case(rng, contrast=0.2 if held else 0.3)
        if held and split == "test":
            path.write_bytes(b"a scored case: no label-free method may open it")
        elif held:
            case["label"] = np.array([{"label": "never read"}], dtype=object)
            np.savez_compressed(path, **case)
        else:
            np.savez_compressed(path, **case)
        records.append({"series_key": key, "study_key": f"st{i}", "patient_key": PATIENT,
                        "site": site, "split": split, "role": "holdout" if held else "train",
                        "labelled": not held or split == "test",
                        "has_label": not held or split == "test"})
    pd.DataFrame(records).to_csv(root / "cohort.csv", index=False)
    (root / "spec.json").write_text(json.dumps(SPEC))
    (root / "labels.json").write_text(json.dumps(LABELS))
    models = root / "models"
    _model(models / "A", 1, "A")
    _model(models / "B", 2, "B")
    return root


def test_the_poison_works(poisoned: Path) -> None:
    # Reading a target label or a scored image fails; reading an adapt image does not.
    from fedct.data.cases import case_path, load_case, load_image

    table = pd.read_csv(poisoned / "cohort.csv")
    for key, split in table.loc[table["role"] == "holdout", ["series_key", "split"]].values:
        with pytest.raises(Exception):  # noqa: B017 - whatever numpy raises on the poison
            load_case(case_path(poisoned, key))
        if split == "adapt":
            assert load_image(case_path(poisoned, key)).shape == (1, 12, 12, 16)


@pytest.mark.slow
def test_every_label_free_method_adapts_on_the_adapt_split_only(poisoned: Path,
                                                                tmp_path: Path) -> None:
    methods = ("fedavg", *dict.fromkeys((*LABEL_FREE, *ABLATIONS)))
    params = FederateParams(sites=("A", "B"), methods=methods,
                            select_from=("fedavg", "tent"), rounds=1, local_steps=1,
                            min_clients=1, mc_samples=2, mc_batch=2, device="cpu",
                            steer_rounds=1, cwst_rounds=2, cwst_steps=1, tent_steps=1)
    train = TrainParams(steps=1, channels=(4, 8), strides=(2,), patch_size=(12, 12, 16),
                        max_shift=(0, 0, 0), batch_size=1, amp=False, device="cpu")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
        mp.setenv("MLFLOW_ARTIFACTS_DESTINATION", str(tmp_path / "mlartifacts"))
        mp.chdir(tmp_path)
        stage.run(params, train, poisoned, poisoned / "models", tmp_path / "out",
                  tmp_path / "ckpt")
    for name in methods:
        cards = list((tmp_path / "out" / name).rglob("model_card.json"))
        assert cards, f"{name} wrote no model"
        assert all(PATIENT not in c.read_text() for c in cards)
