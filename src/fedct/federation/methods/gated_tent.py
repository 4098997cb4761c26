"""``gated_tent``: uncertainty-gated TENT; ``gated_tent_random``, its ablation.

Per held-out target site, TENT on the FedAvg model (``tent_steps``, ``tent_lr``: the
normalisation affine parameters minimise the prediction entropy) with the entropy averaged
over each image's ``federate.gate_keep`` fraction of voxels with the lowest MC-dropout
uncertainty under FedAvg (``fedct.federation.adaptation.uncertainty_gates``): TENT alone
drifts on small targets, most where the model is unsure. ``gated_tent_random``: the same
number of voxels per image gated at random. One model per target each.
"""

from __future__ import annotations

from fedct.federation.adaptation import random_gates, uncertainty_gates
from fedct.federation.label_free import prediction_entropy, tent_adapt
from fedct.federation.methods.base import Context, Method, RunLike
from fedct.model.io import load_model


def _run(ctx: Context, mlrun: RunLike, name: str, random: bool) -> dict:
    p = ctx.params
    mlrun.log_params({"tent_steps": p.tent_steps, "tent_lr": p.tent_lr,
                      "gate_keep": p.gate_keep, "random": random})
    for target, images in ctx.targets.items():
        teacher, start = load_model(ctx.model_path("fedavg"))
        teacher = teacher.to(ctx.device)
        gates = uncertainty_gates(teacher, images, p.gate_keep, p.mc_samples, p.mc_batch,
                                  p.seed, ctx.amp)
        if random:
            gates = random_gates(gates, p.seed)
        before = prediction_entropy(teacher, images, ctx.amp)
        adapted = tent_adapt(teacher, images, steps=p.tent_steps, lr=p.tent_lr, seed=p.seed,
                             amp=ctx.amp, gates=gates)
        after = prediction_entropy(adapted, images, ctx.amp)
        mlrun.log_metrics({f"{target}.entropy": before}, step=0)
        mlrun.log_metrics({f"{target}.entropy": after}, step=p.tent_steps)
        card = ctx.card(name, {**start.get("runtime", {}), **ctx.here}, target_site=target,
                        start="fedavg", steps=p.tent_steps, lr=p.tent_lr,
                        gate_keep=p.gate_keep, entropy_before=before, entropy_after=after,
                        inputs={"target": f"{len(images)} adaptation images of {target}, "
                                          "no label", "model": "FedAvg",
                                "uncertainty": ("none: voxels gated at random at the same "
                                                "rate") if random else
                                f"MC dropout, T = {p.mc_samples}: the {p.gate_keep:.2f} of "
                                "each image's voxels with the lowest standard deviation"},
                        **({"ablation_of": "gated_tent"} if random
                           else {"ablation": "gated_tent_random"}))
        path = ctx.save(adapted, ctx.out_dir / name / target, card)
        ctx.tracker.log_model(mlrun, path.parent, artifact_path=f"model-{target}")
    return {}


def run(ctx: Context, mlrun: RunLike) -> dict:
    return _run(ctx, mlrun, "gated_tent", random=False)


def run_random(ctx: Context, mlrun: RunLike) -> dict:
    return _run(ctx, mlrun, "gated_tent_random", random=True)


METHOD = Method("gated_tent", run, label_free=True, needs=lambda params: ("fedavg",),
                ablation="gated_tent_random")
ABLATION = Method("gated_tent_random", run_random, label_free=True,
                  needs=lambda params: ("fedavg",))
