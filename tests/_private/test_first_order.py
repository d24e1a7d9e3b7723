"""The first-order estimator trains with plain ``torch.optim`` steps: meta_lr = 0 is the plain run."""

import pytest
import torch

import hypermeta
from hypermeta._private.first_order import _Tangents
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


@pytest.mark.parametrize(
    ("optimizer", "options"), [("sgd", {"momentum": 0.9, "dampening": 0.2}), ("adam", {})]
)
def test_a_parameter_without_gradient_keeps_its_tangents(optimizer, options):
    """torch.optim skips a parameter whose gradient is None; its tangents (weights and state) must stay."""
    model = mlp(dtype=torch.float64)
    cls = torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam
    inner = cls([{"params": m.parameters()} for m in (model[0], model[2])], lr=0.05, weight_decay=0.01, **options)
    tangents = _Tangents(inner, 2, wd_row=1)
    x, y = torch.randn(8, 64, dtype=torch.float64), torch.arange(8) % 10
    for skip_last_layer in (False, False, True):
        inner.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        if skip_last_layer:
            model[2].weight.grad = model[2].bias.grad = None
            before = [t.clone() for t in (tangents.weights, tangents.moments)]
        tangents.step(lr_row=0)
    first, last = tangents.group_columns
    for now, then in zip((tangents.weights, tangents.moments), before, strict=True):
        assert torch.equal(now[:, last], then[:, last])
        assert not torch.equal(now[:, first], then[:, first])
        assert now[:, last].abs().sum() > 0
