"""``fedct promote``: register the federated candidate with its evidence; alias it only
when it beats the local baselines on the held-out sites.

Inputs: ``evaluate``'s ``cases.csv`` (one row per held-out (model, case): ``model, kind,
site, case, dice``), the candidate's folder under the federated models, and
``uncertainty``'s ``threshold.json`` (the frozen failure signal and its flag threshold).

Steps:

1. The gate (``fedct.analysis.gate.decide``): the lower bound of the paired 95 % cluster-
   bootstrap interval of (candidate - best local) mean held-out Dice must exceed
   ``promote.margin``, and no held-out site may lose more than ``promote.site_tolerance``.
2. The candidate is copied to ``OUT_DIR/model`` with the failure signal and threshold in its
   card (``fedct predict`` flags with them), logged to MLflow in a form that keeps MC
   dropout, and registered under ``promote.model_name`` with its evidence: git commit,
   the dvc.lock hashes of archive, catalogue, cohort, models and federated models, the
   comparison table's hash and the gate's settings. The same evidence returns the same
   version (idempotent: a rerun adds no version).
3. Promoted: the alias ``promote.alias`` (``champion``) moves to that version. Refused: the
   version is tagged with the reasons and the current champion stays. Aliases only,
   never the deprecated stages.

Output ``OUT_DIR/decision.json``: ``promote``, ``reasons``, ``candidate``, ``version``,
``alias``, ``champion`` (the version the alias names after this run), ``numbers``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pandas as pd
import yaml

from fedct.analysis.gate import decide
from fedct.config import PromoteParams, to_dict
from fedct.errors import FedctError

# The dvc.lock entries whose hashes make up the evidence (prefix match on the path).
EVIDENCE_PATHS = ("data/archive", "data/labels", "outputs/catalogue", "outputs/cohort",
                  "outputs/models", "outputs/federated")


def lock_hashes(lock_file: Path, prefixes: tuple[str, ...] = EVIDENCE_PATHS) -> dict[str, str]:
    """``path -> md5`` of every dep and out in ``dvc.lock`` under one of ``prefixes``."""
    lock_file = Path(lock_file)
    if not lock_file.is_file():
        return {}
    try:
        lock = yaml.safe_load(lock_file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise FedctError(f"{lock_file}: not a readable dvc.lock ({exc})") from exc
    found: dict[str, str] = {}
    for stage in (lock.get("stages") or {}).values():
        for entry in (stage.get("deps") or []) + (stage.get("outs") or []):
            path = str(entry.get("path", ""))
            if any(path == p or path.startswith(p + "/") for p in prefixes) and "md5" in entry:
                found[path] = str(entry["md5"])
    return dict(sorted(found.items()))


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise FedctError(f"{path}: not found ({what})")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FedctError(f"{path}: not readable JSON ({exc})") from exc


def _file_md5(path: Path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def run(params: PromoteParams, evaluate_dir: Path, federated_dir: Path,
        uncertainty_dir: Path, out_dir: Path, lock_file: Path = Path("dvc.lock")) -> dict:
    from fedct import tracking

    evaluate_dir, out_dir = Path(evaluate_dir), Path(out_dir)
    cases_file = evaluate_dir / "cases.csv"
    if not cases_file.is_file():
        raise FedctError(f"{cases_file}: not found; run `fedct evaluate` first")
    table = pd.read_csv(cases_file)
    for col in ("model", "kind", "site", "case", "dice"):
        if col not in table.columns:
            raise FedctError(f"{cases_file}: missing column {col!r}")
    baselines = sorted(table.loc[table["kind"] == "local", "model"].unique())
    if not baselines:
        raise FedctError(f"{cases_file}: no local model to compare the candidate with")
    candidate_dir = Path(federated_dir) / params.candidate
    if not (candidate_dir / "model.pt").is_file():
        raise FedctError(f"{candidate_dir / 'model.pt'}: the candidate {params.candidate!r} "
                         "(promote.candidate) was not federated; add it to federate.methods")
    decision = decide(table, params.candidate, baselines, params.margin,
                      params.site_tolerance, n_boot=params.n_boot, seed=params.seed,
                      source=str(cases_file))
    threshold_file = Path(uncertainty_dir) / "threshold.json"
    failure = _read_json(threshold_file, "the failure signal and flag threshold of "
                                         "`fedct uncertainty`")
    # The registered copy: the candidate with the failure flag settings in its card.
    model_dir = out_dir / "model"
    shutil.rmtree(model_dir, ignore_errors=True)
    model_dir.mkdir(parents=True)
    shutil.copy2(candidate_dir / "model.pt", model_dir / "model.pt")
    card = _read_json(candidate_dir / "model_card.json", "the candidate's model card")
    # The card carries the flag settings that `fedct predict` uses.
    card["failure"] = {"signal": failure.get("signal"), "threshold": failure.get("threshold"),
                       "aggregation": failure.get("aggregation", failure.get("aggregate")),
                       "rule": failure.get("rule"),
                       # T of the calibration: predict scores with it (or says it did not).
                       "mc_samples": failure.get("mc_samples")}
    (model_dir / "model_card.json").write_text(json.dumps(card, indent=1, default=str))
    comparison = out_dir / "comparison.csv"
    table.to_csv(comparison, index=False)
    hashes = lock_hashes(lock_file)
    evidence = {"git_commit": tracking.git_commit(), "candidate": params.candidate,
                "comparison_md5": _file_md5(cases_file),
                "model_md5": _file_md5(candidate_dir / "model.pt"),
                "card_md5": _file_md5(model_dir / "model_card.json"),
                "gate": json.dumps({"margin": params.margin,
                                    "site_tolerance": params.site_tolerance,
                                    "n_boot": params.n_boot, "seed": params.seed},
                                   sort_keys=True),
                **{f"dvc/{path}": md5 for path, md5 in hashes.items()}}
    if not hashes:
        # Outside `dvc repro` (no dvc.lock yet): say so on the version instead of silently
        # registering it without the data's hashes.
        evidence["dvc_lock"] = f"absent: {lock_file} has no data hashes"
        print(f"promote: {lock_file} holds no data hashes; the version records that its "
              "evidence lacks them", flush=True)
    with tracking.start_run("promote", run_name=f"promote-{params.candidate}",
                            tags={"fedct.candidate": params.candidate}) as mlrun:
        mlrun.log_params(to_dict(params))
        logged = tracking.log_fedct_model(mlrun, model_dir)
        version = tracking.register_with_evidence(logged.model_uri, params.model_name,
                                                  evidence)
        if decision.promote:
            tracking.set_champion(params.model_name, version, params.alias,
                                  reasons=list(decision.reasons))
        else:
            tracking.record_refusal(params.model_name, version, list(decision.reasons))
        champion = tracking.get_alias(params.model_name, params.alias)
        result = {"promote": bool(decision.promote), "reasons": list(decision.reasons),
                  "candidate": params.candidate, "model_name": params.model_name,
                  "version": version, "alias": params.alias, "champion": champion,
                  "numbers": decision.as_dict()}
        (out_dir / "decision.json").write_text(json.dumps(result, indent=1, default=str))
        mlrun.log_metrics({"promoted": float(decision.promote),
                           "difference": decision.difference.estimate,
                           "difference_lo": decision.difference.lo,
                           "difference_hi": decision.difference.hi})
        mlrun.log_artifact(out_dir / "decision.json")
        mlrun.log_artifact(comparison)
    verdict = "PROMOTED" if decision.promote else "REFUSED (the champion stays)"
    print(f"promote {params.candidate} as {params.model_name} v{version}: {verdict}")
    for reason in decision.reasons:
        print(f"  - {reason}")
    return result
