"""The science of a federation, as Flower's examples keep it in ``task.py``: what a site
does in a round (describe its data, train the global model, evaluate a model) and the
server's models (the initial one, the final one with its card). No Flower here:
``client_app`` and ``server_app`` turn messages into these calls and back.

A site opens only its own cases (``site_cases``); its images and labels never leave it.
Local training is :func:`fedct.training.local.local_update`, seeded by
:func:`fedct.training.local.round_seed` so that a round run again trains the same update.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fedct.config import TrainParams
from fedct.data.labels import LabelSet


def site_cases(cohort_dir: Path, site: str, split: str) -> list[dict]:
    """The labelled ``split`` cases of ``site`` only (no other site's file is opened)."""
    from fedct.data.cases import case_path, load_case, read_cohort, training_cases

    rows = training_cases(read_cohort(Path(cohort_dir)), site)
    keys = rows.loc[rows["split"] == split, "series_key"]
    return [load_case(case_path(Path(cohort_dir), k)) for k in keys]


def cohort_grid(cohort_dir: Path) -> tuple[LabelSet, dict]:
    """The cohort's label set and preprocessing grid (every node must share both)."""
    from fedct.data.cases import cohort_labels, read_spec

    return cohort_labels(Path(cohort_dir)), read_spec(Path(cohort_dir))


def describe_site(cohort_dir: Path, site: str, params: TrainParams) -> dict[str, Any]:
    """What a site tells the server in the handshake (no image leaves it): its label set
    and grid, training and validation case counts, the mean volume (ml) of each structure
    over its training labels, and where its updates are computed (``runtime``: device,
    threads, torch build; their float rounding depends on it)."""
    from fedct.devices import pick_device, runtime
    from fedct.training.loop import reference_volumes

    labels, spec = cohort_grid(cohort_dir)
    train = site_cases(cohort_dir, site, "train")
    n_val = len(site_cases(cohort_dir, site, "val"))
    ref = reference_volumes([c["label"][0] for c in train], tuple(spec["spacing_mm"]), labels)
    return {"labels": labels, "spec": spec, "n_train": len(train), "n_val": n_val,
            "reference_ml": [float(v) for v in ref],
            "runtime": runtime(pick_device(params.device), params.amp)}


def train(cohort_dir: Path, site: str, params: TrainParams,
          global_state: Mapping[str, torch.Tensor], *, seed: int, server_round: int,
          local_steps: int, mu: float, start_step: int, total_steps: int
          ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """``site``'s update of round ``server_round``: ``local_steps`` steps from the global
    weights on its training cases (FedProx's proximal term when ``mu`` > 0), at steps
    ``start_step ..`` of the one-cycle schedule over ``total_steps``. The new state and
    ``{loss, seconds, n_train}``."""
    from fedct.model.factory import build_model
    from fedct.training.local import local_update, round_seed

    cases = site_cases(cohort_dir, site, "train")
    labels, _ = cohort_grid(cohort_dir)
    model = build_model(params, labels)
    state, m = local_update(model, cases, params, steps=local_steps,
                            round_seed=round_seed(seed, server_round, site),
                            global_state=dict(global_state), mu=mu, start_step=start_step,
                            total_steps=total_steps)
    return state, {"loss": m["loss"], "seconds": m["seconds"], "n_train": len(cases)}


def evaluate(cohort_dir: Path, site: str, params: TrainParams,
             state: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """The model of ``state`` on ``site``'s validation cases (dropout off): mean loss, mean
    Dice over cases and structures (NaN without validation cases), ``n_val``."""
    import numpy as np

    from fedct.devices import pick_device
    from fedct.model.factory import build_model
    from fedct.training.loop import evaluate as evaluate_model

    val = site_cases(cohort_dir, site, "val")
    loss, dice = float("nan"), float("nan")
    if val:
        labels, _ = cohort_grid(cohort_dir)
        model = build_model(params, labels)
        model.load_state_dict(dict(state))
        device = pick_device(params.device)
        loss, d = evaluate_model(model.to(device), val, device, params.amp, labels.n_classes)
        finite = d[~np.isnan(d)]
        dice = float(finite.mean()) if finite.size else float("nan")
    return {"loss": loss, "dice": dice, "n_val": len(val)}


def initial_state(params: TrainParams, labels: LabelSet, seed: int, init_model: str = ""
                  ) -> dict[str, torch.Tensor]:
    """The weights round 1 starts from: those of ``init_model`` (a fedct model of the same
    architecture), else a fresh network built under ``seed``."""
    from fedct.errors import FedctError
    from fedct.model.factory import build_model, model_arch
    from fedct.model.io import load_model

    if init_model:
        model, card = load_model(Path(init_model))
        if card["arch"] != model_arch(params, labels):
            raise FedctError(f"{init_model}: its architecture is not the one of the "
                             "federation's train params")
    else:
        torch.manual_seed(seed)
        model = build_model(params, labels)
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def save_final_model(path: Path, params: TrainParams, labels: LabelSet,
                     state: Mapping[str, torch.Tensor], card: Mapping[str, Any]) -> None:
    """The federated model of ``state`` with its card (``fedct.model.io.save_model``), its
    architecture included so that MC dropout works after loading."""
    from fedct.model.factory import build_model, model_arch
    from fedct.model.io import save_model

    model = build_model(params, labels)
    model.load_state_dict(dict(state))
    save_model(model, path, model_arch(params, labels), dict(card))
