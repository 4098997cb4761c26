"""``fedct promote``: register the federated candidate with its evidence; alias it only
when it beats the local baselines on the held-out sites.

Inputs: ``evaluate``'s ``cases.csv`` (one row per held-out (model, case): ``model, kind,
site, case, dice``) and ``scored.json`` (the digests of that table and of every model it
scored, ``fedct.analysis.scored``), the local models (``MODELS_DIR``), the candidate's
folder under the federated models, and ``uncertainty``'s ``threshold.json`` (the frozen
failure signal and its flag threshold).

Steps:

1. The settings are checked (``fedct.config``: ``promote.margin`` >= 0,
   ``promote.site_tolerance`` in [0, 0.2], ``promote.n_boot`` >= 200), whatever built them.
2. Nothing is trusted that evaluate did not record: ``cases.csv`` is read once and its
   SHA-256 must be the one in ``scored.json``; the candidate's weights and those of every
   local baseline are read once and must be the weights evaluate scored under those
   names; the candidate may not be a local model's weights under another name, and its
   card must name those weights. A mismatch is a FedctError naming the file.
3. The gate (``fedct.analysis.gate.decide``) on the verified table (and, when evaluate
   chose the best local model on validation cases, on its verified ``selection.csv``,
   whose digest ``scored.json`` records): the lower bound of the
   paired 95 % cluster-bootstrap interval of (candidate - best local) mean held-out Dice
   must exceed ``promote.margin``, and no held-out site may lose more than
   ``promote.site_tolerance``.
4. The candidate (the bytes verified in step 2) is written to ``OUT_DIR/model`` with the
   failure signal and threshold in its card (``fedct predict`` flags with them), logged to
   MLflow and registered under ``promote.model_name`` with its evidence: the SHA-256 of
   every file this run read (table, record, candidate and best local weights, threshold,
   registered card), the git commit and the gate's settings; the registry also records
   the weights' and card's digests, which ``fedct predict`` checks. The same evidence
   returns the same version (idempotent: a rerun adds no version).
5. Promoted: the alias ``promote.alias`` (``champion``) moves to that version. Refused: the
   version is tagged with the reasons and the current champion stays. Aliases only,
   never the deprecated stages.

Output ``OUT_DIR/decision.json``: ``promote``, ``reasons``, ``candidate``, ``version``,
``alias``, ``champion`` (the version the alias names after this run), ``numbers``.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pandas as pd

from fedct.analysis.gate import decide
from fedct.analysis.scored import FILE as SCORED_FILE
from fedct.analysis.scored import (
    check_cases,
    check_selection,
    check_weights,
    read_scored,
    sha256,
)
from fedct.config import PromoteParams, check, to_dict
from fedct.errors import FedctError
from fedct.model.io import CARD_FILE, DIGEST_KEY, WEIGHTS_FILE


def _read_json(path: Path, what: str) -> tuple[dict, bytes]:
    """The JSON object of ``path`` and the bytes it was parsed from."""
    if not path.is_file():
        raise FedctError(f"{path}: not found ({what})")
    try:
        data = path.read_bytes()
        return json.loads(data), data
    except (OSError, ValueError) as exc:
        raise FedctError(f"{path}: not readable JSON ({exc})") from exc


def _csv(path: Path, data: bytes) -> pd.DataFrame:
    """The table in ``data``: the very bytes read from ``path`` and checked."""
    try:
        return pd.read_csv(io.BytesIO(data))
    except (ValueError, pd.errors.ParserError) as exc:
        raise FedctError(f"{path}: not a readable table ({exc})") from exc


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise FedctError(f"{path}: cannot read {what} ({exc})") from exc


def run(params: PromoteParams, evaluate_dir: Path, models_dir: Path, federated_dir: Path,
        uncertainty_dir: Path, out_dir: Path) -> dict:
    from fedct import provenance, tracking

    params = check(params, "promote")
    evaluate_dir, out_dir = Path(evaluate_dir), Path(out_dir)
    cases_file = evaluate_dir / "cases.csv"
    if not cases_file.is_file():
        raise FedctError(f"{cases_file}: not found; run `fedct evaluate` first")
    scored_file = evaluate_dir / SCORED_FILE
    record = read_scored(scored_file)
    # The table is parsed from the very bytes whose digest was checked.
    cases_bytes = _read(cases_file, "the comparison table")
    check_cases(record, cases_file, cases_bytes)
    table = _csv(cases_file, cases_bytes)
    for col in ("model", "kind", "site", "case", "dice"):
        if col not in table.columns:
            raise FedctError(f"{cases_file}: missing column {col!r}")
    kinds = {name: m["kind"] for name, m in record["models"].items()}
    baselines = sorted(n for n, k in kinds.items() if k == "local")
    if not baselines:
        raise FedctError(f"{scored_file}: no local model to compare the candidate with")
    candidate_dir = Path(federated_dir) / params.candidate
    candidate_file = candidate_dir / WEIGHTS_FILE
    if not candidate_file.is_file():
        raise FedctError(f"{candidate_file}: the candidate {params.candidate!r} "
                         "(promote.candidate) was not federated; add it to federate.methods")
    if kinds.get(params.candidate) != "federated":
        raise FedctError(f"{scored_file}: {params.candidate!r} (promote.candidate) was not "
                         "scored as a federated model by `fedct evaluate`")

    # Every weights file the comparison rests on must be the one evaluate scored.
    weights = _read(candidate_file, "the candidate's weights")
    digest = check_weights(record, params.candidate, candidate_file, weights)
    local_digests = {}
    for name in baselines:
        path = Path(models_dir) / name / WEIGHTS_FILE
        local_digests[name] = check_weights(record, name, path,
                                            _read(path, f"local model {name}'s weights"))
    twin = sorted(n for n, d in local_digests.items() if d == digest)
    if twin:
        raise FedctError(f"{candidate_file}: the candidate {params.candidate!r} has the "
                         f"weights of local model {twin[0]}; a local model cannot be promoted "
                         "as federated")
    card, _ = _read_json(candidate_dir / CARD_FILE, "the candidate's model card")
    if card.get(DIGEST_KEY) != digest:
        raise FedctError(f"{candidate_dir / CARD_FILE}: the card records weights "
                         f"{str(card.get(DIGEST_KEY))[:16]}..., not the candidate's "
                         f"{digest[:16]}...; it belongs to another model")

    selection = None
    if "selection_sha256" in record:
        # evaluate chose the best local model on validation cases: the gate does too, on
        # the very bytes evaluate recorded.
        selection_file = evaluate_dir / "selection.csv"
        selection_bytes = _read(selection_file, "the validation table")
        check_selection(record, selection_file, selection_bytes)
        selection = _csv(selection_file, selection_bytes)
    decision = decide(table, params.candidate, baselines, params.margin,
                      params.site_tolerance, n_boot=params.n_boot, seed=params.seed,
                      source=str(cases_file), selection=selection)
    failure, threshold_bytes = _read_json(
        Path(uncertainty_dir) / "threshold.json",
        "the failure signal and flag threshold of `fedct uncertainty`")
    # The registered copy: the verified weights, the card with the failure flag settings.
    model_dir = out_dir / "model"
    shutil.rmtree(model_dir, ignore_errors=True)
    model_dir.mkdir(parents=True)
    (model_dir / WEIGHTS_FILE).write_bytes(weights)
    # The card carries the flag settings that `fedct predict` uses.
    card["failure"] = {"signal": failure.get("signal"), "threshold": failure.get("threshold"),
                       "aggregation": failure.get("aggregation", failure.get("aggregate")),
                       "rule": failure.get("rule"),
                       # T of the calibration: predict scores with it (or says it did not).
                       "mc_samples": failure.get("mc_samples")}
    card_bytes = json.dumps(card, indent=1, default=str).encode()
    (model_dir / CARD_FILE).write_bytes(card_bytes)
    comparison = out_dir / "comparison.csv"
    comparison.write_bytes(cases_bytes)
    # Evidence: digests of what this run read and wrote, never copied from elsewhere.
    best = decision.best_local
    evidence = {"git_commit": provenance.git_commit(), "candidate": params.candidate,
                "cases_sha256": sha256(cases_bytes),
                "scored_sha256": sha256(_read(scored_file, "the evaluate record")),
                "weights_sha256": digest,
                "best_local": best, "best_local_weights_sha256": local_digests[best],
                "threshold_sha256": sha256(threshold_bytes),
                "card_sha256": sha256(card_bytes),
                "gate": json.dumps({"margin": params.margin,
                                    "site_tolerance": params.site_tolerance,
                                    "n_boot": params.n_boot, "seed": params.seed},
                                   sort_keys=True)}
    with tracking.start_run("promote", run_name=f"promote-{params.candidate}",
                            tags={"fedct.candidate": params.candidate}) as mlrun:
        mlrun.log_params(to_dict(params))
        logged = tracking.log_fedct_model(mlrun, model_dir)
        version = tracking.register_with_evidence(logged.model_uri, params.model_name,
                                                  evidence, model_dir)
        if decision.promote:
            tracking.set_champion(params.model_name, version, params.alias,
                                  reasons=list(decision.reasons))
        else:
            tracking.record_refusal(params.model_name, version, list(decision.reasons))
        champion = tracking.get_alias(params.model_name, params.alias)
        result = {"promote": bool(decision.promote), "reasons": list(decision.reasons),
                  "candidate": params.candidate, "model_name": params.model_name,
                  "version": version, "alias": params.alias, "champion": champion,
                  "evidence": evidence, "numbers": decision.as_dict()}
        (out_dir / "decision.json").write_text(json.dumps(result, indent=1, default=str))
        mlrun.log_metrics({"promoted": float(decision.promote),
                           "difference": decision.difference.estimate,
                           "difference_lo": decision.difference.lo,
                           "difference_hi": decision.difference.hi})
        mlrun.log_artifact(out_dir / "decision.json")
        mlrun.log_artifact(comparison)
    stays = (f"{params.alias} stays version {champion}" if champion is not None
             else f"no version carries {params.alias} yet")
    verdict = "PROMOTED" if decision.promote else f"REFUSED ({stays})"
    print(f"promote {params.candidate} as {params.model_name} v{version}: {verdict}")
    for reason in decision.reasons:
        print(f"  - {reason}")
    return result
