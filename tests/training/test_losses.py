"""FedProx's proximal term against values worked out by hand."""

from __future__ import annotations

import pytest
import torch

from fedct.errors import FedctError
from fedct.training.losses import proximal_term


def test_proximal_term_value_and_gradient() -> None:
    w1 = torch.tensor([1.0, 2.0], requires_grad=True)
    w2 = torch.tensor([[3.0]], requires_grad=True)
    g1, g2 = torch.tensor([0.0, 0.0]), torch.tensor([[1.0]])
    # ||w - g||^2 = (1 + 4) + 4 = 9; mu = 0.1 -> 0.05 * 9 = 0.45
    term = proximal_term([w1, w2], [g1, g2], mu=0.1)
    assert term.dim() == 0 and term.requires_grad
    assert float(term.detach()) == pytest.approx(0.45)
    term.backward()
    # d/dw = mu * (w - g)
    torch.testing.assert_close(w1.grad, torch.tensor([0.1, 0.2]))
    torch.testing.assert_close(w2.grad, torch.tensor([[0.2]]))


def test_proximal_term_with_named_parameters_and_a_global_state() -> None:
    lin = torch.nn.Linear(2, 1)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -1.0]]))
        lin.bias.fill_(2.0)
    glob = {"weight": torch.tensor([[0.0, 0.0]]), "bias": torch.tensor([0.0])}
    term = proximal_term(lin.named_parameters(), glob, mu=2.0)
    assert float(term.detach()) == pytest.approx(6.0)  # 1 * (1 + 1 + 4)
    term.backward()
    torch.testing.assert_close(lin.bias.grad, torch.tensor([4.0]))
    assert float(proximal_term(lin.named_parameters(), glob, mu=0.0).detach()) == 0.0
    with pytest.raises(FedctError, match="mu must be"):
        proximal_term(lin.parameters(), list(glob.values()), mu=-1.0)
    with pytest.raises(FedctError, match="not in the global state"):
        proximal_term(lin.named_parameters(), {"weight": glob["weight"]}, mu=1.0)
