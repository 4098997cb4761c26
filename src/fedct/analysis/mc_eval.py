"""One model on the evaluation cases with MC dropout: the per-structure records, with the
case-level baselines (one deterministic pass, an image noise estimate) beside them.
``evaluate_models`` runs it for many models (the uncertainty and evaluate stages);
``score_models`` also returns the SHA-256 of each weights file as loaded (checked
against its card by ``fedct.model.io.load_model``)."""

from __future__ import annotations

import multiprocessing
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm import tqdm

from fedct.analysis.baselines import deterministic_max_softmax, noise_estimate
from fedct.analysis.failure import case_records
from fedct.data.cases import case_path, load_case
from fedct.data.labels import parse_labels
from fedct.devices import pick_device
from fedct.model.io import DIGEST_KEY, card_amp, load_model
from fedct.model.mc import mc_predict


def evaluate_model(args: tuple) -> tuple[str, list[dict]]:
    """All evaluation cases under one model (runs in a worker process): the SHA-256 of
    the weights it loaded, and the records."""
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
                           params.mc_batch, amp=card_amp(card), seed=params.seed,
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
    return card[DIGEST_KEY], rows


def evaluate_models(params: Any, cohort_dir: Path, model_paths: Sequence[Path],
                    cases: pd.DataFrame | Sequence[pd.DataFrame], device: torch.device,
                    names: Sequence[str] | None = None, desc: str = "uncertainty"
                    ) -> pd.DataFrame:
    """``evaluate_model`` for every model: one per-structure record table (the table of
    ``score_models``)."""
    return score_models(params, cohort_dir, model_paths, cases, device, names, desc)[0]


def score_models(params: Any, cohort_dir: Path, model_paths: Sequence[Path],
                 cases: pd.DataFrame | Sequence[pd.DataFrame], device: torch.device,
                 names: Sequence[str] | None = None, desc: str = "uncertainty"
                 ) -> tuple[pd.DataFrame, list[str]]:
    """``evaluate_model`` for every model: one per-structure record table, and the
    SHA-256 of each model's weights as loaded (in ``model_paths`` order).

    ``params`` needs ``mc_samples``, ``mc_batch``, ``seed``, ``workers`` and ``device``.
    ``cases``: the cohort rows every model is evaluated on, or one such table per model
    (e.g. a model adapted to one target site, on that site's cases only). ``names`` (one
    per model) replaces the ``model`` column, which is otherwise the card's ``site``. On
    CPU, one process per model with one thread each keeps the cores busy through the
    metric code as well; on a GPU one process owns the device.
    """
    if names is not None and len(names) != len(model_paths):
        raise ValueError(f"need one name per model, got {len(names)} for {len(model_paths)}")
    per_model = [cases] * len(model_paths) if isinstance(cases, pd.DataFrame) else list(cases)
    if len(per_model) != len(model_paths):
        raise ValueError(f"need one case table per model, got {len(per_model)} for "
                         f"{len(model_paths)}")
    workers = 1 if device.type == "cuda" else max(1, min(params.workers, len(model_paths)))
    threads = max(1, torch.get_num_threads() // workers)
    jobs = [(mp, cohort_dir, c, params, threads, i % workers + 1)
            for i, (mp, c) in enumerate(zip(model_paths, per_model, strict=True))]
    if workers > 1:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            results = list(tqdm(pool.map(evaluate_model, jobs), total=len(jobs),
                                desc=f"{desc}: models", position=0))
    else:
        results = [evaluate_model(j) for j in tqdm(jobs, desc=f"{desc}: models")]
    digests = [digest for digest, _ in results]
    results = [rows for _, rows in results]
    if names is not None:
        results = [[{**r, "model": name} for r in rows]
                   for name, rows in zip(names, results, strict=True)]
    return pd.DataFrame([r for rows in results for r in rows]), digests
