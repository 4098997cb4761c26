"""fedct's Flower 1.42 ServerApp (Message API): the rounds of a federation.

Protocol: a ``query`` handshake asks each node for its site, case counts, label set,
preprocessing grid and mean structure volumes (no image leaves the site). Then each round:
the strategy (:mod:`.strategy`: FedAvg, or FedProx when ``proximal-mu`` > 0) sends
``train`` messages with the global weights; the replies' updates are merged; then
``evaluate`` messages return each site's validation Dice of the merged model. After each
round the server checkpoints (weights, round, history, best round's weights) atomically,
so a killed federation resumes from its last finished round; with ``patience`` it stops
on a plateau of the clients' mean validation Dice (:mod:`.stopping`). The checkpoint holds
tensors and plain containers only and is read with ``torch.load(weights_only=True)``,
which rebuilds nothing else: a planted object is refused, not run. The science (initial
and final models) is in :mod:`.task`; the run config in :mod:`.run_config`.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping
from logging import INFO
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from fedct.config import to_dict
from fedct.errors import FedctError
from fedct.federation import steering, task
from fedct.federation.run_config import FederationConfig, nbytes
from fedct.federation.stopping import best_round, plateau_reached
from fedct.federation.strategy import FedctAvg, make_strategy

CHECKPOINT = "federation.pt"
HISTORY = "history.json"
MODEL = "model.safetensors"  # = fedct.model.io.WEIGHTS_FILE
QUERY_INFO = "query.site_info"


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".json":
        tmp.write_text(json.dumps(obj, indent=1, default=float))
    else:
        torch.save(obj, tmp)
    os.replace(tmp, path)


def handshake(grid: Grid, cfg: FederationConfig) -> tuple[dict[int, dict], dict[int, str]]:
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


def _round(grid: Grid, clients: Any, strategy: FedctAvg, steer: steering.Steering | None,
           cfg: FederationConfig, rnd: int, state: dict, site_of: Mapping[int, str],
           total: int) -> tuple[dict, dict]:
    """One round: train, merge, evaluate. The merged state and the round's record (without
    ``round`` and ``attempt``)."""
    t0 = time.perf_counter()
    arrays = ArrayRecord(state)
    config = ConfigRecord({"local-steps": cfg.local_steps,
                           "start-step": (rnd - 1) * cfg.local_steps, "total-steps": total})
    msgs = list(strategy.configure_train(rnd, arrays, config, clients))
    sent = nbytes(arrays) * len(msgs)
    replies = list(grid.send_and_receive(msgs, timeout=cfg.timeout))
    received = sum(nbytes(r.content.array_records["arrays"]) for r in replies
                   if not r.has_error() and "arrays" in r.content.array_records)
    merged, _ = strategy.aggregate_train(rnd, replies)
    ok_sites = list(strategy.last_updates)
    failed = [{"site": site_of.get(n, f"node {n}"), "reason": reason}
              for n, reason in strategy.last_failures]
    # Nodes that were sent a message but neither replied nor errored (timeout).
    answered = {r.metadata.src_node_id for r in replies}
    failed += [{"site": site_of.get(m.metadata.dst_node_id, "?"), "reason": "no reply"}
               for m in msgs if m.metadata.dst_node_id not in answered]
    if steer is not None:  # the round's updates went to every target node as well
        failed, sent = failed + steer.last_failures, sent + steer.last_bytes
    if cfg.keep_updates:
        for s, upd in strategy.last_updates.items():
            _atomic_save(upd, Path(cfg.checkpoint_dir) / "updates" / f"round-{rnd}" / f"{s}.pt")
    # Validation Dice of the merged model at every site.
    emsgs = list(strategy.configure_evaluate(rnd, merged, ConfigRecord(), clients))
    sent += nbytes(merged) * len(emsgs)
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
    record = {"seconds": time.perf_counter() - t0, "bytes_sent": sent,
              "bytes_received": received, "clients": len(ok_sites), "failed": failed,
              "weights": {s: w[s] / sum(w.values()) for s in ok_sites},
              "train_loss": sum(w[s] * per_site[s]["train_loss"] for s in ok_sites)
              / sum(w.values()),
              "val_dice_mean": sum(dices) / len(dices) if dices else float("nan"),
              "sites": per_site}
    record.update({"steer_scores": steer.last_scores} if steer else {})
    return merged.to_torch_state_dict(), record


def _card(cfg: FederationConfig, info: dict[int, dict], labels: Any, fp: str,
          history: list[dict]) -> dict:
    """The final model's card: data, federation settings, rounds kept, each site's runtime."""
    first = next(iter(info.values()))
    n_train = {i["site"]: i["n_train"] for i in info.values()}
    total_train = sum(n_train.values())
    reference = [sum(i["n_train"] * i["reference_ml"][k] for i in info.values()) / total_train
                 for k in range(len(first["reference_ml"]))]
    vals = [r["val_dice_mean"] for r in history]
    best = best_round(vals, cfg.min_delta)
    return {
        "site": "federated", "labels": labels.to_json(), "preprocessing": first["spec"],
        "reference_ml": reference, "fingerprint": fp, "n_train": total_train,
        "training": to_dict(cfg.train_params),
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
        "runtime": {"clients": {i["site"]: i["runtime"] for i in info.values()}}}


def run_server(grid: Grid, cfg: FederationConfig,
               on_round: Callable[[dict], None] | None = None) -> list[dict]:
    """The federation (ServerApp body): rounds, checkpoints, final model; the history.

    One history record per round: ``round``, ``attempt`` (1 + the number of resumes before
    the round ran), ``seconds``, ``bytes_sent`` and ``bytes_received`` (model arrays, all
    messages of the round), ``clients`` (good replies), ``failed`` ([{site, reason}]),
    ``weights`` (site -> normalised weight), ``train_loss`` (weighted), ``val_dice_mean``
    (unweighted mean over sites of each site's mean validation Dice of the merged model),
    and ``sites``: site -> {train_loss, seconds, n_train, val_dice, val_loss, n_val}.
    ``on_round(record)`` sees each record once the round is checkpointed.
    """
    from fedct.data.labels import parse_labels
    from fedct.model.io import read_checkpoint

    params = cfg.train_params
    ckpt_dir, out_dir = Path(cfg.checkpoint_dir), Path(cfg.out_dir)
    info, target_nodes = handshake(grid, cfg)
    clients = steering.NodesView(grid, info)  # the nodes that train (targets only score)
    site_of = {n: i["site"] for n, i in info.items()}
    labels = parse_labels(next(iter(info.values()))["labels"], "federation handshake")
    fp = cfg.fingerprint()
    ckpt = ckpt_dir / CHECKPOINT
    # Tensors and plain containers only: a planted pickle payload is refused, not run.
    saved = read_checkpoint(ckpt, "federation checkpoint") if ckpt.exists() else None
    if saved is not None and saved.get("fingerprint") == fp:
        state, done, history = saved["state"], saved["round"], saved["history"]
        attempt = saved["attempt"] + 1
        best_state = saved.get("best_state", state)
    else:
        state = task.initial_state(params, labels, cfg.seed, cfg.init_model)
        done, history, attempt = 0, [], 1
        best_state = state
    for record in history:
        if on_round is not None:
            on_round(record)
    steer = steering.Steering(grid, target_nodes, cfg.targets, cfg.steer, cfg.timeout) \
        if cfg.targets else None
    strategy = make_strategy(cfg.mu, sites=cfg.sites, min_clients=cfg.min_clients,
                             site_weights=cfg.site_weights,
                             reweigh=steer.weights if steer else None)
    # The clients' one-cycle schedule: train.schedule_steps when set (the rounds beyond it
    # train at its end value until the plateau or the cap), else all rounds.
    total = params.schedule_steps or cfg.rounds * cfg.local_steps
    for rnd in range(done + 1, cfg.rounds + 1):
        if plateau_reached([r["val_dice_mean"] for r in history], cfg.patience,
                           cfg.min_delta):
            break  # a resumed run that had already stopped
        state, record = _round(grid, clients, strategy, steer, cfg, rnd, state, site_of,
                               total)
        record = {"round": rnd, "attempt": attempt, **record}
        history.append(record)
        vals = [r["val_dice_mean"] for r in history]
        if best_round(vals, cfg.min_delta) == rnd:
            best_state = state
        log(INFO, "fedct: round %d/%d done in %.1f s (%d clients, %d failed), val Dice %.3f",
            rnd, cfg.rounds, record["seconds"], record["clients"], len(record["failed"]),
            record["val_dice_mean"])
        _atomic_save({"fingerprint": fp, "round": rnd, "attempt": attempt, "state": state,
                      "best_state": best_state, "history": history}, ckpt)
        _atomic_save(history, ckpt_dir / HISTORY)
        if on_round is not None:
            on_round(record)
        if plateau_reached(vals, cfg.patience, cfg.min_delta):
            log(INFO, "fedct: no higher validation Dice for %d rounds: stopping after "
                "round %d (best round %d)", cfg.patience, rnd, best_round(vals, cfg.min_delta))
            break
    # With plateau stopping, the best round's model (as a local model keeps its best
    # validation checkpoint); without it, the last round's (matched compute).
    best = best_round([r["val_dice_mean"] for r in history], cfg.min_delta)
    if cfg.patience > 0 and best is not None:
        state = best_state
    out_dir.mkdir(parents=True, exist_ok=True)
    task.save_final_model(out_dir / MODEL, params, labels, state,
                          _card(cfg, info, labels, fp, history))
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
