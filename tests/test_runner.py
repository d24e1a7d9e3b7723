"""The Optuna runner: study files, one real (tiny) training per trial, real SQLite storages."""

import math
import re
import shutil
import threading
from datetime import datetime, timedelta
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

import hypermeta
from hypermeta import _runner, _storage
from hypermeta._errors import RunError, UsageError
from hypermeta._results import why_none_completed
from hypermeta._runner import SAMPLERS, RunOptions, load_study_file, run_study

STEPS = 20


class AlwaysPrune(optuna.pruners.BasePruner):
    """A pruner that says yes whenever it is asked."""

    def prune(self, study, trial) -> bool:
        return True


def _builder(data, *, steps=STEPS, eval_every=None):
    def build(trial):
        width = trial.suggest_int("width", 8, 32, log=True)
        lr = trial.suggest_float("lr", 0.02, 0.5, log=True)
        model = torch.nn.Sequential(torch.nn.Linear(64, width), torch.nn.ReLU(), torch.nn.Linear(width, 10))
        return hypermeta.Setup(
            model=model, data=data, steps=steps, batch_size=32, optimizer_options={"momentum": 0.9},
            learning_rate=hypermeta.LearningRate(init=lr), weight_decay=hypermeta.WeightDecay(init=1e-4),
            hypergradient=hypermeta.Hypergradient(horizon=10), eval_every=eval_every,
        )

    return build


def _options(tmp_path, **kwargs) -> RunOptions:
    return RunOptions(storage=f"sqlite:///{tmp_path / 'runs.db'}", quiet=True, **kwargs)


# --- study files --------------------------------------------------------------------------------

STUDY_LINE = "study = hypermeta.Study(name='s', build=lambda trial: None)\n"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("import hypermeta\nx = (\n", r"line 2: syntax error"),
        ("import hypermeta\n", r"defines no hypermeta.Study; define exactly one"),
        ("import hypermeta\n" + STUDY_LINE + STUDY_LINE.replace("study =", "other ="), r"defines 2 studies"),
        ("import hypermeta\nraise RuntimeError('no data here')\n", r"failed to load: RuntimeError: no data here"),
        ("import hypermeta\nstudy = hypermeta.Study(name='s', build=print, n_trials=0)\n", r"n_trials must be"),
    ],
)
def test_bad_study_files(tmp_path, text, problem):
    path = tmp_path / "study.py"
    path.write_text(text)
    with pytest.raises(UsageError, match=problem):
        load_study_file(path)


