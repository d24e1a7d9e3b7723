"""Hypergradients of every kind against central finite differences, in float64.

Each case starts a window from the same state -- weights and optimizer state after a few plain
steps, so momentum and Adam moments are already non-zero -- and compares the estimator's
d(valid loss)/d(log value) with (L(h + eps) - L(h - eps)) / (2 eps) for every scalar entry.
Through one step every estimator is exact; through many, the first-order one must point where the
exact unroll (itself checked against finite differences) points. With settling steps the values
are shifted on the window's first steps only.
"""

import itertools

import pytest
import torch

import hypermeta
from hypermeta._engine import build_run
from hypermeta._private.first_order import first_order_window
from hypermeta._private.greedy import greedy_window
from hypermeta._private.modes import validation_mode
from hypermeta._private.plain import plain_step
from hypermeta._private.unrolled import unrolled_window
from hypermeta._private.window import agreed
from tests.conftest import mlp

EPS = 1e-5
OPTIMIZERS = {"sgd": ({"momentum": 0.9}, 0.05), "adam": ({}, 0.005)}
# Every option of the inner optimizers, each an (optimizer, options, learning rate) set-up.
SETUPS = {
    "sgd": ("sgd", {}, 0.1),
    "sgd momentum": ("sgd", {"momentum": 0.9}, 0.05),
    "sgd dampening": ("sgd", {"momentum": 0.9, "dampening": 0.3}, 0.05),
    "sgd nesterov": ("sgd", {"momentum": 0.9, "nesterov": True}, 0.05),
    "adam": ("adam", {}, 0.005),
    "adam betas eps": ("adam", {"betas": (0.8, 0.99), "eps": 1e-4}, 0.005),
}
ESTIMATORS = {"unrolled": unrolled_window, "greedy": greedy_window, "first_order": first_order_window}


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


def _run(data, optimizer, case, shift=None, total=TOTAL):
    optimizer, options, lr = SETUPS[optimizer]
    run = build_run(
        mlp(dtype=torch.float64), data=data, steps=total, batch_size=16, optimizer=optimizer,
        optimizer_options=options, loss_fn=torch.nn.functional.cross_entropy,
        seed=0, valid_batch_size=64, **_case(case, lr),
    )
    return warmed_up(run, shift, warmup=WARMUP)


def warmed_up(run, shift, *, warmup: int):
    """``run`` after ``warmup`` plain steps, one hyperparameter entry shifted by ``shift = (leaf, index, delta)``."""
    for step in range(warmup):
        plain_step(run.model, run.optimizer, run.hyper, run.loss_fn, run.train_batches.next(), step)
    if shift is not None:
        tensor, index, delta = shift
        with torch.no_grad():
            run.hyper.tensors()[tensor].view(-1)[index] += delta
    return run


def _finite_differences(data, optimizer, case, window, n_steps):
    """Of the run that ``window`` trains: the estimators' own plain steps must be the unroll's."""
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


@pytest.mark.parametrize("optimizer", ["sgd momentum", "adam"])
@pytest.mark.parametrize("case", CASES)
def test_unrolled_matches_finite_differences(small_digits, optimizer, case):
    n_steps = 6
    window = unrolled_window(_run(small_digits, optimizer, case), WARMUP, n_steps)
    expected = _finite_differences(small_digits, optimizer, case, unrolled_window, n_steps)
    _assert_close(window.hypergradients, expected)


@pytest.mark.parametrize("estimator", sorted(ESTIMATORS))
@pytest.mark.parametrize("optimizer", sorted(SETUPS))
@pytest.mark.parametrize("case", CASES)
def test_one_step_matches_finite_differences(small_digits, estimator, optimizer, case):
    """With K = 1 every estimate is exact: the weights and state before the step do not depend on it."""
    window = ESTIMATORS[estimator](_run(small_digits, optimizer, case), WARMUP, 1)
    expected = _finite_differences(small_digits, optimizer, case, ESTIMATORS[estimator], 1)
    _assert_close(window.hypergradients, expected)


LONG = 20


def _long_window(data, optimizer, window, case="per-group weight decay"):
    return window(_run(data, optimizer, case, total=WARMUP + LONG), WARMUP, LONG)


@pytest.mark.parametrize("optimizer", sorted(set(SETUPS) - {"sgd"}))
def test_first_order_points_where_the_unroll_points(small_digits, optimizer):
    """At K = 20 the first-order estimate keeps what flows through the optimizer state.

    Cosine with the exact unroll over the per-group learning rates and weight decays, for each kind
    separately.
    """
    exact = _long_window(small_digits, optimizer, unrolled_window).hypergradients
    first_order = _long_window(small_digits, optimizer, first_order_window).hypergradients
    for kind, want, got in zip(("lr", "weight decay"), exact, first_order, strict=True):
        cosine = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0)
        assert cosine >= 0.95, f"{kind}: cosine {cosine:.3f}, first-order {got} vs exact {want}"


