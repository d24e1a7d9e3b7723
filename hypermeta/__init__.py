"""hypermeta: hyperparameter optimization as meta-learning."""

from hypermeta import datasets, tasks
from hypermeta._data import Dataset, Loaders, Split
from hypermeta._engine import TRAJECTORY_COLUMNS, Diverged, Hypergradient, HyperOptimizer, TrainResult, train
from hypermeta._episodic import EpisodicResult, EpisodicSetup, InnerLearningRate, evaluate_tasks, meta_train
from hypermeta._hyperparameters import LearningRate, WeightDecay
from hypermeta._metrics import evaluate
from hypermeta._results import load_evaluations, load_trajectories
from hypermeta._study import Setup, Study

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "reports":  # imported on first use: it loads matplotlib
        import importlib

        return importlib.import_module("hypermeta.reports")
    raise AttributeError(f"module 'hypermeta' has no attribute {name!r}")


__all__ = [
    "TRAJECTORY_COLUMNS",
    "Dataset",
    "Diverged",
    "EpisodicResult",
    "EpisodicSetup",
    "HyperOptimizer",
    "Hypergradient",
    "InnerLearningRate",
    "LearningRate",
    "Loaders",
    "Setup",
    "Split",
    "Study",
    "TrainResult",
    "WeightDecay",
    "datasets",
    "evaluate",
    "evaluate_tasks",
    "load_evaluations",
    "load_trajectories",
    "meta_train",
    "tasks",
    "train",
]
