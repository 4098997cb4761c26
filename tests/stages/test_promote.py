"""The promote stage: the gate's decision reaches the registry; reruns add no version; it
verifies the evaluate stage's table and the weights it scored instead of trusting them,
and refuses settings that would let a worse model through."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner

from fedct import tracking
from fedct.analysis.scored import write_scored
from fedct.cli import main
from fedct.config import ConfigError, PromoteParams
from fedct.errors import FedctError
from fedct.model.io import WEIGHTS_FILE, architecture, build_from_arch, save_model
from fedct.stages import promote

SITES = ("C", "G")
REPO_PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


def _model(folder: Path, seed: int) -> Path:
    import torch

    torch.manual_seed(seed)
    arch = architecture(3, [4, 8], [2], 0.5, 0)
    folder.mkdir(parents=True, exist_ok=True)
    save_model(build_from_arch(arch), folder / WEIGHTS_FILE, arch,
               {"site": folder.name, "labels": {"1": "a", "2": "b"}})
    return folder


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


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
    d = {name: tmp_path / name for name in ("evaluate", "models", "federated", "uncertainty",
                                            "promote")}
    for p in d.values():
        p.mkdir()
    _model(d["models"] / "A", 10)
    _model(d["models"] / "B", 11)
    _model(d["federated"] / "fedavg", 0)
    (d["uncertainty"] / "threshold.json").write_text(json.dumps(
        {"signal": "sample_disagreement", "threshold": 0.2, "aggregate": "mean",
         "rule": "youden", "mc_samples": 12}))  # the uncertainty stage's threshold.json
    return d


def _evaluated(d: dict[str, Path], gain: float) -> None:
    """cases.csv and scored.json as `fedct evaluate` writes them for these models."""
    cases = d["evaluate"] / "cases.csv"
    _cases(gain).to_csv(cases, index=False)
    weights = {"A": d["models"] / "A", "B": d["models"] / "B",
               "fedavg": d["federated"] / "fedavg"}
    write_scored(d["evaluate"] / "scored.json", cases.read_bytes(),
                 {name: ("federated" if name == "fedavg" else "local",
                         [(None, f / WEIGHTS_FILE, _sha(f / WEIGHTS_FILE))])
                  for name, f in weights.items()})


def _promote(d: dict[str, Path], params: PromoteParams | None = None) -> dict:
    return promote.run(params or PromoteParams(n_boot=200), d["evaluate"], d["models"],
                       d["federated"], d["uncertainty"], d["promote"])


def _run(d: dict[str, Path], gain: float, **kw) -> dict:
    _evaluated(d, gain)
    return _promote(d, PromoteParams(n_boot=200, **kw))


def test_a_clear_win_is_promoted_and_a_rerun_adds_no_version(layout):
    first = _run(layout, 0.05)
    assert first["promote"] is True
    assert first["champion"] == first["version"]
    card = json.loads((layout["promote"] / "model" / "model_card.json").read_text())
    assert card["failure"]["threshold"] == 0.2
    assert card["failure"]["aggregation"] == "mean"
    # predict scores with the T the threshold was calibrated with.
    assert card["failure"]["mc_samples"] == 12
    again = _run(layout, 0.05)
    assert again["version"] == first["version"]
    assert len(tracking.list_versions("fedct-seg")) == 1
    saved = json.loads((layout["promote"] / "decision.json").read_text())
    assert saved["promote"] is True and saved["reasons"]


def test_the_evidence_is_the_digests_of_the_files_read_never_a_lock_file(
        layout, tmp_path, monkeypatch):
    # A stale dvc.lock in the working directory (the issue: its hashes went onto the
    # version while the registered model hashed to something else).
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {
        "federate": {"cmd": "x", "outs": [{"path": "outputs/federated", "md5": "stale.dir"}]},
    }}))
    result = _run(layout, 0.05)
    tags = tracking.version_tags("fedct-seg", result["version"])
    evidence = {k[len("fedct.evidence."):]: v for k, v in tags.items()
                if k.startswith("fedct.evidence.")}
    assert not [k for k in evidence if k.startswith("dvc")]
    assert "stale.dir" not in tags.values()
    fedavg = layout["federated"] / "fedavg" / WEIGHTS_FILE
    assert evidence["weights_sha256"] == _sha(fedavg) == tags[tracking.WEIGHTS_TAG]
    assert evidence["cases_sha256"] == _sha(layout["evaluate"] / "cases.csv")
    assert evidence["scored_sha256"] == _sha(layout["evaluate"] / "scored.json")
    assert evidence["best_local"] == "A"
    assert evidence["best_local_weights_sha256"] == _sha(layout["models"] / "A" / WEIGHTS_FILE)
    assert evidence["threshold_sha256"] == _sha(layout["uncertainty"] / "threshold.json")
    # What the registry serves is what the evidence names.
    got = tracking.download_model(f"models:/fedct-seg/{result['version']}", tmp_path / "dl")
    assert _sha(got / WEIGHTS_FILE) == evidence["weights_sha256"]
    assert _sha(got / "model_card.json") == evidence["card_sha256"]


def test_a_weak_candidate_is_refused_and_the_champion_stays(layout):
    champion = _run(layout, 0.05)["version"]
    _model(layout["federated"] / "fedavg", 1)  # other weights: new evidence
    weak = _run(layout, -0.2)
    assert weak["promote"] is False
    assert weak["version"] != champion
    assert weak["champion"] == champion
    assert tracking.get_alias("fedct-seg") == champion
    assert any("lower bound" in r or "site" in r for r in weak["reasons"])


def test_missing_inputs_are_named(layout):
    with pytest.raises(FedctError, match="cases.csv"):
        _promote(layout)
    _evaluated(layout, 0.05)
    (layout["evaluate"] / "scored.json").unlink()
    with pytest.raises(FedctError, match="scored.json: not found; run `fedct evaluate`"):
        _promote(layout)
    _evaluated(layout, 0.05)
    with pytest.raises(FedctError, match="fedprox"):
        _promote(layout, PromoteParams(candidate="fedprox"))


def test_cli_prints_the_verdict(layout):
    _evaluated(layout, 0.05)
    result = CliRunner().invoke(main, ["promote", str(layout["evaluate"]),
                                       str(layout["models"]), str(layout["federated"]),
                                       str(layout["uncertainty"]), str(layout["promote"]),
                                       "--params", str(REPO_PARAMS)])
    assert result.exit_code == 0, result.output
    assert "PROMOTED" in result.output


def test_a_missing_threshold_is_an_error_not_a_card_without_a_flag(layout):
    (layout["uncertainty"] / "threshold.json").unlink()
    with pytest.raises(FedctError, match="threshold.json: not found"):
        _run(layout, 0.05)
    (layout["uncertainty"] / "threshold.json").write_text("{not json")
    with pytest.raises(FedctError, match="threshold.json: not readable JSON"):
        _run(layout, 0.05)


# --- attacks on the gate (issue 24) ------------------------------------------------------

def _refused(d: dict[str, Path], match: str) -> str:
    with pytest.raises(FedctError, match=match) as err:
        _promote(d)
    assert "\n" not in str(err.value)
    assert tracking.list_versions("fedct-seg") == []  # nothing registered, no alias
    return str(err.value)


def test_an_edited_comparison_table_is_refused_by_name(layout):
    _evaluated(layout, -0.2)  # evaluate found the candidate clearly worse
    table = pd.read_csv(layout["evaluate"] / "cases.csv")
    fed = table["model"] == "fedavg"
    table.loc[fed, "dice"] = (table.loc[fed, "dice"] + 0.3).clip(upper=1.0)
    table.to_csv(layout["evaluate"] / "cases.csv", index=False)
    error = _refused(layout, "changed after evaluate")
    assert error.startswith(f"{layout['evaluate'] / 'cases.csv'}: SHA-256")


def test_another_models_weights_under_the_candidates_name_are_refused(layout):
    _evaluated(layout, -0.2)
    # The attack: local model A's weights (and card) copied over the federated candidate,
    # the table edited so that "fedavg" wins.
    fed = layout["federated"] / "fedavg"
    for f in (WEIGHTS_FILE, "model_card.json"):
        shutil.copy(layout["models"] / "A" / f, fed / f)
    error = _refused(layout, "not the .* of the weights the evaluate stage scored as 'fedavg'")
    assert error.startswith(f"{fed / WEIGHTS_FILE}: SHA-256")


def test_a_local_model_passed_off_as_the_candidate_is_refused_even_with_forged_records(
        layout):
    # The attacker rewrites cases.csv and scored.json consistently as well: the record
    # then names A's weights as "fedavg" and the candidate must not be a local model.
    fed = layout["federated"] / "fedavg"
    for f in (WEIGHTS_FILE, "model_card.json"):
        shutil.copy(layout["models"] / "A" / f, fed / f)
    _evaluated(layout, 0.05)
    _refused(layout, "has the weights of local model A; a local model cannot be promoted")


def test_a_swapped_local_baseline_is_refused_by_name(layout):
    _evaluated(layout, 0.05)
    _model(layout["models"] / "A", 99)  # other weights than evaluate scored
    error = _refused(layout, "scored as 'A'")
    assert error.startswith(f"{layout['models'] / 'A' / WEIGHTS_FILE}: SHA-256")


def test_a_card_of_another_model_beside_the_candidate_is_refused(layout):
    _evaluated(layout, 0.05)
    shutil.copy(layout["models"] / "B" / "model_card.json",
                layout["federated"] / "fedavg" / "model_card.json")
    _refused(layout, "model_card.json: the card records weights .* belongs to another model")


@pytest.mark.parametrize(("change", "message"), [
    ({"margin": -1.0}, "promote.margin = -1.0: expected a Dice difference in [0, 1)"),
    ({"margin": float("nan")}, "promote.margin = nan"),
    ({"site_tolerance": 1.0}, "promote.site_tolerance = 1.0: expected a Dice loss in "
                              "[0, 0.2]"),
    ({"site_tolerance": -0.01}, "promote.site_tolerance = -0.01"),
    ({"n_boot": 10}, "promote.n_boot = 10: expected >= 200 resamples"),
])
def test_out_of_range_gate_settings_are_refused_naming_the_key(layout, tmp_path, change,
                                                               message):
    import re

    _evaluated(layout, -0.2)  # a worse candidate that a lax gate would promote
    # Built in code: promote checks them itself.
    with pytest.raises(ConfigError, match=re.escape(message)):
        _promote(layout, PromoteParams(**{"n_boot": 200, **change}))
    # From params.yaml, through the command line: one line naming the key.
    raw = yaml.safe_load(REPO_PARAMS.read_text())
    raw["promote"].update(change)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(main, ["promote", str(layout["evaluate"]),
                                       str(layout["models"]), str(layout["federated"]),
                                       str(layout["uncertainty"]), str(layout["promote"]),
                                       "--params", str(params)])
    assert result.exit_code == 1
    assert message.split(":")[0] in result.output
    assert tracking.list_versions("fedct-seg") == []