def test_missing_study_file(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_study_file(tmp_path / "nope.py")


def test_one_study_under_two_names_is_one_study(tmp_path):
    path = tmp_path / "study.py"
    path.write_text("import hypermeta\n" + STUDY_LINE + "alias = study\n")
    assert load_study_file(path).name == "s"


# --- the build function is checked before anything is written -----------------------------------


def _raises(trial):
    raise RuntimeError("no GPU today")


@pytest.mark.parametrize(
    ("build", "problem"),
    [
        (_raises, r"build function of study 'b' raised RuntimeError: no GPU today"),
        (lambda trial: {"lr": 0.1}, r"returned dict; return a hypermeta.Setup"),
        ("steps0", r"raised ValueError: Setup.steps must be an integer >= 1, got 0"),
        ("no-model", r"raised TypeError: Setup.model must be a Module"),
    ],
)
def test_broken_build_writes_nothing(tmp_path, digits, build, problem):
    if build == "steps0":
        build = _builder(digits, steps=0)
    elif build == "no-model":

        def build(trial):
            return hypermeta.Setup(
                model="mlp", data=digits, steps=10, batch_size=8, learning_rate=hypermeta.LearningRate(init=0.1)
            )

    with pytest.raises(UsageError, match=problem):
        run_study(hypermeta.Study(name="b", build=build), _options(tmp_path))
    assert list(tmp_path.iterdir()) == []


# --- runs ---------------------------------------------------------------------------------------


def test_value_is_the_final_validation_metric_and_reports_follow_evaluations(tmp_path, digits):
    study = hypermeta.Study(
        name="acc", build=_builder(digits, eval_every=10), metric="valid_accuracy", n_trials=2,
        pruner=optuna.pruners.NopPruner(),
    )
    stored = run_study(study, _options(tmp_path, sampler="random"))
    assert stored.direction == optuna.study.StudyDirection.MAXIMIZE
    evaluations = hypermeta.load_evaluations(study_name="acc", storage=f"sqlite:///{tmp_path / 'runs.db'}")
    trajectories = hypermeta.load_trajectories(study_name="acc", storage=f"sqlite:///{tmp_path / 'runs.db'}")
    trials = stored.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    for trial in trials:
        curve = evaluations[evaluations["trial"] == trial.number].set_index("step")
        assert list(curve.index) == [10, 20]
        assert trial.value == curve["valid_accuracy"].iloc[-1]
        assert trial.intermediate_values == curve["valid_accuracy"].to_dict()
        assert trial.user_attrs["steps"] == STEPS and trial.user_attrs["rejected_steps"] == 0
        assert 0 < trial.user_attrs["test_loss"] < math.inf
        assert 0 <= trial.user_attrs["test_accuracy"] <= 1 and 0 <= trial.user_attrs["test_macro_f1"] <= 1
        final = trial.user_attrs["hyperparameters"]
        assert {key.split("/")[0] for key in final} == {"lr", "weight_decay"}
        assert all(value > 0 for value in final.values())
        rows = trajectories[trajectories["trial"] == trial.number]
        assert sorted(rows["step"].unique()) == [1, 3, 7, 10, 20]  # windows of 1, 2, 4, 3, then 10
        assert set(rows["name"]) == {"lr", "weight_decay"}


def test_continuation_draws_new_parameters_and_keeps_old_trials(tmp_path, digits):
    study = hypermeta.Study(name="more", build=_builder(digits), pruner=optuna.pruners.NopPruner())
    first = run_study(study, _options(tmp_path, sampler="random", n_trials=1)).get_trials()
    trials = run_study(study, _options(tmp_path, sampler="random", n_trials=2)).get_trials()
    assert [t.number for t in trials] == [0, 1]
    assert (trials[0].params, trials[0].value) == (first[0].params, first[0].value)
    assert trials[1].params != trials[0].params  # the second run does not replay the first run's draws


def test_a_trial_beyond_the_target_is_not_run_when_another_worker_has_the_last_one(tmp_path, digits):
    study = hypermeta.Study(name="shared", build=_builder(digits), pruner=optuna.pruners.NopPruner())
    stored = run_study(study, _options(tmp_path, n_trials=1))
    with pytest.warns(UserWarning, match="Heartbeat"):  # asked outside optimize, as in another process
        other_worker = stored.ask()  # another worker is running the second and last trial
    trials = run_study(study, _options(tmp_path, n_trials=2)).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.RUNNING, TrialState.FAIL]
    assert trials[2].user_attrs == {"stop_reason": "not run: 2 trials were already finished or running"}
    assert trials[1].number == other_worker.number


@pytest.mark.parametrize("recheck_seconds", [0.0, 60.0])
def test_a_trial_whose_check_missed_another_workers_earlier_trial_is_dropped_on_its_second_check(
        tmp_path, digits, monkeypatch, recheck_seconds):
    """The race behind two workers starting together: the other worker's trial started first (its
    ``datetime_start`` is earlier) but reached the storage after this trial's check at its start.
    The second check comes once the trial has trained ``SURPLUS_RECHECK_SECONDS``, or at its end."""
    monkeypatch.setattr(_runner, "SURPLUS_RECHECK_SECONDS", recheck_seconds)
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    inner, calls = _builder(digits), iter(range(10**6))

    def build(trial):  # calls: a check and trial 0, then the second run's check and its trial 1
        if next(calls) == 3:
            storage = optuna.storages.RDBStorage(url)
            earlier = optuna.trial.FrozenTrial(
                number=0, trial_id=0, state=TrialState.RUNNING, value=None, params={}, distributions={},
                datetime_start=trial.datetime_start - timedelta(seconds=1), datetime_complete=None,
                user_attrs={}, system_attrs={}, intermediate_values={},
            )
            storage.create_new_trial(storage.get_study_id_from_name("race"), template_trial=earlier)
        return inner(trial)

    study = hypermeta.Study(name="race", build=build, pruner=optuna.pruners.NopPruner())
    run_study(study, _options(tmp_path, n_trials=1))
    trials = run_study(study, _options(tmp_path, n_trials=2)).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.RUNNING]
    reason = trials[1].user_attrs["stop_reason"]
    assert re.fullmatch(r"stopped after (\d+) steps: 2 trials were already finished or running", reason)
    dropped_after = int(reason.split()[2])
    assert dropped_after < STEPS if recheck_seconds == 0 else dropped_after == STEPS


