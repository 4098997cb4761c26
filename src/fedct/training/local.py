"""A site's local update in a federated round: ``steps`` optimiser steps from given weights.

The same batches (random crops, flips, intensity jitter), loss (Dice + CE), optimiser
(AdamW) and training step as :func:`fedct.training.loop.train_model`; only the length and
the starting weights differ. Every random draw is seeded by ``round_seed`` (see
:func:`round_seed`: a function of the federation seed, the round and the site), so a round
re-run after a crash reproduces the same update.

Learning rate: with ``total_steps`` the one-cycle schedule of ``train_model`` is laid over
the whole federation (``total_steps`` = rounds x local steps, or ``train.schedule_steps``
when set) and this update takes its steps ``start_step .. start_step + steps - 1`` (past
the schedule's end, its end value), so a federation sees the learning rates a pooled model
of the same length would; without it, the constant ``params.learning_rate``.
Optimiser state: by default the AdamW moments start afresh each round. With
``opt_store`` (a dict the caller keeps at the site between rounds) the update resumes from
the moments its previous round left there and leaves its own: a stateful client, whose
optimiser state never leaves the site (only the weights travel). A fresh AdamW's first
steps move every weight by about the learning rate whatever its gradient's size (bias
correction), which looked as if it undid part of each merged model; measured on
development seeds it does not help FedAvg (``benchmarks/federation.py --setting
state:client_state=1``: held-out Dice 0.618 against 0.650, README), so the pipeline's
clients start afresh and the store serves that comparison.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch

from fedct.config import TrainParams
from fedct.devices import pick_device, use_amp
from fedct.errors import FedctError
from fedct.training.loop import (
    check_shapes,
    make_loss,
    make_optimizer,
    one_cycle,
    train_step,
    training_batches,
)
from fedct.training.losses import proximal_term


def _load_optimizer(opt: torch.optim.Optimizer, saved: dict) -> None:
    """Load ``saved`` into ``opt``; a state of another model is an error, not a crash later.

    ``Optimizer.load_state_dict`` checks only the number of parameters, so every moment's
    shape is compared with its parameter's too.
    """
    params = [p for g in opt.param_groups for p in g["params"]]
    try:
        ids = [i for g in saved["param_groups"] for i in g["params"]]
        shapes_ok = len(ids) == len(params) and all(
            tuple(saved["state"][i]["exp_avg"].shape) == tuple(p.shape)
            for i, p in zip(ids, params, strict=True) if i in saved["state"])
        if not shapes_ok:
            raise ValueError("parameter shapes differ")
        opt.load_state_dict(saved)
    except (ValueError, KeyError, TypeError) as exc:
        raise FedctError(f"local update: the site's saved optimiser state does not fit "
                         f"the model ({exc})") from exc


def round_seed(seed: int, server_round: int, site: str) -> int:
    """The seed of ``site``'s update in ``server_round`` of a federation seeded ``seed``."""
    key = f"{int(seed)}/{int(server_round)}/{site}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "little")


def local_update(model: torch.nn.Module, train_cases: list[dict], params: TrainParams,
                 steps: int, round_seed: int,
                 global_state: dict[str, torch.Tensor] | None = None, mu: float = 0.0,
                 start_step: int = 0, total_steps: int | None = None,
                 loss_fn: Callable | None = None, opt_store: dict | None = None
                 ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Train ``model`` for ``steps`` steps on ``train_cases``; its new state and metrics.

    ``global_state`` (optional) is loaded first; the weights the update starts from are the
    global weights, and ``mu > 0`` adds FedProx's proximal term ``mu / 2 * ||w - w_g||^2``
    to every step's loss. ``train_cases`` are dicts with ``image`` float32 (1, X, Y, Z) and
    ``label`` uint8 (1, X, Y, Z), as ``fedct.data.cases.load_case`` returns them.
    ``loss_fn(logits, label)`` replaces the training loop's Dice + CE (e.g. a loss that
    ignores unlabelled voxels of pseudo-labelled cases). ``opt_store`` (optional): the
    site's optimiser state between rounds; its ``"optimizer"`` entry, when present, is
    loaded before the first step and replaced by the state after the last.

    Returns the state dict (CPU tensors) and ``{"loss": mean data loss over the steps,
    "steps", "n_cases", "seconds", "lr_last"}``. ``model`` is trained in place.
    """
    if steps < 1:
        raise FedctError(f"local update: steps must be >= 1, got {steps}")
    if not train_cases:
        raise FedctError("local update: no training cases")
    if start_step < 0 or (total_steps is not None and total_steps < 1):
        raise FedctError(f"local update: start step {start_step} and a schedule of "
                         f"{total_steps} steps: a start >= 0 and a schedule >= 1 step")
    check_shapes(params, [c["image"].shape[1:] for c in train_cases])
    device = pick_device(params.device)
    amp = use_amp(device, params.amp)
    if global_state is not None:
        model.load_state_dict(global_state)
    model.to(device)
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    penalty = (lambda: proximal_term(model.named_parameters(), anchor, mu)) if mu > 0 else None
    opt = make_optimizer(model, params)
    if opt_store is not None and opt_store.get("optimizer") is not None:
        _load_optimizer(opt, opt_store["optimizer"])
    sched, total = (one_cycle(opt, params, total_steps) if total_steps is not None
                    else (None, 0))
    if sched is not None:
        with warnings.catch_warnings():  # fast-forwarding before any optimiser step
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(min(start_step, total - 1)):
                sched.step()
    loss_fn = make_loss() if loss_fn is None else loss_fn
    t0 = time.perf_counter()
    losses = []
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(round_seed)  # dropout masks
        batches = training_batches(train_cases, dataclasses.replace(params, seed=round_seed), 0)
        for i in range(steps):
            losses.append(train_step(model, opt, next(batches), loss_fn, device, amp, penalty))
            if sched is not None and start_step + i + 1 < total:
                sched.step()
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if opt_store is not None:
        # A copy: the next round's optimiser updates the moments it loads in place.
        opt_store["optimizer"] = copy.deepcopy(opt.state_dict())
    return state, {"loss": float(np.mean(losses)), "steps": float(steps),
                   "n_cases": float(len(train_cases)),
                   "seconds": time.perf_counter() - t0, "lr_last": opt.param_groups[0]["lr"]}
