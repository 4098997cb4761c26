"""fedct's Flower strategies: FedAvg merging with fedct's maths, and FedProx as FedAvg with
one method changed (as FLamby writes it, and Flower's own ``FedProx``).

- :class:`FedctAvg` overrides only ``aggregate_train`` of Flower's ``FedAvg``: the replies
  are merged by :func:`fedct.federation.aggregate.weighted_average` (integer buffers by
  its documented rule), weighted by ``num-examples`` or by fixed ``site_weights``, in site
  order (so the floating-point sum does not depend on which reply came first), and a
  round with fewer than ``min_clients`` good replies is refused.
- :class:`FedctProx` overrides only ``configure_train`` of :class:`FedctAvg`: each
  client is sent ``proximal-mu`` and adds ``mu / 2 * ||w - w_global||^2`` to its loss
  (``fedct.training.losses.proximal_term``); the merge is FedAvg's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from fedct.errors import FedctError
from fedct.federation.aggregate import weighted_average


class FedctAvg(FedAvg):
    """FedAvg merging with fedct's maths (module docstring).

    ``reweigh(round, states, weights)`` (optional) replaces a round's weights
    (``steering.Steering.weights``). ``last_updates`` (site -> state), ``last_weights``,
    ``last_metrics`` and ``last_failures`` (node id, reason) describe the latest round.
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


class FedctProx(FedctAvg):
    """FedProx (Li et al. 2020): :class:`FedctAvg` whose clients get ``proximal-mu``."""

    def __init__(self, *, proximal_mu: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.proximal_mu = proximal_mu

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        config["proximal-mu"] = self.proximal_mu
        return super().configure_train(server_round, arrays, config, grid)


def make_strategy(mu: float, **kwargs: Any) -> FedctAvg:
    """FedProx when ``mu`` > 0, else FedAvg; ``kwargs`` as :class:`FedctAvg` takes them."""
    return FedctProx(proximal_mu=mu, **kwargs) if mu > 0 else FedctAvg(**kwargs)
