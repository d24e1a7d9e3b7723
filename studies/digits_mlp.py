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
        # windows of 20 steps (the last 10 settling), a hyper-step on one in four with a meta
        # learning rate of 0.2: a trial of 600 steps is short, and at 40-step windows it got too
        # few hyper-steps (the defaults, every=8 and 0.1, are made for long runs and would move the
        # values a quarter as far); no confirmation by the evaluations, which slowed short trials
        # (docs/estimators.md), and no span: a trial's values go anywhere in the ranges
        hypergradient=hypermeta.Hypergradient(horizon=20, every=4, meta_lr=0.2, confirm=False, span=None),
    )


study = hypermeta.Study(name="digits-mlp", build=build, metric="valid_loss", n_trials=12)
