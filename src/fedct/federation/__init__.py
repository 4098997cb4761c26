"""Federated learning across sites: aggregation maths, Flower apps and their simulation.

- :mod:`fedct.federation.aggregate`: pure functions over state dicts (weighted averaging,
  per-site weights, the server step), the one implementation that the one-shot
  stage, the Flower strategy and the tests use;
- the Flower 1.42 apps, as Flower's examples lay them out: :mod:`~.task` (what a site
  does in a round, and the server's initial and final models), thin
  :mod:`~.client_app` and :mod:`~.server_app` over it, :mod:`~.strategy` (FedAvg with
  fedct's merge; FedProx as FedAvg with one method changed) and :mod:`~.run_config`
  (the run config both apps read);
- :mod:`fedct.federation.simulation`: ``run_federation``, Flower's simulation run in a child
  process that is always stopped.
"""

#: The methods of ``federate`` that read no label of a target site (``methods`` params).
LABEL_FREE = ("uw_merge", "tent", "self_train", "uw_select", "steered", "cw_self_train",
              "cw_self_train_all", "gated_tent", "gated_tent_random")
