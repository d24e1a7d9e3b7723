"""A 1-D CNN on MNIST-1D (Greydanus 2020): per-layer learning rates and weight decay adapted online.

    hypermeta run studies/mnist1d_cnn.py

The model is the MNIST-1D repository's CNN (three stride-2 convolutions with kernels 5, 3, 3,
ReLU, then a linear classifier) with Optuna choosing its width. A trial is 3,000 Adam steps.
The ranges are the wide ones a user writes before knowing the answer (learning rate 1e-4..1e-1,
weight decay 1e-7..1e-2, width 16..128 channels, batch 32..256); `hypermeta compare` puts its
defaults at their geometric middles.
"""

import torch

import hypermeta

DATA = hypermeta.datasets.mnist1d()
LENGTH = DATA.train.x.shape[1]  # 40


def cnn(channels: int) -> torch.nn.Sequential:
    layers, in_channels, length = [torch.nn.Unflatten(1, (1, LENGTH))], 1, LENGTH
    for kernel in (5, 3, 3):
        layers += [torch.nn.Conv1d(in_channels, channels, kernel, stride=2, padding=1), torch.nn.ReLU()]
        in_channels, length = channels, (length + 2 - kernel) // 2 + 1
    return torch.nn.Sequential(*layers, torch.nn.Flatten(), torch.nn.Linear(channels * length, 10))


def build(trial):
    return hypermeta.Setup(
        model=cnn(trial.suggest_int("channels", 16, 128, log=True)),
        data=DATA,
        steps=3000,
        batch_size=trial.suggest_int("batch_size", 32, 256, log=True),
        optimizer="adam",
        learning_rate=hypermeta.LearningRate(init=(1e-4, 1e-1), scope="per_group"),
        weight_decay=hypermeta.WeightDecay(init=(1e-7, 1e-2), scope="per_group"),
        hypergradient=hypermeta.Hypergradient(),
    )


study = hypermeta.Study(name="mnist1d-cnn", build=build, metric="valid_loss", n_trials=10)
