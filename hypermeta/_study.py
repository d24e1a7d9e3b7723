"""What a study file declares: a :class:`Study` whose build function returns a :class:`Setup`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optuna
import torch
import torch.nn.functional as F

from hypermeta._data import Dataset
from hypermeta._engine import Hypergradient
from hypermeta._hyperparameters import LearningRate, WeightDecay

METRICS = {"valid_loss": "minimize", "valid_accuracy": "maximize", "valid_macro_f1": "maximize"}


@dataclass(kw_only=True)
class Setup:
    """One training run for the engine: what a study's build function returns.

    The fields are :func:`hypermeta.train`'s arguments of the same names.

    Example:
        >>> import torch, hypermeta
        >>> setup = hypermeta.Setup(
        ...     model=torch.nn.Linear(64, 10), data=hypermeta.datasets.digits(), steps=100,
        ...     batch_size=32, learning_rate=hypermeta.LearningRate(init=0.05))
        >>> setup.optimizer
        'sgd'
    """

    model: torch.nn.Module
    data: Dataset
    steps: int
    batch_size: int
    learning_rate: LearningRate
    weight_decay: WeightDecay | None = None
    optimizer: str = "sgd"
    optimizer_options: dict[str, Any] = field(default_factory=dict)
    hypergradient: Hypergradient | None = field(default_factory=Hypergradient)
    loss_fn: Callable[..., torch.Tensor] = F.cross_entropy
    eval_every: int | None = None


@dataclass(kw_only=True)
class Study:
    """A study: its name, what to optimize, how many trials, and how to build each trial's run.

    Inside ``build(trial)`` plain ``trial.suggest_*`` calls choose what is not differentiable
    (width, depth, batch size, optimizer, horizon, estimator, meta learning rate, initial values
    of the differentiable hyperparameters); hypergradients adapt the rest during each run.

    Args:
        name: the study's name in the storage.
        build: ``build(trial) -> Setup``.
        metric: the final validation metric to optimize: ``"valid_loss"``, ``"valid_accuracy"`` or
            ``"valid_macro_f1"``. Its direction follows from it.
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
    n_trials: int = 10
    pruner: optuna.pruners.BasePruner | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"study name must be a non-empty string, got {self.name!r}")
        if not callable(self.build):
            raise ValueError("build must be a function build(trial) -> hypermeta.Setup")
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {sorted(METRICS)}, got {self.metric!r}")
        if not isinstance(self.n_trials, int) or self.n_trials < 1:
            raise ValueError(f"n_trials must be an integer >= 1, got {self.n_trials!r}")

    @property
    def direction(self) -> str:
        return METRICS[self.metric]

    def make_pruner(self) -> optuna.pruners.BasePruner:
        return self.pruner or optuna.pruners.MedianPruner(n_startup_trials=3)
