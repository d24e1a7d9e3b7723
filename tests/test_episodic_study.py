"""Episodic studies end to end through the CLI: run, read back, report, and clear errors."""

import contextlib
import io

import optuna
import pytest

import hypermeta
from hypermeta._cli import main

STUDY = """
import torch

import hypermeta

TASKS = hypermeta.tasks.{tasks}


def build(trial):
    width = trial.suggest_int("width", 8, 16, log=True)
    form = trial.suggest_categorical("inner_lr_form", ["per_layer_per_step", "per_parameter"])
    model = torch.nn.Sequential(
        torch.nn.Linear(TASKS.in_features, width), torch.nn.ReLU(), torch.nn.Linear(width, TASKS.out_features)
    )
    return hypermeta.EpisodicSetup(
        model=model, tasks=TASKS, shots={shots}, query=5, inner_steps=2, meta_steps=6, meta_batch=4,
        inner_lr=hypermeta.InnerLearningRate(init=0.05, form=form), meta_lr=(1e-3, 1e-2),
        eval_every=3, valid_tasks=8, test_tasks=8,
    )


study = hypermeta.Study(name="tiny-fewshot", build=build, metric={metric!r}, n_trials=2)
"""


def cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def write_study(path, *, tasks="Sinusoid()", shots=5, metric="valid_loss"):
    path.write_text(STUDY.format(tasks=tasks, shots=shots, metric=metric))
    return path


def test_an_episodic_study_runs_end_to_end(tmp_path):
    study_file = write_study(tmp_path / "fewshot.py", tasks="Digits()", shots=1, metric="valid_accuracy")
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    code, out, err = cli("run", study_file, "--storage", url, "--quiet")
    assert code == 0, err
    assert "2 complete" in out and "valid_accuracy" in out
    study = optuna.load_study(study_name="tiny-fewshot", storage=url)
    for trial in study.trials:
        assert {"meta_lr", "width", "inner_lr_form"} <= set(trial.params)
        assert 0 <= trial.user_attrs["test_accuracy"] <= 1 and trial.user_attrs["test_loss"] > 0
        assert all(key.startswith("inner_lr/") for key in trial.user_attrs["hyperparameters"])
        assert sorted(trial.intermediate_values) == [3, 6]
    trajectories = hypermeta.load_trajectories(study_name="tiny-fewshot", storage=url)
    assert set(trajectories["name"]) == {"inner_lr"} and set(trajectories["step"]) == {3, 6}
    evaluations = hypermeta.load_evaluations(study_name="tiny-fewshot", storage=url)
    assert evaluations.groupby("trial")["step"].apply(list).tolist() == [[0, 3, 6]] * 2
    code, out, err = cli("report", "tiny-fewshot", "--storage", url, "--out", tmp_path / "report")
    assert code == 0, err
    assert (tmp_path / "report" / "learning-rates.png").is_file()


def test_shots_larger_than_a_class_fail_before_anything_is_written(tmp_path):
    study_file = write_study(tmp_path / "fewshot.py", tasks="Digits()", shots=500)
    code, _, err = cli("run", study_file, "--storage", f"sqlite:///{tmp_path / 'studies.db'}", "--quiet")
    assert code == 2
    assert "hypermeta: error:" in err and "images of digit" in err and "fewer shots" in err
    assert not (tmp_path / "studies.db").exists()


@pytest.mark.parametrize("metric", ["valid_accuracy", "valid_macro_f1"])
def test_a_metric_the_tasks_cannot_give_is_a_usage_error(tmp_path, metric):
    study_file = write_study(tmp_path / "fewshot.py", metric=metric)
    code, _, err = cli("run", study_file, "--storage", f"sqlite:///{tmp_path / 'studies.db'}", "--quiet")
    assert code == 2 and "metric" in err


def test_finish_on_an_episodic_study_is_a_one_line_error_that_writes_nothing(tmp_path):
    study_file = write_study(tmp_path / "fewshot.py")
    code, out, err = cli("run", study_file, "--finish", 5, "--storage", f"sqlite:///{tmp_path / 'x.db'}", "--quiet")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--finish: study 'tiny-fewshot' is episodic" in err and "drop --finish" in err
    assert not (tmp_path / "x.db").exists()
