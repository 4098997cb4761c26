"""The target hospital steers the aggregation (``fedct.federation.steering``): a target node
scores every client update on its own adaptation images and returns scalars only; the
server merges with the weights they give. In-process grid (``LocalGrid``), no ray."""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fedct.data.cases import case_path
from fedct.errors import FedctError
from fedct.federation.label_free import steering_weights
from fedct.federation.run_config import FederationConfig, run_config
from fedct.federation.server_app import run_server
from fedct.federation.steering import STEER, SteerConfig
from fedct.model.io import load_model
from tests.federation.conftest import PARAMS
from tests.federation.test_server_app import LocalGrid

STEER_CFG = SteerConfig(mc_samples=2, mc_batch=2, seed=3, temperature=0.05)


# Messages built and handled outside a Flower run carry a task identity.
pytestmark = pytest.mark.usefixtures("task_identity")


@pytest.fixture
def cohort(fed_cohort: Path, tmp_path: Path) -> Path:
    """``fed_cohort`` with two adapt cases at target C (image only: their label is an
    object array that np.load refuses) and C's test case replaced by bytes that are not a
    case: a target that read a label or a scored case would fail."""
    root = shutil.copytree(fed_cohort, tmp_path / "cohort")
    rows = pd.read_csv(root / "cohort.csv")
    rng = np.random.default_rng(1)
    for i in range(2):
        image = rng.normal(0.1, 0.02, (1, 16, 16, 8)).astype(np.float32)
        np.savez_compressed(case_path(root, f"C-adapt-{i}"), image=image,
                            label=np.array([{"never": "read"}], dtype=object))
    case_path(root, "C-0").write_bytes(b"a scored case")
    extra = pd.DataFrame([{"site": "C", "split": "adapt", "role": "holdout",
                           "has_label": False, "series_key": f"C-adapt-{i}"} for i in range(2)])
    pd.concat([rows, extra], ignore_index=True).to_csv(root / "cohort.csv", index=False)
    return root


def _config(cohort: Path, tmp: Path, **kw) -> FederationConfig:
    base = dict(sites=("A", "B"), train_params=PARAMS, rounds=2, local_steps=2,
                min_clients=1, seed=1, cohort_dir=str(cohort),
                checkpoint_dir=str(tmp / "ckpt"), out_dir=str(tmp / "out"),
                keep_updates=True, targets=("C",), steer=STEER_CFG.to_json())
    base.update(kw)
    return FederationConfig(**base)


def _run(cfg: FederationConfig) -> tuple[list[dict], LocalGrid, list]:
    rc = run_config(cfg)
    grid = LocalGrid(rc, len(cfg.sites) + len(cfg.targets))
    replies: list = []
    send = grid.send_and_receive

    def spy(messages, timeout=None):
        out = send(messages, timeout)
        replies.extend(out)
        return out

    grid.send_and_receive = spy
    return run_server(grid, FederationConfig.from_run_config(rc)), grid, replies


def test_the_target_steers_the_merge_with_scalars_only(cohort: Path, tmp_path: Path) -> None:
    cfg = _config(cohort, tmp_path)
    history, grid, replies = _run(cfg)
    target_node = 102  # partition 2 = the first target
    # The target never trains or validates; it is sent each round's two client updates.
    kinds = {(m.metadata.message_type, m.metadata.dst_node_id) for m in grid.sent}
    assert ("train", target_node) not in kinds and ("evaluate", target_node) not in kinds
    asks = [m for m in grid.sent if m.metadata.message_type == STEER]
    assert [m.metadata.dst_node_id for m in asks] == [target_node, target_node]
    assert all(set(m.content.array_records) == {"update.A", "update.B"} for m in asks)
    # What leaves the target: one scalar per client, nothing else.
    back = [r for r in replies if r.metadata.src_node_id == target_node
            and r.metadata.message_type == STEER]
    assert len(back) == 2
    for r in back:
        assert not r.has_error(), r.error.reason if r.has_error() else ""
        assert not r.content.array_records and not r.content.config_records
        (scores,) = r.content.metric_records.values()
        assert set(scores) == {"score.A", "score.B"}
        assert all(isinstance(v, float) and 0 <= v <= 1 for v in scores.values())
    # The merge used the weights the scores give: FedAvg's (2 and 3 training cases)
    # tilted towards the less uncertain update.
    for rec in history:
        s = rec["steer_scores"]["C"]
        expected = steering_weights({"C": s}, {"A": 2.0, "B": 3.0}, STEER_CFG.temperature)
        assert rec["weights"] == pytest.approx(expected)
        assert rec["weights"] != pytest.approx({"A": 0.4, "B": 0.6})
        assert rec["failed"] == []
    upd = Path(cfg.checkpoint_dir) / "updates" / "round-2"
    a, b = torch.load(upd / "A.pt"), torch.load(upd / "B.pt")
    model, card = load_model(Path(cfg.out_dir) / "model.safetensors")
    w = history[-1]["weights"]
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, w["A"] * a[k] + w["B"] * b[k], msg=k)
    assert card["federation"]["targets"] == ["C"]
    assert card["federation"]["n_train"] == {"A": 2, "B": 3}


