"""HyperOptimizer: hypergradients inside a training loop of the user's own, and train() built on it."""

import threading
import time

import pytest
import torch
import torch.nn.functional as F

import hypermeta
from hypermeta._data import Batches
from tests.conftest import mlp

STEPS, HORIZON = 17, 5  # windows of 1, 2, 4, 5 and 5 steps


def own_loop(data, hypergradient, *, steps=STEPS, **options):
    """The user's loop over the same seeded batches train() draws, validating on the whole split."""
    hyper = hypermeta.HyperOptimizer(
        mlp(dtype=torch.float64), optimizer_options={"momentum": 0.9},
        learning_rate=hypermeta.LearningRate(init=0.05, scope="per_group"),
        weight_decay=hypermeta.WeightDecay(init=1e-3), hypergradient=hypergradient, **options,
    )
    batches = Batches(data.train, batch_size=16, generator=torch.Generator().manual_seed(0))
    validations = []

    def valid_loss(model):
        validations.append(call)
        return F.cross_entropy(model(data.valid.x), data.valid.y)

    for call in range(1, steps + 1):  # noqa: B007 -- valid_loss reads it
        x, y = batches.next()
        hyper.step(lambda model: F.cross_entropy(model(x), y), valid_loss)  # noqa: B023 -- called in this step
    return hyper, validations


