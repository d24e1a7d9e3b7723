"""The ``hypermeta`` command line."""

from __future__ import annotations

import argparse
import math
import signal
import sys
import warnings
from pathlib import Path

import optuna
import pandas as pd
import torch

from hypermeta import _results, _storage
from hypermeta._errors import RunError, Terminated, UsageError
from hypermeta._private.files import check_target, directory_name
from hypermeta._runner import (
    SAMPLERS,
    RunOptions,
    check_build,
    check_device,
    check_finish,
    load_study_file,
    run_study,
    signals_end_trials,
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage block
        raise UsageError(f"{message}; see `{self.prog} --help`")


def _positive_int(text: str) -> int:
    value = int(text) if text.isascii() and text.lstrip("-").isdigit() else None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _seed(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) >= 2**32:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to 2**32 - 1, got {text!r}")
    return int(text)


def _number(text: str) -> float:
    """``text`` as a float; NaN (which fails every range check) if it is not a number."""
    try:
        return float(text)
    except ValueError:
        return math.nan


def _positive_float(text: str) -> float:
    value = _number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def _finite_seconds(text: str) -> float:
    value = _positive_float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds, got {text!r}")
    return value


def _fraction(text: str) -> float:
    value = _number(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, such as 0.75, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hypermeta", description="Hyperparameter optimization as meta-learning.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def storage_flags(command):
        command.add_argument("--storage", help="Optuna storage URL (default: sqlite file .hypermeta/hypermeta.db)")
        command.add_argument("--artifacts", help="artifact directory (default: beside the SQLite file)")

    def threads_flag(command):
        command.add_argument(
            "--threads", type=_positive_int,
            help="CPU threads for PyTorch (default 1: workers beside each other or other processes do not"
            " thrash; more only helps large models on an otherwise idle machine)",
        )

    run = commands.add_parser("run", help="run a study file until it holds N finished trials")
    run.add_argument("study_file")
    run.add_argument("--n-trials", type=_positive_int, help="finished trials to reach (default: the file's)")
    run.add_argument("--timeout", type=_positive_float, help="stop starting trials after SECONDS")
    storage_flags(run)
    run.add_argument("--sampler", choices=sorted(SAMPLERS), default="tpe")
    run.add_argument("--seed", type=_seed, default=0)
    run.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    threads_flag(run)
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument("--warm-start", metavar="STUDY", help="start from the best trial of this stored study")
    run.add_argument("--warm-storage", metavar="URL", help="storage of the --warm-start study (default: --storage)")
    run.add_argument(
        "--finish", type=_finite_seconds, metavar="SECONDS",
        help="then one finishing run of the best trial's choices for SECONDS, from the values it learned, adapting",
    )

    studies = commands.add_parser("studies", help="list stored studies")
    storage_flags(studies)
    for name, text in (("trials", "a table of a study's trials"), ("best", "a study's best trial")):
        command = commands.add_parser(name, help=text)
        command.add_argument("name")
        storage_flags(command)

    report = commands.add_parser("report", help="write an HTML report with figures of a stored study")
    which = report.add_mutually_exclusive_group(required=True)
    which.add_argument("name", nargs="?", help="the study to report")
    which.add_argument("--all", action="store_true", help="one report per stored study, and an index page")
    storage_flags(report)
    report.add_argument("--out", help="report directory (default: reports/NAME; with --all: reports)")

    compare = commands.add_parser(
        "compare", help="hypergradients against black-box search at equal budget",
        description="Run five arms at the same budget, per seed: hypermeta (hypergradients inside TPE trials); "
        "tpe (every learning-rate and weight-decay entry an Optuna parameter, held fixed during the trial); "
        "random (random search over the space of tpe); hyperband (TPE over that space with Hyperband pruning, "
        "which stops poor trials early at geometric rungs of the study's evaluation steps); defaults "
        "(the study's defaults trained once for the whole budget). Writes a table, the trials and two figures.",
    )
    compare.add_argument("study_file")
    budget = compare.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget-steps", type=_positive_int, help="inner training steps per arm and seed")
    budget.add_argument("--budget-seconds", type=_positive_float, help="wall-clock seconds per arm and seed")
    compare.add_argument("--seeds", type=_positive_int, default=3, help="repetitions with seeds 0..N-1 (default 3)")
    compare.add_argument(
        "--finish", type=_fraction, metavar="FRACTION",
        help="each search arm keeps this fraction of its budget for one finishing run of its best trial's choices"
        " (hypermeta's from the values it learned, adapting; a black-box arm's fixed), after searching the rest",
    )
    compare.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    threads_flag(compare)
    compare.add_argument("--out", help="report directory (default: reports/compare-NAME)")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            args = _parser().parse_args(argv)
            if hasattr(args, "threads"):
                # PyTorch's default, a thread per core, thrashes beside other workers or a busy process
                torch.set_num_threads(args.threads or 1)
            return _COMMANDS[args.command](args)
    except UsageError as error:
        print(f"hypermeta: error: {error}", file=sys.stderr)
        return 2
    except RunError as error:
        print(f"hypermeta: error: {error}", file=sys.stderr)
        return 1
    except Terminated:
        print("hypermeta: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("hypermeta: interrupted", file=sys.stderr)
        return 130


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Our own warnings as one line; others as Python shows them."""
    if issubclass(category, _storage.MissingArtifactsWarning):
        print(f"hypermeta: warning: {message}", file=sys.stderr)
    else:
        _PYTHON_SHOWWARNING(message, category, filename, lineno, file, line)


_PYTHON_SHOWWARNING = warnings.showwarning


def _run(args) -> int:
    with signals_end_trials():
        return _run_study(args)


def _run_study(args) -> int:
    if args.warm_storage and not args.warm_start:
        raise UsageError("--warm-storage needs --warm-start STUDY; see `hypermeta run --help`")
    study = load_study_file(args.study_file)
    options = RunOptions(
        storage=args.storage, artifacts=args.artifacts, n_trials=args.n_trials, timeout=args.timeout,
        sampler=args.sampler, seed=args.seed, device=args.device, quiet=args.quiet,
        warm_start=args.warm_start, warm_storage=args.warm_storage, finish=args.finish,
    )
    stored = run_study(study, options)
    table = _results.trials_table(stored)
    counts = table["state"].value_counts().to_dict()
    summary = ", ".join(f"{n} {state.lower()}" for state, n in sorted(counts.items()))
    print(f"study {study.name!r} in {_storage.redact(args.storage or _storage.default_url())}: {summary}")
    if counts.get("COMPLETE"):
        best = stored.best_trial
        print(f"best trial {best.number}: {study.metric} = {best.value:.4g}")
    target = args.n_trials or study.n_trials
    finished = counts.get("COMPLETE", 0) + counts.get("PRUNED", 0)
    if finished < target and counts.get("FAIL") and not counts.get("RUNNING"):
        print(
            f"{finished} of the {target} trials finished: failed trials do not count (their reasons are in"
            f" `hypermeta trials {study.name}`); run again to continue"
        )
    if finished < target and counts.get("RUNNING"):
        print(
            f"{counts['RUNNING']} trial(s) still running, counted towards the {target}: other workers', or a killed"
            f" worker's until {_storage.GRACE_PERIOD_S} s after its last heartbeat; run again then to complete them"
        )
    return 0


def _compare(args) -> int:
    from hypermeta import _compare as _compare_arms  # matplotlib is imported for this command only

    study = load_study_file(args.study_file)
    budget = _compare_arms.Budget(steps=args.budget_steps, seconds=args.budget_seconds, finish=args.finish)
    check_device(args.device)
    out = Path(args.out or Path("reports") / f"compare-{directory_name(study.name)}")
    check_target(out, study.name)  # before the arms run, not after
    if budget.finish:
        check_finish(check_build(study), study)
    trials = _compare_arms.run_arms(study, budget=budget, seeds=args.seeds, device=args.device)
    _compare_arms.write_report(study, trials, budget=budget, out=out)
    print((out / "README.md").read_text(), end="")
    print(f"report written to {out}")
    return 0


def _studies(args) -> int:
    storage = _storage.open_storage(args.storage, create=False)
    rows = []
    for summary in storage.get_all_studies():
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        states = pd.Series([t.state.name for t in study.get_trials(deepcopy=False)]).value_counts()
        completed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        single = len(summary.directions) == 1  # other Optuna studies may share the storage
        rows.append({
            "study": summary.study_name,
            "direction": "/".join(d.name.lower() for d in summary.directions),
            **{state.name.lower(): int(states.get(state.name, 0)) for state in optuna.trial.TrialState},
            "best value": study.best_value if completed and single else None,
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
    if len(study.directions) != 1:
        raise UsageError(f"study {args.name!r} has {len(study.directions)} objectives; use `hypermeta trials` for it")
    completed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not completed:
        raise UsageError(f"study {args.name!r} has no completed trial yet; {_results.why_none_completed(study)}")
    best = study.best_trial
    row = _results.trials_table(study).set_index("trial").loc[best.number].dropna()
    print(f"best trial of {args.name!r}: {best.number}")
    width = max(len(str(key)) for key in row.index)
    for key, value in row.items():
        print(f"  {key:<{width}}  {value:.6g}" if isinstance(value, float) else f"  {key:<{width}}  {value}")
    return 0


def _report(args) -> int:
    from hypermeta import reports  # matplotlib is imported for this command only

    if not args.all:
        index = reports.write_report(study_name=args.name, storage=args.storage, artifacts=args.artifacts, out=args.out)
        print(f"report of study {args.name!r}: {index}")
        return 0
    written = reports.write_all_reports(storage=args.storage, artifacts=args.artifacts, out=args.out)
    for name, index in written.reports.items():
        print(f"report of study {name!r}: {index}")
    for name, reason in written.skipped.items():
        print(f"hypermeta: skipped study {name!r}: {reason}", file=sys.stderr)
    print(f"index of {len(written.reports)} reports: {written.index}")
    return 0


def _print_table(frame: pd.DataFrame) -> None:
    with pd.option_context("display.max_columns", None, "display.width", 200, "display.max_colwidth", 60):
        print(frame.to_string(index=frame.index.name is not None or not isinstance(frame.index, pd.RangeIndex)))


_COMMANDS = {
    "run": _run, "studies": _studies, "trials": _trials, "best": _best, "report": _report, "compare": _compare,
}


if __name__ == "__main__":
    sys.exit(main())
