"""A wide MLP on 1,000 MNIST-1D training examples: it overfits, and the weight decay decides.

    hypermeta run studies/mnist1d_small_mlp.py

The training split is the first 1,000 examples of MNIST-1D's training split (the library's
default signals, generated offline); the validation and test splits are its full ones (1,000
each). An MLP with two hidden layers of Optuna's width (64..1,024) fits the 1,000 examples within a
few hundred Adam steps and then overfits: the validation loss climbs unless the weight decay holds
it. The ranges are the wide ones a user writes before knowing the answer: learning rate
1e-4..1e-1 and weight decay 1e-6..1e-1 for each layer; hypergradients move both during each run of
2,000 steps.
"""

import torch

import hypermeta

FULL = hypermeta.datasets.mnist1d()
DATA = hypermeta.Dataset(
    train=hypermeta.Split(FULL.train.x[:1000], FULL.train.y[:1000]), valid=FULL.valid, test=FULL.test
)


def mlp(width: int) -> torch.nn.Sequential:
    return torch.nn.Sequential(
        torch.nn.Linear(40, width), torch.nn.ReLU(),
        torch.nn.Linear(width, width), torch.nn.ReLU(),
        torch.nn.Linear(width, 10),
    )


def build(trial):
    return hypermeta.Setup(
        model=mlp(trial.suggest_int("width", 64, 1024, log=True)),
        data=DATA,
        steps=2000,
        batch_size=trial.suggest_int("batch_size", 16, 256, log=True),
        optimizer="adam",
        learning_rate=hypermeta.LearningRate(init=(1e-4, 1e-1), scope="per_group"),
        weight_decay=hypermeta.WeightDecay(init=(1e-6, 1e-1), scope="per_group"),
        hypergradient=hypermeta.Hypergradient(),
    )


study = hypermeta.Study(name="mnist1d-small-mlp", build=build, metric="valid_loss", n_trials=10)