@pytest.mark.parametrize("estimator", ["unrolled", "greedy", "first_order"])
def test_own_loop_is_train(small_digits, estimator):
    """The same batches give the same hyperparameter trajectory and weights as hypermeta.train."""
    hypergradient = hypermeta.Hypergradient(estimator=estimator, horizon=HORIZON)
    hyper, _ = own_loop(small_digits, hypergradient, steps=STEPS)
    result = hypermeta.train(
        mlp(dtype=torch.float64), data=small_digits, steps=STEPS, batch_size=16, optimizer_options={"momentum": 0.9},
        learning_rate=hypermeta.LearningRate(init=0.05, scope="per_group"),
        weight_decay=hypermeta.WeightDecay(init=1e-3), hypergradient=hypergradient, eval_every=STEPS,
    )
    assert list(hyper.trajectory.columns) == hypermeta.TRAJECTORY_COLUMNS
    assert hyper.trajectory.shape == result.trajectory.shape == (3 * 5, 8)  # 2 lr + 1 wd, 5 windows
    assert (hyper.trajectory["value"] != 0.05).any(), "the learning rates must have moved"
    for column in ("step", "name", "group", "segment"):
        assert hyper.trajectory[column].tolist() == result.trajectory[column].tolist()
    for column in ("value", "hypergradient", "train_loss", "valid_loss"):
        torch.testing.assert_close(
            torch.tensor(hyper.trajectory[column].to_numpy()), torch.tensor(result.trajectory[column].to_numpy()),
            rtol=1e-9, atol=1e-12,
        )
    assert hyper.hyperparameters == pytest.approx(result.hyperparameters, rel=1e-9)
    for got, want in zip(hyper.model.parameters(), result.model.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_valid_loss_is_called_only_when_a_window_ends(small_digits):
    hyper, validations = own_loop(small_digits, hypermeta.Hypergradient(horizon=HORIZON), steps=13)
    assert validations == [1, 3, 7, 12]  # windows of 1, 2, 4, 5 steps; step 13 is in a window not yet ended
    assert hyper.steps == 13 and hyper.trajectory["step"].unique().tolist() == [1, 3, 7, 12]


def test_without_hypergradients_the_steps_are_plain_torch(small_digits):
    hyper, validations = own_loop(small_digits, None, steps=12)
    torch.manual_seed(0)
    model = mlp(dtype=torch.float64)
    groups = [{"params": list(layer.parameters())} for layer in model if list(layer.parameters())]
    optimizer = torch.optim.SGD(groups, lr=0.05, momentum=0.9, weight_decay=1e-3)
    batches = Batches(small_digits.train, batch_size=16, generator=torch.Generator().manual_seed(0))
    for _ in range(12):
        x, y = batches.next()
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    assert validations == []
    for got, want in zip(hyper.model.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert hyper.trajectory["hypergradient"].isna().all() and hyper.trajectory["step"].unique().tolist() == [10]


def test_a_loss_that_is_not_a_scalar_is_named(small_digits):
    hyper = hypermeta.HyperOptimizer(
        mlp(), learning_rate=hypermeta.LearningRate(init=0.1), hypergradient=hypermeta.Hypergradient(horizon=2))
    x, y = small_digits.train.x.float(), small_digits.train.y
    with pytest.raises(ValueError, match=r"returned shape \(96,\), not a scalar"):
        hyper.step(lambda m: F.cross_entropy(m(x), y, reduction="none"), lambda m: F.cross_entropy(m(x), y))


@pytest.mark.parametrize(("hypergradient", "kept"), [(None, 0), (hypermeta.Hypergradient(horizon=2), 3)])
def test_divergence_is_raised_with_the_reason_and_the_steps_undone(small_digits, hypergradient, kept):
    """From the 5th step on the loss explodes: plain windows of 10 lose all; windows of 1, 2 and 2
    steps keep the first 3, then the third window is rejected 5 times in a row."""
    hyper = hypermeta.HyperOptimizer(
        mlp(dtype=torch.float64), learning_rate=hypermeta.LearningRate(init=0.1), hypergradient=hypergradient)
    before = [p.detach().clone() for p in hyper.model.parameters()]
    x, y = small_digits.train.x, small_digits.train.y
    calls = []

    def train_loss(model):
        calls.append(1)
        return F.cross_entropy(model(x), y) * (1e6 if len(calls) > 4 else 1)

    with pytest.raises(hypermeta.Diverged, match=f"diverged after step {kept}: training loss") as raised:  # noqa: PT012
        for _ in range(30):
            hyper.step(train_loss, lambda m: F.cross_entropy(m(x), y))
    assert hyper.steps == kept and hyper.reason == str(raised.value)
    assert hyper.rejected_steps == (1 if hypergradient is None else 5)
    if kept == 0:
        for got, want in zip(hyper.model.parameters(), before, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(hypermeta.Diverged):
        hyper.step(train_loss, train_loss)


LOOP_STUDY = """
import torch, torch.nn.functional as F
import hypermeta

DATA = hypermeta.datasets.digits()


def loop(hyper, report):
    device = next(hyper.model.parameters()).device
    valid_x, valid_y = DATA.valid.x.to(device), DATA.valid.y.to(device)
    for step in range(40):
        i = step % 30
        x, y = DATA.train.x[i * 32:(i + 1) * 32].to(device), DATA.train.y[i * 32:(i + 1) * 32].to(device)
        hyper.step(lambda m: F.cross_entropy(m(x), y), lambda m: F.cross_entropy(m(valid_x), valid_y))
        if (step + 1) % 20 == 0:
            report(hypermeta.evaluate(hyper.model, DATA.valid, F.cross_entropy))


def build(trial):
    return hypermeta.Setup(
        model=torch.nn.Linear(64, 10), steps=40, loop=loop,
        learning_rate=hypermeta.LearningRate(init=trial.suggest_float("lr", 0.02, 0.5, log=True)),
        hypergradient=hypermeta.Hypergradient(horizon=10),
    )


study = hypermeta.Study(name="own-loop", build=build, metric="valid_accuracy", n_trials=2)
"""


def test_a_study_with_its_own_loop_is_stored_and_reported_like_any_other(tmp_path, monkeypatch):
    import contextlib
    import io

    from hypermeta._cli import main

    (tmp_path / "own_loop.py").write_text(LOOP_STUDY)
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        assert main(["run", "own_loop.py", "--storage", url, "--quiet"]) == 0, err.getvalue()
        assert main(["report", "own-loop", "--storage", url, "--out", str(tmp_path / "r")]) == 0
    trajectories = hypermeta.load_trajectories(study_name="own-loop", storage=url)
    evaluations = hypermeta.load_evaluations(study_name="own-loop", storage=url)
    assert sorted(trajectories["trial"].unique()) == [0, 1]
    assert trajectories["step"].unique().tolist() == [1, 3, 7, 15, 25, 35, 40]  # windows of 1, 2, 4, 8, then 10
    assert trajectories["hypergradient"].notna().all()
    assert evaluations["step"].tolist() == [20, 40, 20, 40]
    assert {"valid_loss", "valid_accuracy", "valid_macro_f1"} <= set(evaluations.columns)
    assert any((tmp_path / "r").iterdir())


def _worker_threads() -> int:
    return sum(thread.daemon for thread in threading.enumerate())


def _threads_end(expected: int) -> bool:
    """Whether the worker threads drop to ``expected`` within a few seconds (a thread ends just after its reply)."""
    deadline = time.monotonic() + 10
    while _worker_threads() > expected and time.monotonic() < deadline:
        time.sleep(0.01)
    return _worker_threads() == expected


def test_a_step_beyond_the_steps_given_is_an_error(small_digits):
    for hypergradient in (None, hypermeta.Hypergradient(horizon=2)):
        hyper = hypermeta.HyperOptimizer(
            mlp(), learning_rate=hypermeta.LearningRate(init=0.1), hypergradient=hypergradient, steps=2)
        x, y = small_digits.train.x.float(), small_digits.train.y
        for _ in range(2):
            hyper.step(lambda m: F.cross_entropy(m(x), y), lambda m: F.cross_entropy(m(x), y))  # noqa: B023
        with pytest.raises(ValueError, match="all 2 steps of this HyperOptimizer are done"):
            hyper.step(lambda m: F.cross_entropy(m(x), y), lambda m: F.cross_entropy(m(x), y))  # noqa: B023


def test_a_loss_that_raises_mid_window_ends_the_window_and_its_thread(small_digits):
    before = _worker_threads()
    hyper = hypermeta.HyperOptimizer(
        mlp(), learning_rate=hypermeta.LearningRate(init=0.1), hypergradient=hypermeta.Hypergradient(horizon=5))
    x, y = small_digits.train.x.float(), small_digits.train.y
    hyper.step(lambda m: F.cross_entropy(m(x), y), lambda m: F.cross_entropy(m(x), y))

    def broken(model):
        raise KeyboardInterrupt  # as an interrupt would, in the middle of the window

    with pytest.raises(KeyboardInterrupt):
        hyper.step(broken, lambda m: F.cross_entropy(m(x), y))
    assert _threads_end(before)
    with pytest.raises(RuntimeError, match="start a new HyperOptimizer"):
        hyper.step(lambda m: F.cross_entropy(m(x), y), lambda m: F.cross_entropy(m(x), y))


def test_closing_a_loop_stopped_mid_window_ends_its_thread(small_digits):
    before = _worker_threads()
    hyper = hypermeta.HyperOptimizer(
        mlp(), learning_rate=hypermeta.LearningRate(init=0.1), hypergradient=hypermeta.Hypergradient(horizon=5))
    x, y = small_digits.train.x.float(), small_digits.train.y
    for step in range(5):  # windows of 1 and 2 steps, then steps 4 and 5 of a window of 4
        hyper.step(lambda m: F.cross_entropy(m(x), y), lambda m: F.cross_entropy(m(x), y))
        if step == 2:
            kept = [p.detach().clone() for p in hyper.model.parameters()]
    assert _worker_threads() == before + 1 and hyper.steps == 5
    hyper.close()
    assert _threads_end(before) and hyper.steps == 3  # nothing of the window under way was kept
    for got, want in zip(hyper.model.parameters(), kept, strict=True):
        assert torch.equal(got, want)


def test_a_schedule_without_the_runs_length_is_refused():
    """Segments split the run's steps: without ``steps`` only the first would ever train."""
    with pytest.raises(ValueError, match=r"schedule of 3 segments .* give HyperOptimizer\(steps=\.\.\.\)"):
        hypermeta.HyperOptimizer(mlp(), learning_rate=hypermeta.LearningRate(init=0.1, segments=3))
    hyper = hypermeta.HyperOptimizer(mlp(), learning_rate=hypermeta.LearningRate(init=0.1, segments=3), steps=30)
    assert len(hyper.hyperparameters) == 3
