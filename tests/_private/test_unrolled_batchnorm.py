"""Hypergradients of a BatchNorm + Dropout model in train mode against central finite differences (float64).

The window trains in train mode (batch statistics, running statistics updated, Dropout masks drawn from
a seeded generator, the same masks in every evaluation) and takes its validation loss in validation mode.
"""

import pytest
import torch

import hypermeta
from hypermeta._engine import _ESTIMATORS, build_run
from tests._private.test_hypergradients import warmed_up

EPS = 1e-5
WARMUP, N_STEPS = 3, 5


def bn_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Dropout(0.2),
        torch.nn.Linear(16, 10),
    ).double()


def window(data, optimizer, shift=None, estimator="unrolled", n_steps=N_STEPS):
    options = {"momentum": 0.9} if optimizer == "sgd" else {}
    run = build_run(
        bn_model(), data=data, steps=20, batch_size=16, optimizer=optimizer, optimizer_options=options,
        learning_rate=hypermeta.LearningRate(init=0.05 if optimizer == "sgd" else 0.005, scope="per_group"),
        weight_decay=hypermeta.WeightDecay(init=0.01), loss_fn=torch.nn.functional.cross_entropy, seed=0,
    )
    torch.manual_seed(1)  # the Dropout masks
    warmed_up(run, shift, warmup=WARMUP)
    return run, _ESTIMATORS[estimator](run, WARMUP, n_steps)


@pytest.mark.parametrize(("estimator", "n_steps"), [("unrolled", N_STEPS), ("first_order", 1), ("greedy", 1)])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_batchnorm_hypergradients_match_finite_differences(small_digits, optimizer, estimator, n_steps):
    """Exact for the unroll; the first-order estimators are exact over one step (K = 1)."""
    run, estimated = window(small_digits, optimizer, estimator=estimator, n_steps=n_steps)
    for t, tensor in enumerate(run.hyper.tensors()):
        expected = torch.stack([
            (window(small_digits, optimizer, (t, i, EPS), estimator, n_steps)[1].valid_loss
             - window(small_digits, optimizer, (t, i, -EPS), estimator, n_steps)[1].valid_loss) / (2 * EPS)
            for i in range(tensor.numel())
        ]).view_as(tensor)
        got = estimated.hypergradients[t]
        assert expected.abs().min() > 0
        error = (got - expected).norm() / expected.norm()
        assert error <= 1e-4, f"relative error {error:.2e}: {got} vs {expected}"


def test_commit_writes_the_windows_running_statistics_back(small_digits):
    run, estimated = window(small_digits, "sgd")
    before = run.model[1].running_mean.clone()
    estimated.commit()
    after = run.model[1].running_mean
    assert not torch.equal(before, after)
    assert int(run.model[1].num_batches_tracked) == WARMUP + N_STEPS
