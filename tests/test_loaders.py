"""Data from the user's own loaders, losses other than cross-entropy, metrics, and bad data named in one line."""

import contextlib
import io

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import hypermeta
from hypermeta._cli import main
from tests.conftest import mlp


def loaders(split_pairs, *, batch_size=16, shuffle=True, seed=0, **options):
    """``Loaders`` of ``DataLoader``s over (x, y) pairs of tensors: train, valid, test."""
    train, valid, test = (TensorDataset(x, y) for x, y in split_pairs)
    return hypermeta.Loaders(
        train=DataLoader(train, batch_size=batch_size, shuffle=shuffle,
                         generator=torch.Generator().manual_seed(seed), **options),
        valid=DataLoader(valid, batch_size=64),
        test=DataLoader(test, batch_size=64),
    )


def digits_pairs(data):
    return [(s.x, s.y) for s in (data.train, data.valid, data.test)]


def regression_pairs(n=240, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=generator)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0]) + 0.1 * torch.randn(n, generator=generator)
    return [(x[i::3], y[i::3, None]) for i in range(3)]


def binary_pairs(data):
    """Digits 0-4 against 5-9: one logit, float 0/1 targets."""
    return [(s.x, (s.y >= 5).float()[:, None]) for s in (data.train, data.valid, data.test)]


def test_dataloader_run_trains_with_hypergradients(digits):
    result = hypermeta.train(
        mlp(), data=loaders(digits_pairs(digits)), steps=60,
        learning_rate=hypermeta.LearningRate(init=0.1), eval_every=30,
        hypergradient=hypermeta.Hypergradient(horizon=10),
    )
    assert result.status == "completed" and result.steps == 60
    assert result.evaluations["step"].tolist() == [30, 60]
    assert result.evaluations["valid_accuracy"].iloc[-1] > 0.5
    assert result.trajectory["hypergradient"].notna().all()


@pytest.mark.parametrize(("valid_batch_size", "n_batches", "joined"), [
    (20, 4, 21),  # consecutive batches of 7 until they hold 20 examples
    (20, 2, 14),  # never more than one pass
    (None, 4, 28),  # all of valid
])
def test_a_hypergradient_takes_its_validation_loss_on_the_loader_batches_that_hold_valid_batch_size(
        digits, valid_batch_size, n_batches, joined):
    sizes = []

    def loss(output, targets):
        sizes.append(len(targets))
        return F.cross_entropy(output, targets)

    valid = [(digits.valid.x[i : i + 7], digits.valid.y[i : i + 7]) for i in range(0, 7 * n_batches, 7)]
    hypermeta.train(
        mlp(), data=hypermeta.Loaders(train=[(digits.train.x[:10], digits.train.y[:10])], valid=valid),
        steps=1, loss_fn=loss, learning_rate=hypermeta.LearningRate(init=0.1), eval_every=1,
        hypergradient=hypermeta.Hypergradient(valid_batch_size=valid_batch_size),
    )
    whole = 7 * n_batches  # the evaluations at the start (the divergence guard's reference) and the end
    assert [size for size in sizes if size != 10] == [whole, joined, whole]  # the hyper-step between them


