"""What a study file declares: a :class:`Study` whose build function returns a :class:`Setup`."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optuna
import torch
import torch.nn.functional as F

from hypermeta._data import Dataset, Loaders, Split, check_batch, to_run
from hypermeta._engine import (
    Hypergradient,
    HyperOptimizer,
    TrainResult,
    check_data,
    parameter_groups,
    train,
    train_loop,
)
from hypermeta._engine import evaluation_cadence as engine_cadence
from hypermeta._episodic import EpisodicSetup
from hypermeta._hyperparameters import LearningRate, WeightDecay
from hypermeta._metrics import Metric, evaluate, fit_problem

METRICS = {
    "valid_loss": "minimize", "valid_accuracy": "maximize", "valid_macro_f1": "maximize", "valid_f1": "maximize",
}


@dataclass(kw_only=True)
class Setup:
    """One training run for the engine: what a study's build function returns.

    The fields are :func:`hypermeta.train`'s arguments of the same names. ``data`` is a
    :class:`hypermeta.Dataset` (then ``batch_size`` is required) or :class:`hypermeta.Loaders`
    (the loaders decide the batch size). ``loss_fn(output, targets)`` is the training and
    validation loss (cross-entropy by default; ``mse_loss`` for regression,
    ``binary_cross_entropy_with_logits`` for one logit and 0/1 float targets); it must return a
    scalar. ``metrics`` adds ``valid_<name>`` to each evaluation, ``fn(outputs, targets) -> float``
    over the whole validation split, which a :class:`Study` can optimize.

    ``loop(hyper, report)``, a training loop of your own, replaces hypermeta's: ``hyper`` is a
    :class:`hypermeta.HyperOptimizer` built from these fields; the loop brings its own data
    (``data`` may be left out), calls ``hyper.step`` ``steps`` times and ``report({"valid_loss":
    ...})`` after its evaluations. Trajectories and evaluations are stored as for any run.

    Example:
        >>> import torch, hypermeta
        >>> setup = hypermeta.Setup(
        ...     model=torch.nn.Linear(64, 10), data=hypermeta.datasets.digits(), steps=100,
        ...     batch_size=32, learning_rate=hypermeta.LearningRate(init=0.05))
        >>> setup.optimizer
        'sgd'
    """

    model: torch.nn.Module
    steps: int
    learning_rate: LearningRate
    data: Dataset | Loaders | None = None
    batch_size: int | None = None
    weight_decay: WeightDecay | None = None
    optimizer: str = "sgd"
    optimizer_options: dict[str, Any] = field(default_factory=dict)
    hypergradient: Hypergradient | None = field(default_factory=Hypergradient)
    loss_fn: Callable[..., torch.Tensor] = F.cross_entropy
    metrics: dict[str, Metric] = field(default_factory=dict)
    eval_every: int | None = None
    loop: Callable[[HyperOptimizer, Callable[[dict[str, float]], None]], None] | None = None

    def train(self, **options) -> TrainResult:
        """:func:`hypermeta.train` on this set-up (or its ``loop``); ``options`` are its remaining keyword arguments."""
        if self.loop is not None:
            options.pop("seed", None)  # the loop draws its own batches; the runner has seeded torch
            return train_loop(
                self.loop, self.model, steps=self.steps, learning_rate=self.learning_rate,
                weight_decay=self.weight_decay, optimizer=self.optimizer, optimizer_options=self.optimizer_options,
                hypergradient=self.hypergradient, **options,
            )
        return train(
            self.model, data=self.data, steps=self.steps, batch_size=self.batch_size,
            learning_rate=self.learning_rate, weight_decay=self.weight_decay, optimizer=self.optimizer,
            optimizer_options=self.optimizer_options, hypergradient=self.hypergradient, loss_fn=self.loss_fn,
            metrics=self.metrics, eval_every=self.eval_every, **options,
        )

    def test_metrics(self, result: TrainResult, *, device, seed: int) -> dict[str, float]:
        """Loss (accuracy, F1, the user's metrics) of the trained model on the test split, if any."""
        if self.data is None or self.data.test is None:
            return {}
        return evaluate(result.model, self.data.test, self.loss_fn, self.metrics)

    def data_problem(self, metric: str = "valid_loss") -> str | None:
        """Why the first train and validation batches do not fit the model and loss, or why
        ``metric`` is not measured; ``None`` when all is well. Nothing of the model changes.
        A loop of the user's own is not run here: what it reports is its own."""
        if self.loop is not None:
            return None
        batches = {}
        for where in ("train", "valid"):
            data = getattr(self.data, where)
            if isinstance(data, Split):
                batches[where] = (data.x[: self.batch_size], data.y[: self.batch_size])
                continue
            try:
                batches[where] = check_batch(next(iter(data)), where)
            except StopIteration:
                return f"the {where} loader yielded no batches"
            except ValueError as error:
                return str(error)
        parameter = next(self.model.parameters())
        for where, (x, y) in batches.items():
            batch = to_run(x, parameter.device, parameter.dtype), to_run(y, parameter.device, parameter.dtype)
            problem = fit_problem(self.model, batch, self.loss_fn, where)
            if problem:
                return problem
        measured = evaluate(self.model, [batches["valid"]], self.loss_fn, self.metrics)
        if metric.removeprefix("valid_") not in measured:
            names = ", ".join(f"valid_{name}" for name in measured)
            return f"metric {metric!r} is not measured on this set-up (it measures {names}); add it to Setup.metrics"
        return None

    def __post_init__(self) -> None:
        kinds = (("model", torch.nn.Module), ("data", Dataset | Loaders), ("learning_rate", LearningRate))
        if self.loop is not None:
            if not callable(self.loop):
                raise TypeError(f"Setup.loop must be a function loop(hyper, report), got {type(self.loop).__name__}")
            kinds = kinds[::2] if self.data is None else kinds
        for name, kind in kinds:
            if not isinstance(getattr(self, name), kind):
                expected = "Dataset or Loaders" if name == "data" else kind.__name__
                raise TypeError(f"Setup.{name} must be a {expected}, got {type(getattr(self, name)).__name__}")
        for name in ("steps", "eval_every"):
            value = getattr(self, name)
            if value is None and name == "eval_every":
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"Setup.{name} must be an integer >= 1, got {value!r}")
        if self.data is not None:
            check_data(self.data, self.batch_size)


