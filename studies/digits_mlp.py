"""Quickstart: an MLP on scikit-learn's digits, learning rate and weight decay adapted online.

    hypermeta run studies/digits_mlp.py
"""

import torch

import hypermeta

DATA = hypermeta.datasets.digits()


def build(trial):
    width = trial.suggest_int("width", 32, 256, log=True)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, width), torch.nn.ReLU(), torch.nn.Linear(width, 10)
    )
    return hypermeta.Setup(
        model=model,
        data=DATA,
        steps=600,
        batch_size=trial.suggest_int("batch_size", 16, 128, log=True),
        optimizer="sgd",
        optimizer_options={"momentum": 0.9},
        learning_rate=hypermeta.LearningRate(init=(1e-3, 1.0), scope="per_group"),
        weight_decay=hypermeta.WeightDecay(init=(1e-7, 1e-2)),
        hypergradient=hypermeta.Hypergradient(),
    )


study = hypermeta.Study(name="digits-mlp", build=build, metric="valid_loss", n_trials=12)
