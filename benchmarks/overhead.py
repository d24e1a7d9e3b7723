"""Cost of one hypergradient hyper-step relative to plain training, measured in one process.

For each model (an MLP and a small CNN on the bundled digits) and each horizon K, three copies
of the same initial model are trained side by side, batch size 32, SGD with momentum 0.9:

* plain: K ordinary ``torch.optim`` steps (``hypermeta._private.plain.plain_step``), the cost
  of a hand-written training loop;
* unrolled / greedy: one hyper-step as ``hypermeta``'s engine runs it -- the estimator's
  window of K inner steps including the validation loss and its reverse pass, the divergence
  guard's check, the commit and the meta-optimizer step.

A timed sample is a few windows back to back (about ``--steps-per-sample`` inner steps, so that
K = 1 is not lost in timer noise). Samples of the three modes are interleaved, in a rotating
order, after a warm-up; the reported ratio is the median over repeats of
``time(hyper-step samples) / time(plain samples)`` taken in the same repeat. The meta learning
rate is 0 so that every repeat trains at the same learning rate; the meta step is still taken.
The validation loss uses the whole validation split (360 examples), as ``hypermeta.train`` does
by default; ``--valid-batch-size`` changes that.

Memory: ``tracemalloc`` does not see torch's CPU allocations, so the size of the unrolled
window's autograd graph is measured instead. One unrolled window runs under
``torch.autograd.graph.saved_tensors_hooks`` whose pack hook records every tensor saved for
backward (including those saved by the double-backward graph that ``create_graph=True``
builds); the table reports the bytes of the distinct storages behind them
(``untyped_storage().nbytes()``, each storage counted once), in MiB. That is what the graph
keeps alive until the reverse pass; it excludes the model's own weights and optimizer state.

Run ``python benchmarks/overhead.py`` (``--quick`` for a faster, noisier variant;
``--profile`` to print a cProfile of the unrolled hyper-step for the MLP at K = 10 instead).
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import math
import pstats
import shlex
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import hypermeta
from hypermeta._data import Dataset
from hypermeta._engine import Hypergradient, _MetaStep, _Run, build_run
from hypermeta._hyperparameters import LearningRate
from hypermeta._private.plain import plain_step
from hypermeta._private.unrolled import unrolled_window

MODELS = ("mlp", "cnn")
HORIZONS = (1, 10, 50)
MODES = ("plain", "unrolled", "greedy")
TARGETS = {"unrolled": 2.5, "greedy": 1.1}
BATCH_SIZE = 32


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer and shorter samples")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (1)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--horizons", nargs="+", type=int, default=list(HORIZONS))
    parser.add_argument("--repeats", type=int, help="timed samples per mode (9; 3 with --quick)")
    parser.add_argument(
        "--steps-per-sample", type=int, help="inner steps per timed sample (80; 20 with --quick)"
    )
    parser.add_argument("--valid-batch-size", type=int, help="default: the whole split")
    parser.add_argument("--lr", type=float, default=0.05, help="inner learning rate (0.05)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--profile", action="store_true", help="cProfile the unrolled hyper-step (MLP, K = 10)"
    )
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (3 if args.quick else 9)
    args.steps_per_sample = args.steps_per_sample or (20 if args.quick else 80)
    return args


def build_model(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if name == "mlp":
        return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 64, 10),
    )


def make_run(model: nn.Module, data: Dataset, args: argparse.Namespace) -> _Run:
    """A ``_Run`` built as ``hypermeta.train`` builds one (the step budget is open-ended)."""
    return build_run(
        model, data=data, steps=10**9, batch_size=BATCH_SIZE,
        learning_rate=LearningRate(init=args.lr), optimizer="sgd",
        optimizer_options={"momentum": 0.9}, loss_fn=F.cross_entropy, seed=args.seed,
        valid_batch_size=args.valid_batch_size or len(data.valid),
    )


def plain_mode(run: _Run, horizon: int) -> Callable[[int], None]:
    """Advance ``n`` windows of ``horizon`` plain ``torch.optim`` steps."""
    step = 0

    def advance(n_windows: int) -> None:
        nonlocal step
        for _ in range(n_windows * horizon):
            batch = run.train_batches.next()
            plain_step(run.model, run.optimizer, run.hyper, run.loss_fn, batch, step)
            step += 1

    return advance


def hyper_mode(run: _Run, estimator: str, horizon: int) -> Callable[[int], None]:
    """Advance ``n`` hyper-steps, each as ``hypermeta._engine._loop`` takes one."""
    meta = _MetaStep(run.hyper, Hypergradient(estimator=estimator, horizon=horizon, meta_lr=0.0))
    step = 0

    def advance(n_windows: int) -> None:
        nonlocal step
        for _ in range(n_windows):
            window = meta.window(run, step, horizon)
            problem = window.problem(math.inf)
            if problem:
                raise RuntimeError(f"{estimator} window at step {step}: {problem}")
            window.commit()
            meta.step(window.hypergradients, segment=run.hyper.segment(step))
            step += horizon

    return advance


def seconds(advance: Callable[[int], None], n_windows: int) -> float:
    start = time.perf_counter()
    advance(n_windows)
    return time.perf_counter() - start


def graph_mib(run: _Run, horizon: int) -> float:
    """MiB of distinct storages saved for backward during one (uncommitted) unrolled window."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        unrolled_window(run, 0, horizon)
    return sum(storages.values()) / 2**20