def setup_problem(setup, metric: str) -> str | None:
    """What is wrong with a built set-up for a study optimizing ``metric`` (before anything is written)."""
    if isinstance(setup, Setup):
        return setup.data_problem(metric)
    return setup.metric_problem(metric)


@dataclass(kw_only=True)
class Study:
    """A study: its name, what to optimize, how many trials, and how to build each trial's run.

    Inside ``build(trial)`` plain ``trial.suggest_*`` calls choose what is not differentiable
    (width, depth, batch size, optimizer, estimator, initial values of the differentiable
    hyperparameters); hypergradients adapt the rest during each run.

    Args:
        name: the study's name in the storage.
        build: ``build(trial) -> Setup``.
        metric: the final validation metric to optimize: ``"valid_loss"``, ``"valid_accuracy"``,
            ``"valid_macro_f1"`` (multi-class), ``"valid_f1"`` (binary), or ``"valid_<name>"`` of a
            metric of ``Setup.metrics``.
        direction: ``"minimize"`` or ``"maximize"``; it follows from a built-in metric, and a
            metric of your own needs it.
        n_trials: finished trials the study should hold (``--n-trials`` overrides it).
        pruner: an Optuna pruner; by default a median pruner.

    Example:
        >>> import torch, hypermeta
        >>> def build(trial):
        ...     return hypermeta.Setup(
        ...         model=torch.nn.Linear(64, 10), data=hypermeta.datasets.digits(), steps=50,
        ...         batch_size=trial.suggest_categorical("batch_size", [16, 32]),
        ...         learning_rate=hypermeta.LearningRate(init=trial.suggest_float("lr", 1e-3, 1, log=True)))
        >>> hypermeta.Study(name="demo", build=build, n_trials=5).direction
        'minimize'
    """

    name: str
    build: Callable[[optuna.Trial], Setup]
    metric: str = "valid_loss"
    direction: str | None = None
    n_trials: int = 10
    pruner: optuna.pruners.BasePruner | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"study name must be a non-empty string, got {self.name!r}")
        if not callable(self.build):
            raise ValueError("build must be a function build(trial) -> hypermeta.Setup")
        if not isinstance(self.metric, str) or not self.metric.startswith("valid_"):
            raise ValueError(f"metric must be one of {sorted(METRICS)} or valid_<name>, got {self.metric!r}")
        self.direction = self.direction or METRICS.get(self.metric)
        if self.direction not in ("minimize", "maximize"):
            raise ValueError(
                f"metric {self.metric!r} is your own: give Study(direction='minimize' or 'maximize'), "
                f"got {self.direction!r}"
            )
        if not isinstance(self.n_trials, int) or self.n_trials < 1:
            raise ValueError(f"n_trials must be an integer >= 1, got {self.n_trials!r}")

    def make_pruner(self) -> optuna.pruners.BasePruner:
        return self.pruner or optuna.pruners.MedianPruner(n_startup_trials=3)


