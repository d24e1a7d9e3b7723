"""The Optuna outer loop: one engine run per trial, everything stored in an Optuna storage."""

from __future__ import annotations

import contextlib
import runpy
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch
from optuna.artifacts import upload_artifact
from optuna.trial import TrialState
from tqdm import tqdm

from hypermeta import _storage
from hypermeta._episodic import EpisodicSetup
from hypermeta._errors import UsageError
from hypermeta._study import Setup, Study, resolve, setup_problem

SAMPLERS = {
    "tpe": lambda seed: optuna.samplers.TPESampler(seed=seed),
    "gp": lambda seed: optuna.samplers.GPSampler(seed=seed),
    "cmaes": lambda seed: optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False),
    "random": lambda seed: optuna.samplers.RandomSampler(seed=seed),
}
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
TAKEN = (*FINISHED, TrialState.RUNNING)
TRAJECTORY_FILE = "trajectory.csv"
EVALUATIONS_FILE = "evaluations.csv"


@dataclass(kw_only=True)
class RunOptions:
    """How ``hypermeta run`` runs a study; the CLI's flags."""

    storage: str | None = None
    artifacts: str | None = None
    n_trials: int | None = None
    timeout: float | None = None
    sampler: str = "tpe"
    seed: int = 0
    device: str = "cpu"
    quiet: bool = False
    warm_start: str | None = None
    warm_storage: str | None = None


def load_study_file(path: str | Path) -> Study:
    """The one :class:`Study` a study file defines."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"study file {path} does not exist; give the path of a .py file under studies/")
    try:
        namespace = runpy.run_path(str(path), run_name=f"hypermeta_study_{path.stem}")
    except SyntaxError as error:
        raise UsageError(f"study file {path} line {error.lineno}: syntax error ({error.msg}); fix it") from None
    except Exception as error:
        raise UsageError(f"study file {path} failed to load: {_describe(error)}; fix it") from None
    studies = list({id(value): value for value in namespace.values() if isinstance(value, Study)}.values())
    if len(studies) != 1:
        found = "defines no hypermeta.Study" if not studies else f"defines {len(studies)} studies"
        raise UsageError(f"study file {path} {found}; define exactly one: study = hypermeta.Study(...)")
    return studies[0]


def run_study(study: Study, options: RunOptions) -> optuna.Study:
    """Run ``study`` until its storage holds ``n_trials`` finished (complete or pruned) trials."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    check_device(options.device)
    if options.sampler not in SAMPLERS:
        raise UsageError(f"unknown sampler {options.sampler!r}; use one of {', '.join(sorted(SAMPLERS))}")
    _check_build(study)
    warm = warm_start(options.warm_start, options.warm_storage or options.storage) if options.warm_start else None
    _storage.artifact_directory(options.storage, options.artifacts)  # a bad --artifacts fails before any write
    storage = _storage.open_storage(options.storage, create=True, heartbeat=True)
    existing = _existing_trials(storage, study)
    # A continued study must not replay the first run's random draws: offset the seed by its trials.
    sampler = SAMPLERS[options.sampler]((options.seed + existing) % 2**32)
    stored = optuna.create_study(
        storage=storage, study_name=study.name, direction=study.direction, sampler=sampler,
        pruner=study.make_pruner(), load_if_exists=True,
    )
    stored.set_user_attr("metric", study.metric)  # for reports, which never read the study file
    if warm is not None:
        stored.set_user_attr("warm_start", warm)
    store = _storage.artifact_store(options.storage, options.artifacts, create=True)
    target = options.n_trials or study.n_trials
    remaining = target - _count_finished(stored)
    if remaining <= 0:
        return stored
    progress = _Progress(remaining, quiet=options.quiet)
    objective = TrialRunner(
        study, seed=options.seed, device=options.device, store=store, progress=progress,
        start=warm["values"] if warm else None, target=target,
    )
    with progress:
        # Stop once the target is finished or being run by other workers (a worker that dies leaves its
        # trial to the next `run`, which re-runs it).
        stored.optimize(
            objective, n_trials=remaining, timeout=options.timeout, catch=(Exception,),
            callbacks=[optuna.study.MaxTrialsCallback(target, states=TAKEN), progress.end_trial],
        )
    return stored


def warm_start(study_name: str, storage: str | None) -> dict:
    """The final hyperparameter values of the best trial of a stored study, to start from."""
    other = _storage.load_study(_storage.open_storage(storage, create=False), study_name)
    completed = [t for t in other.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.values]
    if len(other.directions) != 1 or not completed:
        raise UsageError(f"--warm-start {study_name!r}: the study has no completed trial to start from; run it first")
    best = other.best_trial
    values = best.user_attrs.get("hyperparameters")
    if not values:
        raise UsageError(f"--warm-start {study_name!r}: its best trial stored no hyperparameter values")
    return {"study": study_name, "trial": best.number, "values": values}


