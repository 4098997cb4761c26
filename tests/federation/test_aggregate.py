"""Aggregation maths against values worked out by hand."""

from __future__ import annotations

import pytest
import torch

from fedct.errors import FedctError
from fedct.federation.aggregate import (
    case_weights,
    server_step,
    site_weights,
    weighted_average,
)


def _state(w: list[float], b: float, n: int) -> dict[str, torch.Tensor]:
    return {"conv.weight": torch.tensor(w), "conv.bias": torch.tensor([b]),
            "bn.running_mean": torch.tensor([b, -b]),
            "bn.running_var": torch.tensor([1.0 + b, 2.0]),
            "bn.num_batches_tracked": torch.tensor(n)}


def test_case_weights_are_training_cases_over_their_sum() -> None:
    assert case_weights({"A": 1, "B": 3}) == {"A": 0.25, "B": 0.75}
    assert case_weights({"A": 0, "B": 2, "C": 2}) == {"A": 0.0, "B": 0.5, "C": 0.5}


def test_weighted_average_by_cases_with_hand_values() -> None:
    a = _state([1.0, 2.0], 0.0, 10)
    b = _state([3.0, 6.0], 4.0, 7)
    # 1 case at A, 3 at B: weights 1/4 and 3/4.
    out = weighted_average({"A": a, "B": b}, case_weights({"A": 1, "B": 3}))
    torch.testing.assert_close(out["conv.weight"], torch.tensor([2.5, 5.0]))  # .25*1+.75*3
    torch.testing.assert_close(out["conv.bias"], torch.tensor([3.0]))
    # Running statistics are averaged like weights.
    torch.testing.assert_close(out["bn.running_mean"], torch.tensor([3.0, -3.0]))
    torch.testing.assert_close(out["bn.running_var"], torch.tensor([4.0, 2.0]))  # .25*1+.75*5
    # The integer counter is the maximum, not a mean (which would be 7.75).
    assert out["bn.num_batches_tracked"].dtype == torch.int64
    assert int(out["bn.num_batches_tracked"]) == 10
    assert out["conv.weight"].dtype == torch.float32
    # The inputs are untouched.
    torch.testing.assert_close(a["conv.weight"], torch.tensor([1.0, 2.0]))


def test_arbitrary_weights_need_not_sum_to_one() -> None:
    s = [{"w": torch.tensor([[0.0, 10.0]])}, {"w": torch.tensor([[10.0, 0.0]])},
         {"w": torch.tensor([[5.0, 5.0]])}]
    # 2:1:1 -> 0.5, 0.25, 0.25
    out = weighted_average(s, [2.0, 1.0, 1.0])
    torch.testing.assert_close(out["w"], torch.tensor([[3.75, 6.25]]))
    assert site_weights({"A": 2.0, "B": 1.0, "C": 1.0}) == {"A": 0.5, "B": 0.25, "C": 0.25}
    # Zero weight: the site is ignored, for floats and for the integer maximum alike.
    ints = [{"n": torch.tensor([1, 9])}, {"n": torch.tensor([4, 2])}]
    assert weighted_average(ints, [1.0, 0.0])["n"].tolist() == [1, 9]
    assert weighted_average(ints, [1.0, 1.0])["n"].tolist() == [4, 9]


def test_float64_and_half_keep_their_dtype() -> None:
    s = [{"w": torch.tensor([1.0], dtype=torch.float16)},
         {"w": torch.tensor([2.0], dtype=torch.float16)}]
    out = weighted_average(s, [1, 1])
    assert out["w"].dtype == torch.float16 and float(out["w"]) == 1.5


@pytest.mark.parametrize(("states", "weights", "match"), [
    ([], [], "no states"),
    ([{"w": torch.ones(2)}], [1.0, 2.0], "2 weights for 1 states"),
    ([{"w": torch.ones(2)}, {"v": torch.ones(2)}], [1, 1], "other keys"),
    ([{"w": torch.ones(2)}, {"w": torch.ones(3)}], [1, 1], "'w' of state 1"),
    ([{"w": torch.ones(2)}, {"w": torch.ones(2, dtype=torch.float64)}], [1, 1], "float64"),
    ([{"w": torch.ones(2)}, {"w": torch.ones(2)}], [1, -1], ">= 0"),
    ([{"w": torch.ones(2)}, {"w": torch.ones(2)}], [0, 0], "all site weights are zero"),
    ([{"w": torch.ones(2)}, {"w": torch.ones(2)}], [1, float("nan")], "finite"),
])
def test_bad_input_is_refused_with_a_reason(states, weights, match) -> None:
    with pytest.raises(FedctError, match=match):
        weighted_average(states, weights)


def test_mapping_sites_must_match() -> None:
    with pytest.raises(FedctError, match="sites of the weights"):
        weighted_average({"A": {"w": torch.ones(1)}}, {"B": 1.0})
    with pytest.raises(FedctError, match="integers >= 0"):
        case_weights({"A": -1})
    with pytest.raises(FedctError, match="all site weights are zero"):
        case_weights({"A": 0, "B": 0})


def test_server_step_is_fedavg_at_lr_1_and_momentum_0() -> None:
    g = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    m = {"w": torch.tensor([2.0, 0.0]), "n": torch.tensor(5)}
    new, vel = server_step(g, m, None)
    assert torch.equal(new["w"], m["w"]) and int(new["n"]) == 5
    assert torch.equal(vel["w"], torch.tensor([1.0, -2.0])) and "n" not in vel


def test_server_step_momentum_by_hand() -> None:
    # Round 1: v = d1 = 1; w = 0 + 0.5 * 1 = 0.5.
    # Round 2: merged 1.5 -> d2 = 1.0; v = 0.9 * 1 + 1 = 1.9; w = 0.5 + 0.5 * 1.9 = 1.45.
    g = {"w": torch.tensor([0.0])}
    w1, v1 = server_step(g, {"w": torch.tensor([1.0])}, None, lr=0.5, momentum=0.9)
    assert w1["w"].item() == pytest.approx(0.5)
    w2, v2 = server_step(w1, {"w": torch.tensor([1.5])}, v1, lr=0.5, momentum=0.9)
    assert v2["w"].item() == pytest.approx(1.9)
    assert w2["w"].item() == pytest.approx(1.45)
    assert g["w"].item() == 0.0  # inputs untouched


@pytest.mark.parametrize("lr, momentum", [(0.0, 0.0), (-1.0, 0.0), (1.0, 1.0),
                                          (1.0, -0.1), (float("nan"), 0.0)])
def test_server_step_refuses_bad_settings(lr, momentum) -> None:
    g = {"w": torch.zeros(2)}
    with pytest.raises(FedctError, match="server step"):
        server_step(g, g, None, lr=lr, momentum=momentum)


def test_server_step_refuses_other_keys_or_shapes() -> None:
    with pytest.raises(FedctError, match="other keys"):
        server_step({"w": torch.zeros(2)}, {"v": torch.zeros(2)}, None)
    with pytest.raises(FedctError, match="'w'"):
        server_step({"w": torch.zeros(2)}, {"w": torch.zeros(3)}, None)
