"""A high-dimensional study: 35 continuous hyperparameters of a 5-layer MLP on digits, adapted online.

    hypermeta run studies/digits_highdim.py

Every layer has its own learning-rate schedule of 6 piecewise-constant segments (5 x 6 = 30
rates) and its own weight decay (5): far more than a black-box search can tune in a few trials,
and what hypergradients move all at once, inside each run. Each segment starts where the previous
one ended, so over the run the rates follow one learned schedule. The ranges are the wide ones a
user writes first (SGD learning rate 1e-3..1, weight decay 1e-7..1e-2).
"""

import torch

import hypermeta

DATA = hypermeta.datasets.digits()
WIDTHS = (64, 128, 128, 128, 64, 10)


def mlp() -> torch.nn.Sequential:
    layers = []
    for n_in, n_out in zip(WIDTHS[:-1], WIDTHS[1:], strict=True):
        layers += [torch.nn.Linear(n_in, n_out), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])


def build(trial):
    return hypermeta.Setup(
        model=mlp(),
        data=DATA,
        steps=1800,
        batch_size=trial.suggest_int("batch_size", 16, 128, log=True),
        optimizer="sgd",
        optimizer_options={"momentum": 0.9},
        learning_rate=hypermeta.LearningRate(init=(1e-3, 1.0), scope="per_group", segments=6),
        weight_decay=hypermeta.WeightDecay(init=(1e-7, 1e-2), scope="per_group"),
        hypergradient=hypermeta.Hypergradient(),
    )


study = hypermeta.Study(name="digits-highdim", build=build, metric="valid_loss", n_trials=20)
