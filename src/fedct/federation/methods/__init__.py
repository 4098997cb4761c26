"""The federation methods of ``fedct federate``: one module per method, registered here.

``REGISTRY`` maps each name of ``federate.methods`` to its :class:`~.base.Method` (the
names are ``fedct.config.FEDERATE_METHODS``, a test says so); ``execution_order`` puts a
method after the methods it reads. What a method receives and returns: :mod:`.base`.
"""

from __future__ import annotations

from fedct.config import FederateParams
from fedct.federation.methods import (
    cw_self_train,
    fedavg,
    fedprox,
    gated_tent,
    one_shot,
    self_train,
    steered,
    tent,
    uw_merge,
    uw_select,
)
from fedct.federation.methods.base import Context, Method, RunLike, Tracker

__all__ = ["REGISTRY", "Context", "Method", "RunLike", "Tracker", "execution_order"]

REGISTRY: dict[str, Method] = {m.name: m for m in (
    one_shot.METHOD, fedavg.METHOD, fedprox.METHOD, uw_merge.METHOD, tent.METHOD,
    self_train.METHOD, uw_select.METHOD, steered.METHOD, steered.ABLATION,
    cw_self_train.METHOD, cw_self_train.ABLATION, gated_tent.METHOD, gated_tent.ABLATION)}


def execution_order(params: FederateParams) -> list[str]:
    """``federate.methods`` in their order, each preceded by the methods it ``needs`` that
    have not run yet (a needed method that is not listed runs as a teacher only)."""
    order: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in order:
            return
        if name in path:
            raise ValueError(f"federate.methods: {' -> '.join((*path, name))} is a cycle")
        for need in REGISTRY[name].needs(params):
            visit(need, (*path, name))
        order.append(name)

    for name in params.methods:
        visit(name, ())
    return order
