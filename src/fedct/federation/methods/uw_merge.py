"""``uw_merge``: per held-out target site, the local models merged with weights from their
MC-dropout uncertainty on the target's images (``label_free.target_uncertainty``,
``scores_to_weights``); in the spirit of FUNAvg / FedUAA / FIVA. One model per target."""

from __future__ import annotations

from fedct.errors import FedctError
from fedct.federation.label_free import merge_for_target, scores_to_weights, target_uncertainty
from fedct.federation.methods.base import Context, Method, RunLike
from fedct.model.io import WEIGHTS_FILE, load_model


def run(ctx: Context, mlrun: RunLike) -> dict:
    p, out = ctx.params, {}
    models = {s: m.to(ctx.device) for s, (m, _) in ctx.local_models().items()}
    for target, imgs in ctx.targets.items():
        scores = target_uncertainty(models, imgs, mc_samples=p.mc_samples,
                                    mc_batch=p.mc_batch, seed=p.seed, signal=p.uw_signal,
                                    aggregation=p.uw_aggregation, amp=ctx.amp)
        try:
            w = scores_to_weights(scores, p.uw_rule, p.uw_temperature,
                                  case_counts=ctx.n_train if p.weighting == "cases" else None)
        except ValueError as exc:
            raise FedctError(f"federate uw_merge, target {target}: {exc}") from exc
        merged = merge_for_target({s: m.state_dict() for s, m in models.items()}, w)
        model = load_model(ctx.models_dir / ctx.sites[0] / WEIGHTS_FILE)[0]
        model.load_state_dict({k: v.cpu() for k, v in merged.items()})
        card = ctx.card("uw_merge", ctx.here, target_site=target, clients=list(ctx.sites),
                        weights=w, scores=scores, signal=p.uw_signal)
        path = ctx.save(model, ctx.out_dir / "uw_merge" / target, card)
        ctx.tracker.log_model(mlrun, path.parent, artifact_path=f"model-{target}")
        mlrun.log_metrics({f"{target}.weight.{s}": v for s, v in w.items()})
        mlrun.log_metrics({f"{target}.score.{s}": v for s, v in scores.items()})
        out[f"uw_merge_weights_{target}"] = w
        ctx.log(f"federate uw_merge: target {target}, weights "
                + ", ".join(f"{s} {v:.2f}" for s, v in w.items()))
    return out


METHOD = Method("uw_merge", run, label_free=True)