def check_device(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here; use --device cpu")


def _existing_trials(storage: optuna.storages.BaseStorage, study: Study) -> int:
    """Trials (any state) of the stored study of that name, which must optimize the same one direction."""
    for summary in storage.get_all_studies():
        if summary.study_name != study.name:
            continue
        directions = [d.name.lower() for d in summary.directions]
        if directions != [study.direction]:
            raise UsageError(
                f"study {study.name!r} is stored with direction {'/'.join(directions)}, but the study"
                f" file's metric {study.metric!r} is to {study.direction}; rename the study"
            )
        study_id = storage.get_study_id_from_name(study.name)
        return len(storage.get_all_trials(study_id, deepcopy=False))
    return 0


def _count_finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def _taken_before(trial: optuna.Trial) -> int:
    """Trials that started running before ``trial`` and are finished or running.

    Ordered by start time, not number: a re-run of a killed worker's trial keeps the number it got
    when it was queued, and may start after trials with higher numbers. Every worker reads the same
    stored times, so two workers asking at once agree on which of them is beyond the target.
    """
    mine = (trial.datetime_start, trial.number)
    return sum((t.datetime_start, t.number) < mine for t in trial.study.get_trials(deepcopy=False, states=TAKEN))


class SurplusTrial(Exception):
    """A trial beyond the study's target, created by a worker that started with others."""


def _check_build(study: Study) -> None:
    """Build one throw-away trial in memory, so a broken build function writes nothing anywhere."""
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    try:
        setup = study.build(trial)
    except Exception as error:
        raise UsageError(f"the build function of study {study.name!r} raised {_describe(error)}; fix it") from None
    if not isinstance(setup, Setup | EpisodicSetup):
        raise UsageError(
            f"the build function of study {study.name!r} returned {type(setup).__name__}; return a hypermeta.Setup"
        )
    problem = setup_problem(setup, study.metric)
    if problem:
        raise UsageError(f"study {study.name!r}: {problem}")


class TrialRunner:
    """The Optuna objective: one engine run per trial.

    ``online``: hypergradients inside the trial, Optuna choosing initial values; otherwise every
    differentiable hyperparameter is an ordinary parameter (see :func:`hypermeta._study.resolve`).
    Without ``store`` no trajectories are kept. ``start``: warm-start values (see ``resolve``).
    ``target``: the finished trials the study should hold; a trial that workers starting at the
    same moment created beyond it ends FAIL without training, and its worker stops.
    """

    def __init__(
        self, study: Study, *, seed: int, device: str, online: bool = True, store=None, progress=None, start=None,
        target: int | None = None,
    ):
        self.study, self.seed, self.device, self.online, self.store = study, seed, device, online, store
        self.progress = progress or _Progress(0, quiet=True)
        self.start, self.target = start, target

    def __call__(self, trial: optuna.Trial) -> float:
        try:
            return self._run(trial)
        except KeyboardInterrupt:  # Optuna marks the trial FAIL and re-raises: the reason goes with it
            trial.set_user_attr("stop_reason", "interrupted (Ctrl-C)")
            raise

    def _run(self, trial: optuna.Trial) -> float:
        if self.target is not None and _taken_before(trial) >= self.target:
            trial.study.stop()
            reason = f"not run: {self.target} trials were already finished or running"
            trial.set_user_attr("stop_reason", reason)
            raise SurplusTrial(reason)
        seed = self.seed + trial.number
        torch.manual_seed(seed)
        setup = self.study.build(trial)
        if not isinstance(setup, Setup | EpisodicSetup):
            raise TypeError(f"build returned {type(setup).__name__}, not a hypermeta.Setup")
        setup, initial_values = resolve(setup, trial, online=self.online, start=self.start)
        self.progress.start_trial(setup.steps)
        started = time.perf_counter()
        result = setup.train(
            initial_values=initial_values, seed=seed, device=self.device, on_steps=self.progress.steps,
            on_evaluation=lambda step, metrics: self._report(trial, step, metrics, setup.steps),
        )
        trial.set_user_attr("seconds", time.perf_counter() - started)
        self._store(trial, result)
        if result.status != "completed":
            reason = f"pruned at step {result.steps}" if result.status == "stopped" else result.reason
            trial.set_user_attr("stop_reason", reason)
            raise optuna.TrialPruned(reason)
        for name, value in setup.test_metrics(result, device=self.device, seed=seed).items():
            trial.set_user_attr(f"test_{name}", value)
        return float(result.evaluations[self.study.metric].iloc[-1])

    def _report(self, trial: optuna.Trial, step: int, metrics: dict[str, float], steps: int) -> bool:
        trial.report(metrics[self.study.metric], step)
        return step < steps and trial.should_prune()  # a run that has finished is complete, not pruned

    def _store(self, trial: optuna.Trial, result) -> None:
        trial.set_user_attr("hyperparameters", result.hyperparameters)
        trial.set_user_attr("steps", result.steps)
        trial.set_user_attr("rejected_steps", result.rejected_steps)
        if self.store is None:
            return
        with tempfile.TemporaryDirectory() as directory:
            for name, frame in ((TRAJECTORY_FILE, result.trajectory), (EVALUATIONS_FILE, result.evaluations)):
                path = Path(directory) / name
                frame.to_csv(path, index=False)
                upload_artifact(artifact_store=self.store, file_path=str(path), study_or_trial=trial)


class _Progress:
    """A bar of trials and a bar of the current trial's inner steps (nothing with ``quiet``)."""

    def __init__(self, n_trials: int, *, quiet: bool) -> None:
        self.quiet = quiet
        self.trials = tqdm(total=n_trials, desc="trials", unit="trial", disable=quiet, position=0)
        self.inner = tqdm(total=0, desc="steps", unit="step", disable=quiet, position=1, leave=False)

    def start_trial(self, steps: int) -> None:
        self.inner.reset(total=steps)

    def steps(self, n: int) -> None:
        self.inner.update(n)

    def end_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.trials.update(1)
        with contextlib.suppress(ValueError):
            self.trials.set_postfix(best=f"{study.best_value:.4g}", refresh=False)

    def __enter__(self) -> _Progress:
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        return self

    def __exit__(self, *exc) -> None:
        self.inner.close()
        self.trials.close()


def _describe(error: BaseException) -> str:
    message = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {message}" if message else type(error).__name__