def resolve(
    setup: Setup, trial: optuna.Trial, *, online: bool = True, start: dict[str, float] | None = None
) -> tuple[Setup, dict[str, float]]:
    """Let ``trial`` choose what ``setup`` leaves to the search; returns it and initial values.

    ``online``: each ``init=(low, high)`` range becomes one parameter (``lr_init``,
    ``weight_decay_init``); hypergradients then move the values during training. Otherwise
    (black-box search) every entry -- each group and schedule segment -- becomes its own parameter
    over the init range (the bounds where the init is a fixed number), held fixed during the run,
    and hypergradients are switched off.

    ``start`` (online only; a warm start) gives entries their initial values: the entries of this
    setup with the same key -- same layer names and segments -- start there, and a kind whose
    entries are all given is not searched.

    An episodic set-up has only ``meta_lr`` to choose, and runs with hypergradients only.
    """
    if isinstance(setup, EpisodicSetup):
        if not online:
            raise TypeError("an episodic set-up learns its inner rates by hypergradient only: no black-box arm")
        if isinstance(setup.meta_lr, tuple):
            setup = dataclasses.replace(setup, meta_lr=trial.suggest_float("meta_lr", *setup.meta_lr, log=True))
        return setup, {}
    if online:
        keys = hyperparameter_keys(setup)
        warm = {key: value for key, value in (start or {}).items() if key in keys}
        covered = {kind for kind in ("lr", "weight_decay") if _all_given(keys, kind, warm)}
        return _suggest_online(setup, trial, skip=covered), warm
    values = {
        key: trial.suggest_float(key, *search_range(spec_of(setup, key)), log=True)
        for key in hyperparameter_keys(setup)
    }
    return _without_hypergradients(setup), values


def search_range(spec: LearningRate | WeightDecay) -> tuple[float, float]:
    return spec.init if isinstance(spec.init, tuple) else spec.bounds


def hyperparameter_keys(setup: Setup) -> list[str]:
    """Every scalar differentiable hyperparameter of ``setup``, keyed as the engine reports them."""
    groups = list(parameter_groups(setup.model))
    lr = setup.learning_rate
    keys = [
        f"lr/{group}/{segment}"
        for segment in range(lr.segments)
        for group in (groups if lr.scope == "per_group" else ["all"])
    ]
    if setup.weight_decay is not None:
        keys += [f"weight_decay/{g}" for g in (groups if setup.weight_decay.scope == "per_group" else ["all"])]
    return keys


def geometric_middle(low: float, high: float) -> float:
    return math.sqrt(low * high)


def _all_given(keys: list[str], kind: str, values: dict[str, float]) -> bool:
    of_kind = [key for key in keys if key.split("/")[0] == kind]
    return bool(of_kind) and all(key in values for key in of_kind)


def _suggest_online(setup: Setup, trial: optuna.Trial, *, skip: set[str]) -> Setup:
    def choose(spec, name):
        if spec is None or not isinstance(spec.init, tuple):
            return spec
        if name.removesuffix("_init") in skip:  # every entry starts from given values: any init will do
            return dataclasses.replace(spec, init=geometric_middle(*spec.init))
        return dataclasses.replace(spec, init=trial.suggest_float(name, *spec.init, log=True))

    return dataclasses.replace(
        setup,
        learning_rate=choose(setup.learning_rate, "lr_init"),
        weight_decay=choose(setup.weight_decay, "weight_decay_init"),
    )


def evaluation_cadence(setup: Setup) -> int:
    """Every how many steps ``setup`` is evaluated: its ``eval_every``, else the engine's default."""
    return engine_cadence(setup.steps, setup.hypergradient, setup.eval_every)


def starting_value(spec: LearningRate | WeightDecay) -> float:
    """The init, or the geometric middle of an init range."""
    return geometric_middle(*spec.init) if isinstance(spec.init, tuple) else spec.init


def spec_of(setup: Setup, key: str) -> LearningRate | WeightDecay:
    """The specification behind an entry key such as ``lr/0/1`` or ``weight_decay/all``."""
    return setup.learning_rate if key.startswith("lr/") else setup.weight_decay


def _without_hypergradients(setup: Setup) -> Setup:
    """``setup`` with fixed hyperparameters: no hypergradients, every init range at its middle."""

    def fixed(spec):
        return None if spec is None else dataclasses.replace(spec, init=starting_value(spec))

    return dataclasses.replace(
        setup,
        learning_rate=fixed(setup.learning_rate),
        weight_decay=fixed(setup.weight_decay),
        hypergradient=None,
    )
