"""Models as they are: BatchNorm running statistics and Dropout through plain and unrolled training."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import hypermeta
from tests.conftest import pinned


def bn_model(*, dropout=0.0, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Dropout(dropout),
        torch.nn.Linear(16, 10),
    ).to(dtype)


def loader(split, seed, batch_size=16):
    return DataLoader(TensorDataset(split.x, split.y), batch_size=batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))


def plain_torch(data, steps, lr, options):
    model = bn_model()
    groups = [{"params": list(m.parameters(recurse=False))} for m in model.modules()
              if list(m.parameters(recurse=False))]
    optimizer = torch.optim.SGD(groups, lr=lr, weight_decay=1e-3, **options)
    batches, done = loader(data.train, seed=1), 0
    while done < steps:
        for x, y in batches:
            if done == steps:
                break
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            done += 1
    return model


@pytest.mark.parametrize("hypergradient", [None, "unrolled", "first_order", "greedy"])
def test_values_that_cannot_move_over_a_dataloader_are_plain_torch(small_digits, hypergradient):
    """Weights and running statistics equal a torch.optim loop over the same DataLoader batches."""
    steps, lr, options = 17, 0.05, {"momentum": 0.9}
    expected = plain_torch(small_digits, steps, lr, options)
    data = hypermeta.Loaders(train=loader(small_digits.train, seed=1), valid=[(small_digits.valid.x,
                                                                              small_digits.valid.y)])
    result = hypermeta.train(
        bn_model(), data=data, steps=steps, optimizer_options=options,
        learning_rate=pinned(hypermeta.LearningRate(init=lr, scope="per_group")),
        weight_decay=pinned(hypermeta.WeightDecay(init=1e-3)),
        hypergradient=hypergradient and hypermeta.Hypergradient(estimator=hypergradient, horizon=5),
        eval_every=10,
    )
    assert result.status == "completed" and result.steps == steps
    got, want = result.model.state_dict(), expected.state_dict()
    assert got.keys() == want.keys() and "1.running_mean" in got
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-10, atol=1e-12, msg=key)
    assert int(got["1.num_batches_tracked"]) == steps


@pytest.mark.parametrize("hypergradient", [None, "unrolled", "first_order"])
def test_guard_restores_running_statistics(small_digits, hypergradient):
    """A window rejected for its loss leaves weights and running statistics as they were before it."""
    model = bn_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = hypermeta.train(
        model, data=small_digits, steps=20, batch_size=16, learning_rate=hypermeta.LearningRate(init=0.05),
        max_loss_ratio=0.5,  # every window's training loss is above half the initial validation loss
        hypergradient=hypergradient and hypermeta.Hypergradient(estimator=hypergradient, horizon=5),
    )
    assert result.status == "diverged" and result.steps == 0
    for key, value in result.model.state_dict().items():
        torch.testing.assert_close(value, before[key], msg=key)


def test_dropout_on_in_training_off_in_evaluation(small_digits):
    """Training steps see the model in train mode, evaluations in eval mode; train mode is left at the end."""
    model = bn_model(dropout=0.5)
    modes = []

    def loss(output, targets):
        modes.append((torch.is_grad_enabled(), model[3].training))
        return F.cross_entropy(output, targets)

    result = hypermeta.train(
        model, data=small_digits, steps=10, batch_size=16, learning_rate=hypermeta.LearningRate(init=0.05),
        loss_fn=loss, eval_every=5,
    )
    training = [dropout_on for grad, dropout_on in modes if grad]
    evaluation = [dropout_on for grad, dropout_on in modes if not grad]
    assert training == [True] * 10
    assert evaluation == [False] * 4  # the fit check, the initial evaluation and two evaluations
    assert result.model.training
    again = hypermeta.evaluate(result.model, small_digits.valid, F.cross_entropy)
    assert again["loss"] == result.evaluations["valid_loss"].iloc[-1]


def test_validation_mode_leaves_running_statistics_and_is_deterministic(small_digits):
    """The hyper-step's validation loss: Dropout off, batch statistics, running statistics untouched."""
    from hypermeta._private.modes import validation_mode

    model = bn_model(dropout=0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with validation_mode(model):
        first = model(small_digits.valid.x)
        second = model(small_digits.valid.x)
        assert not model[3].training and model[1].training
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert model.training and model[3].training
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)
