"""``fedavg``: up to ``federate.rounds`` Flower rounds from a seeded fresh model (stopping
after ``federate.patience`` rounds without a higher mean client validation Dice, keeping
the best round's model); each client trains ``local_steps`` steps per round on its own
training split, the server averages the updates weighted by training cases (or equally:
``federate.weighting``)."""

from __future__ import annotations

from fedct.federation.methods.base import Context, Method, RunLike
from fedct.federation.methods.rounds import multi_round, round_metrics


def federate(ctx: Context, mlrun: RunLike, name: str, mu: float) -> dict:
    """FedAvg (``mu`` 0) or FedProx (``mu`` > 0): the model, its card and its metrics."""
    p = ctx.params
    mlrun.log_params({"rounds": p.rounds, "local_steps": p.local_steps, "proximal_mu": mu,
                      "min_clients": p.min_clients, "patience": p.patience,
                      "min_delta": p.min_delta})
    path, history = multi_round(ctx, name, mlrun, mu=mu,
                                site_weights=ctx.weights if p.weighting == "equal" else None)
    ctx.finish_card(path, name, ctx.here, clients=list(ctx.sites), rounds=p.rounds,
                    local_steps=p.local_steps, proximal_mu=mu)
    ctx.tracker.log_model(mlrun, path.parent)
    mlrun.log_artifact(path.parent / "history.csv")
    return round_metrics(name, history, p.patience, p.min_delta)


def run(ctx: Context, mlrun: RunLike) -> dict:
    return federate(ctx, mlrun, "fedavg", 0.0)


METHOD = Method("fedavg", run)
