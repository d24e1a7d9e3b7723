"""A BatchNorm CNN on 120,000 MNIST-1D examples streamed from disk through a DataLoader.

    hypermeta run studies/mnist1d_stream.py

The examples are made once, offline, from the MNIST-1D templates (``mnist1d.data.make_dataset``,
10,000 at a time) and cached in ``.hypermeta/data/mnist1d-120000-seed0/`` (19 MB; about 40 s on
one core the first time); training batches of 128 read their own rows of the memory-mapped file,
so the data is never in memory whole. 100,000 examples train, 10,000 validate (the next batch of
1,000 per hypergradient, all of them at each evaluation) and 10,000 test.

The model is the MNIST-1D CNN (three stride-2 convolutions) with BatchNorm after each
convolution: its running statistics are updated by the training steps and put back with the weights
when the divergence guard undoes a window.
Optuna chooses the width and the initial per-layer learning rates and weight decays, from the wide
ranges a user writes before knowing the answer (learning rate 1e-4..1e-1, weight decay
1e-7..1e-2); hypergradients move them during each run of 1,500 Adam steps (about two epochs). It is
compared with one long finishing run of the best trial's choices for the last three quarters of the
budget (docs/benchmarks.md):

    hypermeta compare studies/mnist1d_stream.py --budget-seconds 120 --finish 0.75
"""

import torch

import hypermeta

DATA = hypermeta.datasets.mnist1d_loaders(n=120_000, batch_size=128)
LENGTH = 40


def cnn(channels: int) -> torch.nn.Sequential:
    layers, in_channels, length = [torch.nn.Unflatten(1, (1, LENGTH))], 1, LENGTH
    for kernel in (5, 3, 3):
        layers += [
            torch.nn.Conv1d(in_channels, channels, kernel, stride=2, padding=1),
            torch.nn.BatchNorm1d(channels),
            torch.nn.ReLU(),
        ]
        in_channels, length = channels, (length + 2 - kernel) // 2 + 1
    return torch.nn.Sequential(*layers, torch.nn.Flatten(), torch.nn.Linear(channels * length, 10))


def build(trial):
    return hypermeta.Setup(
        model=cnn(trial.suggest_categorical("channels", [32, 64])),
        data=DATA,
        steps=1500,
        optimizer="adam",
        learning_rate=hypermeta.LearningRate(init=(1e-4, 1e-1), scope="per_group"),
        weight_decay=hypermeta.WeightDecay(init=(1e-7, 1e-2), scope="per_group"),
        hypergradient=hypermeta.Hypergradient(),
    )


study = hypermeta.Study(name="mnist1d-stream", build=build, metric="valid_accuracy", n_trials=6)
