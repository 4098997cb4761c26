"""fedct's strategies: FedAvg merging with fedct's maths, independent of reply order, and
FedProx as FedAvg with one method changed (what it sends), as FLamby and Flower write it."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedct.federation.strategy import FedctAvg, FedctProx, make_strategy

# Messages built and handled outside a Flower run carry a task identity.
pytestmark = pytest.mark.usefixtures("task_identity")


def test_aggregation_does_not_depend_on_reply_order() -> None:
    def reply(idx: int, n: int, value: float, node: int) -> Message:
        req = Message(RecordDict(), dst_node_id=node, message_type="train")
        content = RecordDict({"arrays": ArrayRecord({"w": torch.full((3,), value),
                                                     "n": torch.tensor(idx + 1)}),
                              "metrics": MetricRecord({"num-examples": n, "site-index": idx,
                                                       "train-loss": 1.0})})
        return Message(content, reply_to=req)

    replies = [reply(0, 1, 0.1, 10), reply(1, 2, 0.7, 11), reply(2, 3, 0.3, 12)]
    s = FedctAvg(sites=("A", "B", "C"), min_clients=2)
    fwd, _ = s.aggregate_train(1, replies)
    bwd, _ = s.aggregate_train(1, replies[::-1])
    w = fwd.to_torch_state_dict()["w"]
    assert torch.equal(w, bwd.to_torch_state_dict()["w"])
    torch.testing.assert_close(w, torch.full((3,), (0.1 + 1.4 + 0.9) / 6))
    assert int(fwd.to_torch_state_dict()["n"]) == 3  # integer buffer: the maximum


class Nodes:
    """A grid with nodes 10 and 11 that only hands out node ids."""

    def get_node_ids(self) -> list[int]:
        return [10, 11]


def _sent_config(strategy: FedctAvg) -> list[dict]:
    arrays = ArrayRecord({"w": torch.zeros(2)})
    msgs = strategy.configure_train(3, arrays, ConfigRecord({"local-steps": 5}), Nodes())
    return [dict(m.content["config"]) for m in msgs]


def test_fedprox_sends_mu_and_fedavg_does_not() -> None:
    prox = make_strategy(0.25, sites=("A", "B"), min_clients=2)
    avg = make_strategy(0.0, sites=("A", "B"), min_clients=2)
    assert type(prox) is FedctProx and type(avg) is FedctAvg
    assert [c["proximal-mu"] for c in _sent_config(prox)] == [0.25, 0.25]
    assert all("proximal-mu" not in c and c["local-steps"] == 5 and c["server-round"] == 3
               for c in _sent_config(avg))


def test_each_strategy_changes_one_method_of_the_one_below() -> None:
    # FLamby's shape: FedProx is FedAvg with the proximal term sent; fedct's FedAvg is
    # Flower's with fedct's merge. Nothing else is overridden.
    def own(cls: type) -> set[str]:
        return {k for k, v in vars(cls).items() if callable(v) and k != "__init__"}

    assert FedctProx.__mro__[1] is FedctAvg and FedctAvg.__mro__[1] is FedAvg
    assert own(FedctProx) == {"configure_train"}
    assert own(FedctAvg) == {"aggregate_train"}
