"""The registry of federation methods (``fedct.federation.methods``): one unit per name of
``federate.methods``, run after the methods whose models it reads."""

from __future__ import annotations

import dataclasses

import pytest

from fedct.config import ABLATIONS, FEDERATE_METHODS, WEIGHT_SIGNALS, FederateParams
from fedct.federation import LABEL_FREE
from fedct.federation import label_free as lf
from fedct.federation.methods import REGISTRY, execution_order


def test_the_registry_holds_exactly_the_names_params_accept() -> None:
    assert tuple(REGISTRY) == FEDERATE_METHODS
    assert all(m.name == name for name, m in REGISTRY.items())
    # The label-free set that `fedct seeds` judges is the registry's.
    assert set(LABEL_FREE) == {n for n, m in REGISTRY.items() if m.label_free}
    assert WEIGHT_SIGNALS == lf.WEIGHT_SIGNALS
    # Each uncertainty-guided method names its ablation as config does, and the ablation
    # reads what the method reads (the same starting model).
    assert {n: m.ablation for n, m in REGISTRY.items() if m.ablation} == ABLATIONS
    params = FederateParams()
    for method, ablation in ABLATIONS.items():
        assert REGISTRY[method].needs(params) == REGISTRY[ablation].needs(params)


@pytest.mark.parametrize(("methods", "select_from", "order"), [
    # Params order, each method after what it reads; FedAvg runs first as a teacher.
    (("tent",), ("fedavg",), ["fedavg", "tent"]),
    (("self_train", "one_shot"), ("fedavg",), ["fedavg", "self_train", "one_shot"]),
    (("tent", "fedavg"), ("fedavg",), ["fedavg", "tent"]),
    (("uw_select", "uw_merge", "one_shot"), ("one_shot", "uw_merge"),
     ["one_shot", "uw_merge", "uw_select"]),
    (("one_shot", "fedavg", "fedprox", "uw_merge", "tent", "self_train", "uw_select"),
     ("fedavg", "fedprox", "tent", "self_train"),
     ["one_shot", "fedavg", "fedprox", "uw_merge", "tent", "self_train", "uw_select"]),
])
def test_execution_order_runs_what_a_method_reads_first(methods, select_from, order) -> None:
    params = dataclasses.replace(FederateParams(), methods=methods, select_from=select_from)
    assert execution_order(params) == order
