"""Values move as far as they must: adaptive runs from the ends and the middle of a range, beside fixed values.

For each study file and each kind of value (the learning rates, the weight decays), one run of the
study's own length starts every value of that kind at the low end of the study's search range, at
its geometric middle and at its high end, with the study's ``Hypergradient`` moving the values;
beside them a grid of fixed values over the same range trains for the same steps, with nothing
adapting. Everything else is at the study's defaults: the middle of every Optuna range (the first
of every choice), the other kind's values at the middle of their range. Each run is repeated over
seeds (the model's initial weights and the batch order); the tables give medians over seeds of
the final validation loss.

Printed per study and kind: the grid, then for each start the fixed run from that start, the
adaptive run, where its values ended, and how its validation loss compares with the best grid
value's. The targets: every adaptive run ends better than the fixed run from its start, and the
runs from the ends within 10% of the best grid value's validation loss.

    python benchmarks/reach.py [STUDY_FILE ...] [--seeds 3] [--grid 7] [--kinds lr weight_decay]
        [--workers 2] [--out reports/reach]

Runs are counted in steps, not seconds, so ``--workers 2`` runs two at a time on a 2-core machine
without changing any result. ``--out DIR`` writes every run to ``DIR/<study>.csv``.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import math
import statistics
from concurrent.futures import ProcessPoolExecutor
from functools import cache
from pathlib import Path

import optuna
import pandas as pd
import torch

import hypermeta
from hypermeta._runner import load_study_file

STUDIES = [
    "studies/digits_mlp.py", "studies/mnist1d_cnn.py", "studies/digits_highdim.py", "studies/mnist1d_stream.py",
    "studies/mnist1d_small_mlp.py", "studies/friedman_regression.py",
]
KINDS = ("lr", "weight_decay")
TARGET = 0.10  # the runs from the ends reach within this fraction of the best grid value's validation loss


@cache
def _study(path: str) -> hypermeta.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return load_study_file(path)


def default_trial(study: hypermeta.Study) -> optuna.trial.FixedTrial:
    """A trial that answers every ``suggest_*`` of the study with the middle of its range (the first choice)."""
    probe = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    study.build(probe)
    answers = {}
    for name, distribution in probe.distributions.items():
        if isinstance(distribution, optuna.distributions.CategoricalDistribution):
            answers[name] = distribution.choices[0]
            continue
        low, high = distribution.low, distribution.high
        middle = math.sqrt(low * high) if distribution.log else (low + high) / 2
        answers[name] = round(middle) if isinstance(distribution, optuna.distributions.IntDistribution) else middle
    return optuna.trial.FixedTrial(answers)


def _range(spec) -> tuple[float, float]:
    return spec.init if isinstance(spec.init, tuple) else spec.bounds


def run(path: str, kind: str, start: float, adaptive: bool, seed: int, options: dict | None = None) -> dict:
    """One run of the study at its defaults with every value of ``kind`` started at ``start``."""
    torch.set_num_threads(1)
    study = _study(path)
    torch.manual_seed(seed)
    setup = study.build(default_trial(study))
    specs = {"lr": setup.learning_rate, "weight_decay": setup.weight_decay}
    fixed_specs = {
        name: None if spec is None else dataclasses.replace(
            spec, init=start if name == kind else math.sqrt(math.prod(_range(spec))), bounds=_range(spec))
        for name, spec in specs.items()
    }
    setup = dataclasses.replace(
        setup, learning_rate=fixed_specs["lr"], weight_decay=fixed_specs["weight_decay"],
        hypergradient=(hypermeta.Hypergradient(**options) if options is not None else setup.hypergradient)
        if adaptive else None,
    )
    result = setup.train(seed=seed)
    last = result.evaluations.iloc[-1] if len(result.evaluations) else {}
    finals = [v for key, v in result.hyperparameters.items() if key.split("/")[0] == kind]
    return {
        "study": study.name, "kind": kind, "start": start, "adaptive": adaptive, "seed": seed,
        "status": result.status, "steps": result.steps,
        "valid_loss": float(last.get("valid_loss", math.nan)),
        "valid_accuracy": float(last.get("valid_accuracy", math.nan)),
        "final_low": min(finals), "final_high": max(finals),
    }


def _grid(low: float, high: float, points: int) -> list[float]:
    return [low * (high / low) ** (i / (points - 1)) for i in range(points)]


def _median(frame: pd.DataFrame, column: str = "valid_loss") -> float:
    values = frame[column].dropna()
    return statistics.median(values) if len(values) else math.nan


def report(runs: pd.DataFrame, kind: str, starts: list[float]) -> tuple[str, bool]:
    """The markdown tables of one study and kind, and whether both targets were met."""
    of_kind = runs[runs["kind"] == kind]
    fixed, adaptive = of_kind[~of_kind["adaptive"]], of_kind[of_kind["adaptive"]]
    grid = fixed.groupby("start").apply(_median, include_groups=False)
    best_start, best = grid.idxmin(), grid.min()
    lines = [f"grid of fixed {kind} (median final valid loss): " + ", ".join(
        f"{start:.2g}: {loss:.4f}{' (best)' if start == best_start else ''}" for start, loss in grid.items())]
    lines += ["", "| start | fixed | adaptive | ends at | vs best grid | better than fixed | within 10% |",
              "|---|---|---|---|---|---|---|"]
    met = True
    for position, start in zip(("low", "middle", "high"), starts, strict=True):
        ours = adaptive[adaptive["start"] == start]
        loss, fixed_loss = _median(ours), grid[start]
        gap = loss / best - 1
        better = bool(loss < fixed_loss)
        within = bool(gap <= TARGET) if position != "middle" else None
        met = met and better and within is not False
        ends = f"{_median(ours, 'final_low'):.2g}..{_median(ours, 'final_high'):.2g}"
        lines.append(f"| {position} {start:.2g} | {fixed_loss:.4f} | {loss:.4f} | {ends} | {gap:+.1%} | "
                     f"{'yes' if better else 'no'} | {'-' if within is None else 'yes' if within else 'no'} |")
    return "\n".join(lines), met


def _option(text: str) -> tuple[str, object]:
    name, _, value = text.partition("=")
    try:
        return name, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return name, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("studies", nargs="*", default=STUDIES)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--grid", type=int, default=7, help="fixed values over each range, ends included (odd)")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--hypergradient", nargs="*", metavar="NAME=VALUE",
                        help="adaptive runs take Hypergradient(NAME=VALUE, ...) instead of the study's own")
    args = parser.parse_args()
    if args.grid < 3 or args.grid % 2 == 0:
        parser.error(f"--grid must be odd and at least 3 (it holds both ends and the middle), got {args.grid}")
    options = None if args.hypergradient is None else dict(_option(text) for text in args.hypergradient)
    for path in args.studies:
        study = _study(path)
        setup = study.build(default_trial(study))
        jobs = []
        for kind in args.kinds:
            spec = setup.learning_rate if kind == "lr" else setup.weight_decay
            if spec is None:
                continue
            low, high = _range(spec)
            starts = [low, math.sqrt(low * high), high]
            grid = _grid(low, high, args.grid)
            grid[0], grid[args.grid // 2], grid[-1] = starts  # exactly the starts, so each is a grid point
            jobs += [(path, kind, start, False, seed, None) for start in grid for seed in range(args.seeds)]
            jobs += [(path, kind, start, True, seed, options) for start in starts for seed in range(args.seeds)]
        with ProcessPoolExecutor(max_workers=args.workers) as pool:
            runs = pd.DataFrame(pool.map(run, *zip(*jobs, strict=True)))
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            runs.to_csv(args.out / f"{study.name}.csv", index=False)
        print(f"\n## {study.name}: {setup.steps} steps a run, median over {args.seeds} seeds\n")
        for kind in runs["kind"].unique():
            starts = sorted(runs.loc[(runs["kind"] == kind) & runs["adaptive"], "start"].unique())
            table, met = report(runs, kind, starts)
            print(f"### {kind}\n\n{table}\n\ntargets {'met' if met else 'not met'}\n", flush=True)


if __name__ == "__main__":
    main()
