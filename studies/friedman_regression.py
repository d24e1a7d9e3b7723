"""A regression: an MLP on Friedman #1, 1,000 noisy training examples, mean squared error.

    hypermeta run studies/friedman_regression.py

Friedman #1 (scikit-learn's ``make_friedman1``, generated offline): 10 uniform inputs, of which 5
enter y = 10 sin(pi x1 x2) + 20 (x3 - 0.5)^2 + 10 x4 + 5 x5, plus Gaussian noise of standard
deviation 1. 3,000 examples (seed 0) split 1,000 / 1,000 / 1,000 for training, validation and
test; the targets are standardized with the training split's mean and standard deviation, so a
validation loss of 1 is what predicting the mean gives, and the noise alone about 0.04. The MLP
(two hidden layers of Optuna's width, 32..512) trains with SGD and momentum 0.9 for 2,000 steps;
the ranges are the wide ones a user writes before knowing the answer: learning rate 1e-4..1 for
each layer, one weight decay 1e-7..1e-1. The mean absolute error is measured beside the loss.
"""

import torch
import torch.nn.functional as F
from sklearn.datasets import make_friedman1

import hypermeta

X, Y = make_friedman1(n_samples=3000, n_features=10, noise=1.0, random_state=0)
X, Y = torch.tensor(X, dtype=torch.float32), torch.tensor(Y, dtype=torch.float32)[:, None]
Y = (Y - Y[:1000].mean()) / Y[:1000].std()
DATA = hypermeta.Dataset(
    train=hypermeta.Split(X[:1000], Y[:1000]),
    valid=hypermeta.Split(X[1000:2000], Y[1000:2000]),
    test=hypermeta.Split(X[2000:], Y[2000:]),
)


def mlp(width: int) -> torch.nn.Sequential:
    return torch.nn.Sequential(
        torch.nn.Linear(10, width), torch.nn.ReLU(),
        torch.nn.Linear(width, width), torch.nn.ReLU(),
        torch.nn.Linear(width, 1),
    )


def build(trial):
    return hypermeta.Setup(
        model=mlp(trial.suggest_int("width", 32, 512, log=True)),
        data=DATA,
        steps=2000,
        batch_size=trial.suggest_int("batch_size", 16, 256, log=True),
        optimizer="sgd",
        optimizer_options={"momentum": 0.9},
        loss_fn=F.mse_loss,
        metrics={"mae": lambda output, target: float((output - target).abs().mean())},
        learning_rate=hypermeta.LearningRate(init=(1e-4, 1.0), scope="per_group"),
        weight_decay=hypermeta.WeightDecay(init=(1e-7, 1e-1)),
        hypergradient=hypermeta.Hypergradient(),
    )


study = hypermeta.Study(name="friedman-mlp", build=build, metric="valid_loss", n_trials=10)
