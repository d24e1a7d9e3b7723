"""The Optuna outer loop: one engine run per trial, everything stored in an Optuna storage."""

from __future__ import annotations

import contextlib
import dataclasses
import runpy
import signal
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import torch
from optuna.trial import TrialState
from tqdm import tqdm

from hypermeta import _storage
from hypermeta._episodic import EpisodicSetup
from hypermeta._errors import RunError, Terminated, UsageError
from hypermeta._hyperparameters import within_bounds
from hypermeta._records import (
    EVALUATIONS_FILE,
    FAIL_REASON,
    FINISH,
    HYPERPARAMETERS,
    LAYERS,
    REJECTED_STEPS,
    SECONDS,
    STEPS,
    STOP_REASON,
    STUDY_METRIC,
    STUDY_WARM_START,
    TEST_PREFIX,
    TRAJECTORY_FILE,
    describe_layers,
    trial_reason,
)
from hypermeta._study import (
    Setup,
    Study,
    evaluation_cadence,
    hyperparameter_keys,
    resolve,
    setup_problem,
    spec_of,
)

SAMPLERS = {
    "tpe": lambda seed: optuna.samplers.TPESampler(seed=seed),
    "gp": lambda seed: optuna.samplers.GPSampler(seed=seed),
    "cmaes": lambda seed: optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False),
    "random": lambda seed: optuna.samplers.RandomSampler(seed=seed),
}
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
TAKEN = (*FINISHED, TrialState.RUNNING)


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
    finish: float | None = None  # seconds of a finishing run of the best trial after the search


def load_study_file(path: str | Path) -> Study:
    """The one :class:`Study` a study file defines.

    The file's directory goes first on ``sys.path``, as for a script run beside it, so that the file
    imports the modules next to it (also when ``build`` imports them later).
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"study file {path} does not exist; give the path of a .py file under studies/")
    directory = str(path.resolve().parent)
    if directory not in sys.path:
        sys.path.insert(0, directory)
    try:
        namespace = runpy.run_path(str(path), run_name=f"hypermeta_study_{path.stem}")
    except SyntaxError as error:
        raise UsageError(f"study file {path} line {error.lineno}: syntax error ({error.msg}); fix it") from None
    except Exception as error:
        raise UsageError(f"study file {path} failed to load: {_storage.describe(error)}; fix it") from None
    studies = list({id(value): value for value in namespace.values() if isinstance(value, Study)}.values())
    if len(studies) != 1:
        found = "defines no hypermeta.Study" if not studies else f"defines {len(studies)} studies"
        raise UsageError(f"study file {path} {found}; define exactly one: study = hypermeta.Study(...)")
    return studies[0]


def run_study(study: Study, options: RunOptions) -> optuna.Study:
    """Run ``study`` until its storage holds ``n_trials`` finished (complete or pruned) trials, then
    (``finish``) one finishing run of the best trial's choices for that many seconds.

    Every input is checked before anything is written. Raises :class:`~hypermeta._errors.RunError`
    when none of the trials this run started finished, when the artifact store cannot be written,
    and when the storage stays unreachable; each failed trial stores its reason as user attribute
    ``fail_reason`` and prints it on stderr.
    """
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    check_device(options.device)
    if options.sampler not in SAMPLERS:
        raise UsageError(f"unknown sampler {options.sampler!r}; use one of {', '.join(sorted(SAMPLERS))}")
    setup = check_build(study)
    if options.finish:
        check_finish(setup, study)
    warm = warm_start(options.warm_start, options.warm_storage or options.storage) if options.warm_start else None
    if warm is not None:
        _check_warm_start(setup, warm)
    _storage.check_url(options.storage or _storage.default_url(), create=True)
    directory = _storage.artifact_directory(options.storage, options.artifacts)
    store, created = _storage.new_artifact_store(options.storage, options.artifacts)
    try:
        storage = _storage.open_storage(options.storage, create=True, heartbeat=True)
        _check_direction(storage, study)
    except BaseException:
        _storage.remove_directories(created)
        raise
    stored = optuna.create_study(
        storage=storage, study_name=study.name, direction=study.direction,
        sampler=TrialSeededSampler(options.sampler, seed=options.seed), pruner=study.make_pruner(),
        load_if_exists=True,
    )
    stored.set_user_attr(STUDY_METRIC, study.metric)  # for reports, which never read the study file
    if warm is not None:
        stored.set_user_attr(STUDY_WARM_START, warm)
    if created:
        _warn_if_artifacts_lost(stored, directory)
    target = options.n_trials or study.n_trials
    if target - _count_finished(stored) > 0:
        progress = _Progress(target - _count_finished(stored), quiet=options.quiet)
        objective = TrialRunner(
            study, seed=options.seed, device=options.device, store=store, progress=progress,
            start=warm["values"] if warm else None, target=target,
        )
        with progress:
            _optimize(stored, objective, target=target, timeout=options.timeout)
        objective.raise_if_nothing_finished()
    if options.finish:
        _run_finish(stored, study, setup, options, store)
    return stored


def _run_finish(stored: optuna.Study, study: Study, setup: Setup, options: RunOptions, store) -> None:
    """One finishing run of the best trial's choices, from the values it learned, for ``options.finish`` seconds."""
    if not stored.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise RunError(
            f"--finish: no trial of study {study.name!r} completed, so there is no best trial to finish;"
            f" see `hypermeta trials {study.name}`"
        )
    best = stored.best_trial
    _check_warm_start(setup, {"study": study.name, "values": best.user_attrs.get(HYPERPARAMETERS, {})}, "--finish")
    enqueue_finish(stored, best, online=True, seconds=options.finish)
    progress, ran = _Progress(1, quiet=options.quiet), []
    objective = TrialRunner(study, seed=options.seed, device=options.device, store=store, progress=progress)
    with progress:
        stored.optimize(objective, n_trials=1, catch=(Exception,),
                        callbacks=[progress.end_trial, lambda _, trial: ran.append(trial)])
    objective.raise_if_nothing_finished()
    if not ran or FINISH not in ran[0].user_attrs:
        raise RunError(
            f"another worker took the finishing run of trial {best.number}; run --finish once the others are done"
        )
    if ran[0].state != TrialState.COMPLETE:
        raise RunError(
            f"the finishing run of trial {best.number} (trial {ran[0].number}) did not complete:"
            f" {trial_reason(ran[0]) or 'unknown'}"
        )