def _exploding_second_trial(data):
    def build(trial):
        explodes = trial.number == 1  # a rate of 1e4 that the guard cannot cut: it gives up
        return hypermeta.Setup(
            model=torch.nn.Linear(64, 10), data=data, steps=60, batch_size=32,
            learning_rate=hypermeta.LearningRate(init=1e4, bounds=(1e4, 1e6)) if explodes
            else hypermeta.LearningRate(init=0.05),
            hypergradient=hypermeta.Hypergradient(horizon=10),
        )

    return build


def test_a_diverging_trial_is_pruned_with_its_reason_and_the_study_goes_on(tmp_path, digits):
    build = _exploding_second_trial(digits)
    study = hypermeta.Study(name="boom", build=build, n_trials=3, pruner=optuna.pruners.NopPruner())
    trials = run_study(study, _options(tmp_path)).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.COMPLETE]
    assert trials[1].user_attrs["stop_reason"].startswith("diverged after step")


def test_pruner_is_asked_before_the_last_step_only(tmp_path, digits):
    options = _options(tmp_path, sampler="random", n_trials=1)
    early = hypermeta.Study(name="early", build=_builder(digits, eval_every=10), pruner=AlwaysPrune())
    (pruned,) = run_study(early, options).get_trials()
    assert pruned.state == TrialState.PRUNED
    assert pruned.user_attrs["steps"] == 10 and pruned.user_attrs["stop_reason"] == "pruned at step 10"
    assert "test_loss" not in pruned.user_attrs
    at_end = hypermeta.Study(name="at-end", build=_builder(digits, eval_every=STEPS), pruner=AlwaysPrune())
    (finished,) = run_study(at_end, options).get_trials()
    assert finished.state == TrialState.COMPLETE and finished.user_attrs["steps"] == STEPS
    assert list(finished.intermediate_values) == [STEPS]


def test_timeout_stops_starting_trials(tmp_path, digits):
    study = hypermeta.Study(name="t", build=_builder(digits), n_trials=50)
    trials = run_study(study, _options(tmp_path, timeout=0.01)).get_trials()
    assert 1 <= len(trials) < 50


def test_existing_multi_objective_study_of_that_name_is_untouched(tmp_path, digits):
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    other = optuna.create_study(storage=url, study_name="shared", directions=["minimize", "maximize"])
    other.tell(other.ask(), [1.0, 2.0])
    study = hypermeta.Study(name="shared", build=_builder(digits))
    with pytest.raises(UsageError, match="stored with direction minimize/maximize.*rename the study"):
        run_study(study, _options(tmp_path))
    (trial,) = optuna.load_study(study_name="shared", storage=url).get_trials()
    assert trial.values == [1.0, 2.0]
    assert not (Path(tmp_path) / "artifacts").exists()


