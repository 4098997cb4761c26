"""``steered``: the target hospital steers the aggregation; ``steered_uniform``, its ablation.

``steered``: per held-out target site, ``federate.steer_rounds`` further Flower rounds from
the FedAvg model (fine-tuning rate ``steer_lr``) with the target as one more node that
never trains: in each round it scores every client's update by its mean MC-dropout
uncertainty (``federate.uw_signal``) on its own adaptation images and returns only these
scalars; the server merges with FedAvg's weights times ``exp(-(s_i - min s) /
steer_temperature)`` (``fedct.federation.steering``). One model per target.

``steered_uniform``: the same rounds from the same model with FedAvg's weights (no target,
no uncertainty): one model for every target. The paired difference ``steered`` minus
``steered_uniform`` is what the uncertainty steering adds.
"""

from __future__ import annotations

import dataclasses

from fedct.federation.methods.base import Context, Method, RunLike
from fedct.federation.methods.rounds import multi_round
from fedct.federation.steering import SteerConfig


def _fine_tune(ctx: Context):
    # Its own schedule over its rounds, at a fine-tuning rate (a restart at
    # train.learning_rate undoes FedAvg; self_train_lr's reason).
    return dataclasses.replace(ctx.train, learning_rate=ctx.params.steer_lr, schedule_steps=0)


def _weights(ctx: Context) -> dict[str, float] | None:
    return ctx.weights if ctx.params.weighting == "equal" else None


def steer_config(ctx: Context) -> SteerConfig:
    p = ctx.params
    return SteerConfig(mc_samples=p.mc_samples, mc_batch=p.mc_batch, seed=p.seed,
                       signal=p.uw_signal, aggregation=p.uw_aggregation,
                       temperature=p.steer_temperature)


def run(ctx: Context, mlrun: RunLike) -> dict:
    p, out = ctx.params, {}
    steer = steer_config(ctx)
    mlrun.log_params({"steer_rounds": p.steer_rounds, "steer_lr": p.steer_lr,
                      **{f"steer.{k}": v for k, v in dataclasses.asdict(steer).items()}})
    for target, images in ctx.targets.items():
        name = f"steered-{target}"
        with ctx.tracker.start_run(name, {"fedct.method": "steered",
                                          "fedct.target": target}) as trun:
            path, history = multi_round(
                ctx, name, trun, out=ctx.out_dir / "steered" / target, train=_fine_tune(ctx),
                init_model=ctx.model_path("fedavg"), rounds=p.steer_rounds,
                site_weights=_weights(ctx), patience=0, targets=(target,),
                steer=steer.to_json())
        ctx.finish_card(
            path, "steered", ctx.here, target_site=target, start="fedavg",
            clients=list(ctx.sites), rounds=p.steer_rounds, lr=p.steer_lr,
            steer=dataclasses.asdict(steer), ablation="steered_uniform",
            inputs={"target": f"{len(images)} adaptation images of {target}, no label",
                    "model": "each client's update of each round (from FedAvg)",
                    "uncertainty": f"MC dropout, T = {steer.mc_samples}, {steer.signal} "
                                   f"({steer.aggregation} over structures, mean over "
                                   "images): one scalar per update leaves the target"})
        ctx.tracker.log_model(mlrun, path.parent, artifact_path=f"model-{target}")
        out[f"steered_weights_{target}"] = [r.get("weights") for r in history]
        ctx.log(f"federate steered: target {target}, last weights "
                + ", ".join(f"{s} {w:.2f}" for s, w in history[-1]["weights"].items()))
    return out


def run_uniform(ctx: Context, mlrun: RunLike) -> dict:
    p = ctx.params
    mlrun.log_params({"steer_rounds": p.steer_rounds, "steer_lr": p.steer_lr})
    path, _ = multi_round(ctx, "steered_uniform", mlrun, train=_fine_tune(ctx),
                          init_model=ctx.model_path("fedavg"), rounds=p.steer_rounds,
                          site_weights=_weights(ctx), patience=0)
    ctx.finish_card(path, "steered_uniform", ctx.here, start="fedavg", clients=list(ctx.sites),
                    rounds=p.steer_rounds, lr=p.steer_lr, ablation_of="steered",
                    inputs={"target": "none", "model": "FedAvg",
                            "uncertainty": "none (FedAvg's weights)"})
    ctx.tracker.log_model(mlrun, path.parent)
    return {}


METHOD = Method("steered", run, label_free=True, needs=lambda params: ("fedavg",),
                ablation="steered_uniform")
ABLATION = Method("steered_uniform", run_uniform, needs=lambda params: ("fedavg",))
