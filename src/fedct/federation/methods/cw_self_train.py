"""``cw_self_train``: class-wise curriculum self-training at each target site;
``cw_self_train_all``, its ablation without uncertainty.

Per held-out target site, the FedAvg model trains on its own pseudo-labels of the target's
adaptation images for ``federate.cwst_rounds`` rounds of ``cwst_steps`` steps (rate
``cwst_lr``): each round relabels the images with MC dropout and trusts, per predicted
structure, the fraction of its voxels with the lowest MC standard deviation, rising from
``cwst_keep[0]`` to ``cwst_keep[1]``; the others weigh ``cwst_floor`` in the loss
(``fedct.federation.adaptation.cw_self_train``). It runs where the images are (the target
site); nothing leaves it but the model. ``cw_self_train_all``: the same rounds with every
voxel trusted (no threshold). One model per target each.
"""

from __future__ import annotations

import dataclasses
import math

from fedct.federation.adaptation import cw_self_train
from fedct.federation.methods.base import Context, Method, RunLike
from fedct.model.io import load_model


def _run(ctx: Context, mlrun: RunLike, name: str, keep: tuple[float, float]) -> dict:
    p = ctx.params
    # Its own one-cycle schedule over its rounds, at a fine-tuning rate.
    params = dataclasses.replace(ctx.train, learning_rate=p.cwst_lr, device=p.device,
                                 schedule_steps=0)
    mlrun.log_params({"rounds": p.cwst_rounds, "steps": p.cwst_steps, "lr": p.cwst_lr,
                      "keep": list(keep), "floor": p.cwst_floor, "mu": p.cwst_mu,
                      "mc_samples": p.mc_samples})
    out = {}
    for target, images in ctx.targets.items():
        teacher, start = load_model(ctx.model_path("fedavg"))
        rounds: list[dict] = []

        def on_round(r: int, stats: dict, target: str = target, rounds: list = rounds) -> None:
            rounds.append({k: None if math.isnan(v) else v for k, v in stats.items()})
            mlrun.log_metrics({f"{target}.{k}": v for k, v in stats.items()
                               if not math.isnan(v)}, step=r)
            ctx.log(f"federate {name}: target {target}, round {r}/{p.cwst_rounds}, kept "
                    f"{stats['kept']:.2f}, loss {stats['loss']:.3f}")

        model = cw_self_train(teacher.to(ctx.device), images, params, rounds=p.cwst_rounds,
                              steps=p.cwst_steps, keep=keep, floor=p.cwst_floor,
                              mc_samples=p.mc_samples,
                              mc_batch=p.mc_batch, seed=p.seed, mu=p.cwst_mu,
                              site=target, on_round=on_round)
        uncertainty = ("none: every voxel of the pseudo-labels kept" if keep == (1.0, 1.0)
                       else f"MC dropout, T = {p.mc_samples}: per structure the share "
                            f"{keep[0]:.2f} -> {keep[1]:.2f} of its voxels with the lowest "
                            "standard deviation of the structure's probability trusted, "
                            f"the rest weighted {p.cwst_floor:g}")
        card = ctx.card(name, {**start.get("runtime", {}), **ctx.here}, target_site=target,
                        start="fedavg", rounds=p.cwst_rounds, steps=p.cwst_steps,
                        lr=p.cwst_lr, keep=list(keep), floor=p.cwst_floor, mu=p.cwst_mu,
                        per_round=rounds,
                        inputs={"target": f"{len(images)} adaptation images of {target}, "
                                          "no label", "model": "FedAvg",
                                "uncertainty": uncertainty},
                        **({"ablation_of": "cw_self_train"} if name.endswith("_all")
                           else {"ablation": "cw_self_train_all"}))
        path = ctx.save(model, ctx.out_dir / name / target, card)
        ctx.tracker.log_model(mlrun, path.parent, artifact_path=f"model-{target}")
        out[f"{name}_kept_{target}"] = [r["kept"] for r in rounds]
    return out


def run(ctx: Context, mlrun: RunLike) -> dict:
    return _run(ctx, mlrun, "cw_self_train", tuple(ctx.params.cwst_keep))


def run_all(ctx: Context, mlrun: RunLike) -> dict:
    return _run(ctx, mlrun, "cw_self_train_all", (1.0, 1.0))


METHOD = Method("cw_self_train", run, label_free=True, needs=lambda params: ("fedavg",),
                ablation="cw_self_train_all")
ABLATION = Method("cw_self_train_all", run_all, label_free=True,
                  needs=lambda params: ("fedavg",))
