import math

import pytest
import torch

import hypermeta
from hypermeta._data import Batches
from hypermeta._engine import _Evaluation, train_loop
from tests.conftest import mlp

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


@pytest.mark.parametrize("estimator", ["unrolled", "greedy"])
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_meta_lr_zero_reproduces_plain_training(small_digits, optimizer, estimator):
    _, options, lr = OPTIMIZERS[optimizer]
    steps = 23  # windows of 7 steps: state must carry across three truncations and a short window
    expected_model, expected_opt = _plain_torch(small_digits, optimizer, steps)
    result = hypermeta.train(
        mlp(dtype=torch.float64), data=small_digits, steps=steps, batch_size=16, optimizer=optimizer,
        optimizer_options=options, learning_rate=hypermeta.LearningRate(init=lr, scope="per_group"),
        weight_decay=hypermeta.WeightDecay(init=1e-3),
        hypergradient=hypermeta.Hypergradient(estimator=estimator, horizon=7, meta_lr=0.0),
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
    """0.01 is 10x below the best fixed rate on this task (0.1, see benchmarks/short_horizon.py).

    600 steps are 15 windows: a hyper-step on every one with a meta learning rate of 0.2, anywhere in
    the bounds (the defaults, made for long runs, take one in eight and 0.1, within 3x of the start)
    is what a short run needs.
    """
    plain = _digits_run(digits, 0.01, None)
    learned = _digits_run(digits, 0.01, hypermeta.Hypergradient(every=1, meta_lr=0.2, span=None))
    final_lr = learned.hyperparameters["lr/all/0"]
    assert 0.03 < final_lr < 1.0
    assert learned.evaluations["valid_loss"].iloc[-1] < plain.evaluations["valid_loss"].iloc[-1]


@pytest.mark.parametrize(
    ("now", "before", "kept"),
    [
        (_Evaluation(0.5, 0.9), _Evaluation(0.5, 0.9), True),
        (_Evaluation(0.4, 0.8), _Evaluation(0.5, 0.9), False),  # a lower loss does not make up for the accuracy
        (_Evaluation(0.6, 0.95), _Evaluation(0.5, 0.9), False),
        (_Evaluation(0.4, None), _Evaluation(0.5, 0.9), True),  # no accuracy on one side: the loss alone
        (_Evaluation(0.4, 0.1), _Evaluation(0.5, None), True),
        (_Evaluation(0.6, None), _Evaluation(0.5, None), False),
    ],
)
def test_an_evaluation_is_no_worse_when_the_loss_did_not_rise_and_an_accuracy_on_both_did_not_fall(now, before, kept):
    assert now.no_worse_than(before) is kept


def _worse_put_back(result, acted_at, horizon):
    """For each evaluation worse than the one before (a higher validation loss or, where measured,
    a lower accuracy): whether the next window ran with the values of the window after the last
    evaluation that was no worse; and how many of those had only the accuracy worse.

    ``acted_at[i]``: the step (a window's end) at which evaluation ``i`` was acted on.
    """
    values = result.trajectory.pivot_table(index="step", columns="name", values="value")
    def after(i):  # the values of the window that began where evaluation i was acted on
        return values.loc[acted_at[i] + horizon].tolist()
    evaluations = result.evaluations
    losses = evaluations["valid_loss"].tolist()
    accuracies = evaluations["valid_accuracy"].tolist() if "valid_accuracy" in evaluations else [0.0] * len(losses)
    acted = [i for i, step in enumerate(acted_at) if step < result.steps - horizon]
    kept, put_back, accuracy_only = acted[0], [], 0
    for i in acted[1:]:
        rose, fell = losses[i] > losses[i - 1], accuracies[i] < accuracies[i - 1]
        if rose or fell:
            put_back.append(after(i) == after(kept))
            accuracy_only += fell and not rose
        else:
            kept = i
    return put_back, accuracy_only


@pytest.mark.parametrize("confirm", [True, False])
def test_a_worse_evaluation_puts_back_the_values_kept_at_the_evaluation_before(digits, confirm):
    result = _digits_run(
        digits, 0.3, hypermeta.Hypergradient(horizon=10, meta_lr=0.3, every=1, confirm=confirm, span=None),
        weight_decay=hypermeta.WeightDecay(init=1e-3), eval_every=30,
    )  # no span: a value held at its edge would look put back
    put_back, accuracy_only = _worse_put_back(result, result.evaluations["step"].tolist(), horizon=10)
    assert len(put_back) >= 2, "no rise to act on: the test needs a run whose validation loss goes up"
    if confirm:
        assert accuracy_only >= 1, "the test needs an evaluation where only the accuracy is worse"
    assert all(put_back) if confirm else not any(put_back)
    assert result.trajectory.groupby("name")["value"].nunique().min() > 1  # the values still move


def test_an_evaluation_in_the_middle_of_a_window_of_the_users_loop_acts_when_the_window_ends(digits):
    batches = Batches(digits.train, batch_size=32, generator=torch.Generator().manual_seed(0))
    cross_entropy = torch.nn.functional.cross_entropy

    def loop(hyper, report):
        for step in range(1, 601):
            x, y = batches.next()
            hyper.step(lambda m, x=x, y=y: cross_entropy(m(x), y),
                       lambda m: cross_entropy(m(digits.valid.x), digits.valid.y))
            if step % 25 == 0:  # windows are 10 steps: every other report falls in the middle of one
                report({"loss": hypermeta.evaluate(hyper.model, digits.valid, cross_entropy)["loss"]})

    result = train_loop(
        loop, mlp(hidden=128), steps=600, optimizer_options={"momentum": 0.9},
        learning_rate=hypermeta.LearningRate(init=0.3), weight_decay=hypermeta.WeightDecay(init=1e-3),
        hypergradient=hypermeta.Hypergradient(horizon=10, meta_lr=0.3, every=1, confirm=True, span=None),
    )  # no span: a value held at its edge would look put back
    acted_at = [-(-step // 10) * 10 for step in range(25, 601, 25)]  # the end of the window each report fell in
    put_back, _ = _worse_put_back(result, acted_at, horizon=10)
    assert result.status == "completed" and len(put_back) >= 2 and all(put_back)


def _run_reporting(digits, reports, *, steps, confirm=True):
    """A loop of the user's own that reports ``reports(step)`` every 20 steps, instead of measuring."""
    x, y = digits.train.x[:32], digits.train.y[:32]
    cross_entropy = torch.nn.functional.cross_entropy

    def loop(hyper, report):
        for step in range(1, steps + 1):
            hyper.step(lambda m: cross_entropy(m(x), y), lambda m: cross_entropy(m(digits.valid.x), digits.valid.y))
            if step % 20 == 0:
                report(reports(step))

    torch.manual_seed(0)
    return train_loop(
        loop, mlp(hidden=16), steps=steps, learning_rate=hypermeta.LearningRate(init=0.1),
        weight_decay=hypermeta.WeightDecay(init=1e-3),
        hypergradient=hypermeta.Hypergradient(horizon=10, meta_lr=0.3, every=1, confirm=confirm),
    )


def test_a_rise_at_the_last_evaluation_leaves_the_values_the_run_ended_with(digits):
    """The values go back only when training goes on: a run ends with those it reached.

    The reported losses are fixed, so only the last evaluation rises: with confirmation the run
    must end exactly where the same run without it ends.
    """
    def reports(step):
        return {"loss": 2.0 if step == 60 else 1.0}

    confirmed = _run_reporting(digits, reports, steps=60, confirm=True)
    kept = _run_reporting(digits, reports, steps=60, confirm=False)
    assert confirmed.hyperparameters == kept.hyperparameters
    trajectory = confirmed.trajectory
    kept_at_40 = trajectory[trajectory["step"] == 50].set_index("name")["value"]  # the window after it
    for name, key in (("lr", "lr/all/0"), ("weight_decay", "weight_decay/all")):
        assert not math.isclose(confirmed.hyperparameters[key], kept_at_40[name])  # else putting back shows nothing


@pytest.mark.parametrize("reported", ["loss", "loss and accuracy"])
def test_an_accuracy_reported_lower_puts_back_the_values_though_the_loss_did_not_rise(digits, reported):
    def reports(step):
        accuracy = {"accuracy": 0.5 if step == 40 else 0.9} if reported == "loss and accuracy" else {}
        return {"loss": 1.0, **accuracy}

    result = _run_reporting(digits, reports, steps=80)
    values = result.trajectory.pivot_table(index="step", columns="name", values="value")
    put_back = values.loc[50].tolist() == values.loc[30].tolist()  # the window after 40 ran with those kept at 20
    assert put_back == (reported == "loss and accuracy")
    assert values.loc[70].tolist() != values.loc[50].tolist()  # no worse at 60: the values move on


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
        hypergradient=hypermeta.Hypergradient(horizon=10, every=1, confirm=True),
    )
    assert result.status == "diverged" and result.reason == "validation loss is not finite at step 40"
    assert reported == [20, 40] and result.steps == 40


def test_exploding_initial_learning_rate_stops_with_a_reason(digits):
    result = _digits_run(digits, 10.0, hypermeta.Hypergradient(horizon=5, max_failures=3))
    assert result.status == "diverged"
    assert "exceeds the limit" in result.reason and "lower the initial learning rate" in result.reason
    assert result.rejected_steps == 4
    assert torch.isfinite(torch.cat([p.flatten() for p in result.model.parameters()])).all()


def test_exploding_meta_step_is_rejected_and_the_run_recovers(digits):
    """A meta learning rate of 4 multiplies the rate by e^4 per hyper-step: the guard must catch it
    (without a span, which would hold the rate within 3x)."""
    result = _digits_run(digits, 0.1, hypermeta.Hypergradient(horizon=10, meta_lr=4.0, max_failures=20, span=None))
    assert result.rejected_steps > 0
    assert result.status == "completed", result.reason
    assert torch.isfinite(torch.tensor(result.evaluations["valid_loss"].to_list())).all()


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
        hypergradient=hypermeta.Hypergradient(horizon=5, every=1),
    )
    trajectory = result.trajectory
    assert list(trajectory.columns) == hypermeta.TRAJECTORY_COLUMNS
    assert sorted(trajectory["step"].unique()) == [5, 10, 15, 20]
    assert len(trajectory) == 4 * (2 * 2 + 1)
    assert set(trajectory["group"]) == {"0", "2", "all"}
    lr_rows = trajectory[trajectory["name"] == "lr"]
    early = lr_rows[lr_rows["step"] <= 10]  # segment 1 starts at step 10: no hypergradient yet
    assert (early[early["segment"] == 1]["hypergradient"] == 0).all()
    assert (early[early["segment"] == 0]["hypergradient"] != 0).all()
    assert result.evaluations["step"].iloc[-1] == 20
    assert set(result.hyperparameters) == {"lr/0/0", "lr/0/1", "lr/2/0", "lr/2/1", "weight_decay/all"}


@pytest.mark.parametrize(("segments", "confirm"), [(1, False), (2, True)])  # also through carry and put-back
def test_a_span_keeps_every_value_a_run_trains_with_within_that_factor_of_its_start(small_digits, segments, confirm):
    def run(span):
        return hypermeta.train(
            mlp(dtype=torch.float64), data=small_digits, steps=60, batch_size=16, eval_every=10,
            learning_rate=hypermeta.LearningRate(init=0.05, scope="per_group", segments=segments),
            weight_decay=hypermeta.WeightDecay(init=1e-3),
            hypergradient=hypermeta.Hypergradient(horizon=5, every=1, meta_lr=1.0, confirm=confirm, span=span),
        )
    def moved(result):  # how far each row's value is from its start, in log space
        start = result.trajectory["name"].map({"lr": 0.05, "weight_decay": 1e-3})
        return (result.trajectory["value"] / start).map(math.log).abs()
    assert moved(run(None)).max() > math.log(2.0) + 0.1
    held = moved(run(2.0))
    assert held.max() <= math.log(2.0) + 1e-9
    assert held.max() == pytest.approx(math.log(2.0))


@pytest.mark.parametrize("carry", [True, False])
def test_a_segment_starts_where_the_previous_one_ended_unless_told_otherwise(small_digits, carry):
    result = hypermeta.train(
        mlp(dtype=torch.float64), data=small_digits, steps=40, batch_size=16,
        learning_rate=hypermeta.LearningRate(init=0.05, segments=2),
        hypergradient=hypermeta.Hypergradient(horizon=5, meta_lr=0.3, carry_segments=carry, every=1, span=None),
    )
    values = result.trajectory.pivot_table(index="step", columns="segment", values="value")
    first, ended = values[0], values[0][25]  # rows hold the values a window trained with
    assert abs(math.log(ended / 0.05)) > 0.5  # the first segment learned something to carry
    assert (first[first.index >= 25] == ended).all()  # and stops moving once its segment is over
    assert values[1][25] == pytest.approx(ended if carry else 0.05)
    assert values[1][40] != pytest.approx(values[1][25])


@pytest.mark.parametrize("estimator", ["first_order", "unrolled"])
def test_every_third_window_takes_a_hyper_step_and_the_others_train_plainly(small_digits, estimator):
    def run(hypergradient):
        torch.manual_seed(0)
        return hypermeta.train(
            mlp(dtype=torch.float64), data=small_digits, steps=35, batch_size=16, eval_every=35,
            optimizer_options={"momentum": 0.9}, learning_rate=hypermeta.LearningRate(init=0.05),
            weight_decay=hypermeta.WeightDecay(init=1e-3), hypergradient=hypergradient,
        )

    sparse = run(hypermeta.Hypergradient(estimator=estimator, horizon=5, meta_lr=0.3, every=3))
    lr = sparse.trajectory[sparse.trajectory["name"] == "lr"].set_index("step")
    hyper_windows = [5, 20, 35]  # windows 1, 4 and 7 of seven
    assert lr["hypergradient"].notna().tolist() == [step in hyper_windows for step in lr.index]
    values = lr["value"]  # the value each window trained with: it changes only after a hyper window
    assert [values[s] != values[s - 5] for s in lr.index[1:]] == [s - 5 in hyper_windows for s in lr.index[1:]]
    # with meta_lr 0 the plain windows are the same steps as a run without hypergradients
    frozen = run(hypermeta.Hypergradient(estimator="first_order", horizon=5, meta_lr=0.0, every=3))
    plain = run(None)
    for got, want in zip(frozen.model.parameters(), plain.model.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("estimator", ["first_order", "unrolled"])
def test_settling_steps_reach_the_estimator_and_keep_the_plain_run(small_digits, estimator):
    def run(settle, meta_lr=0.0):
        torch.manual_seed(0)
        return hypermeta.train(
            mlp(dtype=torch.float64), data=small_digits, steps=24, batch_size=16, eval_every=24,
            optimizer_options={"momentum": 0.9}, learning_rate=hypermeta.LearningRate(init=0.05, scope="per_group"),
            weight_decay=hypermeta.WeightDecay(init=1e-3),
            hypergradient=hypermeta.Hypergradient(estimator=estimator, horizon=8, settle=settle, meta_lr=meta_lr),
        )

    whole, settled = run(0), run(4)
    assert not whole.trajectory["hypergradient"].equals(settled.trajectory["hypergradient"])
    for got, want in zip(settled.model.parameters(), whole.model.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)  # meta_lr 0: the same plain steps


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