def test_unknown_sampler_is_a_usage_error(tmp_path, digits):
    with pytest.raises(UsageError, match="unknown sampler 'nope'"):
        run_study(hypermeta.Study(name="x", build=_builder(digits)), _options(tmp_path, sampler="nope"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_workers_started_together_draw_distinct_trials_with_every_sampler(tmp_path, digits, sampler):
    """Three workers (threads here; test_workers has processes) start on a new study at the same moment."""
    study = hypermeta.Study(name="together", build=_builder(digits, steps=10), n_trials=6)
    start = threading.Barrier(3)

    def worker():
        start.wait()
        run_study(study, _options(tmp_path, sampler=sampler))

    workers = [threading.Thread(target=worker) for _ in range(3)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    trials = optuna.load_study(study_name="together", storage=f"sqlite:///{tmp_path / 'runs.db'}").trials
    assert [t.state for t in trials].count(TrialState.COMPLETE) == 6
    drawn = [tuple(sorted(t.params.items())) for t in trials if t.params]
    assert len(drawn) >= 6 and len(set(drawn)) == len(drawn), drawn


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_runs_a_study(tmp_path, digits, sampler):
    study = hypermeta.Study(name="s", build=_builder(digits), n_trials=3)
    stored = run_study(study, _options(tmp_path, sampler=sampler))
    assert [t.state.name for t in stored.trials].count("COMPLETE") >= 1
    assert len({t.params["lr"] for t in stored.trials}) == 3


# --- failures say why ----------------------------------------------------------------------------


def _failing_after_check(data, *, fails):
    """A build that raises for trials numbered in ``fails`` (its first call is run_study's check)."""
    inner = _builder(data)
    calls = iter(range(10**6))

    def build(trial):
        if next(calls) > 0 and trial.number in fails:
            raise RuntimeError(f"trial {trial.number} has no data\nsecond line")
        return inner(trial)

    return build


def test_a_failing_trial_stores_its_reason_prints_it_and_the_study_goes_on(tmp_path, digits, capsys):
    study = hypermeta.Study(name="f", build=_failing_after_check(digits, fails={1}), n_trials=3)
    trials = run_study(study, _options(tmp_path)).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert trials[1].user_attrs == {"fail_reason": "RuntimeError: trial 1 has no data"}
    assert "fail_reason" not in trials[0].user_attrs
    assert capsys.readouterr().err.splitlines() == ["hypermeta: trial 1 failed: RuntimeError: trial 1 has no data"]
    assert list(hypermeta._results.trials_table(run_study(study, _options(tmp_path, n_trials=1)))["note"].fillna(
        "")) == ["", "RuntimeError: trial 1 has no data", ""]


def test_a_run_whose_trials_all_fail_is_an_error_naming_the_reason(tmp_path, digits):
    study = hypermeta.Study(name="f", build=_failing_after_check(digits, fails={0, 1}), n_trials=2)
    with pytest.raises(RunError, match=r"none of the 2 trials this run started finished \(trial 1: RuntimeError: "
                                       r"trial 1 has no data\); see `hypermeta trials f`"):
        run_study(study, _options(tmp_path))
    stored = optuna.load_study(study_name="f", storage=f"sqlite:///{tmp_path / 'runs.db'}")
    assert [t.user_attrs["fail_reason"] for t in stored.trials] == [
        f"RuntimeError: trial {n} has no data" for n in (0, 1)
    ]
    assert "all 2 of its trials failed, the last with: RuntimeError: trial 1" in why_none_completed(stored)


def test_an_artifact_store_that_fails_stops_the_run_at_once_and_leaves_no_record(tmp_path, digits):
    """The store's directory vanishes (a real deletion) while trial 1 trains: it cannot write its files."""
    artifacts = tmp_path / "artifacts"
    inner = _builder(digits)

    def build(trial):
        if trial.number == 1:
            shutil.rmtree(artifacts, ignore_errors=True)
        return inner(trial)

    study = hypermeta.Study(name="a", build=build, n_trials=4)
    with pytest.raises(RunError, match=r"trial 1 trained but could not write trajectory.csv to artifact store"
                                       r" .*artifacts: No such file or directory; the run is stopped"):
        run_study(study, _options(tmp_path, artifacts=str(artifacts)))
    trials = optuna.load_study(study_name="a", storage=f"sqlite:///{tmp_path / 'runs.db'}").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL]  # no trial trained after it
    assert trials[1].user_attrs["fail_reason"].startswith("could not write trajectory.csv")
    assert not _storage.has_artifacts(trials[1]) and _storage.has_artifacts(trials[0])
    assert not artifacts.exists()


@pytest.mark.parametrize("artifacts", ["/proc/hypermeta-test", "/proc"])
def test_an_unwritable_artifact_store_is_refused_before_anything_is_written(tmp_path, digits, artifacts):
    """/proc takes no new files even for root (a chmod'ed directory would not stop root)."""
    study = hypermeta.Study(name="u", build=_builder(digits), n_trials=1)
    with pytest.raises(UsageError, match=f"cannot write to artifact store {artifacts}: No such file"):
        run_study(study, _options(tmp_path, artifacts=artifacts))
    assert list(tmp_path.iterdir()) == []


def test_a_trial_left_running_without_any_heartbeat_is_failed_and_run_again(tmp_path, digits):
    """A worker killed between creating its trial and its first heartbeat, made with the storage API."""
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    study = hypermeta.Study(name="stuck", build=_builder(digits), n_trials=2)
    run_study(study, _options(tmp_path, n_trials=1))
    lost = _add_running_trial(url, "stuck", seconds_ago=_storage.GRACE_PERIOD_S + 5)
    trials = run_study(study, _options(tmp_path)).get_trials()
    assert trials[lost.number].state == TrialState.FAIL
    assert trials[lost.number].user_attrs["fail_reason"] == "worker lost before its first heartbeat"
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == lost.number]
    assert retry.state == TrialState.COMPLETE and retry.params == lost.params and "fail_reason" not in retry.user_attrs
    assert [t.state for t in trials].count(TrialState.COMPLETE) == 2 and len(trials) == 3


def _add_running_trial(url: str, name: str, *, seconds_ago: float) -> optuna.trial.FrozenTrial:
    stored = optuna.load_study(study_name=name, storage=url)
    trial = optuna.trial.create_trial(
        state=TrialState.RUNNING, params={"width": 8, "lr": 0.1},
        distributions={"width": optuna.distributions.IntDistribution(8, 32, log=True),
                       "lr": optuna.distributions.FloatDistribution(0.02, 0.5, log=True)},
    )
    trial.datetime_start = datetime.now() - timedelta(seconds=seconds_ago)
    stored.add_trial(trial)
    return stored.trials[-1]


def test_a_storage_gone_for_longer_than_the_limit_ends_the_run_with_one_error(postgres_server, postgres_url, digits,
                                                                              tmp_path, monkeypatch):
    """The real server stops while trial 1 trains and stays down past the (shortened) limit."""
    monkeypatch.setattr(_storage, "OUTAGE_S", 2)
    inner = _builder(digits)

    def build(trial):
        if trial.number == 1:
            postgres_server.stop()
        return inner(trial)

    study = hypermeta.Study(name="outage", build=build, n_trials=3)
    try:
        with pytest.raises(RunError, match=r"^storage postgresql\+psycopg2://hypermeta:\*\*\*@.* unreachable for"):
            run_study(study, RunOptions(storage=postgres_url, artifacts=str(tmp_path / "a"), quiet=True))
    finally:
        postgres_server.start()
    trials = optuna.load_study(study_name="outage", storage=postgres_url).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.RUNNING]  # its heartbeat has stopped


class _CtrlCWhileNamed:
    """A descriptor whose ``__set_name__`` is interrupted, as a Ctrl-C lands while a library defines a class."""

    def __set_name__(self, owner, name):
        raise KeyboardInterrupt


def test_a_ctrl_c_that_python_wraps_while_a_class_is_defined_is_an_interrupt_not_a_failure(digits):
    from hypermeta._runner import TrialRunner

    def build(trial):
        type("LazilyImported", (), {"attribute": _CtrlCWhileNamed()})  # Python 3.11 wraps it in RuntimeError
        return _builder(digits)(trial)

    runner = TrialRunner(hypermeta.Study(name="s", build=build), seed=0, device="cpu")
    search = optuna.create_study()
    with pytest.raises(KeyboardInterrupt):
        search.optimize(runner, n_trials=1, catch=(Exception,))
    trial = search.trials[0]
    assert trial.state == TrialState.FAIL
    assert trial.user_attrs["fail_reason"] == "interrupted (Ctrl-C)"
