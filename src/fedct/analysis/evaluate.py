"""One model on the evaluation cases with MC dropout: the per-structure records, with the
case-level baselines (one deterministic pass, an image noise estimate) beside them."""

from __future__ import annotations

import torch
from tqdm import tqdm

from fedct.analysis.baselines import deterministic_max_softmax, noise_estimate
from fedct.analysis.failure import case_records
from fedct.data.cases import case_path, load_case
from fedct.data.labels import parse_labels
from fedct.devices import pick_device
from fedct.model.io import load_model
from fedct.model.mc import mc_predict


def evaluate_model(args: tuple) -> list[dict]:
    """All evaluation cases under one model (runs in a worker process)."""
    model_path, cohort_dir, evaluate, params, threads, position = args
    torch.set_num_threads(threads)
    device = pick_device(params.device)
    model, card = load_model(model_path)
    model.to(device)
    labels = parse_labels(card["labels"], f"{model_path}: model card")
    prep = card["preprocessing"]
    spacing = tuple(prep["spacing_mm"])
    rows: list[dict] = []
    for _, case in tqdm(evaluate.iterrows(), total=len(evaluate), position=position,
                        desc=f"uncertainty: model {card['site']}", leave=False):
        data = load_case(case_path(cohort_dir, case["series_key"]))
        image = torch.as_tensor(data["image"])
        probs = mc_predict(model, image, params.mc_samples,
                           params.mc_batch, amp=device.type == "cuda", seed=params.seed,
                           output_device="cpu").float()
        label = data.get("label") if bool(case["has_label"]) else None
        records = case_records(card["site"], case, probs, label, card["reference_ml"],
                               spacing, labels)
        # Baselines of the same pair: one deterministic pass, and an image statistic.
        with torch.inference_mode():
            single = torch.softmax(model.eval()(image[None].to(device)).float(), 1)[0].cpu()
        extra = {"deterministic_max_softmax": deterministic_max_softmax(single),
                 "noise_estimate": noise_estimate(data["image"], prep["hu_min"],
                                                  prep["hu_max"])}
        rows.extend({**r, **extra} for r in records)
    return rows
