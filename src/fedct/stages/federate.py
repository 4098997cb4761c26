"""``fedct federate``: federated models of the training sites, and label-free methods.

Inputs: the cohort, the local models of ``train`` (``MODELS_DIR/<site>/model.safetensors``).
Output: one folder per candidate in ``OUT_DIR``, each with ``model.safetensors`` and
``model_card.json`` (the format of ``train``; MC dropout survives loading):

- ``one_shot/``: the average of the local models (``federation.aggregate``), weighted by
  training cases (``federate.weighting``);
- ``fedavg/``, ``fedprox/``: ``federate.rounds`` rounds of Flower (simulation, one
  SuperNode per site; ``fedct.federation.simulation``) from a seeded fresh model; each
  client trains ``local_steps`` steps per round on its own training split only. Beside
  the model: ``history.csv`` (a row per round) and ``federation.log``;
- label-free methods, which read the images of the held-out target sites but never their
  labels (``fedct.data.cases.load_image`` reads the image member of a case only):
  ``uw_merge/<target>/`` merges the local models with weights from their MC-dropout
  uncertainty on the target's images; ``tent/<target>/`` adapts the FedAvg model's
  normalisation affine parameters by entropy minimisation on them; ``self_train/``
  continues FedAvg for ``self_train_rounds`` rounds with every target as one more client
  whose data are the FedAvg model's confident, stable MC-dropout pseudo-labels (DPL).
  ``uw_select/<target>/`` is the candidate of ``federate.select_from`` (FedAvg, FedProx,
  the target's TENT model, the self-trained model) with the lowest MC-dropout uncertainty
  (``federate.uw_signal``) on the target's images: the model a site without ground truth
  would deploy. It runs last, on the models written above.

The label-free methods read the target's images, never a label: its ``adapt`` cases,
disjoint from the ``test`` cases ``evaluate`` scores, when the cohort has them
(``cohort.adapt_fraction`` > 0); else they are transductive and see the same target
images that ``evaluate`` scores (as TENT does at test time).

Each method is one module of ``fedct.federation.methods`` (its registry); the stage runs
them in the order of ``federate.methods``, a method after the ones whose models it reads
(TENT and self-training start from FedAvg, which then runs as a teacher if not listed;
``uw_select`` after its candidates).

MLflow: one parent run per stage, a child run per method (a step per round: global
validation Dice, per-site loss and Dice, bytes, seconds), with a grandchild run per
site for the multi-round methods, and each model logged with its card.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from fedct.config import FederateParams, TrainParams, check, to_dict
from fedct.data.cases import read_cohort
from fedct.devices import pick_device, runtime
from fedct.errors import FedctError
from fedct.federation.aggregate import case_weights, site_weights
from fedct.federation.methods import REGISTRY, Context, execution_order
from fedct.federation.methods.base import local_models, target_images
from fedct.federation.methods.rounds import rounds_summary

__all__ = ["rounds_summary", "run"]


def _weights(params: FederateParams, n_train: dict[str, int]) -> dict[str, float]:
    if params.weighting == "equal":
        return site_weights({s: 1.0 for s in n_train})
    return case_weights(n_train)


def _mean_reference(cards: list[dict], weights: list[float]) -> list[float]:
    refs = np.array([c["reference_ml"] for c in cards], dtype=float)
    return [float(v) for v in np.average(refs, axis=0, weights=weights)]


@contextlib.contextmanager
def _timed(method: str) -> Iterator[None]:
    """Progress: one line when a method starts and when it is done."""
    print(f"federate {method}: start", flush=True)
    t0 = time.perf_counter()
    yield
    print(f"federate {method}: done in {time.perf_counter() - t0:.0f} s", flush=True)


class _MlflowTracker:
    """The methods' ``Tracker``: nested MLflow runs of this stage (``fedct.tracking``)."""

    def start_run(self, run_name: str, tags: Mapping[str, str]):
        from fedct import tracking

        return tracking.start_run("federate", run_name=run_name, nested=True, tags=tags)

    def log_model(self, run, folder: Path, artifact_path: str = "model") -> None:
        from fedct import tracking

        tracking.log_fedct_model(run, folder, artifact_path=artifact_path)


def run(params: FederateParams, train: TrainParams, cohort_dir: Path, models_dir: Path,
        out_dir: Path, checkpoint_dir: Path | None = None) -> dict:
    """Every method of ``federate.methods``; the stage metrics (also ``metrics.json``)."""
    from fedct import tracking

    check(params, "federate")  # params built in code as well as read from params.yaml
    order = execution_order(params)
    if params.rounds * params.local_steps != train.steps:
        # Allowed (a study of more local work), but then federated and local models differ
        # in optimiser steps as well as in method: say so where the numbers are made.
        warnings.warn(f"federate: rounds x local_steps = {params.rounds * params.local_steps}"
                      f" optimiser steps per client, but train.steps = {train.steps}: the "
                      "federated and local models differ in training length", stacklevel=2)
    cohort_dir, out_dir = Path(cohort_dir), Path(out_dir)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else out_dir.parent / "federate_ckpt"
    sites = tuple(params.sites)
    cohort = read_cohort(cohort_dir)
    locals_ = local_models(models_dir, sites)
    base_card = next(iter(locals_.values()))[1]
    n_train = {s: int(card["n_train"]) for s, (_, card) in locals_.items()}
    weights = _weights(params, n_train)
    label_free = sorted(m for m in order if REGISTRY[m].label_free)
    targets = target_images(cohort, cohort_dir) if label_free else {}
    if label_free and not targets:
        raise FedctError(f"{cohort_dir / 'cohort.csv'}: no held-out site for the label-free "
                         f"methods {label_free} (cohort.holdout_sites)")
    device = pick_device(params.device)
    amp = train.amp  # bf16 where the device has it (fedct.devices.use_amp)
    # Every federated card carries the clients' mean structure volumes (label-free volume
    # checks in evaluate and predict), not one site's.
    base_card = {**base_card, "reference_ml": _mean_reference(
        [locals_[s][1] for s in sites], [weights[s] for s in sites])}
    ctx = Context(params=params, train=train, cohort=cohort, cohort_dir=cohort_dir,
                  models_dir=Path(models_dir), out_dir=out_dir, checkpoint_dir=checkpoint_dir,
                  sites=sites, weights=weights, n_train=n_train, base_card=base_card,
                  arch=base_card["arch"], device=device, amp=amp,
                  here={"stage": runtime(device, amp)}, targets=targets,
                  tracker=_MlflowTracker())
    del locals_
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics: dict = {"sites": list(sites), "weights": weights}
    with tracking.start_run("federate", run_name="federate") as parent:
        parent.log_params({**to_dict(params), "n_train": n_train,
                           **{f"runtime.{k}": v for k, v in ctx.here["stage"].items()}})
        for name in order:
            with _timed(name), ctx.tracker.start_run(name, {"fedct.method": name}) as mlrun:
                metrics.update(REGISTRY[name].run(ctx, mlrun))
        for name in order:
            if name not in params.methods and (out_dir / name).exists():
                shutil.rmtree(out_dir / name)  # only a teacher here, not a candidate
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, default=str))
        parent.log_artifact(out_dir / "metrics.json")
    return metrics