def _optimize(stored: optuna.Study, objective: TrialRunner, *, target: int, timeout: float | None) -> None:
    """``stored.optimize`` until ``target`` trials are finished or taken, going on past a trial lost to others."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while (remaining := target - _count_finished(stored)) > 0:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            return
        try:
            # Stop once the target is finished or being run by other workers (a worker that dies leaves its
            # trial to the next `run`, which re-runs it).
            stored.optimize(
                objective, n_trials=remaining, timeout=left, catch=(Exception,),
                callbacks=[optuna.study.MaxTrialsCallback(target, states=TAKEN), objective.progress.end_trial],
            )
            return
        except UnboundLocalError as error:
            # Optuna 5's _run_trial hides a storage error of its final tell behind an UnboundLocalError
            cause = error.__context__
            if isinstance(cause, RunError):
                raise cause from None
            raise
        except TrialTakenOver as taken:
            objective.progress.note(
                f"hypermeta: trial {taken.number} was failed by another worker while this one was paused or cut off"
                f" (no heartbeat for {_storage.GRACE_PERIOD_S} s); its result is dropped, going on"
            )


def _warn_if_artifacts_lost(stored: optuna.Study, directory: Path) -> None:
    """A missing artifact store that the study's trials wrote to was deleted or moved: say so."""
    lost = sum(_storage.lacks_artifact_files(t, directory) for t in stored.get_trials(deepcopy=False))
    if lost:
        warnings.warn(
            f"artifact store {directory} did not exist, but {lost} trial(s) of study {stored.study_name!r} stored"
            " files there: created it anew, their trajectories are missing (restore the directory, or pass"
            " --artifacts DIR where it is now)",
            _storage.MissingArtifactsWarning, stacklevel=2,
        )


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """One of :data:`SAMPLERS`, seeded for each trial from ``seed`` and the trial's number.

    Trial numbers are unique in a study, so workers started at the same moment draw different
    trials, while one worker on an empty storage draws the same trials for the same seed. The
    model-based samplers rebuild their model from the stored trials on every trial anyway.
    """

    def __init__(self, name: str, *, seed: int) -> None:
        self.name, self.seed = name, seed
        self.sampler = SAMPLERS[name](seed)

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        entropy = np.random.SeedSequence([self.seed, trial.number]).generate_state(1)[0]
        self.sampler = SAMPLERS[self.name](int(entropy))
        self.sampler.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self.sampler.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self.sampler.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.sampler.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self.sampler.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.sampler.reseed_rng()


