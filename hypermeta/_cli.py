"""The ``hypermeta`` command line."""

from __future__ import annotations

import argparse
import sys

import optuna
import pandas as pd

from hypermeta import _results, _storage
from hypermeta._errors import UsageError
from hypermeta._runner import SAMPLERS, RunOptions, load_study_file, run_study


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage block
        raise UsageError(f"{message}; see `{self.prog} --help`")


def _positive_int(text: str) -> int:
    value = int(text) if text.lstrip("-").isdigit() else None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return int(text)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hypermeta", description="Hyperparameter optimization as meta-learning.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def storage_flags(command):
        command.add_argument("--storage", help="Optuna storage URL (default: sqlite file .hypermeta/hypermeta.db)")
        command.add_argument("--artifacts", help="artifact directory (default: beside the SQLite file)")

    run = commands.add_parser("run", help="run a study file until it holds N finished trials")
    run.add_argument("study_file")
    run.add_argument("--n-trials", type=_positive_int, help="finished trials to reach (default: the file's)")
    run.add_argument("--timeout", type=_positive_float, help="stop starting trials after SECONDS")
    storage_flags(run)
    run.add_argument("--sampler", choices=sorted(SAMPLERS), default="tpe")
    run.add_argument("--seed", type=_non_negative_int, default=0)
    run.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    run.add_argument("--quiet", action="store_true", help="no progress bars")

    studies = commands.add_parser("studies", help="list stored studies")
    storage_flags(studies)
    for name, text in (("trials", "a table of a study's trials"), ("best", "a study's best trial")):
        command = commands.add_parser(name, help=text)
        command.add_argument("name")
        storage_flags(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        return _COMMANDS[args.command](args)
    except UsageError as error:
        print(f"hypermeta: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hypermeta: interrupted", file=sys.stderr)
        return 130


def _run(args) -> int:
    study = load_study_file(args.study_file)
    options = RunOptions(
        storage=args.storage, artifacts=args.artifacts, n_trials=args.n_trials, timeout=args.timeout,
        sampler=args.sampler, seed=args.seed, device=args.device, quiet=args.quiet,
    )
    stored = run_study(study, options)
    table = _results.trials_table(stored)
    counts = table["state"].value_counts().to_dict()
    summary = ", ".join(f"{n} {state.lower()}" for state, n in sorted(counts.items()))
    print(f"study {study.name!r} in {_storage.redact(args.storage or _storage.default_url())}: {summary}")
    if counts.get("COMPLETE"):
        best = stored.best_trial
        print(f"best trial {best.number}: {study.metric} = {best.value:.4g}")
    return 0


def _studies(args) -> int:
    storage = _storage.open_storage(args.storage, create=False)
    rows = []
    for summary in storage.get_all_studies():
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        states = pd.Series([t.state.name for t in study.get_trials(deepcopy=False)]).value_counts()
        completed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        rows.append({
            "study": summary.study_name,
            "direction": summary.directions[0].name.lower(),
            **{state.name.lower(): int(states.get(state.name, 0)) for state in optuna.trial.TrialState},
            "best value": study.best_value if completed else None,
        })
    if not rows:
        print("no studies in this storage")
        return 0
    _print_table(pd.DataFrame(rows))
    return 0


def _trials(args) -> int:
    study = _results.open_study(args.name, args.storage)
    table = _results.trials_table(study)
    if table.empty:
        print(f"study {args.name!r} has no trials")
    else:
        _print_table(table)
    return 0


def _best(args) -> int:
    study = _results.open_study(args.name, args.storage)
    completed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not completed:
        raise UsageError(f"study {args.name!r} has no completed trial yet; run it first")
    best = study.best_trial
    row = _results.trials_table(study).set_index("trial").loc[best.number].dropna()
    print(f"best trial of {args.name!r}: {best.number}")
    width = max(len(str(key)) for key in row.index)
    for key, value in row.items():
        print(f"  {key:<{width}}  {value:.6g}" if isinstance(value, float) else f"  {key:<{width}}  {value}")
    return 0


def _print_table(frame: pd.DataFrame) -> None:
    with pd.option_context("display.max_columns", None, "display.width", 200, "display.max_colwidth", 60):
        print(frame.to_string(index=frame.index.name is not None or not isinstance(frame.index, pd.RangeIndex)))


_COMMANDS = {"run": _run, "studies": _studies, "trials": _trials, "best": _best}


if __name__ == "__main__":
    sys.exit(main())
