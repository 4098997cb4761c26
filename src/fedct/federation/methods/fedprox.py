"""``fedprox``: FedAvg's rounds with the proximal term ``mu / 2 ||w - w_global||^2`` in
each client's loss (``federate.proximal_mu``)."""

from __future__ import annotations

from fedct.federation.methods.base import Context, Method, RunLike
from fedct.federation.methods.fedavg import federate


def run(ctx: Context, mlrun: RunLike) -> dict:
    return federate(ctx, mlrun, "fedprox", ctx.params.proximal_mu)


METHOD = Method("fedprox", run)