def measure(name: str, horizon: int, data: Dataset, args: argparse.Namespace) -> dict:
    """Median hyper-step / plain time ratios and the unrolled graph size for one (model, K)."""
    model = build_model(name, args.seed)
    runs = {mode: make_run(copy.deepcopy(model), data, args) for mode in MODES}
    modes = {
        "plain": plain_mode(runs["plain"], horizon),
        "unrolled": hyper_mode(runs["unrolled"], "unrolled", horizon),
        "greedy": hyper_mode(runs["greedy"], "greedy", horizon),
    }
    n_windows = max(1, round(args.steps_per_sample / horizon))
    for advance in modes.values():
        advance(n_windows)
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for repeat in range(args.repeats):
        for mode in MODES[repeat % 3:] + MODES[: repeat % 3]:
            times[mode].append(seconds(modes[mode], n_windows))
    ratios = {
        mode: statistics.median(t / p for t, p in zip(times[mode], times["plain"], strict=True))
        for mode in TARGETS
    }
    plain_ms = 1000 * statistics.median(times["plain"]) / (n_windows * horizon)
    return {
        "model": name, "K": horizon, **ratios, "plain_ms": plain_ms,
        "graph_mib": graph_mib(runs["unrolled"], horizon),
    }


def print_table(rows: list[dict]) -> None:
    print("| model | K | unrolled ratio | greedy ratio | graph MiB (unrolled) | plain ms/step |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['model']} | {row['K']} | {row['unrolled']:.2f}x | {row['greedy']:.2f}x "
            f"| {row['graph_mib']:.2f} | {row['plain_ms']:.3f} |"
        )


def print_targets(rows: list[dict]) -> None:
    print()
    for mode, target in TARGETS.items():
        missed = [f"{row['model']} K={row['K']} ({row[mode]:.2f}x)" for row in rows
                  if row[mode] > target]
        verdict = "met everywhere" if not missed else "NOT met for " + ", ".join(missed)
        print(f"- {mode} <= {target}x: {verdict}")


def profile(data: Dataset, args: argparse.Namespace, n_windows: int = 30) -> None:
    """cProfile of ``n_windows`` unrolled hyper-steps for the MLP at K = 10."""
    advance = hyper_mode(make_run(build_model("mlp", args.seed), data, args), "unrolled", 10)
    advance(3)
    profiler = cProfile.Profile()
    profiler.runcall(advance, n_windows)
    stats = pstats.Stats(profiler, stream=sys.stdout).strip_dirs()
    stats.sort_stats("cumulative").print_stats(30)
    stats.sort_stats("tottime").print_stats(20)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print("$ " + shlex.join(["python", *sys.argv]))
    print(
        f"\ntorch {torch.__version__}, hypermeta {hypermeta.__version__}, "
        f"{torch.get_num_threads()} thread(s), batch {BATCH_SIZE}, SGD momentum 0.9, "
        f"lr {args.lr}, {args.repeats} repeats of ~{args.steps_per_sample} steps\n"
    )
    data = hypermeta.datasets.digits(seed=args.seed)
    if args.profile:
        profile(data, args)
        return
    rows = [measure(name, k, data, args) for name in args.models for k in args.horizons]
    print_table(rows)
    print_targets(rows)


if __name__ == "__main__":
    main()
