"""hypermeta: hyperparameter optimization as meta-learning."""

from hypermeta import datasets
from hypermeta._data import Dataset, Split
from hypermeta._engine import TRAJECTORY_COLUMNS, Hypergradient, TrainResult, train
from hypermeta._hyperparameters import LearningRate, WeightDecay
from hypermeta._metrics import evaluate
from hypermeta._results import load_evaluations, load_trajectories
from hypermeta._study import Setup, Study

__version__ = "0.1.0"

__all__ = [
    "TRAJECTORY_COLUMNS",
    "Dataset",
    "Hypergradient",
    "LearningRate",
    "Setup",
    "Split",
    "Study",
    "TrainResult",
    "WeightDecay",
    "datasets",
    "evaluate",
    "load_evaluations",
    "load_trajectories",
    "train",
]
