"""The hypermeta arm of ``hypermeta compare`` alone, with a variant: cheap to try a lever before a full run.

    python benchmarks/hypermeta_arm.py studies/digits_mlp.py --seconds 20 --seeds 3 --start middle
    python benchmarks/hypermeta_arm.py studies/mnist1d_cnn.py --seconds 180 --hypergradient horizon=80

``--start``: ``search`` (what ``hypermeta compare`` does: TPE draws every trial's initial values),
``middle`` (the first trial starts at the middle of the init ranges, TPE draws the rest), ``learned``
(once a trial has finished, each new one starts from the values the best finished trial learned) or
``middle+learned``. ``--hypergradient key=value`` overrides fields of the study's ``Hypergradient``.
Prints, per seed, the best validation metric within the budget and when it was reached.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics

import optuna
import torch

from hypermeta import _compare
from hypermeta._compare import Budget
from hypermeta._records import HYPERPARAMETERS
from hypermeta._runner import TrialRunner, check_build, load_study_file
from hypermeta._study import geometric_middle


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study_file")
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--start", choices=("search", "middle", "learned", "middle+learned"), default="search")
    parser.add_argument("--hypergradient", nargs="*", default=[], metavar="KEY=VALUE")
    return parser.parse_args(argv)


def with_hypergradient(study, overrides: dict[str, str]):
    def build(trial):
        setup = study.build(trial)
        fields = {key: _parsed(value) for key, value in overrides.items()}
        return dataclasses.replace(setup, hypergradient=dataclasses.replace(setup.hypergradient, **fields))

    return dataclasses.replace(study, build=build) if overrides else study


_CONSTANTS = {"True": True, "False": False, "None": None}


def _parsed(text: str) -> bool | int | float | str | None:
    if text in _CONSTANTS:
        return _CONSTANTS[text]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


class LearnedStart(TrialRunner):
    """Each trial starts from the values the best finished trial so far learned (none: TPE draws them)."""

    def _run(self, trial: optuna.Trial) -> float:
        finished = trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        sign = 1 if trial.study.direction == optuna.study.StudyDirection.MINIMIZE else -1
        best = min(finished, key=lambda t: sign * t.value) if finished else None
        self.start = dict(best.user_attrs[HYPERPARAMETERS]) if best else None
        return super()._run(trial)


def middle_params(study) -> dict[str, float]:
    """``lr_init`` and ``weight_decay_init`` at the middle of their ranges (a throw-away build)."""
    setup = check_build(study)
    params = {"lr_init": geometric_middle(*setup.learning_rate.init)}
    if setup.weight_decay is not None and isinstance(setup.weight_decay.init, tuple):
        params["weight_decay_init"] = geometric_middle(*setup.weight_decay.init)
    return params


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = with_hypergradient(load_study_file(args.study_file), dict(kv.split("=", 1) for kv in args.hypergradient))
    if "learned" in args.start:
        _compare.TrialRunner = LearnedStart  # the runner _search builds
    if "middle" in args.start:
        make_search, first = _compare.search_study, middle_params(study)

        def search_study(study, *, arm, seed):
            search = make_search(study, arm=arm, seed=seed)
            search.enqueue_trial(first)
            return search

        _compare.search_study = search_study
    sign = 1 if study.direction == "minimize" else -1
    bests = []
    for seed in range(args.seeds):
        rows = _compare._search(study, "hypermeta", Budget(seconds=args.seconds), seed, "cpu")
        spent, best, reached, counted = 0.0, sign * math.inf, [], 0
        for row in rows:
            spent += row["seconds"]
            if spent > args.seconds:  # the trial that crosses the budget is not counted
                break
            counted += 1
            if row["value"] is not None and sign * row["value"] < sign * best:
                best = row["value"]
                reached.append(f"{best:.4f} at {spent / args.seconds:.2f}")
        bests.append(best)
        print(f"seed {seed}: best {best:.4f}, {counted} trials; best so far: {', '.join(reached)}", flush=True)
    print(f"{args.study_file} --start {args.start} {' '.join(args.hypergradient)}: "
          f"median best {statistics.median(bests):.4f} over {args.seeds} seeds")


if __name__ == "__main__":
    main()
