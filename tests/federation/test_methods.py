"""The registry of federation methods (``fedct.federation.methods``): one unit per name of
``federate.methods``, run after the methods whose models it reads."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fedct.config import (
    ABLATIONS,
    FEDERATE_METHODS,
    WEIGHT_SIGNALS,
    FederateParams,
    TrainParams,
)
from fedct.federation import LABEL_FREE
from fedct.federation import label_free as lf
from fedct.federation.methods import REGISTRY, Context, execution_order
from fedct.model.io import load_model


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


class Recorder:
    """A ``Tracker`` and its runs that keep what is logged (no MLflow)."""

    def __init__(self) -> None:
        self.metrics: list[tuple[str, dict, int | None]] = []
        self.params: dict = {}
        self.models: list[str] = []
        self.run_name = "method"

    def log_params(self, params) -> None:
        self.params.update(params)

    def log_metrics(self, metrics, step=None) -> None:
        self.metrics.append((self.run_name, dict(metrics), step))

    def log_artifact(self, path, artifact_path=None) -> None:
        pass

    def set_tags(self, tags) -> None:
        pass

    @contextlib.contextmanager
    def start_run(self, run_name, tags):
        self.run_name = run_name
        yield self

    def log_model(self, run, folder, artifact_path="model") -> None:
        self.models.append(artifact_path)


@pytest.fixture
def context(tmp_path: Path) -> Context:
    """Two targets with two adaptation images each, and a FedAvg model to start from."""
    from fedct.model.io import architecture, build_from_arch, save_model
    from tests.stages.tiny import LABELS, SPEC, tiny_case

    torch.manual_seed(0)
    arch = architecture(len(LABELS), (4, 8), (2,), 0.5, 1)
    card = {"labels": LABELS, "preprocessing": SPEC, "reference_ml": [1.0, 0.2]}
    (tmp_path / "out" / "fedavg").mkdir(parents=True)
    save_model(build_from_arch(arch), tmp_path / "out" / "fedavg" / "model.safetensors", arch,
               {**card, "site": "fedavg"})
    rng = np.random.default_rng(0)
    targets = {t: [tiny_case(rng, contrast=0.2)["image"] for _ in range(2)] for t in "CG"}
    params = dataclasses.replace(FederateParams(), sites=("A", "B"), mc_samples=2,
                                 mc_batch=2, cwst_rounds=2, cwst_steps=1, tent_steps=2,
                                 device="cpu")
    train = TrainParams(channels=(4, 8), strides=(2,), patch_size=(12, 12, 16),
                        max_shift=(0, 0, 0), batch_size=1, amp=False, device="cpu")
    return Context(params=params, train=train, cohort=pd.DataFrame(), cohort_dir=tmp_path,
                   models_dir=tmp_path, out_dir=tmp_path / "out", checkpoint_dir=tmp_path,
                   sites=("A", "B"), weights={"A": 0.5, "B": 0.5}, n_train={"A": 1, "B": 1},
                   base_card=card, arch=arch, device=torch.device("cpu"), amp=False,
                   here={"stage": {"device": "cpu"}}, targets=targets, tracker=Recorder(),
                   log=lambda line: None)


@pytest.mark.parametrize(("method", "ablation", "per_round"), [
    ("cw_self_train", "cw_self_train_all", "kept"), ("gated_tent", "gated_tent_random",
                                                     "entropy")])
def test_a_target_side_method_and_its_ablation_log_per_round_and_name_their_inputs(
        context: Context, method: str, ablation: str, per_round: str) -> None:
    for name in (method, ablation):
        rec = context.tracker = Recorder()
        REGISTRY[name].run(context, rec)
        assert rec.models == ["model-C", "model-G"]
        for target in "CG":
            steps = sorted({s for _, m, s in rec.metrics if f"{target}.{per_round}" in m})
            assert len(steps) == 2, (name, target, steps)  # one value per round / end
            card = json.loads((context.out_dir / name / target / "model_card.json")
                              .read_text())
            assert card["method"] == name and card["target_site"] == target
            assert card["start"] == "fedavg" and set(card["inputs"]) == {
                "target", "model", "uncertainty"}
            assert "2 adaptation images" in card["inputs"]["target"]
            assert ("MC dropout" in card["inputs"]["uncertainty"]) == (name == method)
            assert card.get("ablation") == (ablation if name == method else None)
            assert card.get("ablation_of") == (method if name == ablation else None)
    # The same start, the same seeds: only the uncertainty guidance differs.
    a = load_model(context.out_dir / method / "C" / "model.safetensors")[0].state_dict()
    b = load_model(context.out_dir / ablation / "C" / "model.safetensors")[0].state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)
