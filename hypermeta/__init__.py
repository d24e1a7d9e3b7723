"""hypermeta: hyperparameter optimization as meta-learning.

Public names are imported on first use (PEP 562), so that ``import hypermeta`` is cheap and the
``hypermeta`` command sets up its signal handling before torch and Optuna load.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.2.0"

if TYPE_CHECKING:  # what the lazy names below resolve to, for type checkers and the API reference
    from hypermeta import datasets, reports, tasks
    from hypermeta._data import Dataset, Loaders, Split
    from hypermeta._engine import TRAJECTORY_COLUMNS, Diverged, Hypergradient, HyperOptimizer, TrainResult, train
    from hypermeta._episodic import EpisodicResult, EpisodicSetup, InnerLearningRate, evaluate_tasks, meta_train
    from hypermeta._hyperparameters import LearningRate, WeightDecay
    from hypermeta._metrics import evaluate
    from hypermeta._results import load_evaluations, load_trajectories
    from hypermeta._study import Setup, Study

_HOMES = {
    "hypermeta._data": ["Dataset", "Loaders", "Split"],
    "hypermeta._engine": ["TRAJECTORY_COLUMNS", "Diverged", "Hypergradient", "HyperOptimizer", "TrainResult", "train"],
    "hypermeta._episodic": ["EpisodicResult", "EpisodicSetup", "InnerLearningRate", "evaluate_tasks", "meta_train"],
    "hypermeta._hyperparameters": ["LearningRate", "WeightDecay"],
    "hypermeta._metrics": ["evaluate"],
    "hypermeta._results": ["load_evaluations", "load_trajectories"],
    "hypermeta._study": ["Setup", "Study"],
}
_SUBMODULES = ["datasets", "reports", "tasks"]
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"hypermeta.{name}")
    if name not in _HOME_OF:
        raise AttributeError(f"module 'hypermeta' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME_OF[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = sorted([*_HOME_OF, "datasets", "tasks"])  # not reports: a star import should not load matplotlib