class _Unsized:
    """A re-iterable of batches without a length, as a loader over a generator is."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


@pytest.mark.parametrize("sized", [True, False])
@pytest.mark.parametrize(("valid_batch_size", "joined"), [
    (12, [(0, 1), (2, 3), (4, 0), (1, 2)]),  # each hyper-step the next batches, on into the next pass
    (50, [(0, 1, 2, 3, 4)] * 4),  # more than the split holds: one whole pass each
])
def test_each_hyper_step_takes_the_next_validation_batches_and_one_pass_at_most(
        digits, sized, valid_batch_size, joined):
    taken = []

    def loss(output, targets):
        taken.append(targets.clone())
        return F.cross_entropy(output, targets)

    valid = [(digits.valid.x[i : i + 7], digits.valid.y[i : i + 7]) for i in range(0, 35, 7)]
    hypermeta.train(
        mlp(), data=hypermeta.Loaders(train=[(digits.train.x[:10], digits.train.y[:10])],
                                      valid=valid if sized else _Unsized(valid)),
        steps=15, loss_fn=loss, learning_rate=hypermeta.LearningRate(init=0.1), eval_every=15,
        hypergradient=hypermeta.Hypergradient(horizon=10, valid_batch_size=valid_batch_size),
    )  # windows of 1, 2, 4 and 8 steps
    hyper_steps = [targets for targets in taken if len(targets) != 10][1:-1]  # between the two evaluations
    assert len(hyper_steps) == 4
    for got, batches in zip(hyper_steps, joined, strict=True):
        torch.testing.assert_close(got, torch.cat([valid[i][1] for i in batches]))


def test_epochs_roll_over_and_every_batch_is_used(digits):
    """Far more steps than one epoch has batches: the loader is iterated again, in its own order."""
    seen = []
    x, y = digits.train.x[:40], digits.train.y[:40]
    batches = [(x[i : i + 10], y[i : i + 10]) for i in range(0, 40, 10)]

    def loss(output, targets):
        seen.append(targets.clone())
        return F.cross_entropy(output, targets)

    hypermeta.train(
        mlp(), data=hypermeta.Loaders(train=batches, valid=batches), steps=10, loss_fn=loss,
        learning_rate=hypermeta.LearningRate(init=0.1), eval_every=10,
    )
    training = seen[2:-1]  # after the fit check and the first validation, before the last validation
    expected = [b[1] for b in batches] * 3
    assert len(training) == 10
    for got, want in zip(training, expected, strict=False):
        torch.testing.assert_close(got, want)


def test_regression_with_mse_end_to_end():
    torch.manual_seed(0)
    result = hypermeta.train(
        torch.nn.Linear(5, 1), data=loaders(regression_pairs()), steps=200, loss_fn=F.mse_loss,
        learning_rate=hypermeta.LearningRate(init=0.05), hypergradient=hypermeta.Hypergradient(horizon=10),
        metrics={"mae": lambda output, targets: (output - targets).abs().mean()},
    )
    final = result.evaluations.iloc[-1]
    assert result.status == "completed"
    assert set(result.evaluations.columns) == {"step", "train_loss", "valid_loss", "valid_mae"}
    assert final["valid_loss"] < 0.1 < result.evaluations["valid_loss"].iloc[0] * 10
    assert final["valid_mae"] < 0.3


def test_binary_one_logit_end_to_end(digits):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    result = hypermeta.train(
        model, data=loaders(binary_pairs(digits)), steps=300, loss_fn=F.binary_cross_entropy_with_logits,
        learning_rate=hypermeta.LearningRate(init=0.5), hypergradient=hypermeta.Hypergradient(horizon=10),
    )
    final = result.evaluations.iloc[-1]
    assert {"valid_accuracy", "valid_f1"} <= set(result.evaluations.columns)
    assert "valid_macro_f1" not in result.evaluations.columns
    assert final["valid_accuracy"] > 0.8 and final["valid_f1"] > 0.8


def test_multiclass_metrics_agree_with_sklearn(digits):
    from sklearn.metrics import accuracy_score, f1_score

    model = mlp()
    measured = hypermeta.evaluate(model, DataLoader(TensorDataset(digits.valid.x, digits.valid.y), batch_size=50),
                                  F.cross_entropy)
    with torch.no_grad():
        output = model(digits.valid.x)
    predicted = output.argmax(-1).numpy()
    assert measured["accuracy"] == pytest.approx(accuracy_score(digits.valid.y.numpy(), predicted))
    assert measured["macro_f1"] == pytest.approx(f1_score(digits.valid.y.numpy(), predicted, average="macro"))
    assert measured["loss"] == pytest.approx(float(F.cross_entropy(output, digits.valid.y)))


@pytest.mark.parametrize(
    ("model", "loss_fn", "message"),
    [
        (torch.nn.Linear(5, 3), F.mse_loss, "output (80, 3) float32 and the train targets (80, 1) float32"),
        (torch.nn.Linear(5, 1), lambda o, t: F.mse_loss(o.squeeze(1), t), "do not fit the loss"),
        (torch.nn.Linear(5, 1), lambda o, t: (o - t) ** 2, "returned (80, 1) float32"),
        (torch.nn.Linear(4, 1), F.mse_loss, "the model failed on a train batch of inputs (80, 5) float32"),
    ],
)
def test_misfit_is_one_line_before_training(model, loss_fn, message):
    pairs = regression_pairs()
    data = hypermeta.Loaders(train=[pairs[0]], valid=[pairs[1]])
    with pytest.raises(ValueError, match="^[^\n]*$") as raised:
        hypermeta.train(model, data=data, steps=5, loss_fn=loss_fn, learning_rate=hypermeta.LearningRate(init=0.1))
    assert message in str(raised.value)


def test_loader_yielding_something_else_is_named():
    data = hypermeta.Loaders(train=[torch.zeros(4, 5)], valid=[(torch.zeros(4, 5), torch.zeros(4, 1))])
    with pytest.raises(ValueError, match="train loader yielded Tensor; a loader must yield"):
        hypermeta.train(torch.nn.Linear(5, 1), data=data, steps=2, loss_fn=F.mse_loss,
                        learning_rate=hypermeta.LearningRate(init=0.1))


def test_loaders_decide_the_batch_size():
    batches = [(torch.zeros(4, 5), torch.zeros(4, 1))]
    with pytest.raises(ValueError, match="loaders decide the batch size"):
        hypermeta.Setup(model=torch.nn.Linear(5, 1), data=hypermeta.Loaders(train=batches, valid=batches),
                        steps=5, batch_size=8, learning_rate=hypermeta.LearningRate(init=0.1))
    with pytest.raises(TypeError, match="re-iterable"):
        hypermeta.Loaders(train=iter(batches), valid=batches)


BAD_STUDY = """
import torch, torch.nn.functional as F
import hypermeta

