"""The Optuna runner: study files, one real (tiny) training per trial, real SQLite storages."""

import math
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

import hypermeta
from hypermeta._errors import UsageError
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
        assert sorted(rows["step"].unique()) == [10, 20] and set(rows["name"]) == {"lr", "weight_decay"}


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


def _exploding_second_trial(data, *, lr: float, meta_lr: float):
    def build(trial):
        explodes = trial.number == 1
        return hypermeta.Setup(
            model=torch.nn.Linear(64, 10), data=data, steps=60, batch_size=32,
            learning_rate=hypermeta.LearningRate(init=lr if explodes else 0.05, bounds=(1e-6, 1e6)),
            hypergradient=hypermeta.Hypergradient(horizon=10, meta_lr=meta_lr if explodes else 0.1, max_failures=0),
        )

    return build


@pytest.mark.parametrize(("lr", "meta_lr"), [(1e4, 0.1), (0.05, 1e3)], ids=["loss explodes", "rate explodes"])
def test_a_diverging_trial_is_pruned_with_its_reason_and_the_study_goes_on(tmp_path, digits, lr, meta_lr):
    build = _exploding_second_trial(digits, lr=lr, meta_lr=meta_lr)
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
def test_every_sampler_runs_a_study(tmp_path, digits, sampler):
    study = hypermeta.Study(name="s", build=_builder(digits), n_trials=3)
    stored = run_study(study, _options(tmp_path, sampler=sampler))
    assert [t.state.name for t in stored.trials].count("COMPLETE") >= 1
    assert len({t.params["lr"] for t in stored.trials}) == 3
