"""``uw_select``: per held-out target site, the candidate of ``federate.select_from`` with
the lowest MC-dropout uncertainty (``federate.uw_signal``) on the target's images: the
model a site without ground truth would deploy. A copy of the chosen model per target."""

from __future__ import annotations

from fedct.errors import FedctError
from fedct.federation.label_free import select_by_uncertainty, target_uncertainty
from fedct.federation.methods.base import Context, Method, RunLike
from fedct.model.io import load_model


def run(ctx: Context, mlrun: RunLike) -> dict:
    p, out = ctx.params, {}
    mlrun.log_params({"select_from": list(p.select_from), "signal": p.uw_signal})
    for target, imgs in ctx.targets.items():
        paths = {m: ctx.model_path(m, target) for m in p.select_from}
        models = {m: load_model(path)[0].to(ctx.device) for m, path in paths.items()}
        scores = target_uncertainty(models, imgs, mc_samples=p.mc_samples,
                                    mc_batch=p.mc_batch, seed=p.seed, signal=p.uw_signal,
                                    aggregation=p.uw_aggregation, amp=ctx.amp)
        try:
            chosen = select_by_uncertainty(scores)
        except ValueError as exc:
            raise FedctError(f"federate uw_select, target {target}: {exc}") from exc
        model, src_card = load_model(paths[chosen])
        # The weights are the chosen model's; the choice (MC dropout) is here.
        card = ctx.card("uw_select", {**src_card.get("runtime", {}), **ctx.here},
                        target_site=target, chosen=chosen, scores=scores, signal=p.uw_signal,
                        chosen_card={k: src_card.get(k) for k in
                                     ("method", "target_site", "clients")})
        path = ctx.save(model, ctx.out_dir / "uw_select" / target, card)
        ctx.tracker.log_model(mlrun, path.parent, artifact_path=f"model-{target}")
        mlrun.log_metrics({f"{target}.score.{m}": v for m, v in scores.items()})
        mlrun.set_tags({f"fedct.chosen.{target}": chosen})
        out[f"uw_select_{target}"] = {"chosen": chosen, "scores": scores}
        ctx.log(f"federate uw_select: target {target}, {chosen} (scores "
                + ", ".join(f"{m} {v:.4f}" for m, v in scores.items()) + ")")
    return out


METHOD = Method("uw_select", run, label_free=True,
                needs=lambda params: tuple(params.select_from))
