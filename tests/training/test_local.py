"""Local updates of a federated round: the training loop's step, seeded, FedProx-anchored."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedct.errors import FedctError
from fedct.model.factory import build_model
from fedct.training.local import local_update, round_seed
from fedct.training.loop import train_model
from tests.training.test_loop import LABELS, PARAMS, _cases


def _distance(a: dict, b: dict) -> float:
    return sum(float((a[k].float() - b[k].float()).pow(2).sum()) for k in a
               if a[k].is_floating_point())


def _fresh(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(PARAMS, LABELS)


def test_update_equals_the_training_loop_on_the_same_schedule() -> None:
    # Without dropout both draw no other random numbers: the same batches, loss, optimiser
    # and learning rates must give the same weights.
    params = dataclasses.replace(PARAMS, dropout=0.0, steps=5)
    loop_model, _ = train_model(params, LABELS, _cases(4), [], None, "fp")
    torch.manual_seed(params.seed)
    model = build_model(params, LABELS)
    state, metrics = local_update(model, _cases(4), params, steps=5, round_seed=params.seed,
                                  total_steps=5)
    for k, v in loop_model.state_dict().items():
        torch.testing.assert_close(state[k], v, msg=k)
    assert metrics["steps"] == 5 and metrics["n_cases"] == 4 and metrics["loss"] > 0


def test_update_is_seeded_by_the_round_seed_and_starts_from_the_global_state() -> None:
    glob = _fresh(1).state_dict()
    seed = round_seed(5, 2, "A")
    a, _ = local_update(_fresh(7), _cases(4), PARAMS, 3, seed, global_state=glob)
    b, _ = local_update(_fresh(8), _cases(4), PARAMS, 3, seed, global_state=glob)
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)  # other start model, same global
    c, _ = local_update(_fresh(7), _cases(4), PARAMS, 3, round_seed(5, 3, "A"),
                        global_state=glob)
    assert _distance(a, c) > 0
    assert len({round_seed(5, 2, "A"), round_seed(5, 2, "B"), round_seed(5, 3, "A"),
                round_seed(6, 2, "A")}) == 4
    # The caller's global RNG is left as it was.
    model = _fresh(7)
    torch.manual_seed(3)
    expected = torch.rand(1)
    torch.manual_seed(3)
    local_update(model, _cases(2), PARAMS, 1, seed, global_state=glob)
    assert torch.equal(torch.rand(1), expected)


def test_proximal_term_keeps_the_update_near_the_global_weights() -> None:
    glob = _fresh(1).state_dict()
    params = dataclasses.replace(PARAMS, learning_rate=3e-2)
    free, _ = local_update(_fresh(), _cases(4), params, 6, 11, global_state=glob, mu=0.0)
    prox, _ = local_update(_fresh(), _cases(4), params, 6, 11, global_state=glob, mu=50.0)
    assert 0 < _distance(prox, glob) < 0.5 * _distance(free, glob)


def test_schedule_position_sets_the_learning_rate() -> None:
    glob = _fresh(1).state_dict()
    _, early = local_update(_fresh(), _cases(2), PARAMS, 1, 1, glob, start_step=0,
                            total_steps=20)
    _, late = local_update(_fresh(), _cases(2), PARAMS, 1, 1, glob, start_step=18,
                           total_steps=20)
    _, const = local_update(_fresh(), _cases(2), PARAMS, 1, 1, glob)
    assert late["lr_last"] < early["lr_last"] < PARAMS.learning_rate
    assert const["lr_last"] == PARAMS.learning_rate


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(FedctError, match="steps must be"):
        local_update(_fresh(), _cases(2), PARAMS, 0, 1)
    with pytest.raises(FedctError, match="no training cases"):
        local_update(_fresh(), [], PARAMS, 1, 1)
    with pytest.raises(FedctError, match="a start >= 0"):
        local_update(_fresh(), _cases(2), PARAMS, 1, 1, start_step=-1, total_steps=5)


def test_rounds_past_the_schedule_train_at_its_end_value() -> None:
    # train.schedule_steps below the federation's cap: later rounds hold the end rate.
    glob = _fresh(1).state_dict()
    params = dataclasses.replace(PARAMS, final_div_factor=4.0)
    end = params.learning_rate / 25 / 4
    for start in (19, 20, 35):
        _, info = local_update(_fresh(), _cases(2), params, 2, 1, glob, start_step=start,
                               total_steps=20)
        assert info["lr_last"] == pytest.approx(end)
    _, before = local_update(_fresh(), _cases(2), params, 1, 1, glob, start_step=17,
                             total_steps=20)
    assert before["lr_last"] > end


def test_a_given_loss_replaces_dice_ce() -> None:
    glob = _fresh(1).state_dict()
    seen: list[tuple] = []

    def loss(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        seen.append((tuple(logits.shape), tuple(label.shape)))
        return logits.sum() * 0 + 7.0

    _, m = local_update(_fresh(), _cases(2), PARAMS, 2, 1, glob, loss_fn=loss)
    assert m["loss"] == 7.0 and seen == [((2, 3, 16, 16, 8), (2, 1, 16, 16, 8))] * 2


def _mean_step(a: dict, b: dict) -> float:
    """Mean absolute change of the floating-point weights from ``a`` to ``b``."""
    diffs = [(b[k].float() - a[k].float()).abs().flatten() for k in a
             if a[k].is_floating_point() and a[k].numel() > 1]
    return float(torch.cat(diffs).mean())


def test_a_site_optimiser_store_carries_adamw_across_rounds() -> None:
    params = dataclasses.replace(PARAMS, dropout=0.0, learning_rate=1e-2)
    glob = _fresh(1).state_dict()
    store: dict = {}
    r1, _ = local_update(_fresh(), _cases(4), params, 4, 1, global_state=glob,
                         opt_store=store)
    steps = {int(v["step"]) for v in store["optimizer"]["state"].values()}
    assert steps == {4}
    # The next round resumes the moments: one step moves the weights less than a fresh
    # AdamW, whose bias-corrected first step moves every weight by about the learning rate.
    carried, _ = local_update(_fresh(), _cases(4), params, 1, 2, global_state=r1,
                              opt_store=store)
    fresh, _ = local_update(_fresh(), _cases(4), params, 1, 2, global_state=r1)
    assert {int(v["step"]) for v in store["optimizer"]["state"].values()} == {5}
    assert _mean_step(r1, fresh) > 0.5 * params.learning_rate
    assert _mean_step(r1, carried) < 0.5 * _mean_step(r1, fresh)
    # A store that does not fit the model is an error, not a silent fresh start.
    wrong = dataclasses.replace(params, channels=(6, 8))
    with pytest.raises(FedctError, match="optimiser state"):
        local_update(build_model(wrong, LABELS), _cases(2), wrong, 1, 1, opt_store=store)
