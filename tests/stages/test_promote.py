"""The promote stage: the gate's decision reaches the registry; reruns add no version."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from fedct import tracking
from fedct.cli import main
from fedct.config import PromoteParams
from fedct.errors import FedctError
from fedct.model.io import architecture, build_from_arch, save_model
from fedct.stages import promote

SITES = ("C", "G")


def _model(folder: Path, seed: int) -> Path:
    import torch

    torch.manual_seed(seed)
    arch = architecture(3, [4, 8], [2], 0.5, 0)
    folder.mkdir(parents=True, exist_ok=True)
    save_model(build_from_arch(arch), folder / "model.pt", arch,
               {"site": folder.name, "labels": {"1": "a", "2": "b"}})
    return folder


def _cases(candidate_gain: float, n: int = 12, seed: int = 0) -> pd.DataFrame:
    """Held-out cases of two local models and the candidate, candidate = best + gain."""
    rng = np.random.default_rng(seed)
    rows = []
    for site in SITES:
        for i in range(n):
            base = 0.6 + 0.1 * rng.random()
            case = f"{site}{i:02d}"
            rows += [{"model": "A", "kind": "local", "site": site, "case": case,
                      "dice": base},
                     {"model": "B", "kind": "local", "site": site, "case": case,
                      "dice": base - 0.05},
                     {"model": "fedavg", "kind": "federated", "site": site, "case": case,
                      "dice": min(1.0, base + candidate_gain + 0.002 * rng.standard_normal())}]
    return pd.DataFrame(rows)


@pytest.fixture()
def layout(tmp_path: Path) -> dict[str, Path]:
    d = {name: tmp_path / name for name in ("evaluate", "federated", "uncertainty", "promote")}
    for p in d.values():
        p.mkdir()
    _model(d["federated"] / "fedavg", 0)
    (d["uncertainty"] / "threshold.json").write_text(json.dumps(
        {"signal": "sample_disagreement", "threshold": 0.2, "aggregate": "mean",
         "rule": "youden", "mc_samples": 12}))  # the uncertainty stage's threshold.json
    return d


def _run(d: dict[str, Path], gain: float, tmp_path: Path, **kw) -> dict:
    _cases(gain).to_csv(d["evaluate"] / "cases.csv", index=False)
    params = PromoteParams(n_boot=200, **kw)
    return promote.run(params, d["evaluate"], d["federated"], d["uncertainty"], d["promote"],
                       lock_file=tmp_path / "dvc.lock")


def test_a_clear_win_is_promoted_and_a_rerun_adds_no_version(layout, tmp_path):
    first = _run(layout, 0.05, tmp_path)
    assert first["promote"] is True
    assert first["champion"] == first["version"]
    card = json.loads((layout["promote"] / "model" / "model_card.json").read_text())
    assert card["failure"]["threshold"] == 0.2
    assert card["failure"]["aggregation"] == "mean"
    # predict scores with the T the threshold was calibrated with.
    assert card["failure"]["mc_samples"] == 12
    again = _run(layout, 0.05, tmp_path)
    assert again["version"] == first["version"]
    assert len(tracking.list_versions("fedct-seg")) == 1
    saved = json.loads((layout["promote"] / "decision.json").read_text())
    assert saved["promote"] is True and saved["reasons"]
    # No dvc.lock here: the version says its evidence lacks the data hashes.
    tags = tracking.version_tags("fedct-seg", first["version"])
    assert tags["fedct.evidence.dvc_lock"].startswith("absent")
    assert not any(k.startswith("fedct.evidence.dvc/") for k in tags)


def test_a_weak_candidate_is_refused_and_the_champion_stays(layout, tmp_path):
    champion = _run(layout, 0.05, tmp_path)["version"]
    _model(layout["federated"] / "fedavg", 1)  # other weights: new evidence
    weak = _run(layout, -0.2, tmp_path)
    assert weak["promote"] is False
    assert weak["version"] != champion
    assert weak["champion"] == champion
    assert tracking.get_alias("fedct-seg") == champion
    assert any("lower bound" in r or "site" in r for r in weak["reasons"])


def test_missing_inputs_are_named(layout, tmp_path):
    with pytest.raises(FedctError, match="cases.csv"):
        promote.run(PromoteParams(), layout["evaluate"], layout["federated"],
                    layout["uncertainty"], layout["promote"])
    _cases(0.05).to_csv(layout["evaluate"] / "cases.csv", index=False)
    with pytest.raises(FedctError, match="fedprox"):
        promote.run(PromoteParams(candidate="fedprox"), layout["evaluate"],
                    layout["federated"], layout["uncertainty"], layout["promote"])


def test_lock_hashes_pick_the_evidence_paths(tmp_path):
    lock = tmp_path / "dvc.lock"
    lock.write_text("""schema: '2.0'
stages:
  cohort:
    cmd: x
    deps:
    - path: data/archive
      md5: aaa.dir
    - path: src/fedct/x.py
      md5: bbb
    outs:
    - path: outputs/cohort
      md5: ccc.dir
""")
    assert promote.lock_hashes(lock) == {"data/archive": "aaa.dir", "outputs/cohort": "ccc.dir"}


def test_cli_prints_the_verdict(layout, tmp_path, monkeypatch):
    _cases(0.05).to_csv(layout["evaluate"] / "cases.csv", index=False)
    params = Path(__file__).resolve().parents[2] / "params.yaml"
    result = CliRunner().invoke(main, ["promote", str(layout["evaluate"]),
                                       str(layout["federated"]), str(layout["uncertainty"]),
                                       str(layout["promote"]), "--params", str(params)])
    assert result.exit_code == 0, result.output
    assert "PROMOTED" in result.output


def test_a_missing_threshold_is_an_error_not_a_card_without_a_flag(layout, tmp_path):
    (layout["uncertainty"] / "threshold.json").unlink()
    with pytest.raises(FedctError, match="threshold.json: not found"):
        _run(layout, 0.05, tmp_path)
    (layout["uncertainty"] / "threshold.json").write_text("{not json")
    with pytest.raises(FedctError, match="threshold.json: not readable JSON"):
        _run(layout, 0.05, tmp_path)
