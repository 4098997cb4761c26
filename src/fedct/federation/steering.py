"""The target hospital steers the aggregation (the ``steered`` method): its Flower messages.

A federation may have **target nodes** beside its clients (``targets`` in the run config):
held-out sites without labels, which never train. In every round, after the clients'
updates arrive and before they are merged:

1. the server sends each target node the round's client updates (``query.steer``:
   one ``ArrayRecord`` per client, ``update.<site>``);
2. the target node scores each update on its own adaptation images only
   (``fedct.data.cases.adaptation_cases``, read with ``load_image``: never a label and
   never a case that ``evaluate`` scores) by its mean MC-dropout uncertainty
   (``label_free.target_uncertainty``), and replies with one scalar per client
   (``MetricRecord`` ``score.<site>``): no image, label, prediction or per-voxel map
   leaves it;
3. the server turns the scalars into merge weights (``label_free.steering_weights``:
   FedAvg's weights times ``exp(-(s_i - min s) / temperature)``).

A target that fails or does not reply is recorded and the round falls back to FedAvg's
weights (``fallback``). What the target learns: each client's update of the round (an
honest-but-curious target could study them; FedAvg's server sees the same).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedct.config import TrainParams
from fedct.errors import FedctError

#: The message type of a scoring request to a target node.
STEER = "query.steer"


@dataclasses.dataclass(frozen=True)
class SteerConfig:
    """How target nodes score updates and the server weighs them (run config ``steer``,
    JSON): MC-dropout samples and batch, dropout seed, the signal and its case
    aggregation (``label_free.case_uncertainty``), and the softmax ``temperature`` (in
    the signal's units)."""

    mc_samples: int = 10
    mc_batch: int = 10
    seed: int = 0
    signal: str = "sample_disagreement"
    aggregation: str = "mean"
    temperature: float = 0.01

    @classmethod
    def from_json(cls, text: str) -> SteerConfig:
        try:
            cfg = cls(**json.loads(text))
        except (TypeError, ValueError) as exc:
            raise FedctError(f"federation run config: steer {text!r}: {exc}") from exc
        if cfg.mc_samples < 2 or cfg.mc_batch < 1 or not cfg.temperature > 0:
            raise FedctError(f"federation run config: steer {text!r}: mc_samples >= 2, "
                             "mc_batch >= 1 and temperature > 0")
        return cfg

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def check_targets(sites: tuple[str, ...], targets: tuple[str, ...], steer: str) -> None:
    """Refuse a run config whose ``targets`` repeat or are sites, or that has targets
    without ``steer`` (or the reverse), or a bad ``steer``."""
    if len(set(targets)) != len(targets) or set(targets) & set(sites):
        raise FedctError(f"federation run config: targets {targets} must be distinct and "
                         f"not among the sites {sites}")
    if bool(targets) != bool(steer):
        raise FedctError("federation run config: targets and steer go together")
    if steer:
        SteerConfig.from_json(steer)


def is_target(node_config: Mapping[str, Any], sites: tuple[str, ...],
              targets: tuple[str, ...]) -> bool:
    """Whether a node is a target node: its node config names a target site, or its
    partition comes after the sites'."""
    if "site" in node_config:
        return str(node_config["site"]) in targets
    return int(node_config["partition-id"]) >= len(sites)


def target_info(msg: Message, site: str, labels: Any, spec: dict) -> Message:
    """A target node's handshake reply: its site and role, label set and grid (checked
    against the clients'); no case count, since it holds no training case."""
    return Message(content=RecordDict({"info": ConfigRecord(
        {"site": site, "role": "target", "labels": json.dumps(labels.to_json()),
         "spec": json.dumps(spec)})}), reply_to=msg)


class NodesView:
    """A view of a Flower grid that lists only ``nodes`` (the clients: the strategy samples
    training and evaluation nodes from it, so a target node never trains)."""

    def __init__(self, grid: Any, nodes: Iterable[int]) -> None:
        self.grid, self.nodes = grid, list(nodes)

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)