def test_first_order_is_greedy_without_optimizer_state(small_digits):
    """Plain SGD without weight decay has nothing to carry: both drop only the training Hessian.

    (With weight decay the first-order estimate also keeps the decay term's own Hessian, wd * I.)
    """
    first_order = _long_window(small_digits, "sgd", first_order_window, "per-group lr").hypergradients
    greedy = _long_window(small_digits, "sgd", greedy_window, "per-group lr").hypergradients
    for got, want in zip(first_order, greedy, strict=True):
        torch.testing.assert_close(got, want)


def _settled_finite_differences(data, optimizer, case, n_steps, settle):
    """Plain steps with one entry shifted, then ``settle`` plain steps at the unshifted values."""

    def valid_loss(t, index, delta):
        run = _run(data, optimizer, case, (t, index, delta))
        steps = iter(range(WARMUP, WARMUP + n_steps))
        for step in itertools.islice(steps, n_steps - settle):
            plain_step(run.model, run.optimizer, run.hyper, run.loss_fn, run.train_batches.next(), step)
        with torch.no_grad():
            run.hyper.tensors()[t].view(-1)[index] -= delta
        for step in steps:
            plain_step(run.model, run.optimizer, run.hyper, run.loss_fn, run.train_batches.next(), step)
        x, y = run.valid_batches.next()
        with validation_mode(run.model):
            return run.loss_fn(run.model(x), y).detach()

    tensors = _run(data, optimizer, case).hyper.tensors()
    return [
        torch.stack([(valid_loss(t, i, EPS) - valid_loss(t, i, -EPS)) / (2 * EPS) for i in range(tensor.numel())])
        .view_as(tensor)
        for t, tensor in enumerate(tensors)
    ]


@pytest.mark.parametrize("optimizer", ["sgd momentum", "adam"])
@pytest.mark.parametrize("case", CASES)
def test_unrolled_with_settling_steps_moves_only_where_both_exact_hypergradients_agree(small_digits, optimizer, case):
    """The window over steps 3..8 settles on 7..8: in the segments case the middle segment spans both."""
    n_steps, settle = 6, 2
    window = unrolled_window(_run(small_digits, optimizer, case), WARMUP, n_steps, settle=settle)
    whole = _finite_differences(small_digits, optimizer, case, unrolled_window, n_steps)
    settled = _settled_finite_differences(small_digits, optimizer, case, n_steps, settle)
    _assert_close(window.hypergradients, whole)
    _assert_close(window.settled, settled)
    expected = agreed(whole, settled)
    assert any(bool((e != 0).any()) for e in expected)
    for got, want, one, other in zip(window.moves, expected, whole, settled, strict=True):
        assert torch.equal(got == 0, want == 0), f"moved {got}, expected {want} (whole {one}, settled {other})"
    _assert_close([g[g != 0] for g in window.moves], [e[e != 0] for e in expected])


@pytest.mark.parametrize("optimizer", sorted(set(SETUPS) - {"sgd"}))
def test_first_order_with_settling_steps_points_where_the_unroll_points(small_digits, optimizer):
    """K = 20 with the last 10 steps settling: the settled estimates, each kind separately."""
    run = lambda: _run(small_digits, optimizer, "per-group weight decay", total=WARMUP + LONG)  # noqa: E731
    exact = unrolled_window(run(), WARMUP, LONG, settle=LONG // 2).settled
    first_order = first_order_window(run(), WARMUP, LONG, settle=LONG // 2).settled
    for kind, want, got in zip(("lr", "weight decay"), exact, first_order, strict=True):
        cosine = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0)
        assert cosine >= 0.95, f"{kind}: cosine {cosine:.3f}, first-order {got} vs exact {want}"


def test_greedy_and_first_order_agree_with_settling_steps_on_plain_sgd(small_digits):
    """Plain SGD carries nothing through the optimizer state: the two estimates are the same."""
    run = lambda: _run(small_digits, "sgd", "per-group lr", total=WARMUP + LONG)  # noqa: E731
    greedy = greedy_window(run(), WARMUP, LONG, settle=5)
    first_order = first_order_window(run(), WARMUP, LONG, settle=5)
    for estimate in ("hypergradients", "settled"):
        for got, want in zip(getattr(greedy, estimate), getattr(first_order, estimate), strict=True):
            torch.testing.assert_close(got, want)
    assert not torch.allclose(greedy.settled[0], greedy.hypergradients[0])


def test_unrolled_hypergradient_only_reaches_segments_the_window_used(small_digits):
    run = _run(small_digits, "sgd", "schedule segments")
    (grad,) = unrolled_window(run, WARMUP, 1).hypergradients  # step 3: segment 0 only
    assert grad[0].abs().item() > 0
    assert grad[1:].abs().sum().item() == 0