X, Y = torch.randn(48, 5), torch.randn(48, 1)
PAIRS = [(X[i:i + 16], Y[i:i + 16]) for i in range(0, 48, 16)]


def build(trial):
    return hypermeta.Setup(
        model=torch.nn.Linear(5, {outputs}), data=hypermeta.Loaders(train={train}, valid=PAIRS),
        steps=10, loss_fn={loss}, learning_rate=hypermeta.LearningRate(init=0.1),
        {extra}
    )


study = hypermeta.Study(name="bad", build=build, n_trials=1{study_extra})
"""

BAD_STUDIES = {
    "not-a-pair": (dict(train="[X]"), "train loader yielded Tensor"),
    "not-a-scalar": (dict(loss="lambda o, t: (o - t) ** 2"), "not a scalar"),
    "misfit": (dict(outputs=3), "output (16, 3) float32 and the train targets (16, 1) float32"),
    "unmeasured": (dict(study_extra=', metric="valid_accuracy"'), "metric 'valid_accuracy' is not measured"),
    "own-metric": (dict(study_extra=', metric="valid_mae"'), "give Study(direction="),
}


@pytest.mark.parametrize("name", sorted(BAD_STUDIES))
def test_bad_data_in_a_study_is_one_line_and_exit_2(tmp_path, monkeypatch, name):
    fields, message = BAD_STUDIES[name]
    text = BAD_STUDY.format(**{"outputs": 1, "train": "PAIRS", "loss": "F.mse_loss", "extra": "", "study_extra": "",
                               **fields})
    (tmp_path / "study.py").write_text(text)
    monkeypatch.chdir(tmp_path)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["run", "study.py", "--storage", f"sqlite:///{tmp_path / 'db.sqlite'}", "--quiet"])
    assert code == 2, err.getvalue()
    assert err.getvalue().startswith("hypermeta: error: ") and err.getvalue().count("\n") == 1
    assert message in err.getvalue()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.py"], "nothing may be written"