def test_a_failing_target_leaves_the_round_to_fedavg(cohort: Path, tmp_path: Path) -> None:
    (cohort / "cases" / "C-adapt-0.npz").write_bytes(b"unreadable")
    history, _, _ = _run(_config(cohort, tmp_path, rounds=1))
    (rec,) = history
    assert rec["weights"] == pytest.approx({"A": 0.4, "B": 0.6})
    assert [f["site"] for f in rec["failed"]][:1] == ["C"]
    assert rec["steer_scores"] == {}


def test_a_target_that_is_not_there_stops_a_steered_federation(cohort: Path,
                                                                tmp_path: Path) -> None:
    cfg = _config(cohort, tmp_path, timeout=1.0)
    rc = run_config(cfg)
    grid = LocalGrid(rc, 2)  # the target's node never connects
    with pytest.raises(FedctError, match=r"target site\(s\) \['C'\] did not answer"):
        run_server(grid, FederationConfig.from_run_config(rc))


@pytest.mark.parametrize(("change", "match"), [
    ({"targets": "A"}, "not among the sites"),
    ({"steer": ""}, "targets and steer go together"),
    ({"steer": '{"temperature": 0}'}, "temperature > 0"),
    ({"steer": '{"no_such": 1}'}, "steer"),
])
def test_bad_steering_config_is_refused(cohort: Path, tmp_path: Path, change, match) -> None:
    rc = {**run_config(_config(cohort, tmp_path)), **change}
    with pytest.raises(FedctError, match=match):
        FederationConfig.from_run_config(rc)


def test_a_plain_federation_keeps_its_fingerprint(cohort: Path, tmp_path: Path) -> None:
    plain = _config(cohort, tmp_path, targets=(), steer="")
    steered = _config(cohort, tmp_path)
    assert plain.fingerprint() != steered.fingerprint()
    assert dataclasses.replace(steered, targets=(), steer="").fingerprint() == \
        plain.fingerprint()


def test_steering_weights_tilt_fedavg_towards_the_less_uncertain_update() -> None:
    base = {"A": 1.0, "B": 3.0}
    # Equal scores: FedAvg's weights.
    assert steering_weights({"C": {"A": 0.2, "B": 0.2}}, base, 0.01) == pytest.approx(
        {"A": 0.25, "B": 0.75})
    # A is less uncertain by one temperature: e times B's per training case.
    w = steering_weights({"C": {"A": 0.1, "B": 0.11}}, base, 0.01)
    assert w["A"] / w["B"] == pytest.approx(math.e / 3)
    # Two targets: the mean score; a non-finite score from any target drops the client.
    w = steering_weights({"C": {"A": 0.1, "B": 0.3}, "G": {"A": 0.3, "B": 0.1}}, base, 0.01)
    assert w == pytest.approx({"A": 0.25, "B": 0.75})
    assert steering_weights({"C": {"A": math.inf, "B": 0.5}}, base, 0.01) == {"A": 0.0,
                                                                           "B": 1.0}
    with pytest.raises(ValueError, match="scored"):
        steering_weights({"C": {"A": 0.1}}, base, 0.01)
    with pytest.raises(ValueError, match="no target"):
        steering_weights({}, base, 0.01)