def check_finish(setup: Setup | EpisodicSetup, study: Study) -> None:
    """A finishing run sets the steps of hypermeta's own loop: an episodic set-up or a loop of yours has none."""
    if isinstance(setup, EpisodicSetup):
        raise UsageError(f"--finish: study {study.name!r} is episodic and learns its inner rates; drop --finish")
    if setup.loop is not None:
        raise UsageError(f"--finish: study {study.name!r} trains with a loop of its own, whose steps a finishing run"
                         " cannot set; drop --finish")


def enqueue_finish(
    study: optuna.Study, trial: optuna.trial.FrozenTrial, *, online: bool, steps: int | None = None,
    seconds: float | None = None,
) -> None:
    """Queue a finishing run of ``trial``'s choices: ``steps`` steps, or until ``seconds`` have passed.

    An ``online`` run starts from the values ``trial`` learned and adapts them on; a black-box one
    runs at ``trial``'s values, fixed. The runner that takes it never prunes it.
    """
    if (steps is None) == (seconds is None):
        raise ValueError("a finishing run takes steps or seconds, one of them")
    start = dict(trial.user_attrs[HYPERPARAMETERS]) if online else None
    finish = {"of": trial.number, "steps": steps, "seconds": seconds, "start": start}
    study.enqueue_trial(trial.params, user_attrs={FINISH: finish})


def warm_start(study_name: str, storage: str | None) -> dict:
    """The final hyperparameter values of the best trial of a stored study, to start from."""
    other = _storage.load_study(_storage.open_storage(storage, create=False), study_name)
    completed = [t for t in other.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.values]
    if len(other.directions) != 1 or not completed:
        raise UsageError(f"--warm-start {study_name!r}: the study has no completed trial to start from; run it first")
    best = other.best_trial
    values = best.user_attrs.get(HYPERPARAMETERS)
    if not values:
        raise UsageError(f"--warm-start {study_name!r}: its best trial stored no hyperparameter values")
    return {"study": study_name, "trial": best.number, "values": values}


