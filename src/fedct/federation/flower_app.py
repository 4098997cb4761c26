"""Flower 1.42 (Message API) apps of fedct: a thin ServerApp and ClientApp.

All science lives elsewhere: local training in :mod:`fedct.training.local`, merging in
:mod:`fedct.federation.aggregate`. Both apps read one **run config** (Flower's
``--run-config`` or the ``overrides`` of the factories below), with these keys:

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
- ``patience`` (server): stop after this many rounds without a higher mean validation Dice
  of the clients and keep the best round's model (:mod:`fedct.federation.stopping`);
  0 (default): every round, the last round's model.
- ``site-weights`` (server, optional): JSON site -> weight; empty: training cases
  (``num-examples``).
- ``targets``, ``steer`` (optional): target sites that score each round's updates and
  steer the merge, and how (the ``steered`` method: :mod:`fedct.federation.steering`).
- Fault injection (tests only): ``fail-site`` and ``fail-round`` make that site's ClientApp
  raise in that round's training; ``kill-after-round`` makes the server's process kill
  itself (SIGKILL) once that round is checkpointed; ``keep-updates`` saves every client
  update of a round under ``checkpoint-dir/updates/round-<r>/<site>.pt``.

Protocol: a ``query`` handshake asks each node for its site, case counts, label set,
preprocessing grid and mean structure volumes (no image leaves the site). Then each round:
``train`` messages carry the global weights and ``{proximal-mu, local-steps, start-step,
total-steps}``; replies carry the update and ``num-examples``, ``train-loss``, ``seconds``,
``bytes-received``, ``bytes-sent``, ``site-index``; :class:`FedctAvg` merges them; then
``evaluate`` messages return each site's validation Dice of the merged model. After each
round the server checkpoints (weights, round, history) atomically, so a killed federation
resumes from its last finished round. The checkpoint holds tensors and plain containers
only and is read with ``torch.load(weights_only=True)``, which rebuilds nothing else: a
planted object is refused, not run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import signal
import time
from collections.abc import Callable, Iterable, Mapping
from logging import INFO
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
from flwr.supercore import log

from fedct.config import TrainParams, from_dict, model_params, to_dict
from fedct.errors import FedctError
from fedct.federation import steering
from fedct.federation.aggregate import weighted_average
from fedct.federation.stopping import best_round, plateau_reached

CHECKPOINT = "federation.pt"
HISTORY = "history.json"
MODEL = "model.safetensors"  # = fedct.model.io.WEIGHTS_FILE (imported lazily below)
QUERY_INFO = "query.site_info"


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
    fail_site: str = ""
    fail_round: int = 0
    kill_after_round: int = 0
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
                      fail_site=str(get("fail-site", "")),
                      fail_round=int(get("fail-round", 0)),
                      kill_after_round=int(get("kill-after-round", 0)),
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
            "timeout": cfg.timeout, "fail-site": cfg.fail_site, "fail-round": cfg.fail_round,
            "kill-after-round": cfg.kill_after_round, "keep-updates": cfg.keep_updates,
            "patience": cfg.patience, "min-delta": cfg.min_delta,
            "targets": ",".join(cfg.targets), "steer": cfg.steer}


def _nbytes(arrays: ArrayRecord) -> int:
    return int(sum(len(a.data) for a in arrays.values()))


# --------------------------------------------------------------------------- client side


def _site(context: Context, cfg: FederationConfig, target: bool = False) -> tuple[str, int]:
    """This node's site (node config ``site``, else the partition id) and its index among
    the sites (``target``: among the target sites; a node of the other kind is refused)."""
    nodes, kind = (*cfg.sites, *cfg.targets), cfg.targets if target else cfg.sites
    if "site" in context.node_config:
        site = str(context.node_config["site"])
    else:
        pid = int(context.node_config["partition-id"])
        if not 0 <= pid < len(nodes):
            raise FedctError(f"partition {pid} has no site (sites: {list(nodes)})")
        site = nodes[pid]
    if site not in kind:
        raise FedctError(f"node site {site!r} is not one of {list(kind)}")
    return site, kind.index(site)


def _site_cases(cfg: FederationConfig, site: str, split: str) -> list[dict]:
    """The labelled ``split`` cases of ``site`` only (no other site's file is opened)."""
    from fedct.data.cases import case_path, load_case, read_cohort, training_cases

    rows = training_cases(read_cohort(Path(cfg.cohort_dir)), site)
    keys = rows.loc[rows["split"] == split, "series_key"]
    return [load_case(case_path(Path(cfg.cohort_dir), k)) for k in keys]


def _client_query(msg: Message, context: Context, cfg: FederationConfig) -> Message:
    from fedct.data.cases import cohort_labels, read_spec
    from fedct.devices import pick_device, runtime
    from fedct.training.loop import reference_volumes

    labels = cohort_labels(Path(cfg.cohort_dir))
    spec = read_spec(Path(cfg.cohort_dir))
    if steering.is_target(context.node_config, cfg.sites, cfg.targets):
        return steering.target_info(msg, _site(context, cfg, target=True)[0], labels, spec)
    site, index = _site(context, cfg)
    train = _site_cases(cfg, site, "train")
    n_val = len(_site_cases(cfg, site, "val"))
    ref = reference_volumes([c["label"][0] for c in train], tuple(spec["spacing_mm"]), labels)
    content = RecordDict({
        "info": ConfigRecord({"site": site, "labels": json.dumps(labels.to_json()),
                              "spec": json.dumps(spec)}),
        "counts": MetricRecord({"site-index": index, "n-train": len(train), "n-val": n_val,
                                "reference-ml": [float(v) for v in ref]}),
        # Where this site's updates are computed (their float rounding depends on it).
        "runtime": ConfigRecord(runtime(pick_device(cfg.train_params.device),
                                        cfg.train_params.amp))})
    return Message(content=content, reply_to=msg)


def _client_train(msg: Message, context: Context, cfg: FederationConfig) -> Message:
    from fedct.data.cases import cohort_labels
    from fedct.model.factory import build_model
    from fedct.training.local import local_update, round_seed

    site, index = _site(context, cfg)
    conf = msg.content["config"]
    rnd = int(conf["server-round"])
    if cfg.fail_site == site and cfg.fail_round == rnd:
        # Fault injection (tests): a site that crashes in the middle of a round.
        raise RuntimeError(f"fault injection: site {site} fails in round {rnd}")
    train = _site_cases(cfg, site, "train")
    arrays = msg.content["arrays"]
    model = build_model(cfg.train_params, cohort_labels(Path(cfg.cohort_dir)))
    state, m = local_update(model, train, cfg.train_params, steps=int(conf["local-steps"]),
                            round_seed=round_seed(cfg.seed, rnd, site),
                            global_state=arrays.to_torch_state_dict(),
                            mu=float(conf["proximal-mu"]), start_step=int(conf["start-step"]),
                            total_steps=int(conf["total-steps"]))
    out = ArrayRecord(state)
    metrics = MetricRecord({"num-examples": len(train), "train-loss": m["loss"],
                            "seconds": m["seconds"], "bytes-received": _nbytes(arrays),
                            "bytes-sent": _nbytes(out), "site-index": index})
    return Message(content=RecordDict({"arrays": out, "metrics": metrics}), reply_to=msg)


def _client_evaluate(msg: Message, context: Context, cfg: FederationConfig) -> Message:
    import numpy as np

    from fedct.data.cases import cohort_labels
    from fedct.devices import pick_device
    from fedct.model.factory import build_model
    from fedct.training.loop import evaluate

    site, index = _site(context, cfg)
    labels = cohort_labels(Path(cfg.cohort_dir))
    val = _site_cases(cfg, site, "val")
    loss, dice = float("nan"), float("nan")
    if val:
        model = build_model(cfg.train_params, labels)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        device = pick_device(cfg.train_params.device)
        loss, d = evaluate(model.to(device), val, device, cfg.train_params.amp,
                           labels.n_classes)
        finite = d[~np.isnan(d)]
        dice = float(finite.mean()) if finite.size else float("nan")
    metrics = MetricRecord({"num-examples": len(val), "val-loss": loss, "val-dice": dice,
                            "site-index": index})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


def make_client_app(overrides: Mapping[str, Any] | None = None) -> ClientApp:
    """The ClientApp; ``overrides`` (run-config keys) take precedence over the run config."""
    app = ClientApp()

    def config(context: Context) -> FederationConfig:
        rc = {**context.run_config, **(overrides or {})}
        if "cohort-dir" in context.node_config:  # a deployed site's own data folder
            rc["cohort-dir"] = str(context.node_config["cohort-dir"])
        return FederationConfig.from_run_config(rc)

    @app.query("site_info")
    def query(msg: Message, context: Context) -> Message:
        return _client_query(msg, context, config(context))

    @app.query("steer")
    def steer(msg: Message, context: Context) -> Message:
        cfg = config(context)
        return steering.score_updates(msg, Path(cfg.cohort_dir),
                                      _site(context, cfg, target=True)[0], cfg.train_params,
                                      steering.SteerConfig.from_json(cfg.steer))

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return _client_train(msg, context, config(context))

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return _client_evaluate(msg, context, config(context))

    return app


# --------------------------------------------------------------------------- server side


class FedctAvg(FedAvg):
    """FedAvg (FedProx when the clients get ``proximal-mu`` > 0) merging with fedct's maths.

    Only ``aggregate_train`` differs from Flower's FedAvg: it merges the replies with
    :func:`fedct.federation.aggregate.weighted_average` (integer buffers by the documented
    rule), weighted by ``num-examples`` or by fixed ``site_weights``, in site order (so the
    floating-point sum does not depend on which reply came first), and refuses a round with
    fewer than ``min_clients`` good replies. ``reweigh(round, states, weights)`` (optional)
    replaces a round's weights (``steering.Steering.weights``). ``last_updates`` (site -> state),
    ``last_weights`` and ``last_failures`` (node id, reason) describe the latest round.
    """

    def __init__(self, *, sites: tuple[str, ...], min_clients: int,
                 site_weights: Mapping[str, float] | None = None,
                 reweigh: Callable[[int, dict, dict], dict] | None = None, **kwargs: Any) -> None:
        super().__init__(min_train_nodes=min_clients, min_evaluate_nodes=min_clients,
                         min_available_nodes=min_clients, **kwargs)
        self.sites, self.min_clients = sites, min_clients
        self.site_weights = dict(site_weights) if site_weights else None
        self.reweigh = reweigh
        self.last_updates: dict[str, dict[str, torch.Tensor]] = {}
        self.last_weights: dict[str, float] = {}
        self.last_metrics: dict[str, dict[str, float]] = {}
        self.last_failures: list[tuple[int, str]] = []

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, errors = self._check_and_log_replies(list(replies), is_train=True)
        self.last_failures = [(m.metadata.src_node_id, m.error.reason) for m in errors]
        if len(valid) < self.min_clients:
            raise FedctError(f"federation round {server_round}: {len(valid)} of the clients "
                             f"replied, fewer than the minimum of {self.min_clients} "
                             f"(failures: {[r for _, r in self.last_failures]})")
        by_site = {}
        for m in valid:
            metrics = next(iter(m.content.metric_records.values()))
            by_site[self.sites[int(metrics["site-index"])]] = m
        order = [s for s in self.sites if s in by_site]
        states = {s: next(iter(by_site[s].content.array_records.values())).to_torch_state_dict()
                  for s in order}
        self.last_metrics = {s: dict(next(iter(by_site[s].content.metric_records.values())))
                             for s in order}
        weights = ({s: float(self.site_weights[s]) for s in order} if self.site_weights
                   else {s: float(self.last_metrics[s][self.weighted_by_key]) for s in order})
        if self.reweigh is not None:
            weights = self.reweigh(server_round, states, weights)
        merged = weighted_average(states, weights)
        self.last_updates, self.last_weights = states, weights
        metrics = aggregate_metricrecords([by_site[s].content for s in order],
                                          self.weighted_by_key)
        return ArrayRecord(merged), metrics


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".json":
        tmp.write_text(json.dumps(obj, indent=1, default=float))
    else:
        torch.save(obj, tmp)
    os.replace(tmp, path)


def _handshake(grid: Grid, cfg: FederationConfig) -> tuple[dict[int, dict], dict[int, str]]:
    """Node id -> {site, labels, spec, n_train, n_val, reference_ml, runtime} of each site;
    node id -> site of each target node."""
    # Wait for every site; after ``timeout`` go on with those connected, if enough.
    deadline = time.monotonic() + cfg.timeout
    while len(nodes := list(grid.get_node_ids())) < len(cfg.sites) + len(cfg.targets):
        if time.monotonic() > deadline:
            if len(nodes) >= cfg.min_clients:
                break
            raise FedctError(f"federation: {len(nodes)} of {len(cfg.sites)} sites connected "
                             f"within {cfg.timeout:.0f} s, fewer than min-clients "
                             f"{cfg.min_clients}")
        time.sleep(0.5)
    msgs = [Message(RecordDict(), dst_node_id=n, message_type=QUERY_INFO) for n in nodes]
    info: dict[int, dict] = {}
    targets: dict[int, dict] = {}  # target nodes: site, labels and grid (checked too)
    for reply in grid.send_and_receive(msgs, timeout=cfg.timeout):
        if reply.has_error():
            continue
        conf, node = reply.content["info"], reply.metadata.src_node_id
        common = {"site": str(conf["site"]), "labels": json.loads(str(conf["labels"])),
                  "spec": json.loads(str(conf["spec"]))}
        if str(conf.get("role", "")) == "target":
            targets[node] = common
            continue
        counts = reply.content["counts"]
        info[node] = {**common, "n_train": int(counts["n-train"]),
            "n_val": int(counts["n-val"]), "reference_ml": list(counts["reference-ml"]),
            "runtime": dict(reply.content.config_records.get("runtime") or {})}
    if len(info) < cfg.min_clients:
        raise FedctError(f"federation: {len(info)} sites answered the handshake, fewer than "
                         f"min-clients {cfg.min_clients}")
    checked = [*info.values(), *targets.values()]
    named = [i["site"] for i in checked]
    if len(set(named)) != len(named):
        raise FedctError(f"federation: two nodes claim the same site ({sorted(named)})")
    if len({json.dumps(i["labels"], sort_keys=True) for i in checked}) > 1:
        raise FedctError("federation: the sites have different label sets")
    if len({json.dumps(i["spec"], sort_keys=True) for i in checked}) > 1:
        raise FedctError("federation: the sites have different preprocessing grids")
    return info, {n: t["site"] for n, t in targets.items()}


def run_server(grid: Grid, cfg: FederationConfig,
               on_round: Callable[[dict], None] | None = None) -> list[dict]:
    """The federation (ServerApp body): rounds, checkpoints, final model; the history.

    One history record per round: ``round``, ``attempt`` (1 + the number of resumes before
    the round ran), ``seconds``, ``bytes_sent`` and ``bytes_received`` (model arrays, all
    messages of the round), ``clients`` (good replies), ``failed`` ([{site, reason}]),
    ``weights`` (site -> normalised weight), ``train_loss`` (weighted), ``val_dice_mean``
    (unweighted mean over sites of each site's mean validation Dice of the merged model),
    and ``sites``: site -> {train_loss, seconds, n_train, val_dice, val_loss, n_val}.
    """
    from fedct.data.labels import parse_labels
    from fedct.model.factory import build_model, model_arch
    from fedct.model.io import load_model, read_checkpoint, save_model

    params = cfg.train_params
    ckpt_dir, out_dir = Path(cfg.checkpoint_dir), Path(cfg.out_dir)
    info, target_nodes = _handshake(grid, cfg)
    clients = steering.NodesView(grid, info)  # the nodes that train (targets only score)
    node_site = {n: i["site"] for n, i in info.items()}
    first = next(iter(info.values()))
    labels = parse_labels(first["labels"], "federation handshake")
    arch = model_arch(params, labels)
    fp = cfg.fingerprint()
    ckpt = ckpt_dir / CHECKPOINT
    # Tensors and plain containers only: a planted pickle payload is refused, not run.
    saved = read_checkpoint(ckpt, "federation checkpoint") if ckpt.exists() else None
    if saved is not None and saved.get("fingerprint") == fp:
        state, done, history = saved["state"], saved["round"], saved["history"]
        attempt = saved["attempt"] + 1
        best_state = saved.get("best_state", state)
    else:
        if cfg.init_model:
            model, card = load_model(Path(cfg.init_model))
            if card["arch"] != arch:
                raise FedctError(f"{cfg.init_model}: its architecture is not the one of the "
                                 "federation's train params")
        else:
            torch.manual_seed(cfg.seed)
            model = build_model(params, labels)
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        done, history, attempt = 0, [], 1
        best_state = state
    for record in history:
        if on_round is not None:
            on_round(record)
    steer = steering.Steering(grid, target_nodes, cfg.targets, cfg.steer, cfg.timeout) \
        if cfg.targets else None
    strategy = FedctAvg(sites=cfg.sites, min_clients=cfg.min_clients,
                        site_weights=cfg.site_weights, reweigh=steer.weights if steer else None)
    # The clients' one-cycle schedule: train.schedule_steps when set (the rounds beyond it
    # train at its end value until the plateau or the cap), else all rounds.
    total = params.schedule_steps or cfg.rounds * cfg.local_steps
    for rnd in range(done + 1, cfg.rounds + 1):
        if plateau_reached([r["val_dice_mean"] for r in history], cfg.patience,
                           cfg.min_delta):
            break  # a resumed run that had already stopped
        t0 = time.perf_counter()
        arrays = ArrayRecord(state)
        config = ConfigRecord({"proximal-mu": cfg.mu, "local-steps": cfg.local_steps,
                               "start-step": (rnd - 1) * cfg.local_steps,
                               "total-steps": total})
        msgs = list(strategy.configure_train(rnd, arrays, config, clients))
        sent = _nbytes(arrays) * len(msgs)
        replies = list(grid.send_and_receive(msgs, timeout=cfg.timeout))
        received = sum(_nbytes(r.content.array_records["arrays"]) for r in replies
                       if not r.has_error() and "arrays" in r.content.array_records)
        merged, _ = strategy.aggregate_train(rnd, replies)
        ok_sites = list(strategy.last_updates)
        failed = [{"site": node_site.get(n, f"node {n}"), "reason": reason}
                  for n, reason in strategy.last_failures]
        # Nodes that were sent a message but neither replied nor errored (timeout).
        answered = {r.metadata.src_node_id for r in replies}
        failed += [{"site": node_site.get(m.metadata.dst_node_id, "?"), "reason": "no reply"}
                   for m in msgs if m.metadata.dst_node_id not in answered]
        state = merged.to_torch_state_dict()
        if steer is not None:  # the round's updates went to every target node as well
            failed, sent = failed + steer.last_failures, sent + steer.last_bytes
        if cfg.keep_updates:
            for s, upd in strategy.last_updates.items():
                _atomic_save(upd, ckpt_dir / "updates" / f"round-{rnd}" / f"{s}.pt")
        # Validation Dice of the merged model at every site.
        emsgs = list(strategy.configure_evaluate(rnd, merged, ConfigRecord(), clients))
        sent += _nbytes(merged) * len(emsgs)
        per_site: dict[str, dict] = {
            s: {"train_loss": float(strategy.last_metrics[s]["train-loss"]),
                "seconds": float(strategy.last_metrics[s]["seconds"]),
                "n_train": int(strategy.last_metrics[s]["num-examples"])} for s in ok_sites}
        for reply in grid.send_and_receive(emsgs, timeout=cfg.timeout):
            if reply.has_error():
                continue
            m = reply.content["metrics"]
            site = cfg.sites[int(m["site-index"])]
            per_site.setdefault(site, {}).update(
                {"val_dice": float(m["val-dice"]), "val_loss": float(m["val-loss"]),
                 "n_val": int(m["num-examples"])})
        dices = [v["val_dice"] for v in per_site.values()
                 if not math.isnan(v.get("val_dice", float("nan")))]
        w = strategy.last_weights
        record = {"round": rnd, "attempt": attempt, "seconds": time.perf_counter() - t0,
                  "bytes_sent": sent, "bytes_received": received, "clients": len(ok_sites),
                  "failed": failed,
                  "weights": {s: w[s] / sum(w.values()) for s in ok_sites},
                  "train_loss": sum(w[s] * per_site[s]["train_loss"] for s in ok_sites)
                  / sum(w.values()),
                  "val_dice_mean": sum(dices) / len(dices) if dices else float("nan"),
                  "sites": per_site}
        record.update({"steer_scores": steer.last_scores} if steer else {})
        history.append(record)
        vals = [r["val_dice_mean"] for r in history]
        if best_round(vals, cfg.min_delta) == rnd:
            best_state = state
        log(INFO, "fedct: round %d/%d done in %.1f s (%d clients, %d failed), val Dice %.3f",
            rnd, cfg.rounds, record["seconds"], len(ok_sites), len(failed),
            record["val_dice_mean"])
        _atomic_save({"fingerprint": fp, "round": rnd, "attempt": attempt, "state": state,
                      "best_state": best_state, "history": history}, ckpt)
        _atomic_save(history, ckpt_dir / HISTORY)
        if on_round is not None:
            on_round(record)
        if cfg.kill_after_round == rnd:
            # Fault injection (tests): the federation process dies as under `kill -9`.
            os.kill(os.getpid(), signal.SIGKILL)
        if plateau_reached(vals, cfg.patience, cfg.min_delta):
            log(INFO, "fedct: no higher validation Dice for %d rounds: stopping after "
                "round %d (best round %d)", cfg.patience, rnd, best_round(vals, cfg.min_delta))
            break
    # With plateau stopping, the best round's model (as a local model keeps its best
    # validation checkpoint); without it, the last round's (matched compute).
    vals = [r["val_dice_mean"] for r in history]
    best = best_round(vals, cfg.min_delta)
    if cfg.patience > 0 and best is not None:
        state = best_state
    # The final model, with its architecture so that MC dropout works after loading.
    model = build_model(params, labels)
    model.load_state_dict(state)
    n_train = {i["site"]: i["n_train"] for i in info.values()}
    total_train = sum(n_train.values())
    reference = [sum(i["n_train"] * i["reference_ml"][k] for i in info.values()) / total_train
                 for k in range(len(first["reference_ml"]))]
    out_dir.mkdir(parents=True, exist_ok=True)
    save_model(model, out_dir / MODEL, arch, {
        "site": "federated", "labels": labels.to_json(), "preprocessing": first["spec"],
        "reference_ml": reference, "fingerprint": fp, "n_train": total_train,
        "training": to_dict(params),
        "federation": {"method": "fedprox" if cfg.mu > 0 else "fedavg",
                       "sites": list(cfg.sites), "rounds": cfg.rounds,
                       "local_steps": cfg.local_steps, "proximal_mu": cfg.mu,
                       "min_clients": cfg.min_clients, "seed": cfg.seed,
                       "patience": cfg.patience, "best_round": best,
                       "last_round": len(history),
                       "kept_round": best if cfg.patience > 0 and best else len(history),
                       "min_delta": cfg.min_delta,
                       "stopped": "plateau" if plateau_reached(vals, cfg.patience,
                                                               cfg.min_delta)
                       else "cap",
                       "n_train": n_train, "site_weights": cfg.site_weights,
                       **({"targets": list(cfg.targets), "steer": json.loads(cfg.steer)}
                          if cfg.targets else {})},
        # Each site's device, CPU or GPU model, threads, torch build and bf16 autocast.
        "runtime": {"clients": {i["site"]: i["runtime"] for i in info.values()}}})
    _atomic_save(history, out_dir / HISTORY)
    return history


def make_server_app(overrides: Mapping[str, Any] | None = None,
                    on_round: Callable[[dict], None] | None = None) -> ServerApp:
    """The ServerApp; ``on_round(record)`` sees each round's history record (in-process)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = FederationConfig.from_run_config({**context.run_config, **(overrides or {})})
        run_server(grid, cfg, on_round)

    return app


# For ``flwr run`` / SuperLink deployments: everything comes from the run config.
server_app = make_server_app()
client_app = make_client_app()
