"""What fedct's Flower apps (``client_app``, ``server_app``) share: the run config, and
how the history counts a message's bytes (``nbytes``).

Both apps read one **run config** (Flower's ``--run-config``, the defaults in the app
bundle's ``[tool.flwr.app.config]``, or the ``overrides`` of the app factories), with
these keys:

- ``sites``: training sites, comma-separated; partition ``i`` of a simulation is site ``i``.
  A deployed SuperNode names its site in its node config (``site="A"``) instead.
- ``cohort-dir`` (clients): the prepared cohort; a client loads only its own site's cases.
  A deployed SuperNode's node config may name its own (``cohort-dir="/data/fedct"``).
- ``train-params``: JSON of ``TrainParams`` (``fedct.config.to_dict``).
- ``rounds``, ``local-steps``, ``proximal-mu`` (0: FedAvg, > 0: FedProx), ``seed``,
  ``min-clients`` (a round fails below it), ``timeout`` (s per round's replies).
- ``init-model`` (server): a fedct ``model.safetensors`` to start from (its card beside
  it); empty: a fresh model built under ``seed``.
- ``checkpoint-dir``, ``out-dir`` (server): checkpoint after each round; final model.
- ``keep-updates`` (server): also save every client update of each round under
  ``checkpoint-dir/updates/round-<r>/<site>.pt``.
- ``patience`` (server): stop after this many rounds without a higher mean validation Dice
  of the clients and keep the best round's model (:mod:`fedct.federation.stopping`);
  0 (default): every round, the last round's model. ``min-delta``: the smallest gain that
  counts as higher.
- ``site-weights`` (server, optional): JSON site -> weight; empty: training cases
  (``num-examples``).
- ``targets``, ``steer`` (optional): target sites that score each round's updates and
  steer the merge, and how (the ``steered`` method: :mod:`fedct.federation.steering`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedct.config import TrainParams, from_dict, model_params, to_dict
from fedct.errors import FedctError
from fedct.federation import steering


@dataclasses.dataclass(frozen=True)
class FederationConfig:
    """The run config of a federation, parsed and checked (keys in the module docstring)."""

    sites: tuple[str, ...]
    train_params: TrainParams
    rounds: int
    local_steps: int
    mu: float = 0.0
    min_clients: int = 1
    seed: int = 0
    cohort_dir: str = ""
    init_model: str = ""
    checkpoint_dir: str = ""
    out_dir: str = ""
    site_weights: dict[str, float] | None = None
    timeout: float = 3600.0
    keep_updates: bool = False
    patience: int = 0
    min_delta: float = 0.0
    targets: tuple[str, ...] = ()
    steer: str = ""  # JSON of steering.SteerConfig; empty: no steering

    @classmethod
    def from_run_config(cls, rc: Mapping[str, Any]) -> FederationConfig:
        def get(key: str, default: Any = None) -> Any:
            if key not in rc and default is None:
                raise FedctError(f"federation run config: {key!r} is missing")
            return rc.get(key, default)

        try:
            sites = tuple(s.strip() for s in str(get("sites")).split(",") if s.strip())
            params = from_dict(TrainParams, json.loads(str(get("train-params"))),
                               "federation run config: train-params")
            weights = str(get("site-weights", ""))
            targets = tuple(t for t in str(get("targets", "")).replace(" ", "").split(",") if t)
            cfg = cls(sites=sites, train_params=params, rounds=int(get("rounds")),
                      local_steps=int(get("local-steps")),
                      mu=float(get("proximal-mu", 0.0)),
                      min_clients=int(get("min-clients", 1)), seed=int(get("seed", 0)),
                      cohort_dir=str(get("cohort-dir", "")),
                      init_model=str(get("init-model", "")),
                      checkpoint_dir=str(get("checkpoint-dir", "")),
                      out_dir=str(get("out-dir", "")),
                      site_weights=json.loads(weights) if weights else None,
                      timeout=float(get("timeout", 3600.0)),
                      keep_updates=bool(get("keep-updates", False)),
                      patience=int(get("patience", 0)),
                      min_delta=float(get("min-delta", 0.0)),
                      targets=targets, steer=str(get("steer", "")))
        except (TypeError, ValueError) as exc:  # JSON and number parsing
            raise FedctError(f"federation run config: {exc}") from exc
        if not sites or len(set(sites)) != len(sites):
            raise FedctError(f"federation run config: sites must be distinct, got {sites}")
        if cfg.rounds < 1 or cfg.local_steps < 1:
            raise FedctError("federation run config: rounds and local-steps must be >= 1")
        if cfg.patience < 0:
            raise FedctError(f"federation run config: patience {cfg.patience} must be >= 0")
        if not 0 <= cfg.min_delta < 1:
            raise FedctError(f"federation run config: min-delta {cfg.min_delta} must be "
                             "in [0, 1)")
        if not 1 <= cfg.min_clients <= len(sites):
            raise FedctError(f"federation run config: min-clients {cfg.min_clients} must "
                             f"be within 1..{len(sites)} (the number of sites)")
        if not math.isfinite(cfg.mu) or cfg.mu < 0:
            raise FedctError(f"federation run config: proximal-mu {cfg.mu} must be >= 0")
        steering.check_targets(sites, cfg.targets, cfg.steer)
        if cfg.site_weights is not None and set(cfg.site_weights) != set(sites):
            raise FedctError(f"federation run config: site-weights name {sorted(cfg.site_weights)}"
                             f", not the sites {sorted(sites)}")
        return cfg

    def fingerprint(self) -> str:
        """What makes two runs the same federation (a checkpoint is resumed only then)."""
        init = Path(self.init_model)
        if self.init_model and not init.is_file():
            raise FedctError(f"{init}: initial model not found")
        key = {"sites": self.sites, "params": model_params(self.train_params),
               "rounds": self.rounds, "local_steps": self.local_steps, "mu": self.mu,
               "seed": self.seed, "weights": self.site_weights,
               "init": hashlib.sha256(init.read_bytes()).hexdigest() if self.init_model
               else None}
        key.update({"targets": self.targets, "steer": self.steer} if self.targets else {})
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def run_config(cfg: FederationConfig) -> dict[str, Any]:
    """The run config (Flower's scalar key -> value mapping) of ``cfg``."""
    return {"sites": ",".join(cfg.sites), "train-params": json.dumps(to_dict(cfg.train_params)),
            "rounds": cfg.rounds, "local-steps": cfg.local_steps, "proximal-mu": cfg.mu,
            "min-clients": cfg.min_clients, "seed": cfg.seed, "cohort-dir": cfg.cohort_dir,
            "init-model": cfg.init_model, "checkpoint-dir": cfg.checkpoint_dir,
            "out-dir": cfg.out_dir,
            "site-weights": json.dumps(cfg.site_weights) if cfg.site_weights else "",
            "timeout": cfg.timeout, "keep-updates": cfg.keep_updates,
            "patience": cfg.patience, "min-delta": cfg.min_delta,
            "targets": ",".join(cfg.targets), "steer": cfg.steer}


def nbytes(arrays: Any) -> int:
    """The bytes of the model arrays of a message (an ``ArrayRecord``): what the history
    counts as sent and received."""
    return int(sum(len(a.data) for a in arrays.values()))
