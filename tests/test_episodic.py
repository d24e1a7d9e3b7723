"""The episodic engine: exact meta-gradients (finite differences), learning, evaluation, bad inputs."""

import math

import pytest
import torch

import hypermeta
from hypermeta._episodic import make_inner_rates
from hypermeta._private.episodes import InnerLoop

EPS = 1e-6
INNER_STEPS = 2


def _tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(1, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1)
    ).double()


def _meta_loss(model, inner, episodes):
    loop = InnerLoop(model, inner, torch.nn.functional.mse_loss)
    *_, fast = loop.adapt(episodes.support, INNER_STEPS, differentiable=True)
    return loop.task_losses(fast, episodes.query)[0].mean()


def _finite_difference(model, inner, episodes, tensor, index):
    flat = tensor.data.view(-1)
    saved = flat[index].item()
    flat[index] = saved + EPS
    up = _meta_loss(model, inner, episodes).item()
    flat[index] = saved - EPS
    down = _meta_loss(model, inner, episodes).item()
    flat[index] = saved
    return (up - down) / (2 * EPS)


@pytest.mark.parametrize("form,weight_decay", [
    ("per_layer_per_step", None),
    ("per_parameter", None),
    ("per_layer", hypermeta.WeightDecay(init=0.05, scope="per_group")),
    ("fixed", None),
])
def test_meta_gradient_matches_finite_differences(form, weight_decay):
    """d(query loss after 2 inner steps)/d(log inner rates, initial weights), float64, every entry."""
    model = _tiny_model()
    inner = make_inner_rates(
        model, inner_lr=hypermeta.InnerLearningRate(init=0.3, form=form), inner_weight_decay=weight_decay,
        inner_steps=INNER_STEPS,
    )
    with torch.no_grad():  # distinct values, so a mix-up of layers or steps would show
        for tensor in inner.tensors():
            tensor.add_(0.2 * torch.randn(tensor.shape, generator=torch.Generator().manual_seed(1), dtype=tensor.dtype))
    episodes = hypermeta.tasks.Sinusoid().sample(
        3, shots=5, query=6, generator=torch.Generator().manual_seed(0)
    ).to("cpu", torch.float64)
    leaves = [*inner.tensors(), *model.parameters()]
    grads = torch.autograd.grad(_meta_loss(model, inner, episodes), leaves)
    assert len(inner.tensors()) == {"fixed": 0, "per_parameter": 4}.get(form, 2 if weight_decay else 1)
    for tensor, grad in zip(leaves, grads, strict=True):
        expected = torch.tensor([
            _finite_difference(model, inner, episodes, tensor, i) for i in range(tensor.numel())
        ], dtype=torch.float64)
        error = (grad.flatten() - expected).norm() / expected.norm()
        assert error <= 1e-4, f"relative error {error:.2e}: {grad.flatten()} vs {expected}"


def test_per_step_rates_get_their_own_gradients():
    model = _tiny_model()
    inner = make_inner_rates(model, inner_lr=hypermeta.InnerLearningRate(init=0.1), inner_weight_decay=None,
                             inner_steps=INNER_STEPS)
    episodes = hypermeta.tasks.Sinusoid().sample(2, shots=5, query=5, generator=torch.Generator().manual_seed(0))
    (grad,) = torch.autograd.grad(_meta_loss(model, inner, episodes.to("cpu", torch.float64)), inner.tensors())
    assert grad.shape == (INNER_STEPS, 2) and (grad != 0).all()
    assert not torch.allclose(grad[0], grad[1])


def sinusoid_model(width=40):
    return torch.nn.Sequential(
        torch.nn.Linear(1, width), torch.nn.ReLU(), torch.nn.Linear(width, width), torch.nn.ReLU(),
        torch.nn.Linear(width, 1),
    )


