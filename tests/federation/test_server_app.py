"""The ServerApp's rounds and the ClientApp's handlers, on an in-process grid (no ray).

``LocalGrid`` stands in for Flower's Grid: every message goes straight to the ClientApp
with the node's Context, and an exception becomes an error reply, as in Flower. The real
simulation runs in ``test_simulation.py``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from flwr.app import Context, Error, Message, RecordDict

from fedct.errors import FedctError
from fedct.federation.client_app import make_client_app
from fedct.federation.run_config import FederationConfig, run_config
from fedct.federation.server_app import CHECKPOINT, HISTORY, run_server
from fedct.model.io import LEGACY_FILE, load_model
from tests.federation.conftest import PARAMS
from tests.federation.faults import fail_in_round
from tests.model.payload import planted


class LocalGrid:
    """Nodes 100, 101, ... run ``app`` (fedct's ClientApp by default) in this process;
    partition i = node 100 + i."""

    def __init__(self, rc: dict, n: int, app=None) -> None:
        self.app = make_client_app() if app is None else app
        self.contexts = {100 + i: Context(run_id=1, node_id=100 + i,
                                          node_config={"partition-id": i, "num-partitions": n},
                                          state=RecordDict(), run_config=dict(rc))
                         for i in range(n)}
        self.sent: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None) -> list[Message]:
        replies = []
        for m in messages:
            self.sent.append(m)
            try:
                replies.append(self.app(m, self.contexts[m.metadata.dst_node_id]))
            except Exception as exc:  # noqa: BLE001 - Flower turns it into an error reply
                replies.append(Message(Error(code=0, reason=str(exc)), reply_to=m))
        return replies


# Messages built and handled outside a Flower run carry a task identity.
pytestmark = pytest.mark.usefixtures("task_identity")


def _config(cohort: Path, tmp: Path, **kw) -> FederationConfig:
    base = dict(sites=("A", "B"), train_params=PARAMS, rounds=2, local_steps=2, mu=0.0,
                min_clients=1, seed=1, cohort_dir=str(cohort),
                checkpoint_dir=str(tmp / "ckpt"), out_dir=str(tmp / "out"), keep_updates=True)
    base.update(kw)
    return FederationConfig(**base)


def _run(cfg: FederationConfig, seen: list | None = None, app=None) -> list[dict]:
    rc = run_config(cfg)
    return run_server(LocalGrid(rc, len(cfg.sites), app),
                      FederationConfig.from_run_config(rc),
                      on_round=None if seen is None else seen.append)


def test_rounds_merge_the_client_updates_weighted_by_training_cases(
        fed_cohort: Path, tmp_path: Path) -> None:
    cfg = _config(fed_cohort, tmp_path)
    seen: list[dict] = []
    history = _run(cfg, seen)
    assert [r["round"] for r in history] == [1, 2] and seen == history
    r2 = history[-1]
    assert r2["weights"] == {"A": pytest.approx(0.4), "B": pytest.approx(0.6)}
    assert r2["failed"] == [] and r2["clients"] == 2
    assert set(r2["sites"]) == {"A", "B"} and r2["sites"]["B"]["n_train"] == 3
    assert 0 <= r2["val_dice_mean"] <= 1 and r2["bytes_sent"] > r2["bytes_received"] > 0
    # The final model is 2/5 of A's and 3/5 of B's last update.
    upd = Path(cfg.checkpoint_dir) / "updates" / "round-2"
    a, b = torch.load(upd / "A.pt"), torch.load(upd / "B.pt")
    model, card = load_model(Path(cfg.out_dir) / "model.safetensors")
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, 0.4 * a[k] + 0.6 * b[k], msg=k)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the sites did differ
    assert card["site"] == "federated" and card["federation"]["n_train"] == {"A": 2, "B": 3}
    assert card["runtime"]["clients"]["B"]["threads"] == torch.get_num_threads()
    assert card["labels"] == {"0": "background", "1": "muscle", "2": "femur"}
    assert json.loads((Path(cfg.out_dir) / HISTORY).read_text()) == json.loads(
        json.dumps(history))


def test_a_failing_site_is_recorded_and_rejoins(fed_cohort: Path, tmp_path: Path) -> None:
    failing = make_client_app(mods=[fail_in_round("B", 1)])  # a test double (faults.py)
    cfg = _config(fed_cohort, tmp_path)
    history = _run(cfg, app=failing)
    r1, r2 = history
    assert r1["clients"] == 1 and r1["weights"] == {"A": 1.0}
    assert [f["site"] for f in r1["failed"]] == ["B"]
    assert "fault injection" in r1["failed"][0]["reason"]
    assert r2["clients"] == 2 and r2["failed"] == []
    # Below the minimum the round, and the federation, stop with a reason.
    strict = _config(fed_cohort, tmp_path / "strict", min_clients=2)
    with pytest.raises(FedctError, match="fewer than the minimum of 2"):
        _run(strict, app=failing)


def test_resume_skips_finished_rounds_and_ends_as_if_never_stopped(
        fed_cohort: Path, tmp_path: Path) -> None:
    full = _run(_config(fed_cohort, tmp_path / "full"))
    cfg = _config(fed_cohort, tmp_path / "killed")

    class Killed(Exception):
        pass

    def kill_after_round_1(record: dict) -> None:
        if record["round"] == 1:
            raise Killed

    rc = run_config(cfg)
    with pytest.raises(Killed):
        run_server(LocalGrid(rc, 2), cfg, on_round=kill_after_round_1)
    assert torch.load(Path(cfg.checkpoint_dir) / CHECKPOINT, weights_only=True)["round"] == 1
    grid = LocalGrid(rc, 2)
    resumed = run_server(grid, cfg)
    assert [r["attempt"] for r in resumed] == [1, 2]
    trained = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert {int(m.content["config"]["server-round"]) for m in trained} == {2}
    a, _ = load_model(Path(cfg.out_dir) / "model.safetensors")
    b, _ = load_model(tmp_path / "full" / "out" / "model.safetensors")
    for (ka, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(va, vb, msg=ka)
    assert resumed[1]["val_dice_mean"] == pytest.approx(full[1]["val_dice_mean"])
    # Other settings: the checkpoint is not resumed.
    other = dataclasses.replace(cfg, seed=2)
    grid = LocalGrid(run_config(other), 2)
    assert [r["attempt"] for r in run_server(grid, other)] == [1, 1]


def test_fedprox_sends_mu_and_starts_from_a_given_model(fed_cohort: Path,
                                                        tmp_path: Path) -> None:
    first = _config(fed_cohort, tmp_path / "a", rounds=1)
    _run(first)
    init = Path(first.out_dir) / "model.safetensors"
    cfg = _config(fed_cohort, tmp_path / "b", rounds=1, mu=0.5, init_model=str(init))
    grid = LocalGrid(run_config(cfg), 2)
    run_server(grid, cfg)
    train = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert {float(m.content["config"]["proximal-mu"]) for m in train} == {0.5}
    start, _ = load_model(init)
    sent = train[0].content["arrays"].to_torch_state_dict()
    for k, v in start.state_dict().items():
        torch.testing.assert_close(sent[k], v, msg=k)
    _, card = load_model(Path(cfg.out_dir) / "model.safetensors")
    assert card["federation"]["method"] == "fedprox"


def test_a_pickle_payload_as_the_server_checkpoint_is_refused_not_run(
        fed_cohort: Path, tmp_path: Path) -> None:
    cfg = _config(fed_cohort, tmp_path)
    marker = planted(Path(cfg.checkpoint_dir) / CHECKPOINT, tmp_path / "pwned")
    with pytest.raises(FedctError, match=f"{CHECKPOINT}: the federation checkpoint holds "
                                         "objects other than tensors"):
        _run(cfg)
    assert not marker.exists(), "resuming the federation ran the code in its checkpoint"


def test_a_pickle_payload_as_the_initial_model_is_refused_not_run(
        fed_cohort: Path, tmp_path: Path) -> None:
    init = tmp_path / "init" / LEGACY_FILE
    marker = planted(init, tmp_path / "pwned")
    cfg = _config(fed_cohort, tmp_path, rounds=1, init_model=str(init))
    with pytest.raises(FedctError, match="fedct convert-model"):
        _run(cfg)
    assert not marker.exists(), "starting from the model ran the code inside it"


def test_fixed_site_weights_replace_case_counts(fed_cohort: Path, tmp_path: Path) -> None:
    cfg = _config(fed_cohort, tmp_path, rounds=1, site_weights={"A": 3.0, "B": 1.0})
    assert _run(cfg)[0]["weights"] == {"A": 0.75, "B": 0.25}


@pytest.mark.parametrize(("change", "match"), [
    ({"sites": "A,A"}, "distinct"),
    ({"min-clients": 3}, "min-clients 3"),
    ({"proximal-mu": -1.0}, "proximal-mu"),
    ({"rounds": 0}, "rounds"),
    ({"train-params": "{not json"}, "run config"),
    ({"site-weights": json.dumps({"A": 1.0})}, "site-weights"),
])
def test_bad_run_config_is_refused(fed_cohort: Path, tmp_path: Path, change, match) -> None:
    rc = {**run_config(_config(fed_cohort, tmp_path)), **change}
    with pytest.raises(FedctError, match=match):
        FederationConfig.from_run_config(rc)
    rc = run_config(_config(fed_cohort, tmp_path))
    del rc["sites"]
    with pytest.raises(FedctError, match="'sites' is missing"):
        FederationConfig.from_run_config(rc)


def test_a_client_reads_only_its_own_site(fed_cohort: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import fedct.data.cases as cases

    opened: list[str] = []
    real = cases.load_case
    monkeypatch.setattr(cases, "load_case", lambda p: (opened.append(Path(p).stem), real(p))[1])
    cfg = _config(fed_cohort, tmp_path, rounds=1)
    grid = LocalGrid({**run_config(cfg), "cohort-dir": str(tmp_path / "not-here")}, 2)
    # A deployed node names its site and its data folder in its node config.
    grid.contexts[100].node_config = {"site": "B", "cohort-dir": str(fed_cohort)}
    grid.contexts = {100: grid.contexts[100]}
    # Site A never connects: after the timeout the federation goes on without it.
    history = run_server(grid, dataclasses.replace(cfg, timeout=1.0))
    assert history[0]["weights"] == {"B": 1.0}
    assert opened and {k.split("-")[0] for k in opened} == {"B"}


def test_a_corrupt_checkpoint_is_named(fed_cohort: Path, tmp_path: Path) -> None:
    cfg = _config(fed_cohort, tmp_path, rounds=1)
    (Path(cfg.checkpoint_dir)).mkdir(parents=True)
    (Path(cfg.checkpoint_dir) / CHECKPOINT).write_bytes(b"not a checkpoint")
    with pytest.raises(FedctError, match="cannot read the federation checkpoint"):
        _run(cfg)


class ScriptedValGrid(LocalGrid):
    """LocalGrid whose clients report a scripted validation Dice in round r (all sites)."""

    def __init__(self, rc: dict, n: int, val: list[float]) -> None:
        super().__init__(rc, n)
        self.val = val

    def send_and_receive(self, messages, timeout=None) -> list[Message]:
        replies = super().send_and_receive(messages, timeout)
        for m, reply in zip(messages, replies, strict=True):
            if m.metadata.message_type == "evaluate" and not reply.has_error():
                rnd = int(m.content["config"]["server-round"])
                reply.content["metrics"]["val-dice"] = self.val[rnd - 1]
        return replies


VAL = [0.5, 0.7, 0.6, 0.65, 0.9, 0.95]  # best round 2, then two rounds below it


def _merged(ckpt: Path, rnd: int) -> dict[str, torch.Tensor]:
    a = torch.load(ckpt / "updates" / f"round-{rnd}" / "A.pt")
    b = torch.load(ckpt / "updates" / f"round-{rnd}" / "B.pt")
    return {k: 0.4 * a[k] + 0.6 * b[k] for k in a if a[k].is_floating_point()}


def test_a_plateau_of_the_clients_val_dice_stops_the_federation_and_keeps_the_best_round(
        fed_cohort: Path, tmp_path: Path) -> None:
    cfg = _config(fed_cohort, tmp_path, rounds=6, local_steps=1, patience=2)
    grid = ScriptedValGrid(run_config(cfg), 2, VAL)
    history = run_server(grid, FederationConfig.from_run_config(run_config(cfg)))
    # Rounds 3 and 4 bring nothing above round 2's 0.7: stop after round 4, not at the cap.
    assert [r["val_dice_mean"] for r in history] == pytest.approx(VAL[:4])
    trained = {int(m.content["config"]["server-round"]) for m in grid.sent
               if m.metadata.message_type == "train"}
    assert trained == {1, 2, 3, 4}
    model, card = load_model(Path(cfg.out_dir) / "model.safetensors")
    fed = card["federation"]
    assert (fed["best_round"], fed["last_round"], fed["kept_round"], fed["stopped"]) == (
        2, 4, 2, "plateau")
    state = model.state_dict()
    for k, v in _merged(Path(cfg.checkpoint_dir), 2).items():
        torch.testing.assert_close(state[k], v, msg=k)  # round 2's model, not round 4's
    assert any(not torch.equal(state[k], v)
               for k, v in _merged(Path(cfg.checkpoint_dir), 4).items())


def test_without_patience_every_round_runs_and_the_last_model_is_kept(
        fed_cohort: Path, tmp_path: Path) -> None:
    cfg = _config(fed_cohort, tmp_path, rounds=4, local_steps=1, patience=0)
    history = run_server(ScriptedValGrid(run_config(cfg), 2, VAL), cfg)
    assert len(history) == 4
    model, card = load_model(Path(cfg.out_dir) / "model.safetensors")
    assert (card["federation"]["kept_round"], card["federation"]["stopped"]) == (4, "cap")
    for k, v in _merged(Path(cfg.checkpoint_dir), 4).items():
        torch.testing.assert_close(model.state_dict()[k], v, msg=k)


def test_a_resumed_federation_keeps_its_best_round_and_stops_where_it_would_have(
        fed_cohort: Path, tmp_path: Path) -> None:
    cfg = _config(fed_cohort, tmp_path, rounds=6, local_steps=1, patience=2)

    class Killed(Exception):
        pass

    def kill_after_round_3(record: dict) -> None:
        if record["round"] == 3:
            raise Killed

    with pytest.raises(Killed):
        run_server(ScriptedValGrid(run_config(cfg), 2, VAL), cfg, on_round=kill_after_round_3)
    grid = ScriptedValGrid(run_config(cfg), 2, VAL)
    history = run_server(grid, cfg)
    assert [r["attempt"] for r in history] == [1, 1, 1, 2]
    model, card = load_model(Path(cfg.out_dir) / "model.safetensors")
    assert card["federation"]["kept_round"] == 2
    for k, v in _merged(Path(cfg.checkpoint_dir), 2).items():
        torch.testing.assert_close(model.state_dict()[k], v, msg=k)


def test_stopping_rules() -> None:
    from fedct.federation.stopping import best_round, plateau_reached

    nan = float("nan")
    assert best_round([0.5, 0.7, 0.7, nan]) == 2 and best_round([nan, None]) is None
    assert not plateau_reached([0.5, 0.7, 0.6], 2) and plateau_reached([0.5, 0.7, 0.6, nan], 2)
    assert not plateau_reached([0.1, 0.0, 0.0, 0.0], 0)  # 0: never
    assert not plateau_reached([nan, nan, nan], 1)  # no validation: run to the cap


def test_the_clients_schedule_is_train_schedule_steps_when_set(fed_cohort: Path,
                                                                 tmp_path: Path) -> None:
    cfg = _config(fed_cohort, tmp_path, rounds=3, local_steps=1,
                  train_params=dataclasses.replace(PARAMS, schedule_steps=2))
    grid = LocalGrid(run_config(cfg), 2)
    run_server(grid, cfg)
    sent = {(int(m.content["config"]["start-step"]), int(m.content["config"]["total-steps"]))
            for m in grid.sent if m.metadata.message_type == "train"}
    # Round 3 starts past the 2-step schedule: its clients train at the end rate.
    assert sent == {(0, 2), (1, 2), (2, 2)}
    plain = _config(fed_cohort, tmp_path / "plain", rounds=3, local_steps=1)
    grid = LocalGrid(run_config(plain), 2)
    run_server(grid, plain)
    assert {int(m.content["config"]["total-steps"]) for m in grid.sent
            if m.metadata.message_type == "train"} == {3}


def test_gains_below_min_delta_do_not_postpone_the_plateau(fed_cohort: Path,
                                                            tmp_path: Path) -> None:
    # At the schedule's end rate the clients' val Dice drifts up by a few 1e-4 a round.
    drift = [0.5, 0.8, 0.8005, 0.801, 0.8012, 0.9]
    cfg = _config(fed_cohort, tmp_path, rounds=6, local_steps=1, patience=3, min_delta=0.002)
    history = run_server(ScriptedValGrid(run_config(cfg), 2, drift), cfg)
    assert len(history) == 5  # rounds 3-5 gain < 0.002 on round 2: stop, not run on
    model, card = load_model(Path(cfg.out_dir) / "model.safetensors")
    assert (card["federation"]["kept_round"], card["federation"]["stopped"]) == (2, "plateau")
    for k, v in _merged(Path(cfg.checkpoint_dir), 2).items():
        torch.testing.assert_close(model.state_dict()[k], v, msg=k)
    # Without min_delta each drift is an improvement and the cap ends the run.
    plain = _config(fed_cohort, tmp_path / "plain", rounds=6, local_steps=1, patience=3)
    assert len(run_server(ScriptedValGrid(run_config(plain), 2, drift), plain)) == 6


def test_min_delta_out_of_range_is_refused(fed_cohort: Path, tmp_path: Path) -> None:
    rc = run_config(_config(fed_cohort, tmp_path, min_delta=1.5))
    with pytest.raises(FedctError, match="min-delta"):
        FederationConfig.from_run_config(rc)
