"""Hypergradients of every kind against central finite differences, in float64.

Each case starts a window from the same state -- weights and optimizer state after a few plain
steps, so momentum and Adam moments are already non-zero -- and compares the estimator's
d(valid loss)/d(log value) with (L(h + eps) - L(h - eps)) / (2 eps) for every scalar entry.
"""

import pytest
import torch

import hypermeta
from hypermeta._engine import build_run
from hypermeta._private.greedy import greedy_window
from hypermeta._private.plain import plain_step
from hypermeta._private.unrolled import unrolled_window
from tests.conftest import mlp

EPS = 1e-5
OPTIMIZERS = {"sgd": ({"momentum": 0.9}, 0.05), "adam": ({}, 0.005)}


def _case(name: str, lr: float) -> dict:
    per_group = "per-group" in name
    case = {
        "learning_rate": hypermeta.LearningRate(
            init=lr, scope="per_group" if per_group else "global", segments=3 if "segment" in name else 1
        )
    }
    if "weight decay" in name:
        case["weight_decay"] = hypermeta.WeightDecay(init=0.01, scope="per_group" if per_group else "global")
    return case


CASES = ["global lr", "per-group lr", "schedule segments", "global weight decay", "per-group weight decay"]
WARMUP = 3
TOTAL = 12  # with 3 segments of 4 steps, a window over steps 3..8 crosses two boundaries


def _run(data, optimizer, case, shift=None):
    options, lr = OPTIMIZERS[optimizer]
    run = build_run(
        mlp(dtype=torch.float64), data=data, steps=TOTAL, batch_size=16, optimizer=optimizer,
        optimizer_options=options, loss_fn=torch.nn.functional.cross_entropy,
        seed=0, valid_batch_size=64, **_case(case, lr),
    )
    for step in range(WARMUP):
        plain_step(run.model, run.optimizer, run.hyper, run.loss_fn, run.train_batches.next(), step)
    if shift is not None:
        tensor, index, delta = shift
        with torch.no_grad():
            run.hyper.tensors()[tensor].view(-1)[index] += delta
    return run


def _finite_differences(data, optimizer, case, window, n_steps):
    reference = _run(data, optimizer, case)
    estimates = []
    for t, tensor in enumerate(reference.hyper.tensors()):
        flat = []
        for index in range(tensor.numel()):
            up = window(_run(data, optimizer, case, (t, index, EPS)), WARMUP, n_steps).valid_loss
            down = window(_run(data, optimizer, case, (t, index, -EPS)), WARMUP, n_steps).valid_loss
            flat.append((up - down) / (2 * EPS))
        estimates.append(torch.stack(flat).view_as(tensor))
    return estimates


def _assert_close(estimated, expected):
    for got, want in zip(estimated, expected, strict=True):
        assert torch.isfinite(got).all()
        error = (got - want).norm() / want.norm()
        assert error <= 1e-4, f"relative error {error:.2e}: {got} vs {want}"


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("case", CASES)
def test_unrolled_matches_finite_differences(small_digits, optimizer, case):
    n_steps = 6
    window = unrolled_window(_run(small_digits, optimizer, case), WARMUP, n_steps)
    expected = _finite_differences(small_digits, optimizer, case, unrolled_window, n_steps)
    _assert_close(window.hypergradients, expected)


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("case", ["per-group lr", "per-group weight decay"])
def test_greedy_one_step_matches_finite_differences(small_digits, optimizer, case):
    """With K = 1 the first-order estimate is exact: the weights before the step do not depend on it."""
    window = greedy_window(_run(small_digits, optimizer, case), WARMUP, 1)
    expected = _finite_differences(small_digits, optimizer, case, greedy_window, 1)
    _assert_close(window.hypergradients, expected)


def test_unrolled_hypergradient_only_reaches_segments_the_window_used(small_digits):
    run = _run(small_digits, "sgd", "schedule segments")
    (grad,) = unrolled_window(run, WARMUP, 1).hypergradients  # step 3: segment 0 only
    assert grad[0].abs().item() > 0
    assert grad[1:].abs().sum().item() == 0