def test_learned_rates_lower_the_meta_validation_loss():
    torch.manual_seed(0)
    result = hypermeta.meta_train(
        sinusoid_model(), tasks=hypermeta.tasks.Sinusoid(), shots=10, query=10, inner_steps=3, meta_steps=120,
        meta_batch=10, inner_lr=hypermeta.InnerLearningRate(init=0.01, form="per_layer_per_step", meta_lr=0.03),
        meta_lr=3e-3, eval_every=60, valid_tasks=50,
    )
    assert result.status == "completed" and result.steps == 120
    losses = result.evaluations["valid_loss"].tolist()
    assert len(losses) == 3 and losses[-1] < 0.7 * losses[0]
    rates = result.trajectory[result.trajectory["name"] == "inner_lr"]
    assert list(result.trajectory.columns) == hypermeta.TRAJECTORY_COLUMNS
    assert sorted(rates["step"].unique()) == [60, 120]
    assert sorted(rates["segment"].unique()) == [0, 1, 2] and set(rates["group"]) == {"0", "2", "4"}
    assert rates["value"].max() > 0.011  # the rates moved from 0.01
    assert set(result.hyperparameters) == {f"inner_lr/{g}/{s}" for g in "024" for s in range(3)}


def test_evaluation_is_the_same_held_out_tasks_for_every_model():
    sinusoid = hypermeta.tasks.Sinusoid()
    results = [
        hypermeta.meta_train(sinusoid_model(8), tasks=sinusoid, shots=5, query=5, inner_steps=1, meta_steps=1,
                             inner_lr=hypermeta.InnerLearningRate(form="fixed"))
        for _ in range(2)
    ]
    tables = [hypermeta.evaluate_tasks(r, tasks=sinusoid, shots=5, query=10, n_tasks=30, steps=(0, 1, 5))
              for r in results]
    again = hypermeta.evaluate_tasks(results[0], tasks=sinusoid, shots=5, query=10, n_tasks=30, steps=(0, 1, 5),
                                     batch=7)
    assert tables[0]["loss"].tolist() == pytest.approx(again["loss"].tolist())
    assert tables[0]["loss"].tolist() != tables[1]["loss"].tolist()
    assert (tables[0]["loss_ci95"] > 0).all()


def test_digits_evaluation_reports_accuracy():
    digits = hypermeta.tasks.Digits()
    model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))
    result = hypermeta.meta_train(
        model, tasks=digits, shots=1, query=3, inner_steps=1, meta_steps=2, meta_batch=4, valid_tasks=10,
        inner_lr=hypermeta.InnerLearningRate(init=0.1, form="per_parameter"),
    )
    assert {"valid_loss", "valid_accuracy"} <= set(result.evaluations.columns)
    table = hypermeta.evaluate_tasks(result, tasks=digits, shots=1, query=3, n_tasks=20, steps=(1,))
    assert 0 <= table["accuracy"].iloc[0] <= 1 and math.isfinite(table["accuracy_ci95"].iloc[0])


def test_divergence_ends_the_run_with_a_reason():
    result = hypermeta.meta_train(
        sinusoid_model(8), tasks=hypermeta.tasks.Sinusoid(amplitude=(1e6, 1e6)), shots=5, query=5, inner_steps=5,
        meta_steps=5, meta_batch=2, inner_lr=hypermeta.InnerLearningRate(init=10.0, form="fixed"), valid_tasks=2,
    )
    assert result.status == "diverged" and "not finite" in result.reason


@pytest.mark.parametrize("bad, message", [
    ({"inner_steps": 0}, "inner_steps"),
    ({"meta_batch": 1.5}, "meta_batch"),
    ({"shots": 300}, "shots"),
    ({"meta_lr": -1.0}, "meta_lr"),
])
def test_bad_arguments_are_clear_errors(bad, message):
    arguments = {"shots": 5, "query": 5, "inner_steps": 1, "meta_steps": 1, **bad}
    with pytest.raises(ValueError, match=message):
        hypermeta.meta_train(torch.nn.Linear(64, 5), tasks=hypermeta.tasks.Digits(), **arguments)


def test_bad_inner_learning_rates_are_rejected():
    with pytest.raises(ValueError, match="form"):
        hypermeta.InnerLearningRate(form="per_layer_step")
    with pytest.raises(ValueError, match="bounds"):
        hypermeta.InnerLearningRate(init=100.0)


def test_episodic_setup_checks_shots_at_build_time():
    with pytest.raises(ValueError, match="images of digit"):
        hypermeta.EpisodicSetup(model=torch.nn.Linear(64, 5), tasks=hypermeta.tasks.Digits(), shots=180, query=1,
                                inner_steps=1, meta_steps=1)
