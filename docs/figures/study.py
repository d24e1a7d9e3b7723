"""The study behind the report gallery in docs/reports.md (regenerate: see that page).

A digits MLP with a learning-rate schedule of 2 segments per layer and a shared weight decay,
adapted by hypergradients; the median pruner starts late so that enough trials complete for
parameter importances, and still prunes some.
"""

import optuna
import torch

import hypermeta

DATA = hypermeta.datasets.digits()


def build(trial):
    width = trial.suggest_int("width", 16, 128, log=True)
    model = torch.nn.Sequential(torch.nn.Linear(64, width), torch.nn.ReLU(), torch.nn.Linear(width, 10))
    return hypermeta.Setup(
        model=model,
        data=DATA,
        steps=300,
        batch_size=trial.suggest_categorical("batch_size", [32, 64]),
        optimizer="sgd",
        optimizer_options={"momentum": 0.9},
        learning_rate=hypermeta.LearningRate(init=(1e-3, 0.5), scope="per_group", segments=2),
        weight_decay=hypermeta.WeightDecay(init=(1e-6, 1e-2)),
        hypergradient=hypermeta.Hypergradient(),
    )


study = hypermeta.Study(
    name="gallery", build=build, metric="valid_loss", n_trials=18,
    pruner=optuna.pruners.MedianPruner(n_startup_trials=8, n_warmup_steps=60),
)
