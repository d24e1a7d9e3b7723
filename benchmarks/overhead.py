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
``time(hyper-step samples) / time(plain samples)`` taken in the same repeat. The learning rate's
bounds hold it at its start, so that every repeat trains at the same rate; the meta step is still
taken.
The per-step table takes the validation loss on the whole validation split (360 examples) unless
``--valid-batch-size`` is given; ``train()`` takes ``Hypergradient().valid_batch_size`` (256) by default.

Memory: ``tracemalloc`` does not see torch's CPU allocations, so the size of the unrolled
window's autograd graph is measured instead. One unrolled window runs under
``torch.autograd.graph.saved_tensors_hooks`` whose pack hook records every tensor saved for
backward (including those saved by the double-backward graph that ``create_graph=True``
builds); the table reports the bytes of the distinct storages behind them
(``untyped_storage().nbytes()``, each storage counted once), in MiB. That is what the graph
keeps alive until the reverse pass; it excludes the model's own weights and optimizer state.

End to end: the same ``hypermeta.train`` call (the digits MLP of ``studies/digits_mlp.py``, 3,000
steps, and the MNIST-1D CNN of ``studies/mnist1d_cnn.py``, 1,500 steps, per-layer learning rates and
weight decay) with the default ``Hypergradient()``, with each estimator at its defaults otherwise,
and with ``hypergradient=None``; and a hand-written ``torch.optim`` loop over the same batches that
evaluates on the validation split as often as ``train()`` does (at the start and every
``eval_every`` steps), with denormals flushed to zero as in ``train()``. Runs of all modes are
interleaved in a rotating order; the ratios are medians over repeats of ``time(mode) / time(train
without hypergradients)`` in the same repeat, and ``train()`` without hypergradients over the hand
loop.

Run ``python benchmarks/overhead.py`` (``--quick`` for a faster, noisier variant;
``--profile`` to print a cProfile of the unrolled hyper-step for the MLP at K = 10 instead;
``--end-to-end-only`` / ``--per-step-only`` for one of the two tables).
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import functools
import math
import pstats
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import hypermeta
from hypermeta._data import Batches, Dataset
from hypermeta._engine import (
    _ESTIMATORS,
    Hypergradient,
    _MetaStep,
    _Run,
    build_run,
    evaluation_cadence,
    parameter_groups,
)
from hypermeta._hyperparameters import LearningRate
from hypermeta._private.denormals import flushing_denormals
from hypermeta._private.plain import plain_step
from hypermeta._private.unrolled import unrolled_window

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "studies"))  # run as a script from anywhere
from mnist1d_cnn import cnn  # noqa: E402

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
    parser.add_argument(
        "--valid-batch-size", type=int,
        help="per step: instead of the whole split; end to end: every estimator also with this subsample",
    )
    parser.add_argument("--lr", type=float, default=0.05, help="inner learning rate (0.05)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--profile", action="store_true", help="cProfile the unrolled hyper-step (MLP, K = 10)"
    )
    parser.add_argument("--end-to-end-only", action="store_true", help="only the train() table")
    parser.add_argument("--per-step-only", action="store_true", help="only the hyper-step table")
    parser.add_argument("--end-to-end-repeats", type=int, help="runs per mode end to end (5; 3 with --quick)")
    args = parser.parse_args(argv)
    args.end_to_end_repeats = args.end_to_end_repeats or (3 if args.quick else 5)
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
        learning_rate=LearningRate(init=args.lr, bounds=(args.lr, args.lr * (1 + 1e-12))), optimizer="sgd",
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
    meta = _MetaStep(run.hyper, Hypergradient(estimator=estimator, horizon=horizon), steps_left=lambda step: 10**9)
    step = 0

    def advance(n_windows: int) -> None:
        nonlocal step
        for _ in range(n_windows):
            window = meta.window(run, step, horizon)
            problem = window.problem(math.inf)
            if problem:
                raise RuntimeError(f"{estimator} window at step {step}: {problem}")
            window.commit()
            meta.step(window, segment=run.hyper.segment(step), start=step, end=step + horizon)
            step += horizon

    return advance


