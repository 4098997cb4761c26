"""Federated learning across sites: aggregation maths, Flower apps and their simulation.

- :mod:`fedct.federation.aggregate`: pure functions over state dicts (weighted averaging,
  per-site weights, the server step), the one implementation that the one-shot
  stage, the Flower strategy and the tests use;
- :mod:`fedct.federation.flower_app`: the thin Flower 1.42 ServerApp and ClientApp;
- :mod:`fedct.federation.simulation`: ``run_federation``, Flower's simulation run in a child
  process that is always stopped.
"""

#: The methods of ``federate`` that read no label of a target site (``methods`` params).
LABEL_FREE = ("uw_merge", "tent", "self_train", "uw_select", "steered", "cw_self_train",
              "cw_self_train_all", "gated_tent", "gated_tent_random")
