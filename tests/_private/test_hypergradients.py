"""Hypergradients of every kind against central finite differences, in float64.

Each case starts a window from the same state -- weights and optimizer state after a few plain
steps, so momentum and Adam moments are already non-zero -- and compares the estimator's
d(valid loss)/d(log value) with (L(h + eps) - L(h - eps)) / (2 eps) for every scalar entry.
Through one step every estimator is exact; through many, the first-order one must point where the
exact unroll (itself checked against finite differences) points, and across windows it adds the
carried tangents of the earlier ones.
"""

import pytest
import torch

import hypermeta
from hypermeta._engine import build_run
from hypermeta._private.first_order import first_order_window
from hypermeta._private.greedy import greedy_window
from hypermeta._private.modes import validation_mode
from hypermeta._private.plain import plain_step
from hypermeta._private.unrolled import unrolled_window
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
    """At K = 20, one window with nothing carried: every learning rate and weight decay of the
    first-order estimate has the sign of the exact unroll's (the meta-optimizer uses only signs)."""
    exact = _long_window(small_digits, optimizer, unrolled_window).hypergradients
    first_order = _long_window(small_digits, optimizer, first_order_window).hypergradients
    for kind, want, got in zip(("lr", "weight decay"), exact, first_order, strict=True):
        assert torch.equal(torch.sign(got), torch.sign(want)), f"{kind}: first-order {got} vs exact {want}"


def test_first_order_is_greedy_without_optimizer_state(small_digits):
    """Plain SGD without weight decay has nothing to carry: both drop only the training Hessian,
    and the first-order tangent of a learning rate is the window's displacement."""
    first_order = _long_window(small_digits, "sgd", first_order_window, "per-group lr").hypergradients
    greedy = _long_window(small_digits, "sgd", greedy_window, "per-group lr").hypergradients
    for got, want in zip(first_order, greedy, strict=True):
        torch.testing.assert_close(got, want)


def _recording_valid_batches(run):
    """Record the validation batches ``run`` draws."""
    drawn, draw = [], run.valid_batches.next

    def next_batch():
        drawn.append(draw())
        return drawn[-1]

    run.valid_batches.next = next_batch
    return drawn


def _valid_gradient(run, batch):
    with validation_mode(run.model):
        loss = run.loss_fn(run.model(batch[0]), batch[1])
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(run.model.parameters()))])


def _flat(run):
    return torch.cat([p.detach().flatten() for p in run.model.parameters()])


@pytest.mark.parametrize("optimizer", ["sgd momentum", "adam"])
def test_first_order_carries_the_earlier_windows_tangents(small_digits, optimizer):
    """Window 3..8 then 8..13: the second one's learning-rate hypergradient is the validation gradient
    against its own displacement plus the first window's, weighted (8 / 13) ** 2."""
    carried = _run(small_digits, optimizer, "global lr", total=20)
    fresh = _run(small_digits, optimizer, "global lr", total=20)
    before = _flat(carried)
    first_order_window(carried, WARMUP, 5).commit()
    first_order_window(fresh, WARMUP, 5).commit()
    first_displacement = _flat(carried) - before
    fresh.carried = None  # the same window without what the first one carried
    drawn = _recording_valid_batches(carried)
    (with_carry,) = first_order_window(carried, 8, 5).hypergradients
    (without,) = first_order_window(fresh, 8, 5).hypergradients
    extra = (8 / 13) ** 2 * _valid_gradient(carried, drawn[-1]) @ first_displacement
    torch.testing.assert_close(with_carry, without + extra)
    assert extra.abs() > 1e-3 * without.abs()


def test_a_rejected_window_leaves_the_carried_tangents_as_they_were(small_digits):
    run = _run(small_digits, "adam", "global weight decay", total=20)
    first_order_window(run, WARMUP, 5).commit()
    kept = run.carried
    first_order_window(run, 8, 5).rollback()
    assert run.carried is kept


def test_a_new_segment_starts_its_learning_rate_tangent_at_zero(small_digits):
    """Steps 0..3 are segment 0, 4..7 segment 1: the second window's rates start afresh, its decay carries on."""
    run = _run(small_digits, "sgd momentum", "schedule segments weight decay", total=TOTAL)
    first_order_window(run, WARMUP, 1).commit()  # step 3, segment 0
    decay = run.carried.weight_decay.clone()
    before = _flat(run)
    first_order_window(run, 4, 2).commit()  # steps 4, 5: segment 1
    assert run.carried.segment == 1
    torch.testing.assert_close(run.carried.lr, _flat(run) - before)
    assert not torch.equal(run.carried.weight_decay, decay)


def test_unrolled_hypergradient_only_reaches_segments_the_window_used(small_digits):
    run = _run(small_digits, "sgd", "schedule segments")
    (grad,) = unrolled_window(run, WARMUP, 1).hypergradients  # step 3: segment 0 only
    assert grad[0].abs().item() > 0
    assert grad[1:].abs().sum().item() == 0


@pytest.mark.parametrize("estimator", ["first_order", "greedy"])
@pytest.mark.parametrize("optimizer", sorted(SETUPS))
def test_first_order_and_greedy_windows_are_plain_torch_optim_steps(small_digits, estimator, optimizer):
    """Their training steps are the optimizer's own: the weights after a window are those of plain steps."""
    window_run = _run(small_digits, optimizer, "per-group weight decay")
    ESTIMATORS[estimator](window_run, WARMUP, 5).commit()
    plain_run = _run(small_digits, optimizer, "per-group weight decay")
    for step in range(WARMUP, WARMUP + 5):
        plain_step(plain_run.model, plain_run.optimizer, plain_run.hyper, plain_run.loss_fn,
                   plain_run.train_batches.next(), step)
    assert torch.equal(_flat(window_run), _flat(plain_run))
