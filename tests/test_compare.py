import math

import matplotlib.image
import pandas as pd
import pytest

from hypermeta import _cli
from hypermeta._compare import ARMS
from hypermeta._private.files import MARKER

STUDY = '''
import torch
import hypermeta

DATA = hypermeta.datasets.digits()


def build(trial):
    width = trial.suggest_int("width", 8, 32, log=True)
    return hypermeta.Setup(
        model=torch.nn.Sequential(torch.nn.Linear(64, width), torch.nn.ReLU(), torch.nn.Linear(width, 10)),
        data=DATA, steps=40, batch_size=32, optimizer_options={"momentum": 0.9},
        learning_rate=hypermeta.LearningRate(init=(0.01, 0.5), scope="per_group", segments=2),
        weight_decay=hypermeta.WeightDecay(init=(1e-5, 1e-2)),
        hypergradient=hypermeta.Hypergradient(horizon=10, meta_lr=(0.05, 0.3)),
    )


study = hypermeta.Study(name="tiny-compare", build=build, n_trials=3)
'''
BUDGET = 160


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    directory = tmp_path_factory.mktemp("compare")
    study_file = directory / "tiny.py"
    study_file.write_text(STUDY)
    out = directory / "out"
    status = _cli.main(["compare", str(study_file), "--budget-steps", str(BUDGET), "--seeds", "2", "--out", str(out)])
    assert status == 0
    return out


def test_compare_writes_every_file(report):
    assert {p.name for p in report.iterdir()} == {
        "README.md", "trials.csv", "summary.csv", "best_vs_steps.png", "best_vs_seconds.png", MARKER
    }
    for figure in ("best_vs_steps.png", "best_vs_seconds.png"):
        assert matplotlib.image.imread(report / figure).shape[0] > 100
    table = (report / "README.md").read_text()
    assert all(f"| {arm} |" in table for arm in ARMS)


def test_every_arm_and_seed_spends_the_same_budget(report):
    trials = pd.read_csv(report / "trials.csv")
    summary = pd.read_csv(report / "summary.csv")
    assert set(summary["arm"]) == set(ARMS) and set(summary["seed"]) == {0, 1}
    for (arm, seed), frame in trials.groupby(["arm", "seed"]):
        if arm == "defaults":
            assert frame["steps"].sum() == BUDGET
            continue
        # trials run until the budget is used up; the one that crosses it is not counted
        assert frame["steps"].sum() >= BUDGET, (arm, seed)
        assert frame["steps"].iloc[:-1].sum() < BUDGET, (arm, seed)
    assert (summary["steps"] <= BUDGET).all()
    assert summary["best valid"].map(math.isfinite).all()


def test_the_black_box_arms_search_every_entry_and_hypermeta_the_initial_values(report):
    trials = pd.read_csv(report / "trials.csv")
    entries = ["param lr/0/0", "param lr/0/1", "param lr/2/0", "param lr/2/1", "param weight_decay/all"]
    online = ["param lr_init", "param weight_decay_init", "param meta_lr"]
    for arm, frame in trials.groupby("arm"):
        searched = set(frame.columns[frame.notna().any()])
        if arm in ("tpe", "random"):
            assert set(entries) <= searched and not set(online) & searched, arm
        elif arm == "hypermeta":
            assert set(online) <= searched and not set(entries) & searched
        assert "param width" in searched


@pytest.mark.parametrize(
    "arguments",
    [
        ["--budget-steps", "100", "--budget-seconds", "5"],
        [],
        ["--budget-steps", "0"],
        ["--seeds", "0", "--budget-steps", "5"],
    ],
)
def test_bad_budgets_are_one_line_errors(tmp_path, capsys, arguments):
    study_file = tmp_path / "tiny.py"
    study_file.write_text(STUDY)
    assert _cli.main(["compare", str(study_file), "--out", str(tmp_path / "out"), *arguments]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("hypermeta: error:")
    assert not (tmp_path / "out").exists()


def test_compare_never_replaces_a_directory_the_user_owns(tmp_path, capsys):
    study_file = tmp_path / "tiny.py"
    study_file.write_text(STUDY)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert _cli.main(["compare", str(study_file), "--budget-steps", "40", "--out", str(mine)]) == 2
    assert "not a hypermeta report" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("axis", ["steps", "seconds"])
def test_every_arm_is_drawn_distinguishably_and_ends_where_it_stopped(report, axis):
    from hypermeta._compare import plot_best_so_far

    trials = pd.read_csv(report / "trials.csv")
    counted = trials[trials["within_budget"]]
    figure = plot_best_so_far(counted, axis=axis, study_name="tiny-compare", metric="valid_loss", direction="minimize")
    main, finals = figure.axes
    lines = {line.get_label(): line for line in main.get_lines()}
    assert set(lines) == set(ARMS)  # the defaults arm too
    assert len({(line.get_linestyle(), line.get_marker()) for line in lines.values()}) == len(ARMS)
    assert not main.collections  # no shaded ranges over the lines
    for arm, line in lines.items():
        assert line.get_xdata()[-1] == pytest.approx(counted[counted["arm"] == arm][f"cum_{axis}"].max())
    assert not main.get_legend() and len(figure.legends) == 1  # outside the panels
    assert [label.get_text() for label in finals.get_xticklabels()] == list(ARMS)
