"""A 1-D CNN on MNIST-1D (Greydanus 2020): per-layer learning rates and weight decay adapted online.

    hypermeta run studies/mnist1d_cnn.py

The model is the MNIST-1D repository's CNN (three stride-2 convolutions with kernels 5, 3, 3,
ReLU, then a linear classifier) with Optuna choosing its width. The budget -- 3,000 Adam steps of
100 examples, 100 epochs of the 3,000 training examples -- is where plain training at a good fixed
rate reaches the published ~94% test accuracy: 64 channels, lr 1e-2, weight decay 3e-4 gave
94.7 / 95.5 / 94.7% over seeds 0, 1, 2 (2,000 steps: 94.0 / 95.0 / 94.9%). With hypergradients
(meta_lr 0.005) the same start gave 95.2 / 94.6 / 94.7%; larger meta learning rates let the
short-horizon bias pull the rates down too far within this budget. A horizon of 40 steps (its meta
learning rates twice those of a horizon of 20, keeping meta_lr / horizon) weakens that bias.
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
    )


study = hypermeta.Study(name="mnist1d-cnn", build=build, metric="valid_loss", n_trials=10)