def target_images(cohort_dir: Path, site: str) -> list:
    """The adaptation images of target ``site`` (images only; no label is read)."""
    from fedct.data.cases import adaptation_cases, case_path, load_image, read_cohort

    held = adaptation_cases(read_cohort(cohort_dir))
    keys = held.loc[held["site"].astype(str) == site, "series_key"]
    if keys.empty:
        raise FedctError(f"target site {site}: no held-out case to score updates on")
    return [load_image(case_path(cohort_dir, k)) for k in keys]


def score_updates(msg: Message, cohort_dir: Path, site: str, train_params: TrainParams,
                  steer: SteerConfig) -> Message:
    """A target node's reply to ``query.steer``: one uncertainty score per client update,
    on its own adaptation images (module docstring)."""
    from fedct.data.cases import cohort_labels
    from fedct.devices import pick_device
    from fedct.federation.label_free import target_uncertainty
    from fedct.model.factory import build_model

    labels = cohort_labels(cohort_dir)
    device = pick_device(train_params.device)
    models = {}
    for key, record in msg.content.array_records.items():
        model = build_model(train_params, labels)
        model.load_state_dict(record.to_torch_state_dict())
        models[key.removeprefix("update.")] = model.to(device)
    scores = target_uncertainty(models, target_images(cohort_dir, site),
                                mc_samples=steer.mc_samples, mc_batch=steer.mc_batch,
                                seed=steer.seed, signal=steer.signal,
                                aggregation=steer.aggregation, amp=train_params.amp)
    return Message(RecordDict({"scores": MetricRecord(
        {f"score.{s}": float(v) for s, v in scores.items()})}), reply_to=msg)


class Steering:
    """The server's side: ``weights(round, states, base)`` asks the target nodes and returns
    the round's merge weights (client site -> weight); ``last_scores`` (target -> client
    -> score), ``last_failures`` ([{site, reason}]) and ``last_bytes`` (model arrays sent
    to the targets) describe the latest round. Every target site of ``targets`` must have
    answered the handshake (``target_nodes``: node id -> site)."""

    def __init__(self, grid: Any, target_nodes: Mapping[int, str], targets: tuple[str, ...],
                 steer: str, timeout: float) -> None:
        missing = sorted(set(targets) - set(target_nodes.values()))
        if missing:
            raise FedctError(f"federation: target site(s) {missing} did not answer the "
                             "handshake; a steered federation needs every target")
        self.grid, self.target_nodes = grid, dict(target_nodes)
        self.steer, self.timeout = SteerConfig.from_json(steer), timeout
        self.last_scores: dict[str, dict[str, float]] = {}
        self.last_failures: list[dict[str, str]] = []
        self.last_bytes = 0

    def weights(self, server_round: int, states: Mapping[str, Mapping[str, torch.Tensor]],
                base: Mapping[str, float]) -> dict[str, float]:
        from fedct.federation.label_free import steering_weights

        content = RecordDict({f"update.{s}": ArrayRecord(dict(state))
                              for s, state in states.items()})
        content["config"] = ConfigRecord({"server-round": server_round})
        msgs = [Message(content, dst_node_id=n, message_type=STEER) for n in self.target_nodes]
        self.last_bytes = len(msgs) * sum(len(a.data) for k, r in content.array_records.items()
                                          for a in r.values())
        self.last_scores, self.last_failures = {}, []
        answered = set()
        for reply in self.grid.send_and_receive(msgs, timeout=self.timeout):
            node = reply.metadata.src_node_id
            answered.add(node)
            target = self.target_nodes.get(node, f"node {node}")
            if reply.has_error():
                self.last_failures.append({"site": target, "reason": reply.error.reason})
                continue
            got = reply.content["scores"]
            self.last_scores[target] = {s: float(got[f"score.{s}"]) for s in states
                                        if f"score.{s}" in got}
        self.last_failures += [{"site": t, "reason": "no reply"}
                               for n, t in self.target_nodes.items() if n not in answered]
        try:
            return steering_weights(self.last_scores, base, self.steer.temperature)
        except ValueError as exc:
            self.last_failures.append({"site": "steering", "reason": str(exc)})
            return fallback(base)


def fallback(base: Mapping[str, float]) -> dict[str, float]:
    """FedAvg's weights (what a round without usable target scores merges with)."""
    total = sum(base.values())
    return {s: float(v) / total if total > 0 else math.nan for s, v in base.items()}
