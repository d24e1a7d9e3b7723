"""Plain steps through ``hypermeta.Loaders`` against the same DataLoader in a plain torch loop, and the hyper-step cost.

The data is ``hypermeta.datasets.mnist1d_loaders()`` -- 120,000 MNIST-1D examples memory-mapped
from ``.hypermeta/data/`` (made once, about 40 s), batches of 128 -- and the model the BatchNorm
CNN of ``studies/mnist1d_stream.py``. Three arms train the same initial model for ``--steps``
Adam steps over the same seeded DataLoader, each with one validation pass before and one after
(on the first ``--valid-batches`` batches of 1,000 of the validation split), the cadence of a
``hypermeta.train`` call with ``eval_every=steps``:

* torch: a hand-written loop (``zero_grad``, loss, ``backward``, ``step``; one parameter group
  per layer, as hypermeta makes them) with an evaluation loop of its own;
* plain: ``hypermeta.train`` without hypergradients on ``Loaders`` of that DataLoader;
* hyper: ``hypermeta.train`` with ``Hypergradient()``: the cost of its hyper-steps, one per window.

One thread (``--threads``), the arms interleaved in a rotating order after a warm-up round; the
ratios are medians over rounds of the per-round ratio to the torch arm. Run
``python benchmarks/loaders.py`` (``--quick`` for fewer, shorter rounds).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import hypermeta

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "studies"))
from mnist1d_stream import cnn  # noqa: E402 -- the study's model

LR = 0.01


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--valid-batches", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="3 rounds of 150 steps")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.rounds = 150, 3
    return args


def data(valid_batches: int) -> hypermeta.Loaders:
    """A fresh, identically seeded training DataLoader each time, and a short validation list."""
    loaders = hypermeta.datasets.mnist1d_loaders()
    valid = [batch for _, batch in zip(range(valid_batches), loaders.valid, strict=False)]
    return hypermeta.Loaders(train=loaders.train, valid=valid)


def torch_arm(model: torch.nn.Module, loaders: hypermeta.Loaders, steps: int) -> None:
    groups = [{"params": list(m.parameters(recurse=False))} for m in model.modules()
              if list(m.parameters(recurse=False))]
    optimizer = torch.optim.Adam(groups, lr=LR)
    validate(model, loaders.valid)
    done = 0
    model.train()
    while done < steps:
        for x, y in loaders.train:
            if done == steps:
                break
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            done += 1
    validate(model, loaders.valid)


@torch.no_grad()
def validate(model: torch.nn.Module, valid) -> float:
    model.eval()
    losses = [F.cross_entropy(model(x), y, reduction="sum") for x, y in valid]
    model.train()
    return float(sum(losses)) / sum(len(y) for _, y in valid)


def hypermeta_arm(hypergradient):
    def run(model, loaders, steps):
        result = hypermeta.train(
            model, data=loaders, steps=steps, optimizer="adam", learning_rate=hypermeta.LearningRate(init=LR),
            hypergradient=hypergradient, eval_every=steps,
        )
        assert result.status == "completed", result.reason

    return run


def main() -> None:
    args = arguments()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    initial = cnn(args.channels)
    arms = {
        "torch": torch_arm,
        "plain": hypermeta_arm(None),
        "hyper": hypermeta_arm(hypermeta.Hypergradient()),
    }
    names = list(arms)
    seconds = {name: [] for name in names}
    for round_ in range(args.rounds + 1):  # round 0 warms up
        order = names[round_ % 3:] + names[: round_ % 3]
        for name in order:
            model, loaders = copy.deepcopy(initial), data(args.valid_batches)
            start = time.perf_counter()
            arms[name](model, loaders, args.steps)
            if round_:
                seconds[name].append(time.perf_counter() - start)
    print(f"{args.steps} steps of batch 128, CNN {args.channels} channels with BatchNorm, MNIST-1D 120,000 "
          f"streamed from disk, {args.threads} thread(s), {args.rounds} interleaved rounds")
    print(f"{'arm':<6} {'median s':>9} {'ms/step':>8} {'x torch':>8}")
    for name in names:
        ratios = [s / t for s, t in zip(seconds[name], seconds["torch"], strict=True)]
        median = statistics.median(seconds[name])
        print(f"{name:<6} {median:>9.3f} {1000 * median / args.steps:>8.2f} {statistics.median(ratios):>8.3f}")
    print("command: python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()
