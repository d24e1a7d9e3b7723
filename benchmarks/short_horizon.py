"""Short-horizon bias (Wu et al. 2018) on digits: how far does the learned learning rate fall?

Digits MLP (64-128-10, ReLU), SGD momentum 0.9, batch 32, 600 steps. First a grid of fixed
learning rates finds the best one; then every estimator and horizon K starts from that rate and
from a rate 10x too small. Each hypergradient run gets the same total meta-step budget:
meta_lr = 0.01 * K (Adam in log space), so the rate could move by the same amount whatever K is.

Printed per run: the final learned rate over the best fixed rate (1.0 = found it; << 1 = the
rate collapsed), the smallest rate on the way, and the final validation loss, median over seeds.
The row "default" is ``Hypergradient()`` with its meta learning rate set as above; a run
``estimator:K`` has no settling steps, ``estimator:K:S`` settles its last S steps of each window.
Every run takes a hyper-step on every window, keeps every one and lets the rate go anywhere in its
bounds (``every=1, confirm=False, span=None``), as the committed tables were measured: the bias
measured is the estimators' own.

    python benchmarks/short_horizon.py [--seeds 3] [--runs default unrolled:20 first_order:40:20 ...]
        [--valid-batch-size N]
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys

import torch

import hypermeta

GRID = (0.003, 0.01, 0.03, 0.1, 0.3)
RUNS = ("default", "greedy:1", "greedy:10", "greedy:50", "first_order:10", "first_order:20", "first_order:50",
        "unrolled:1", "unrolled:10", "unrolled:20", "unrolled:50")


def _train(data, lr: float, seed: int, hypergradient=None) -> hypermeta.TrainResult:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    return hypermeta.train(
        model, data=data, steps=600, batch_size=32, seed=seed, optimizer_options={"momentum": 0.9},
        learning_rate=hypermeta.LearningRate(init=lr), hypergradient=hypergradient,
    )


def _final_valid_loss(result: hypermeta.TrainResult) -> float:
    return float(result.evaluations["valid_loss"].iloc[-1])


def _spec(run: str, valid_batch_size: int | None) -> hypermeta.Hypergradient:
    """``Hypergradient`` for ``"estimator:K[:S]"``, or the default one, with meta_lr = 0.01 K."""
    options = {"every": 1, "confirm": False, "span": None}
    if valid_batch_size is not None:
        options["valid_batch_size"] = valid_batch_size
    if run == "default":
        return hypermeta.Hypergradient(meta_lr=0.01 * hypermeta.Hypergradient().horizon, **options)
    estimator, horizon, settle = (run.split(":") + ["0"])[:3]
    return hypermeta.Hypergradient(
        estimator=estimator, horizon=int(horizon), settle=int(settle), meta_lr=0.01 * int(horizon), **options
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--runs", nargs="+", default=list(RUNS), help="estimator:K[:S] or 'default' (all of them)")
    parser.add_argument("--valid-batch-size", type=int, help="Hypergradient(valid_batch_size=...)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = range(args.seeds)
    data = hypermeta.datasets.digits()
    print("$ " + shlex.join(["python", *sys.argv]) + "\n")

    fixed = {lr: statistics.median(_final_valid_loss(_train(data, lr, s)) for s in seeds) for lr in GRID}
    best = min(fixed, key=fixed.get)
    print("| fixed lr | valid loss |\n|---|---|")
    for lr, loss in fixed.items():
        print(f"| {lr:g}{' (best)' if lr == best else ''} | {loss:.4f} |")

    print("\n| start lr | estimator | K | meta lr | final lr / best | min lr / best | valid loss |")
    print("|---|---|---|---|---|---|---|")
    for start in (best, best / 10):
        for run in args.runs:
            spec = _spec(run, args.valid_batch_size)
            estimator = f"default ({spec.estimator})" if run == "default" else spec.estimator
            horizon = spec.horizon
            finals, lows, losses = [], [], []
            for seed in seeds:
                result = _train(data, start, seed, spec)
                lrs = result.trajectory.query("name == 'lr'")["value"]
                finals.append(lrs.iloc[-1] / best)
                lows.append(lrs.min() / best)
                losses.append(_final_valid_loss(result))
            print(
                f"| {start:g} | {estimator} | {horizon} | {spec.meta_lr:g} | "
                f"{statistics.median(finals):.2f} | {statistics.median(lows):.2f} | "
                f"{statistics.median(losses):.4f} |"
            )
        print(f"| {start:g} | none (fixed) | - | - | {start / best:.2f} | {start / best:.2f} | "
              f"{statistics.median(_final_valid_loss(_train(data, start, s)) for s in seeds):.4f} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
