"""Model registry through fedct.tracking: evidence, idempotency, champion alias, refusals.

Each test runs on its own SQLite tracking store (conftest) with artifacts under tmp_path.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from fedct import tracking
from fedct.model.io import DIGEST_KEY, load_model
from tests.inference.conftest import make_model

NAME = "fedct-seg"
EVIDENCE = {"git_commit": "0123abc", "dvc.archive": "md5-a", "dvc.catalogue": "md5-c",
            "dvc.cohort": "md5-h", "dvc.models": "md5-m", "comparison": "sha-t"}


@pytest.fixture(autouse=True)
def _artifacts_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the SQLite store puts run artifacts under ./mlruns


def log_model(seed: int) -> tuple[str, Path]:
    """Log a tiny fedct model (weights from ``seed``) in a fresh run: its URI and folder."""
    folder = make_model(Path.cwd() / "models" / f"seed{seed}", seed=seed)
    with tracking.start_run("promote") as run:
        return tracking.log_fedct_model(run, folder).model_uri, folder


def register(seed: int, evidence: dict) -> str:
    uri, folder = log_model(seed)
    return tracking.register_with_evidence(uri, NAME, evidence, folder)


def test_evidence_hash_is_sha256_of_canonical_json() -> None:
    shuffled = dict(reversed(list(EVIDENCE.items())))
    canon = json.dumps(EVIDENCE, sort_keys=True, separators=(",", ":"))
    assert tracking.evidence_hash(shuffled) == hashlib.sha256(canon.encode()).hexdigest()
    assert tracking.evidence_hash({**EVIDENCE, "dvc.models": "md5-x"}) != \
        tracking.evidence_hash(EVIDENCE)


def test_register_is_idempotent_on_the_same_evidence() -> None:
    first = register(1, EVIDENCE)
    assert first == "1"
    tags = tracking.version_tags(NAME, first)
    assert tags["fedct.evidence"] == tracking.evidence_hash(EVIDENCE)
    assert {k: tags[f"fedct.evidence.{k}"] for k in EVIDENCE} == EVIDENCE
    # The digests download_model checks.
    folder = Path.cwd() / "models" / "seed1"
    assert tags[tracking.WEIGHTS_TAG] == json.loads(
        (folder / tracking.MODEL_CARD_FILE).read_text())[DIGEST_KEY]
    assert tags[tracking.CARD_TAG] == hashlib.sha256(
        (folder / tracking.MODEL_CARD_FILE).read_bytes()).hexdigest()

    # A rerun logs the model again (a new run and URI) on the same evidence: no version.
    again = register(1, dict(reversed(list(EVIDENCE.items()))))
    assert again == first
    assert tracking.list_versions(NAME) == ["1"]

    # New evidence (a retrained model) is a new version.
    other = register(2, {**EVIDENCE, "dvc.models": "md5-n"})
    assert other == "2"
    assert tracking.list_versions(NAME) == ["1", "2"]


def test_promote_sets_the_alias_and_a_refusal_keeps_the_champion() -> None:
    assert tracking.get_alias(NAME) is None  # no model yet
    v1 = register(1, EVIDENCE)
    assert tracking.get_alias(NAME) is None  # registered, not promoted
    tracking.set_champion(NAME, v1, reasons=["lower bound +0.02 is above the margin"])
    assert tracking.get_alias(NAME, "champion") == v1
    assert tracking.version_tags(NAME, v1)["fedct.decision"] == "promoted"

    weak = register(5, {**EVIDENCE, "dvc.models": "zero-rounds"})
    reasons = ["lower bound -0.3000 of the 95% interval is not above the margin +0.0000",
               "site H: federated minus best local mean held-out Dice is -0.4000"]
    tracking.record_refusal(NAME, weak, reasons)
    assert weak != v1
    assert tracking.get_alias(NAME) == v1
    tags = tracking.version_tags(NAME, weak)
    assert tags["fedct.decision"] == "refused"
    assert tags["fedct.decision.reasons"].splitlines() == reasons
    # The alias still resolves to the champion's weights, not the refused model's.
    got = tracking.download_model(f"models:/{NAME}@champion", Path.cwd() / "dl")
    loaded, _ = load_model(got)
    champion, _ = load_model(Path.cwd() / "models" / "seed1")
    assert all(a.equal(b) for a, b in zip(loaded.state_dict().values(),
                                          champion.state_dict().values(), strict=True))

    # A later winner moves the alias.
    tracking.set_champion(NAME, weak)
    assert tracking.get_alias(NAME) == weak


def test_bad_evidence_key_and_model_name_raise() -> None:
    with pytest.raises(ValueError, match="evidence keys"):
        tracking.register_with_evidence("models:/m-0", NAME, {"dvc:lock": "x"})
    with pytest.raises(ValueError, match="quote"):
        tracking.list_versions("it's")
