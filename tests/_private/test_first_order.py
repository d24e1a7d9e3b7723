"""The first-order estimator trains with plain ``torch.optim`` steps: meta_lr = 0 is the plain run."""

import pytest
import torch

import hypermeta
from tests.conftest import mlp


def _train(data, optimizer, options, hypergradient):
    return hypermeta.train(
        mlp(dtype=torch.float64), data=data, steps=23, batch_size=16, optimizer=optimizer,
        optimizer_options=options, hypergradient=hypergradient,
        learning_rate=hypermeta.LearningRate(init=0.02, scope="per_group", segments=2),
        weight_decay=hypermeta.WeightDecay(init=1e-3),
    )


@pytest.mark.parametrize(
    ("optimizer", "options"),
    [("sgd", {"momentum": 0.9, "dampening": 0.2}), ("sgd", {"momentum": 0.9, "nesterov": True}), ("adam", {})],
)
def test_meta_lr_zero_is_the_plain_run(small_digits, optimizer, options):
    plain = _train(small_digits, optimizer, options, None)
    adapted = _train(
        small_digits, optimizer, options, hypermeta.Hypergradient(estimator="first_order", horizon=5, meta_lr=0.0)
    )
    assert adapted.trajectory["hypergradient"].abs().sum() > 0
    for got, want in zip(adapted.model.parameters(), plain.model.parameters(), strict=True):
        assert torch.equal(got, want)
