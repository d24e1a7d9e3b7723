import math

import pytest
import torch

import hypermeta
from hypermeta._data import Batches
from hypermeta._engine import CUT, FITTED, _MetaStep, train_loop
from hypermeta._hyperparameters import HyperParameters
from hypermeta._private.window import Window, nothing
from tests.conftest import mlp, pinned

OPTIMIZERS = {
    "sgd": (torch.optim.SGD, {"momentum": 0.9, "nesterov": True}, 0.05),
    "adam": (torch.optim.Adam, {}, 0.005),
}


def _plain_torch(data, optimizer, steps):
    """Training written directly against torch.optim, independent of the engine."""
    cls, options, lr = OPTIMIZERS[optimizer]
    model = mlp(dtype=torch.float64)
    groups = [{"params": list(layer.parameters())} for layer in model if list(layer.parameters())]
    opt = cls(groups, lr=lr, weight_decay=1e-3, **options)
    batches = Batches(data.train, batch_size=16, generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        x, y = batches.next()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("estimator", ["unrolled", "greedy", "first_order"])
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_values_that_cannot_move_reproduce_plain_training(small_digits, optimizer, estimator):
    _, options, lr = OPTIMIZERS[optimizer]
    steps = 23  # windows of 1, 2, 4 then 7 steps: state must carry across the truncations and a short window
    expected_model, expected_opt = _plain_torch(small_digits, optimizer, steps)
    result = hypermeta.train(
        mlp(dtype=torch.float64), data=small_digits, steps=steps, batch_size=16, optimizer=optimizer,
        optimizer_options=options, learning_rate=pinned(hypermeta.LearningRate(init=lr, scope="per_group")),
        weight_decay=pinned(hypermeta.WeightDecay(init=1e-3)),
        hypergradient=hypermeta.Hypergradient(estimator=estimator, horizon=7),
        eval_every=steps,
    )
    assert result.status == "completed" and result.steps == steps
    assert (result.trajectory["hypergradient"].abs() > 0).any()
    for got, want in zip(result.model.parameters(), expected_model.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    expected_state = list(expected_opt.state.values())
    assert len(expected_state) == 4
    for got, want in zip(result.optimizer.state.values(), expected_state, strict=True):
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(
                torch.as_tensor(got[key]).double(),
                torch.as_tensor(want[key]).double(),
                rtol=1e-10,
                atol=1e-12,
            )


def _digits_run(data, lr, hypergradient, **kwargs):
    return hypermeta.train(
        mlp(hidden=128), data=data, steps=600, batch_size=32, optimizer_options={"momentum": 0.9},
        learning_rate=hypermeta.LearningRate(init=lr), hypergradient=hypergradient, **kwargs,
    )


def test_learning_rate_ten_times_too_small_is_learned_on_digits(digits):
    """0.01 is 10x below the best fixed rate on this task (0.1, see benchmarks/reach.py): the default
    ``Hypergradient()`` finds a better one within one run of 600 steps."""
    plain = _digits_run(digits, 0.01, None)
    learned = _digits_run(digits, 0.01, hypermeta.Hypergradient())
    final_lr = learned.hyperparameters["lr/all/0"]
    assert 0.03 < final_lr < 1.0
    assert learned.evaluations["valid_loss"].iloc[-1] < plain.evaluations["valid_loss"].iloc[-1]


def test_a_validation_loss_reported_not_finite_ends_the_users_loop_as_diverged(digits):
    x, y = digits.train.x[:32], digits.train.y[:32]
    cross_entropy = torch.nn.functional.cross_entropy
    reported = []

    def loop(hyper, report):
        for step in range(1, 61):
            hyper.step(lambda m: cross_entropy(m(x), y), lambda m: cross_entropy(m(digits.valid.x), digits.valid.y))
            if step % 20 == 0:
                reported.append(step)
                report({"loss": math.nan if step == 40 else 1.0})

    result = train_loop(
        loop, mlp(hidden=16), steps=60, learning_rate=hypermeta.LearningRate(init=0.1),
        hypergradient=hypermeta.Hypergradient(horizon=10),
    )
    assert result.status == "diverged" and result.reason == "validation loss is not finite at step 40"
    assert reported == [20, 40] and result.evaluations["step"].tolist() == [20, 40]
    assert result.steps == 35  # windows end at 1, 3, 7, 15, 25, 35: the one under way at 40 is undone


def test_an_exploding_initial_learning_rate_is_cut_until_the_run_trains(digits):
    """The guard undoes each window that blows up and cuts its learning rate threefold."""
    result = _digits_run(digits, 10.0, hypermeta.Hypergradient())
    assert result.status == "completed", result.reason
    assert result.rejected_steps >= 1
    assert result.hyperparameters["lr/all/0"] < 10.0 / CUT
    assert result.evaluations["valid_loss"].iloc[-1] < 0.5


def test_a_learning_rate_that_cannot_be_cut_ends_the_run_with_a_reason(digits):
    """Bounds that keep the rate at 10: every window is rejected, and after 5 in a row the run ends."""
    rate = hypermeta.LearningRate(init=10.0, bounds=(10.0, 20.0))
    result = hypermeta.train(
        mlp(hidden=128), data=digits, steps=600, batch_size=32, optimizer_options={"momentum": 0.9},
        learning_rate=rate, hypergradient=hypermeta.Hypergradient(horizon=5),
    )
    assert result.status == "diverged" and result.steps <= 1
    assert "exceeds the limit" in result.reason and "(5 windows rejected in a row)" in result.reason
    assert result.rejected_steps == 5
    assert torch.isfinite(torch.cat([p.flatten() for p in result.model.parameters()])).all()


def test_plain_run_that_diverges_stops_without_raising(digits):
    result = _digits_run(digits, 10.0, None)
    assert result.status == "diverged" and result.steps < 600
    assert result.steps % 60 == 0  # a plain window runs to the next evaluation, and the rejected one is undone
    assert torch.isfinite(torch.cat([p.flatten() for p in result.model.parameters()])).all()


def test_a_plain_window_runs_to_the_next_evaluation_with_the_values_of_each_segment(small_digits):
    rates = {"lr/all/0": 0.05, "lr/all/1": 0.2, "lr/all/2": 0.01}
    result = hypermeta.train(
        mlp(dtype=torch.float64), data=small_digits, steps=30, batch_size=16, eval_every=15,
        learning_rate=hypermeta.LearningRate(init=0.05, segments=3), initial_values=rates,
    )
    assert result.trajectory["step"].unique().tolist() == result.evaluations["step"].tolist() == [15, 30]
    model = mlp(dtype=torch.float64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    batches = Batches(small_digits.train, batch_size=16, generator=torch.Generator().manual_seed(0))
    for step in range(30):  # segments of 10 steps; the window of steps 0-14 spans two
        optimizer.param_groups[0]["lr"] = rates[f"lr/all/{step // 10}"]
        x, y = batches.next()
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    for got, want in zip(result.model.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_trajectory_is_long_format_with_one_row_per_hyperparameter_per_hyper_step(small_digits):
    result = hypermeta.train(
        mlp(dtype=torch.float64), data=small_digits, steps=20, batch_size=16,
        learning_rate=hypermeta.LearningRate(init=0.05, scope="per_group", segments=2),
        weight_decay=hypermeta.WeightDecay(init=1e-3),
        hypergradient=hypermeta.Hypergradient(horizon=5),
    )
    trajectory = result.trajectory
    assert list(trajectory.columns) == hypermeta.TRAJECTORY_COLUMNS
    # windows of 1, 2, 4 steps, then the horizon, each cut at the evaluations (every 5 steps)
    assert sorted(trajectory["step"].unique()) == [1, 3, 5, 10, 15, 20]
    assert len(trajectory) == 6 * (2 * 2 + 1)
    assert set(trajectory["group"]) == {"0", "2", "all"}
    lr_rows = trajectory[trajectory["name"] == "lr"]
    early = lr_rows[lr_rows["step"] <= 10]  # segment 1 starts at step 10: no hypergradient yet
    assert (early[early["segment"] == 1]["hypergradient"] == 0).all()
    assert (early[early["segment"] == 0]["hypergradient"] != 0).all()
    assert result.evaluations["step"].iloc[-1] == 20
    assert set(result.hyperparameters) == {"lr/0/0", "lr/0/1", "lr/2/0", "lr/2/1", "weight_decay/all"}


def test_a_segment_starts_where_the_previous_one_ended(small_digits):
    result = hypermeta.train(
        mlp(dtype=torch.float64), data=small_digits, steps=40, batch_size=16,
        learning_rate=hypermeta.LearningRate(init=0.05, segments=2), hypergradient=hypermeta.Hypergradient(horizon=5),
    )
    values = result.trajectory.pivot_table(index="step", columns="segment", values="value")
    first, ended = values[0], values[0][25]  # rows hold the values a window trained with
    assert abs(math.log(ended / 0.05)) > 0.5  # the first segment learned something to carry
    assert (first[first.index >= 25] == ended).all()  # and stops moving once its segment is over
    assert values[1][20] == pytest.approx(0.05)  # not yet begun
    assert values[1][25] == pytest.approx(ended)  # began where the first ended
    assert values[1][40] != pytest.approx(values[1][25])


def _meta(steps_left=lambda step: 1000.0):
    hyper = HyperParameters(
        learning_rate=hypermeta.LearningRate(init=0.1), weight_decay=hypermeta.WeightDecay(init=1e-3),
        group_names=["a"], total_steps=10_000, dtype=torch.float64, device=torch.device("cpu"),
    )
    return hyper, _MetaStep(hyper, hypermeta.Hypergradient(horizon=10), steps_left)


def _window(train_loss, lr_grad=1.0, wd_grad=1.0):
    return Window(
        train_loss=torch.tensor(train_loss), valid_loss=torch.tensor(1.0), commit=nothing, rollback=nothing,
        hypergradients=[torch.tensor([[lr_grad]], dtype=torch.float64), torch.tensor([wd_grad], dtype=torch.float64)],
    )


def test_once_the_model_fits_a_learning_rate_moves_at_the_pace_of_the_steps_left():
    """The first window's training loss sets the scale; below a tenth of it a rate moves by at most
    its step times the window's steps over the steps left. A weight decay always moves by its step."""
    hyper, meta = _meta(steps_left=lambda step: 990.0)
    meta.step(_window(2.0), segment=0, start=0, end=10)  # not fitted: full steps
    values = hyper.values()
    assert values["lr/all/0"] == pytest.approx(0.1 * math.exp(-0.3))
    assert values["weight_decay/all"] == pytest.approx(1e-3 * math.exp(-0.3))
    meta.step(_window(2.0 * FITTED / 2), segment=0, start=10, end=20)  # fitted: 10 of 990 steps left
    moved = hyper.values()
    assert math.log(values["lr/all/0"] / moved["lr/all/0"]) == pytest.approx(0.36 * 10 / 990)
    assert math.log(values["weight_decay/all"] / moved["weight_decay/all"]) == pytest.approx(0.36)


def test_a_zero_hypergradient_leaves_its_value_still():
    hyper, meta = _meta()
    log_lr = hyper.log_lr.clone()
    meta.step(_window(2.0, lr_grad=0.0, wd_grad=-1.0), segment=0, start=0, end=10)
    assert torch.equal(hyper.log_lr, log_lr)
    assert hyper.values()["weight_decay/all"] == pytest.approx(1e-3 * math.exp(0.3))


def test_a_rejected_window_undoes_its_hyper_step_and_cuts_the_learning_rates():
    hyper, meta = _meta()
    meta.step(_window(2.0), segment=0, start=0, end=10)
    before = hyper.values()
    meta.step(_window(2.0, lr_grad=-1.0, wd_grad=-1.0), segment=0, start=10, end=20)  # the step the window used
    meta.reject(0)
    values = hyper.values()
    assert values["lr/all/0"] == pytest.approx(before["lr/all/0"] / CUT)
    assert values["weight_decay/all"] == pytest.approx(before["weight_decay/all"])  # undone, never put back later
    meta.reject(0)  # a second rejection in a row cuts again from there
    assert hyper.values()["lr/all/0"] == pytest.approx(before["lr/all/0"] / CUT**2)


def test_a_training_loss_that_jumps_is_undone_and_the_rate_cut(small_digits):
    """The training loss of steps 40-44 is made 30 times larger: the window that holds them is
    rejected (its weights and hyper-step undone, the rate cut threefold), and the run goes on."""
    calls = [0]

    def loss(output, target):
        calls[0] += torch.is_grad_enabled() and output.shape[0] == 16  # training steps only
        scale = 30.0 if 40 < calls[0] <= 45 else 1.0
        return scale * torch.nn.functional.cross_entropy(output, target)

    result = hypermeta.train(
        mlp(dtype=torch.float64), data=small_digits, steps=100, batch_size=16, eval_every=100, loss_fn=loss,
        learning_rate=hypermeta.LearningRate(init=0.05), hypergradient=hypermeta.Hypergradient(horizon=10),
    )
    assert result.status == "completed" and result.rejected_steps == 1
    values = result.trajectory.set_index("step")["value"]
    assert values[45] == pytest.approx(values[35] / CUT)  # the window 35-45 was undone, the rate cut


def test_a_time_budget_ends_the_run_and_paces_its_learning_rates(small_digits):
    seen = []
    result = hypermeta.train(
        mlp(dtype=torch.float64), data=small_digits, steps=10**9, batch_size=16, eval_every=20, seconds=0.5,
        learning_rate=hypermeta.LearningRate(init=0.05), hypergradient=hypermeta.Hypergradient(horizon=5),
        on_evaluation=lambda step, metrics: seen.append(step) and False,
    )
    assert result.status == "completed" and 0 < result.steps < 10**6
    assert result.steps == seen[-1] and result.evaluations["step"].iloc[-1] == result.steps


def test_on_evaluation_can_stop_a_run(small_digits):
    seen = []
    result = hypermeta.train(
        mlp(dtype=torch.float64), data=small_digits, steps=40, batch_size=16, eval_every=10,
        learning_rate=hypermeta.LearningRate(init=0.05),
        on_evaluation=lambda step, metrics: seen.append(step) or step >= 20,
    )
    assert seen == [10, 20]
    assert result.status == "stopped" and result.steps == 20


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"optimizer": "rmsprop"}, "optimizer must be one of"),
        ({"optimizer": "adam", "optimizer_options": {"amsgrad": True}}, "amsgrad"),
        ({"steps": 0}, "steps must be >= 1"),
        ({"batch_size": 0}, "a Dataset needs batch_size"),
        ({"optimizer_options": {"lr": 0.1}}, "must not set 'lr'"),
    ],
)
def test_bad_arguments_are_named(small_digits, kwargs, message):
    lr = hypermeta.LearningRate(init=0.1)
    arguments = dict(data=small_digits, steps=10, batch_size=8, learning_rate=lr)
    with pytest.raises(ValueError, match=message):
        hypermeta.train(mlp(dtype=torch.float64), **{**arguments, **kwargs})
