"""Warm start: a study starts its differentiable hyperparameters from another study's best trial."""

import optuna
import pytest

import hypermeta
from hypermeta import _cli
from hypermeta.reports import write_report

STUDY = '''
import torch
import hypermeta

DATA = hypermeta.datasets.digits()


def build(trial):
    model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
    return hypermeta.Setup(
        model=model, data=DATA, steps=40, batch_size=32, optimizer_options={"momentum": 0.9},
        learning_rate=hypermeta.LearningRate(init=(0.01, 0.5), scope="per_group"),
        weight_decay=hypermeta.WeightDecay(init=(1e-5, 1e-2)),
        hypergradient=hypermeta.Hypergradient(horizon=10),
    )


study = hypermeta.Study(name="NAME", build=build, n_trials=2)
'''


@pytest.fixture(scope="module")
def storages(tmp_path_factory):
    directory = tmp_path_factory.mktemp("warm")
    for name in ("source", "target"):
        (directory / f"{name}.py").write_text(STUDY.replace("NAME", name))
    url = f"sqlite:///{directory / 'studies.db'}"
    assert _cli.main(["run", str(directory / "source.py"), "--storage", url, "--quiet"]) == 0
    status = _cli.main(["run", str(directory / "target.py"), "--storage", url, "--quiet", "--warm-start", "source"])
    assert status == 0
    return directory, url


def test_warm_started_trials_start_from_the_best_trial_of_the_other_study(storages):
    _, url = storages
    source = optuna.load_study(study_name="source", storage=url)
    target = optuna.load_study(study_name="target", storage=url)
    start = source.best_trial.user_attrs["hyperparameters"]
    assert target.user_attrs["warm_start"] == {"study": "source", "trial": source.best_trial.number, "values": start}
    trajectories = hypermeta.load_trajectories(study_name="target", storage=url)
    first = trajectories[trajectories["step"] == trajectories["step"].min()]
    for trial, rows in first.groupby("trial"):
        for row in rows.itertuples():
            key = f"{row.name}/{row.group}" + (f"/{row.segment}" if row.name == "lr" else "")
            assert row.value == pytest.approx(start[key]), (trial, key)
    for trial in target.trials:  # nothing left to search for the starting values
        assert "lr_init" not in trial.params and "weight_decay_init" not in trial.params


def test_the_report_says_it_was_warm_started(storages):
    directory, url = storages
    index = write_report(study_name="target", storage=url, out=directory / "report")
    assert "Warm-started from study <code>source</code>" in index.read_text()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--warm-start", "nope"], "no study named 'nope'"),
        (["--warm-storage", "sqlite:///x.db"], "--warm-storage needs --warm-start"),
        (["--warm-start", "source", "--warm-storage", "sqlite:////nonexistent/x.db"], "no study storage"),
    ],
)
def test_bad_warm_starts_are_one_line_errors_and_write_nothing(storages, capsys, arguments, message):
    directory, url = storages
    (directory / "other.py").write_text(STUDY.replace("NAME", "other"))
    assert _cli.main(["run", str(directory / "other.py"), "--storage", url, "--quiet", *arguments]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and message in error[0]
    assert "other" not in optuna.get_all_study_names(storage=url)


def test_a_warm_start_outside_the_studys_range_is_a_one_line_error_and_writes_nothing(storages, capsys):
    directory, url = storages
    source = optuna.load_study(study_name="source", storage=url)
    learned = source.best_trial.user_attrs["hyperparameters"]["lr/0/0"]
    narrow = STUDY.replace("NAME", "narrow").replace("init=(0.01, 0.5)", f"init=({learned * 2:.6g}, {learned * 4:.6g})")
    (directory / "narrow.py").write_text(narrow)
    arguments = ["run", str(directory / "narrow.py"), "--storage", url, "--quiet", "--warm-start", "source"]
    assert _cli.main(arguments) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "its lr/0/0 = " in error[0] and "outside this study's range" in error[0], error
    assert "narrow" not in optuna.get_all_study_names(storage=url)
