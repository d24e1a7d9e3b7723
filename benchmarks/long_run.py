"""Adaptation does no harm: one long run from the middle of a study's ranges, with and without hypergradients.

For each study file, each seed runs the study's defaults (the middle of every range, the first of
every choice; as the ``defaults`` arm of ``hypermeta compare``) twice for the same wall-clock
seconds: once with fixed values and once with ``Hypergradient()`` (or the options given), in
alternating order. Printed per run: steps taken, the final validation metric (the study's), the
test accuracy of the final model (its test loss where the study has no accuracy), and how far the
learning rates and weight decays moved (final over start, the smallest and
largest over the groups); then the median over seeds. A learning rate that ends 10x or more below
its start has collapsed under the short-horizon bias.

    python benchmarks/long_run.py [STUDY_FILE ...] [--seconds 60] [--seeds 3] [--first-seed 0]
        [--estimator first_order] [--horizon 40] [--valid-batch-size 256 | none] [--trace 8]

``--first-seed K`` runs seeds K, K+1, ... (two processes on two cores can run disjoint seeds).
``--valid-batch-size none`` takes each hypergradient's validation loss on the whole validation split
(``Hypergradient(valid_batch_size=None)``).
``--trace N`` also prints each run's best evaluation and N evaluations spread over the run, with
the losses, the validation accuracy (a classifier) and (adaptive runs) the learning rates and
weight decays in force at that step.
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch

import hypermeta
from hypermeta._compare import Budget, long_run
from hypermeta._hyperparameters import HyperParameters
from hypermeta._runner import load_study_file

STUDIES = {"studies/digits_mlp.py": 20.0, "studies/digits_highdim.py": 30.0, "studies/mnist1d_cnn.py": 60.0}


def _moved(row: dict, kind: str) -> tuple[float, float] | None:
    """The smallest and largest final / start ratio over the entries of one kind (``lr``, ``weight_decay``)."""
    ratios = [
        row[key] / row[f"param {key.removeprefix('final ')}"]
        for key in row if key.startswith(f"final {kind}/")
    ]
    return (min(ratios), max(ratios)) if ratios else None


def _paired(pairs: list[tuple[dict, dict]], key: str) -> str:
    differences = [adaptive.get(key, math.nan) - fixed.get(key, math.nan) for adaptive, fixed in pairs]
    error = statistics.stdev(differences) / math.sqrt(len(differences)) if len(differences) > 1 else math.nan
    return f"{statistics.mean(differences):+.4f} ({error:.4f})"


def _test_metric(rows: list[dict]) -> str:
    """The test accuracy where the runs have one (a classifier), else the test loss."""
    accuracies = [row.get("test_accuracy", math.nan) for row in rows]
    return "test_loss" if all(math.isnan(value) for value in accuracies) else "test_accuracy"


def _show(moved: tuple[float, float] | None) -> str:
    return "-" if moved is None else f"{moved[0]:.2g}..{moved[1]:.2g}x"


def _examples(text: str) -> int | None:
    if text.lower() == "none":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of examples >= 1 or 'none'")
    return int(text)


def _trace(result: hypermeta.TrainResult, points: int) -> None:
    evaluations = result.evaluations.set_index("step")
    if not len(evaluations):
        print(f"  no evaluation: {result.reason}")
        return
    best = evaluations["valid_loss"].idxmin()
    print(f"  best valid loss {evaluations.loc[best, 'valid_loss']:.4f} at step {best}")
    trajectory = result.trajectory
    columns = (trajectory["name"], trajectory["group"].astype(str), trajectory["segment"])
    keys = [HyperParameters._key(*entry) for entry in zip(*columns, strict=True)]  # as TrainResult keys them
    values = trajectory.assign(key=keys).pivot_table(index="step", columns="key", values="value").ffill()
    at = evaluations.iloc[sorted({round(i * (len(evaluations) - 1) / max(points - 1, 1)) for i in range(points)})]
    for step, row in at.iterrows():
        held = values.asof(step) if len(values) and step >= values.index[0] else None  # the last window begun
        shown = "" if held is None else " ".join(f"{key} {value:.2g}" for key, value in held.items())
        accuracy = f", accuracy {row['valid_accuracy']:.3f}" if "valid_accuracy" in row else ""
        print(f"  step {step:>6}: train {row['train_loss']:.4f}, valid {row['valid_loss']:.4f}{accuracy}  {shown}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("studies", nargs="*", default=list(STUDIES))
    parser.add_argument("--seconds", type=float, help="per run (default: 20 digits, 30 highdim, 60 MNIST-1D)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--estimator", default=hypermeta.Hypergradient().estimator)
    parser.add_argument("--horizon", type=int, default=hypermeta.Hypergradient().horizon)
    parser.add_argument("--valid-batch-size", type=_examples, default=hypermeta.Hypergradient().valid_batch_size,
                        help="Hypergradient(valid_batch_size=...): validation examples per hypergradient, or 'none'")
    parser.add_argument("--trace", type=int, default=0, help="print this many evaluations of each run")
    args = parser.parse_args()
    torch.set_num_threads(1)
    hypergradient = hypermeta.Hypergradient(estimator=args.estimator, horizon=args.horizon,
                                            valid_batch_size=args.valid_batch_size)
    print(f"adaptive runs: {hypergradient}; 1 thread; shared machine, so timings are noisy")
    for path in args.studies:
        study = load_study_file(path)
        budget = Budget(seconds=args.seconds or STUDIES.get(path, 60.0))
        rows = {"fixed": [], "adaptive": []}
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            order = ("fixed", "adaptive") if seed % 2 == 0 else ("adaptive", "fixed")
            for arm in order:
                adaptive = arm == "adaptive"
                traced = []  # the run, kept only for --trace
                row = long_run(study, budget=budget, seed=seed, hypergradient=hypergradient if adaptive else None,
                               on_result=traced.append if args.trace else None)
                rows[arm].append(row)
                print(f"{study.name} seed {seed} {arm:>8}: {row['steps']:>6} steps, {study.metric} {row['value']:.4f}, "
                      f"test loss {row.get('test_loss', float('nan')):.4f}, "
                      f"accuracy {row.get('test_accuracy', float('nan')):.4f}, "
                      f"lr {_show(_moved(row, 'lr'))}, weight decay {_show(_moved(row, 'weight_decay'))}", flush=True)
                if args.trace:
                    _trace(traced[0], args.trace)
        test = _test_metric(rows["fixed"] + rows["adaptive"])
        print(f"\n{study.name}, {budget.seconds:g} s per run, median over {args.seeds} seeds:")
        print(f"| run | steps | final {study.metric} | {test.replace('_', ' ')} | lr final/start (lowest) |")
        print("|---|---|---|---|---|")
        for arm, of_arm in rows.items():
            lowest = [(_moved(row, "lr") or (1.0, 1.0))[0] for row in of_arm]
            print(f"| {arm} | {statistics.median(r['steps'] for r in of_arm):.0f} | "
                  f"{statistics.median(r['value'] for r in of_arm):.4f} | "
                  f"{statistics.median(r[test] for r in of_arm):.4f} | "
                  f"{statistics.median(lowest):.2g}x |")
        pairs = list(zip(rows["adaptive"], rows["fixed"], strict=True))
        sign = 1 if study.direction == "minimize" else -1
        better = sum(sign * a["value"] < sign * f["value"] for a, f in pairs)
        test_sign = -1 if test == "test_accuracy" else 1
        test_better = sum(test_sign * a[test] < test_sign * f[test] for a, f in pairs)
        print(f"adaptive ended with the better {study.metric} ({'lower' if sign == 1 else 'higher'}) in {better} "
              f"of {args.seeds} seeds and the better {test.replace('_', ' ')} in {test_better}", flush=True)
        print(f"adaptive minus fixed, mean over seeds (standard error): {study.metric} {_paired(pairs, 'value')}, "
              f"{test.replace('_', ' ')} {_paired(pairs, test)}\n", flush=True)


if __name__ == "__main__":
    main()