def check_device(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here; use --device cpu")


def _check_direction(storage: optuna.storages.BaseStorage, study: Study) -> None:
    """A stored study of that name must optimize the same one direction."""
    for summary in storage.get_all_studies():
        if summary.study_name != study.name:
            continue
        directions = [d.name.lower() for d in summary.directions]
        if directions != [study.direction]:
            raise UsageError(
                f"study {study.name!r} is stored with direction {'/'.join(directions)}, but the study"
                f" file's metric {study.metric!r} is to {study.direction}; rename the study"
            )


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


class TrialTakenOver(BaseException):
    """This worker's trial was failed by another worker (its heartbeat had stopped: paused, cut off).

    A BaseException, so that Optuna does not try to tell the finished trial again ("Cannot tell a
    FAIL trial"); the run catches it and goes on with the next trial.
    """

    def __init__(self, number: int) -> None:
        super().__init__(number)
        self.number = number


def check_build(study: Study) -> Setup | EpisodicSetup:
    """Build one throw-away trial in memory, so a broken build function writes nothing anywhere."""
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    try:
        setup = study.build(trial)
    except Exception as error:
        problem = _storage.describe(error)
        raise UsageError(f"the build function of study {study.name!r} raised {problem}; fix it") from None
    if not isinstance(setup, Setup | EpisodicSetup):
        raise UsageError(
            f"the build function of study {study.name!r} returned {type(setup).__name__}; return a hypermeta.Setup"
        )
    problem = setup_problem(setup, study.metric)
    if problem:
        raise UsageError(f"study {study.name!r}: {problem}")
    return setup


def _check_warm_start(setup: Setup | EpisodicSetup, warm: dict, flag: str = "--warm-start") -> None:
    """Every value this set-up is to start from must lie where its hypergradients may move it."""
    if isinstance(setup, EpisodicSetup):
        raise UsageError(f"{flag} {warm['study']!r}: an episodic study learns its inner rates; drop {flag}")
    keys = hyperparameter_keys(setup)
    for key, value in warm["values"].items():
        bounds = spec_of(setup, key).bounds if key in keys else None
        if bounds and not within_bounds(value, bounds):
            raise UsageError(
                f"{flag} {warm['study']!r}: its {key} = {value:.3g} lies outside this study's range "
                f"({bounds[0]:g}, {bounds[1]:g}); widen the range (or its bounds) to include it, or drop {flag}"
            )


UNTIL_THE_DEADLINE = 10**9  # the steps of a run that a deadline ends
# A trial's second surplus check waits this long: another worker's insert of a trial that started at
# the same moment can take longer to show than a trial's first window of one step.
SURPLUS_RECHECK_SECONDS = 0.5


class TrialRunner:
    """The Optuna objective: one engine run per trial.

    ``online``: hypergradients inside the trial, Optuna choosing initial values; otherwise every
    differentiable hyperparameter is an ordinary parameter (see :func:`hypermeta._study.resolve`).
    Without ``store`` no trajectories are kept. ``start``: warm-start values (see ``resolve``).
    ``target``: the finished trials the study should hold; a trial that workers starting at the
    same moment created beyond it ends FAIL without training (or after its first steps, where
    the check at its start could not yet see the other worker's trial), and its worker stops.
    ``deadline`` (a ``time.perf_counter()`` time): a trial still training then is pruned at its
    next evaluation (``hypermeta compare`` ends an arm's last trial where its budget of seconds ends).
    A trial queued by :func:`enqueue_finish` is a finishing run, whichever runner takes it.
    """

    def __init__(
        self, study: Study, *, seed: int, device: str, online: bool = True, store=None, progress=None, start=None,
        target: int | None = None, deadline: float | None = None,
    ):
        self.study, self.seed, self.device, self.online, self.store = study, seed, device, online, store
        self.progress = progress or _Progress(0, quiet=True)
        self.start, self.target, self.deadline = start, target, deadline
        self.finished, self.failures, self.fatal = 0, [], None
        self._rechecked = None  # the trial that had its second surplus check
        self._trial_started = 0.0

    def __call__(self, trial: optuna.Trial) -> float:
        try:
            value = self._run(trial)
        except (optuna.TrialPruned, SurplusTrial):
            raise
        except optuna.exceptions.UpdateFinishedTrialError:
            raise TrialTakenOver(trial.number) from None
        except KeyboardInterrupt as interrupt:  # Optuna marks the trial FAIL and re-raises: the reason goes with it
            self._note_interrupt(trial, interrupt)
            raise
        except _ArtifactsUnwritable as error:
            self._note_failure(trial, str(error), show=False)
            self.fatal = RunError(f"trial {trial.number} trained but {error}; the run is stopped")
            trial.study.stop()
            raise
        except Exception as error:
            interrupt = _interrupt_inside(error)
            if interrupt is not None:
                self._note_interrupt(trial, interrupt)
                raise interrupt from None
            self._note_failure(trial, _storage.describe(error))
            raise
        self.finished += 1
        return value

    def _note_interrupt(self, trial: optuna.Trial, interrupt: KeyboardInterrupt) -> None:
        reason = "terminated (SIGTERM)" if isinstance(interrupt, Terminated) else "interrupted (Ctrl-C)"
        self._note_failure(trial, reason, attrs=(STOP_REASON, FAIL_REASON), show=False)

    def _note_failure(self, trial: optuna.Trial, reason: str, *, attrs=(FAIL_REASON,), show: bool = True) -> None:
        self.failures.append((trial.number, reason))
        with contextlib.suppress(Exception):  # the storage may be what failed; the reason still goes to stderr
            for key in attrs:
                trial.set_user_attr(key, reason)
        if show:
            self.progress.note(f"hypermeta: trial {trial.number} failed: {reason}")

    def raise_if_nothing_finished(self) -> None:
        """After the run: the fatal error that stopped it, or an error if none of its trials finished."""
        if self.fatal is not None:
            raise self.fatal
        if self.failures and not self.finished:
            number, reason = self.failures[-1]
            raise RunError(
                f"none of the {len(self.failures)} trials this run started finished (trial {number}: {reason});"
                f" see `hypermeta trials {self.study.name}`"
            )

    def _run(self, trial: optuna.Trial) -> float:
        finish = trial.user_attrs.get(FINISH)
        if finish is None:
            self._drop_if_surplus(trial, "not run")
        seed = self.seed + trial.number
        torch.manual_seed(seed)
        setup = self.study.build(trial)
        if not isinstance(setup, Setup | EpisodicSetup):
            raise TypeError(f"build returned {type(setup).__name__}, not a hypermeta.Setup")
        start = finish["start"] if finish is not None else self.start
        setup, initial_values = resolve(setup, trial, online=self.online, start=start)
        budget = {}
        if finish is not None:  # as long as it says, at the set-up's own cadence; never pruned
            cadence = evaluation_cadence(setup)
            steps = UNTIL_THE_DEADLINE if finish["steps"] is None else finish["steps"]
            setup = dataclasses.replace(setup, steps=steps, eval_every=cadence)
            if finish["seconds"] is not None:
                budget = {"seconds": finish["seconds"]}
        self.progress.start_trial(setup.steps if setup.steps < UNTIL_THE_DEADLINE else None)
        started = self._trial_started = time.perf_counter()
        result = setup.train(
            initial_values=initial_values, seed=seed, device=self.device,
            on_steps=lambda n: self._on_steps(trial, n, surplus_check=finish is None),
            on_evaluation=lambda step, metrics: self._report(
                trial, step, metrics, setup.steps, deadline=self.deadline if finish is None else None,
                prune=finish is None),
            **budget,
        )
        trial.set_user_attr(SECONDS, time.perf_counter() - started)
        if finish is None:
            self._recheck_surplus(trial, result.steps)
        self._store(trial, result)
        if result.status != "completed" and not (finish is not None and result.status == "stopped"):
            self.finished += 1
            reason = f"pruned at step {result.steps}" if result.status == "stopped" else result.reason
            trial.set_user_attr(STOP_REASON, reason)
            raise optuna.TrialPruned(reason)
        for name, value in setup.test_metrics(result, device=self.device, seed=seed).items():
            trial.set_user_attr(f"{TEST_PREFIX}{name}", value)
        return float(result.evaluations[self.study.metric].iloc[-1])

    def _drop_if_surplus(self, trial: optuna.Trial, what: str) -> None:
        """End ``trial`` if ``target`` trials started before it.

        Checked as it starts and again once it has trained for ``SURPLUS_RECHECK_SECONDS`` (or as it
        ends, if sooner): a trial another worker created at the same moment may have started first
        (``datetime_start`` is taken before the insert) but reached the storage only after this
        trial's first check.
        """
        if self.target is not None and _taken_before(trial) >= self.target:
            trial.study.stop()
            reason = f"{what}: {self.target} trials were already finished or running"
            trial.set_user_attr(STOP_REASON, reason)
            raise SurplusTrial(reason)

    def _on_steps(self, trial: optuna.Trial, n_steps: int, *, surplus_check: bool) -> None:
        """The second surplus check once the trial has trained a while; then the progress bar."""
        if surplus_check and time.perf_counter() - self._trial_started >= SURPLUS_RECHECK_SECONDS:
            self._recheck_surplus(trial, n_steps)
        self.progress.steps(n_steps)

    def _recheck_surplus(self, trial: optuna.Trial, n_steps: int) -> None:
        if self._rechecked != trial.number:
            self._rechecked = trial.number
            self._drop_if_surplus(trial, f"stopped after {n_steps} steps")

    def _report(
        self, trial: optuna.Trial, step: int, metrics: dict[str, float], steps: int, *, deadline: float | None,
        prune: bool,
    ) -> bool:
        trial.report(metrics[self.study.metric], step)
        if step >= steps:  # a run that has finished is complete, not pruned
            return False
        return (prune and trial.should_prune()) or (deadline is not None and time.perf_counter() >= deadline)

    def _store(self, trial: optuna.Trial, result) -> None:
        trial.set_user_attr(HYPERPARAMETERS, result.hyperparameters)
        trial.set_user_attr(STEPS, result.steps)
        trial.set_user_attr(REJECTED_STEPS, result.rejected_steps)
        trial.set_user_attr(LAYERS, describe_layers(result.model))
        if self.store is None:
            return
        with tempfile.TemporaryDirectory() as directory:
            for name, frame in ((TRAJECTORY_FILE, result.trajectory), (EVALUATIONS_FILE, result.evaluations)):
                path = Path(directory) / name
                frame.to_csv(path, index=False)
                try:
                    _storage.upload(self.store, trial, path)
                except OSError as error:
                    raise _ArtifactsUnwritable(
                        f"could not write {name} to artifact store {self.store._base_path}: {error.strerror or error}"
                    ) from None


def _interrupt_inside(error: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C or SIGTERM an error wraps: Python turns one that lands in ``__set_name__`` (while a
    library imports lazily, mid-trial) into a ``RuntimeError`` caused by it."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


class _ArtifactsUnwritable(Exception):
    """The artifact store refused a file: every later trial would train for nothing."""


_PENDING: list[KeyboardInterrupt] = []


@contextlib.contextmanager
def signals_end_trials():
    """SIGINT and SIGTERM end the current trial (FAIL, with its reason), not leave it RUNNING.

    The handler raises where the signal lands, and the inner-step callback raises it again: Python
    drops an exception raised in a garbage-collector callback (printing "Exception ignored in"),
    and a signal can land in one; such a dropped interrupt is not printed.
    """
    previous = {number: signal.signal(number, _interrupt) for number in (signal.SIGINT, signal.SIGTERM)}
    hook, sys.unraisablehook = sys.unraisablehook, _unraisable(sys.unraisablehook)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        sys.unraisablehook = hook
        _PENDING.clear()


def _interrupt(signum: int, frame) -> None:
    _PENDING.append(Terminated() if signum == signal.SIGTERM else KeyboardInterrupt())
    raise _PENDING[-1]


def _unraisable(hook):
    def quiet(unraisable) -> None:
        if not (_PENDING and unraisable.exc_value is _PENDING[-1]):
            hook(unraisable)

    return quiet


class _Progress:
    """A bar of trials and a bar of the current trial's inner steps (nothing with ``quiet``)."""

    def __init__(self, n_trials: int, *, quiet: bool) -> None:
        self.quiet = quiet
        self.trials = tqdm(total=n_trials, desc="trials", unit="trial", disable=quiet, position=0)
        self.inner = tqdm(total=0, desc="steps", unit="step", disable=quiet, position=1, leave=False)

    def note(self, line: str) -> None:
        """One line on stderr that does not break the bars."""
        tqdm.write(line, file=sys.stderr)

    def start_trial(self, steps: int) -> None:
        self.inner.reset(total=steps)

    def steps(self, n: int) -> None:
        if _PENDING:
            raise _PENDING[-1]
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


