"""What every federation method of ``fedct federate`` shares: its signature and its inputs.

A method is one :class:`Method`: a name, a function ``run(ctx, run) -> metrics`` and the
methods whose outputs it reads (``needs``). ``ctx`` is a :class:`Context`: the cohort and
the prepared target images, the local models, the params, the output folder, and a
:class:`Tracker` (MLflow through ``fedct.tracking``, given by the stage; a test may pass a
recorder). ``run`` is the method's own MLflow child run (``log_params``, ``log_metrics``
with a ``step`` per round, ``set_tags``, ``log_artifact``), opened by the stage. The
function writes its models under ``ctx.out_dir/<name>/`` (one per target site under
``<name>/<target>/`` for a method adapted to each held-out site) and returns the entries
it adds to the stage's ``metrics.json``.

Label-free methods read ``ctx.targets`` (each held-out site's images, never a label: the
``adapt`` split when the cohort has one) and nothing else of a target site.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch

from fedct.config import FederateParams, TrainParams
from fedct.data.cases import adaptation_cases, case_path, load_image
from fedct.errors import FedctError
from fedct.model.io import WEIGHTS_FILE, load_model, save_model, weights_path


class RunLike(Protocol):
    """The part of ``fedct.tracking.Run`` that methods use."""

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: Mapping[str, str]) -> None: ...


class Tracker(Protocol):
    """Where methods log: child runs and models (the stage passes ``fedct.tracking``'s)."""

    def start_run(self, run_name: str, tags: Mapping[str, str]
                  ) -> contextlib.AbstractContextManager[RunLike]: ...
    def log_model(self, run: RunLike, folder: Path, artifact_path: str = "model") -> None: ...


def local_models(models_dir: Path, sites: tuple[str, ...]
                 ) -> dict[str, tuple[torch.nn.Module, dict]]:
    """Fresh copies of the local models of ``sites`` (``MODELS_DIR/<site>``) with their
    cards; every site's must exist and all must share one architecture."""
    out = {}
    for site in sites:
        folder = Path(models_dir) / site
        path = weights_path(folder) if folder.is_dir() else folder / WEIGHTS_FILE
        if not path.is_file():
            raise FedctError(f"{path}: no local model of site {site} (federate.sites must "
                             "be sites that `train` trained)")
        out[site] = load_model(path)
    arches = {json.dumps(card["arch"], sort_keys=True) for _, card in out.values()}
    if len(arches) != 1:
        raise FedctError(f"{models_dir}: the local models of {list(sites)} differ in "
                         "architecture and cannot be averaged")
    return out


def target_images(cohort: pd.DataFrame, cohort_dir: Path) -> dict[str, list[np.ndarray]]:
    """Each held-out site's images (never a label): the label-free methods' only input;
    its ``adapt`` cases when the cohort has them (``adaptation_cases``)."""
    held = adaptation_cases(cohort)
    return {site: [load_image(case_path(cohort_dir, k)) for k in rows["series_key"]]
            for site, rows in held.groupby("site", sort=True)}


@dataclass
class Context:
    """Everything a method may read (module docstring); built once by the stage."""

    params: FederateParams
    train: TrainParams
    cohort: pd.DataFrame
    cohort_dir: Path
    models_dir: Path
    out_dir: Path
    checkpoint_dir: Path
    sites: tuple[str, ...]
    #: Site weights of every average (``federate.weighting``), and training cases.
    weights: dict[str, float]
    n_train: dict[str, int]
    #: The card every federated model starts from (labels, preprocessing, the clients'
    #: mean structure volumes) and the architecture.
    base_card: dict
    arch: dict
    device: torch.device
    amp: bool
    #: ``runtime`` of this stage's process (where a method's own computation runs).
    here: dict
    #: Held-out site -> its images (``(1, X, Y, Z)`` arrays; adapt split; no label).
    targets: dict[str, list[np.ndarray]]
    tracker: Tracker
    log: Callable[[str], None] = field(default=lambda line: print(line, flush=True))

    def local_models(self) -> dict[str, tuple[torch.nn.Module, dict]]:
        """Fresh copies of the clients' local models (a method may modify them)."""
        return local_models(self.models_dir, self.sites)

    def model_path(self, method: str, target: str | None = None) -> Path:
        """The weights file of ``method`` (for ``target``, when it has one per target)."""
        folder = self.out_dir / method
        if target is not None and (folder / target / WEIGHTS_FILE).is_file():
            return folder / target / WEIGHTS_FILE
        return folder / WEIGHTS_FILE

    def card(self, method: str, where: dict, **extra: Any) -> dict:
        """A federated model's card: the local cards' labels and preprocessing, its own
        name, and ``runtime``: where its weights were computed (``where``: ``stage``, this
        stage's process, for what it computes itself; ``clients``, each site's, for
        Flower's methods)."""
        keep = {k: self.base_card[k] for k in ("labels", "preprocessing", "reference_ml")
                if k in self.base_card}
        return {**keep, "site": method, "kind": "federated", "method": method, **extra,
                "runtime": where}

    def save(self, model: torch.nn.Module, folder: Path, card: dict) -> Path:
        """Write ``model`` with ``card`` to ``folder``; the weights file."""
        folder.mkdir(parents=True, exist_ok=True)
        save_model(model.cpu(), folder / WEIGHTS_FILE, self.arch, card)
        return folder / WEIGHTS_FILE

    def finish_card(self, path: Path, method: str, where: dict, **extra: Any) -> None:
        """Give a model written by the Flower server the card of a federated candidate (its
        ``runtime``: the clients' from the server's card, and ``where``, the stage's)."""
        model, card = load_model(path)
        full = self.card(method, {**card.get("runtime", {}), **where}, **extra)
        full.update({k: card[k] for k in ("fingerprint",) if k in card})
        save_model(model, path, card["arch"], full)


@dataclass(frozen=True)
class Method:
    """One federation method: ``run(ctx, run) -> metrics`` (module docstring).

    ``needs(params)``: the methods whose models it reads, run before it (one that
    ``federate.methods`` does not list runs as a teacher only and its folder is removed
    at the end). ``label_free``: it reads the held-out sites' images (``ctx.targets``).
    ``ablation``: the method that is this one without its uncertainty guidance (uniform
    weights, no thresholds, random gates), run beside it; its cards say ``ablation``
    and the ablation's say ``ablation_of``, so that ``evaluate`` pairs them.
    """

    name: str
    run: Callable[[Context, RunLike], dict]
    label_free: bool = False
    needs: Callable[[FederateParams], tuple[str, ...]] = lambda params: ()
    ablation: str | None = None

