"""Warm-start benchmark, target study: the same layers on another digits split, a quarter of the budget."""

import torch

import hypermeta

DATA = hypermeta.datasets.digits(seed=1)


def build(trial):
    width = trial.suggest_categorical("width", [64])  # same layer names as the source: its values apply
    model = torch.nn.Sequential(torch.nn.Linear(64, width), torch.nn.ReLU(), torch.nn.Linear(width, 10))
    return hypermeta.Setup(
        model=model, data=DATA, steps=150, batch_size=trial.suggest_categorical("batch_size", [32, 64]),
        optimizer_options={"momentum": 0.9},
        learning_rate=hypermeta.LearningRate(init=(1e-3, 1.0), scope="per_group"),
        weight_decay=hypermeta.WeightDecay(init=(1e-6, 1e-2)),
        hypergradient=hypermeta.Hypergradient(),
    )


study = hypermeta.Study(name="warm-target", build=build, n_trials=8)