def interleaved_seconds(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each run per repeat, after one warm-up each; the order rotates every repeat, so
    that load on a shared machine falls on every run alike."""
    for run in runs.values():
        run()
    order = list(runs)
    times: dict[str, list[float]] = {name: [] for name in order}
    for repeat in range(repeats):
        shift = repeat % len(order)
        for name in order[shift:] + order[:shift]:
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    return times


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
    times = interleaved_seconds(
        {mode: functools.partial(modes[mode], n_windows) for mode in MODES}, args.repeats
    )
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


END_TO_END = {  # model, dataset, train() arguments: the committed studies' set-ups at one point of their ranges
    "digits mlp": dict(
        steps=3000, batch_size=32, optimizer="sgd", optimizer_options={"momentum": 0.9},
        learning_rate=hypermeta.LearningRate(init=0.05, scope="per_group"),
        weight_decay=hypermeta.WeightDecay(init=1e-4),
    ),
    "mnist1d cnn": dict(
        steps=1500, batch_size=100, optimizer="adam",
        learning_rate=hypermeta.LearningRate(init=1e-2, scope="per_group"),
        weight_decay=hypermeta.WeightDecay(init=3e-4, scope="per_group"),
    ),
}
E2E_TARGETS = {"default": 1.5, "unrolled": 2.5}


def end_to_end_model(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if name == "digits mlp":
        return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    return cnn(64)


def end_to_end_data(name: str, seed: int) -> Dataset:
    return hypermeta.datasets.digits(seed=seed) if name == "digits mlp" else hypermeta.datasets.mnist1d(seed=seed)


def hand_loop(model: nn.Module, data: Dataset, settings: dict, eval_every: int, seed: int) -> None:
    """What a user writes with ``torch.optim``: one group per layer, the same batches and evaluations,
    denormals flushed as ``train()`` flushes them (so that the ratio is the engine's own cost)."""
    with flushing_denormals():
        _hand_loop(model, data, settings, eval_every, seed)


def _hand_loop(model: nn.Module, data: Dataset, settings: dict, eval_every: int, seed: int) -> None:
    options = {"lr": settings["learning_rate"].init, "weight_decay": settings["weight_decay"].init}
    groups = [{"params": params} for params in parameter_groups(model).values()]
    cls = torch.optim.SGD if settings["optimizer"] == "sgd" else torch.optim.Adam
    optimizer = cls(groups, **options, **settings.get("optimizer_options", {}))
    batches = Batches(data.train, batch_size=settings["batch_size"], generator=torch.Generator().manual_seed(seed))
    hypermeta.evaluate(model, data.valid, F.cross_entropy)
    for step in range(1, settings["steps"] + 1):
        x, y = batches.next()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        if step % eval_every == 0 or step == settings["steps"]:
            hypermeta.evaluate(model, data.valid, F.cross_entropy)


def end_to_end_modes(name: str, seed: int, valid_batch_size: int | None = None) -> dict[str, Callable[[], None]]:
    """A fresh run of every mode, from the same initial model, as a function of nothing."""
    data, settings = end_to_end_data(name, seed), END_TO_END[name]
    steps = settings["steps"]

    def train(hypergradient):
        return lambda: hypermeta.train(
            end_to_end_model(name, seed), data=data, seed=seed, hypergradient=hypergradient, **settings
        )

    plain_every = evaluation_cadence(steps, None, None)  # train()'s default cadence
    modes = {
        "hand loop": lambda: hand_loop(end_to_end_model(name, seed), data, settings, plain_every, seed),
        "plain": train(None),
        "default": train(Hypergradient()),
    }
    modes.update({estimator: train(Hypergradient(estimator=estimator)) for estimator in _ESTIMATORS})
    if valid_batch_size:
        modes.update({
            f"{estimator} valid {valid_batch_size}": train(
                Hypergradient(estimator=estimator, valid_batch_size=valid_batch_size)
            )
            for estimator in _ESTIMATORS
        })
    return modes


def measure_end_to_end(name: str, args: argparse.Namespace) -> dict:
    modes = end_to_end_modes(name, args.seed, args.valid_batch_size)
    times = interleaved_seconds(modes, args.end_to_end_repeats)
    ratios = {
        mode: statistics.median(t / p for t, p in zip(times[mode], times["plain"], strict=True))
        for mode in modes if mode not in ("plain", "hand loop")
    }
    plain_over_hand = statistics.median(p / h for p, h in zip(times["plain"], times["hand loop"], strict=True))
    return {"model": name, **ratios, "plain / hand loop": plain_over_hand, "plain_s": statistics.median(times["plain"])}


def print_end_to_end(rows: list[dict]) -> None:
    estimators = [key for key in rows[0] if key not in ("model", "plain / hand loop", "plain_s")]
    print(f"default Hypergradient(): estimator={Hypergradient().estimator!r}, horizon={Hypergradient().horizon}, "
          f"valid_batch_size={Hypergradient().valid_batch_size}\n")
    print("| model | " + " | ".join(f"{e} / plain" for e in estimators)
          + " | plain train() / hand loop | plain train() s |")
    print("|---|" + "---:|" * (len(estimators) + 2))
    for row in rows:
        cells = " | ".join(f"{row[e]:.2f}x" for e in estimators)
        print(f"| {row['model']} | {cells} | {row['plain / hand loop']:.2f}x | {row['plain_s']:.2f} |")
    print()
    for mode, target in (*E2E_TARGETS.items(), ("plain / hand loop", 1.1)):
        missed = [f"{row['model']} ({row[mode]:.2f}x)" for row in rows if row[mode] > target]
        print(f"- {mode} <= {target}x end to end: " + ("met" if not missed else "NOT met for " + ", ".join(missed)))


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
    if not args.end_to_end_only:
        rows = [measure(name, k, data, args) for name in args.models for k in args.horizons]
        print_table(rows)
        print_targets(rows)
        print()
    if not args.per_step_only:
        print(f"End to end, {args.end_to_end_repeats} interleaved repeats, ratios to train(hypergradient=None):\n")
        print_end_to_end([measure_end_to_end(name, args) for name in END_TO_END])


if __name__ == "__main__":
    main()
