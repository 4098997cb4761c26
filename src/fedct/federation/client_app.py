"""fedct's Flower 1.42 ClientApp (Message API): a thin layer over :mod:`.task`.

Each handler reads the run config (:mod:`.run_config`) and the node's site, calls the task,
and packs the reply; nothing else crosses the network:

- ``query.site_info`` (handshake): the site, its label set and grid, case counts, mean
  structure volumes and runtime (a target node: site, labels and grid only);
- ``train``: the global weights and ``{local-steps, start-step, total-steps}`` (and
  ``proximal-mu`` from FedProx) in; the update and ``num-examples``, ``train-loss``,
  ``seconds``, ``bytes-received``, ``bytes-sent``, ``site-index`` out;
- ``evaluate``: a model in; its validation loss and Dice at the site out;
- ``query.steer`` (target nodes of the steered method): :mod:`.steering`.

``mods`` of :func:`make_client_app` wrap every handler (Flower's mechanism for that; the
tests install fault injection through it, ``tests/federation/faults.py``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from fedct.errors import FedctError
from fedct.federation import steering, task
from fedct.federation.run_config import FederationConfig, nbytes


def node_config(context: Context, overrides: Mapping[str, Any] | None = None
                ) -> FederationConfig:
    """The run config as this node sees it: ``overrides`` over Flower's run config, and a
    deployed node's own data folder (node config ``cohort-dir``) over both."""
    rc = {**context.run_config, **(overrides or {})}
    if "cohort-dir" in context.node_config:
        rc["cohort-dir"] = str(context.node_config["cohort-dir"])
    return FederationConfig.from_run_config(rc)


def node_site(context: Context, cfg: FederationConfig, target: bool = False
              ) -> tuple[str, int]:
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


def handle_query(msg: Message, context: Context, cfg: FederationConfig) -> Message:
    """The handshake reply (module docstring)."""
    cohort = Path(cfg.cohort_dir)
    if steering.is_target(context.node_config, cfg.sites, cfg.targets):
        labels, spec = task.cohort_grid(cohort)
        return steering.target_info(msg, node_site(context, cfg, target=True)[0], labels,
                                    spec)
    site, index = node_site(context, cfg)
    info = task.describe_site(cohort, site, cfg.train_params)
    content = RecordDict({
        "info": ConfigRecord({"site": site, "labels": json.dumps(info["labels"].to_json()),
                              "spec": json.dumps(info["spec"])}),
        "counts": MetricRecord({"site-index": index, "n-train": info["n_train"],
                                "n-val": info["n_val"], "reference-ml": info["reference_ml"]}),
        "runtime": ConfigRecord(info["runtime"])})
    return Message(content=content, reply_to=msg)


def handle_train(msg: Message, context: Context, cfg: FederationConfig) -> Message:
    """One round's local update at this node's site."""
    site, index = node_site(context, cfg)
    conf = msg.content["config"]
    arrays = msg.content["arrays"]
    state, m = task.train(Path(cfg.cohort_dir), site, cfg.train_params,
                          arrays.to_torch_state_dict(), seed=cfg.seed,
                          server_round=int(conf["server-round"]),
                          local_steps=int(conf["local-steps"]),
                          mu=float(conf["proximal-mu"]) if "proximal-mu" in conf else 0.0,
                          start_step=int(conf["start-step"]),
                          total_steps=int(conf["total-steps"]))
    out = ArrayRecord(state)
    metrics = MetricRecord({"num-examples": m["n_train"], "train-loss": m["loss"],
                            "seconds": m["seconds"], "bytes-received": nbytes(arrays),
                            "bytes-sent": nbytes(out), "site-index": index})
    return Message(content=RecordDict({"arrays": out, "metrics": metrics}), reply_to=msg)


def handle_evaluate(msg: Message, context: Context, cfg: FederationConfig) -> Message:
    """The merged model's validation loss and Dice at this node's site."""
    site, index = node_site(context, cfg)
    m = task.evaluate(Path(cfg.cohort_dir), site, cfg.train_params,
                      msg.content["arrays"].to_torch_state_dict())
    metrics = MetricRecord({"num-examples": m["n_val"], "val-loss": m["loss"],
                            "val-dice": m["dice"], "site-index": index})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


def handle_steer(msg: Message, context: Context, cfg: FederationConfig) -> Message:
    """A target node's scores of the round's client updates (:mod:`.steering`)."""
    return steering.score_updates(msg, Path(cfg.cohort_dir),
                                  node_site(context, cfg, target=True)[0], cfg.train_params,
                                  steering.SteerConfig.from_json(cfg.steer))


def make_client_app(overrides: Mapping[str, Any] | None = None,
                    mods: Sequence[Mod] = ()) -> ClientApp:
    """The ClientApp; ``overrides`` (run-config keys) take precedence over the run config,
    ``mods`` wrap every handler."""
    app = ClientApp(mods=list(mods))

    @app.query("site_info")
    def query(msg: Message, context: Context) -> Message:
        return handle_query(msg, context, node_config(context, overrides))

    @app.query("steer")
    def steer(msg: Message, context: Context) -> Message:
        return handle_steer(msg, context, node_config(context, overrides))

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, node_config(context, overrides))

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return handle_evaluate(msg, context, node_config(context, overrides))

    return app


# For ``flwr run`` / SuperLink deployments: everything comes from the run config.
client_app = make_client_app()
