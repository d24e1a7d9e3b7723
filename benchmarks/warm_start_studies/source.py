"""Warm-start benchmark, source study: an MLP on digits, 600 steps."""

import torch

import hypermeta

DATA = hypermeta.datasets.digits()


def build(trial):
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    return hypermeta.Setup(
        model=model, data=DATA, steps=600, batch_size=32, optimizer_options={"momentum": 0.9},
        learning_rate=hypermeta.LearningRate(init=(1e-3, 1.0), scope="per_group"),
        weight_decay=hypermeta.WeightDecay(init=(1e-6, 1e-2)),
        hypergradient=hypermeta.Hypergradient(),
    )


study = hypermeta.Study(name="warm-source", build=build, n_trials=10)
