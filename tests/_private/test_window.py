import math

import pytest
import torch

from hypermeta._private.diffopt import safe_sqrt
from hypermeta._private.window import Window, nothing


def _window(train=1.0, valid=1.0, grad=0.0):
    return Window(
        train_loss=torch.tensor(train), valid_loss=torch.tensor(valid), hypergradients=[torch.tensor([grad])],
        commit=nothing, rollback=nothing,
    )


@pytest.mark.parametrize(
    ("window", "problem"),
    [
        (_window(), None),
        (_window(train=math.nan), "training loss is not finite"),
        (_window(valid=math.inf), "validation loss is not finite"),
        (_window(valid=50.0), "validation loss 50 exceeds the limit 10"),
        (_window(grad=math.nan), "hypergradient is not finite"),
        (_window(grad=-math.inf), "hypergradient is not finite"),
    ],
)
def test_window_problem_names_what_went_wrong(window, problem):
    assert window.problem(10.0) == problem


def test_safe_sqrt_has_a_zero_gradient_at_zero():
    x = torch.tensor([0.0, 4.0], requires_grad=True)
    (grad,) = torch.autograd.grad(safe_sqrt(x).sum(), x)
    assert grad.tolist() == [0.0, 0.25]
    assert safe_sqrt(x).tolist() == [0.0, 2.0]
