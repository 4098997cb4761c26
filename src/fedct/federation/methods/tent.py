"""``tent``: per held-out target site, the FedAvg model whose normalisation affine
parameters minimise the entropy of its predictions on the target's images
(``label_free.tent_adapt``). One model per target."""

from __future__ import annotations

from fedct.federation.label_free import tent_adapt
from fedct.federation.methods.base import Context, Method, RunLike
from fedct.model.io import load_model


def run(ctx: Context, mlrun: RunLike) -> dict:
    p = ctx.params
    for target, imgs in ctx.targets.items():
        teacher, start = load_model(ctx.model_path("fedavg"))
        adapted = tent_adapt(teacher.to(ctx.device), imgs, steps=p.tent_steps, lr=p.tent_lr,
                             seed=p.seed, amp=ctx.amp)
        card = ctx.card("tent", {**start.get("runtime", {}), **ctx.here}, target_site=target,
                        start="fedavg", steps=p.tent_steps, lr=p.tent_lr)
        path = ctx.save(adapted, ctx.out_dir / "tent" / target, card)
        ctx.tracker.log_model(mlrun, path.parent, artifact_path=f"model-{target}")
    mlrun.log_params({"tent_steps": p.tent_steps, "tent_lr": p.tent_lr})
    return {}


METHOD = Method("tent", run, label_free=True, needs=lambda params: ("fedavg",))
