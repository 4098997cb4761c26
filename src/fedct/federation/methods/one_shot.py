"""``one_shot``: the average of the local models, weighted by ``federate.weighting``
(``fedct.federation.aggregate``); no round of communication after training."""

from __future__ import annotations

from fedct.federation.aggregate import weighted_average
from fedct.federation.methods.base import Context, Method, RunLike


def run(ctx: Context, mlrun: RunLike) -> dict:
    locals_ = ctx.local_models()
    merged = weighted_average([locals_[s][0].state_dict() for s in ctx.sites],
                              [ctx.weights[s] for s in ctx.sites])
    model = locals_[ctx.sites[0]][0]
    model.load_state_dict(merged)
    card = ctx.card("one_shot", ctx.here, clients=list(ctx.sites), weights=ctx.weights)
    path = ctx.save(model, ctx.out_dir / "one_shot", card)
    mlrun.log_params({"weights": ctx.weights})
    ctx.tracker.log_model(mlrun, path.parent)
    return {}


METHOD = Method("one_shot", run)
