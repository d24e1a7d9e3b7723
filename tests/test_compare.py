import dataclasses
import math
import runpy
import shutil
from pathlib import Path

import matplotlib.image
import optuna
import pandas as pd
import pytest
import torch

import hypermeta
from hypermeta import _cli, _compare, _runner
from hypermeta._compare import ARMS
from hypermeta._errors import UsageError
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
        hypergradient=hypermeta.Hypergradient(horizon=10),
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
    assert ARMS == ("hypermeta", "tpe", "random", "hyperband", "defaults")
    assert [line.split(" | ")[0] for line in table.splitlines() if line.startswith("| ")][1:] == [
        f"| {arm}" for arm in ARMS
    ]


def test_the_table_shows_the_test_metrics_that_exist(report, tmp_path):
    """A classifier: accuracy, macro-F1, loss. A regression: its own metric and the loss, no accuracy."""
    header = next(line for line in (report / "README.md").read_text().splitlines() if line.startswith("| arm"))
    assert header == "| arm | best valid | test accuracy | test macro-F1 | test loss | trials | steps | seconds |"
    regression = STUDY.replace("torch.nn.Linear(width, 10)", "torch.nn.Linear(width, 1)").replace(
        "data=DATA,", "data=REGRESSION, loss_fn=torch.nn.functional.mse_loss,"
        " metrics={'mae': lambda out, y: (out - y).abs().mean()},").replace(
        "DATA = hypermeta.datasets.digits()", "DATA = hypermeta.datasets.digits()\n"
        "REGRESSION = hypermeta.Dataset(**{name: hypermeta.Split(part.x, part.y.float().unsqueeze(1) / 9)"
        " for name, part in (('train', DATA.train), ('valid', DATA.valid), ('test', DATA.test))})")
    (tmp_path / "regression.py").write_text(regression)
    out = tmp_path / "out"
    assert _cli.main(["compare", str(tmp_path / "regression.py"), "--budget-steps", "80", "--seeds", "1",
                      "--out", str(out)]) == 0
    lines = (out / "README.md").read_text().splitlines()
    header = next(line for line in lines if line.startswith("| arm"))
    assert header == "| arm | best valid | test mae | test loss | trials | steps | seconds |"
    hypermeta_row = next(line for line in lines if line.startswith("| hypermeta"))
    assert float(hypermeta_row.split(" | ")[2].split()[0]) > 0  # the test mae of hypermeta's best trial


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
    online = ["param lr_init", "param weight_decay_init"]
    for arm, frame in trials.groupby("arm"):
        searched = set(frame.columns[frame.notna().any()])
        if arm in ("tpe", "random", "hyperband"):
            assert set(entries) <= searched and not set(online) & searched, arm
        elif arm == "hypermeta":
            assert set(online) <= searched and not set(entries) & searched
        assert "param width" in searched


def _tiny_study(*, steps: int, eval_every: int) -> hypermeta.Study:
    namespace = {}
    exec(STUDY.replace("steps=40,", f"steps={steps}, eval_every={eval_every},"), namespace)
    return namespace["study"]


def test_the_hyperband_arm_prunes_at_hyperband_rungs_of_the_evaluation_cadence():
    study = _tiny_study(steps=45, eval_every=5)  # rungs at 5, 15 and 45 (the end)
    assert isinstance(_compare.search_study(study, arm="hyperband", seed=0).pruner, optuna.pruners.HyperbandPruner)
    assert isinstance(_compare.search_study(study, arm="tpe", seed=0).pruner, optuna.pruners.MedianPruner)
    stopped = {}
    for arm in ("hyperband", "tpe"):
        rows = pd.DataFrame(_compare._search(study, arm, _compare.Budget(steps=400), 0, "cpu"))
        assert set(rows.loc[rows["state"] == "COMPLETE", "steps"]) == {45}
        stopped[arm] = set(rows.loc[rows["state"] == "PRUNED", "steps"])
    assert stopped["hyperband"] == {5, 15}  # both rungs before the end, and no other step
    assert stopped["tpe"] - {5, 15}  # the study's median pruner stops trials between rungs too


@pytest.mark.parametrize(
    ("steps", "eval_every", "hypergradient"),
    [(40, None, None), (250, None, None), (40, None, hypermeta.Hypergradient(horizon=5)), (40, 15, None)],
)
def test_the_evaluation_cadence_is_where_the_engine_evaluates(steps, eval_every, hypergradient):
    setup = hypermeta.Setup(
        model=torch.nn.Linear(64, 10), data=hypermeta.datasets.digits(), steps=steps, batch_size=32,
        learning_rate=hypermeta.LearningRate(init=0.1), hypergradient=hypergradient, eval_every=eval_every,
    )
    evaluated = setup.train(seed=0).evaluations["step"].tolist()
    cadence = _compare.evaluation_cadence(setup)
    assert evaluated == sorted({*range(cadence, steps + 1, cadence), steps})


def test_old_reports_without_an_arm_are_redrawn_with_the_arms_they_have(report, tmp_path):
    old = tmp_path / "compare-old"
    shutil.copytree(report, old)
    trials = pd.read_csv(old / "trials.csv")
    trials[trials["arm"] != "hyperband"].to_csv(old / "trials.csv", index=False)
    for figure in old.glob("*.png"):
        figure.unlink()
    redraw = runpy.run_path(str(Path(__file__).parents[1] / "benchmarks" / "compare_figures.py"))["redraw"]
    redraw(old)
    for axis in ("steps", "seconds"):
        assert matplotlib.image.imread(old / f"best_vs_{axis}.png").shape[0] > 100
    counted = pd.read_csv(old / "trials.csv").query("within_budget")
    figure = _compare.plot_best_so_far(
        counted, axis="steps", study_name="old", metric="valid_loss", direction="minimize"
    )
    drawn = [label.get_text() for label in figure.axes[1].get_xticklabels()]
    assert drawn == [arm for arm in ARMS if arm != "hyperband"]


def test_compare_help_names_every_arm(capsys):
    with pytest.raises(SystemExit):
        _cli.main(["compare", "--help"])
    shown = capsys.readouterr().out
    assert all(f"{arm} (" in shown for arm in ARMS)


@pytest.mark.parametrize(
    "arguments",
    [
        ["--budget-steps", "100", "--budget-seconds", "5"],
        [],
        ["--budget-steps", "0"],
        ["--seeds", "0", "--budget-steps", "5"],
        ["--budget-steps", "40", "--finish", "1"],
        ["--budget-steps", "40", "--finish", "0"],
        ["--budget-steps", "40", "--finish", "nan"],
        ["--budget-steps", "40", "--finish", "most"],
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


def _trials(values_by_arm: dict[str, list[list[float]]]) -> pd.DataFrame:
    """Trials of 100 steps each: per arm, per seed, their values in order."""
    rows = []
    for arm, seeds in values_by_arm.items():
        for seed, values in enumerate(seeds):
            rows += [{"arm": arm, "seed": seed, "value": v, "steps": 100, "seconds": 1.0, "cum_steps": 100 * (i + 1),
                      "cum_seconds": i + 1.0} for i, v in enumerate(values)]
    return pd.DataFrame(rows)


def test_the_median_fraction_is_where_hypermetas_median_best_first_reaches_tpes_median_best():
    trials = _trials({
        "hypermeta": [[0.9, 0.5, 0.3, 0.3], [0.8, 0.6, 0.4, 0.2]],  # median best: 0.85, 0.55, 0.35, 0.25
        "tpe": [[0.7, 0.4, 0.4, 0.4], [0.5, 0.5, 0.3, 0.3]],  # best per seed 0.4 and 0.3: median 0.35
    })
    budget = _compare.Budget(steps=400)
    summary = _compare.summarize(trials, direction="minimize")
    assert _compare.median_fraction_to_reach(trials, summary, budget=budget, direction="minimize") == 0.75
    behind = _trials({"hypermeta": [[0.9], [0.8]], "tpe": [[0.5], [0.5]]})
    summary = _compare.summarize(behind, direction="minimize")
    assert math.isinf(_compare.median_fraction_to_reach(behind, summary, budget=budget, direction="minimize"))


def test_the_table_names_the_arms_ahead_of_hypermeta(report):
    summary = pd.read_csv(report / "summary.csv")
    medians = summary.groupby("arm")["best valid"].median()
    ahead = [arm for arm in ARMS if arm != "hypermeta" and medians[arm] < medians["hypermeta"]]
    table = (report / "README.md").read_text()
    if ahead:
        assert f"Arms ahead of hypermeta in the median: {', '.join(ahead)}." in table
    else:
        assert "at or ahead of every other arm's" in table
    assert "hypermeta's median best-so-far matched TPE's median best after" in table


def test_a_trial_still_training_at_the_deadline_is_pruned_at_its_next_evaluation(tmp_path):
    from hypermeta._runner import TrialRunner, load_study_file

    study_file = tmp_path / "tiny.py"
    study_file.write_text(STUDY)
    study = load_study_file(study_file)
    search = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    late = TrialRunner(study, seed=0, device="cpu", online=False, deadline=0.0)  # long past
    search.optimize(late, n_trials=1, catch=(Exception,))
    trial = search.trials[-1]
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert trial.user_attrs["steps"] == 10  # the first evaluation (of 40 steps, evaluated every 10)
    search.optimize(TrialRunner(study, seed=0, device="cpu", online=False), n_trials=1, catch=(Exception,))
    assert search.trials[-1].state == optuna.trial.TrialState.COMPLETE


def test_an_adaptive_long_run_starts_at_the_defaults_and_hands_over_the_run(tmp_path):
    study_file = tmp_path / "tiny.py"
    study_file.write_text(STUDY)
    results = []
    row = _compare.long_run(_runner.load_study_file(str(study_file)), budget=_compare.Budget(steps=200), seed=0,
                            hypergradient=hypermeta.Hypergradient(horizon=10), on_result=results.append)
    (result,) = results
    assert result.steps == row["steps"] == 200
    assert result.evaluations["valid_loss"].iloc[-1] == row["value"]
    start = math.sqrt(0.01 * 0.5)
    rates = result.trajectory[result.trajectory["name"] == "lr"]
    assert rates[rates["step"] == 1]["value"].tolist() == pytest.approx([start] * 4)  # 2 layers x 2 segments
    finals = {key: value for key, value in row.items() if key.startswith("final lr/")}
    assert len(finals) == 4 and any(not math.isclose(value, start) for value in finals.values())


@pytest.mark.parametrize("finish", [0.0, 1.0, -0.5, math.nan])
def test_a_finish_outside_0_to_1_is_a_usage_error(finish):
    with pytest.raises(UsageError, match="--finish must be a fraction between 0 and 1"):
        _compare.Budget(steps=100, finish=finish)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    directory = tmp_path_factory.mktemp("finish")
    (directory / "tiny.py").write_text(STUDY)
    out = directory / "out"
    arguments = ["--budget-steps", str(2 * BUDGET), "--seeds", "1", "--finish", "0.5", "--out", str(out)]
    assert _cli.main(["compare", str(directory / "tiny.py"), *arguments]) == 0
    return pd.read_csv(out / "trials.csv"), (out / "README.md").read_text()


def test_with_a_finish_each_search_arm_ends_with_one_run_of_its_best_trials_choices_for_the_rest(finished):
    trials, table = finished
    assert "spent the last 0.5 of its budget on one finishing run" in table
    for arm, frame in trials.groupby("arm"):
        if arm == "defaults":
            assert len(frame) == 1 and frame["steps"].sum() == 2 * BUDGET
            continue
        searched, finish = frame.iloc[:-1], frame.iloc[-1]
        assert not searched["finish"].any() and finish["finish"], arm
        # the search stops once it has spent its half; the finishing run gets the rest, unpruned
        assert searched["steps"].sum() >= BUDGET and searched["steps"].iloc[:-1].sum() < BUDGET, arm
        assert finish["state"] == "COMPLETE" and finish["steps"] == 2 * BUDGET - searched["steps"].sum(), arm
        best = searched.loc[searched["value"].idxmin()]
        params = {c for c in frame.columns if c.startswith("param ") and pd.notna(finish[c])}
        assert all(finish[c] == pytest.approx(best[c]) for c in params), arm
        # hypermeta's run starts from the values its best trial learned, so it draws no initial values
        expected = {"param width"} if arm == "hypermeta" else {
            c for c in frame.columns if c.startswith("param ") and pd.notna(best[c])}
        assert params == expected and (arm == "hypermeta" or len(expected) >= 2), arm
        assert frame["within_budget"].all()


def _frozen_study(tmp_path) -> hypermeta.Study:
    """The tiny study without hypergradients: a run's values stay where it started them."""
    study_file = tmp_path / "frozen.py"
    study_file.write_text(STUDY.replace("hypergradient=hypermeta.Hypergradient(horizon=10)", "hypergradient=None"))
    return _runner.load_study_file(study_file)


def _searched_trial(user_attrs: dict | None = None) -> optuna.trial.FrozenTrial:
    """A finished trial of the tiny study that chose width 16."""
    return optuna.trial.create_trial(
        params={"width": 16}, distributions={"width": optuna.distributions.IntDistribution(8, 32, log=True)},
        value=1.0, user_attrs=user_attrs or {},
    )


def test_hypermetas_finishing_run_starts_from_the_values_its_trial_learned_and_is_never_pruned(tmp_path):
    study = _frozen_study(tmp_path)
    learned = {"lr/0/0": 0.03, "lr/0/1": 0.02, "lr/2/0": 0.05, "lr/2/1": 0.01, "weight_decay/all": 3e-4}
    always = optuna.pruners.ThresholdPruner(lower=math.inf)  # would prune every trial at its first report
    search = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), pruner=always)
    _runner.enqueue_finish(search, _searched_trial({"hyperparameters": learned}), online=True, steps=70)
    search.optimize(_runner.TrialRunner(study, seed=0, device="cpu"), n_trials=1, catch=(Exception,))
    trial = search.trials[-1]
    assert trial.state == optuna.trial.TrialState.COMPLETE and trial.user_attrs["steps"] == 70
    assert trial.params == {"width": 16} and trial.user_attrs["hyperparameters"] == pytest.approx(learned)
    assert sorted(trial.intermediate_values) == [10, 20, 30, 40, 50, 60, 70]  # the set-up's cadence (40 steps: 10)


def test_a_finishing_run_of_seconds_ends_complete_at_its_first_evaluation_past_them(tmp_path):
    study = _frozen_study(tmp_path)
    search = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    _runner.enqueue_finish(search, _searched_trial(), online=False, seconds=1e-6)
    search.optimize(_runner.TrialRunner(study, seed=0, device="cpu", online=False), n_trials=1, catch=(Exception,))
    trial = search.trials[-1]
    assert trial.state == optuna.trial.TrialState.COMPLETE and trial.user_attrs["steps"] == 10
    assert math.isfinite(trial.value) and "test_accuracy" in trial.user_attrs


def test_an_arm_without_a_completed_trial_says_it_ran_no_finishing_run(tmp_path):
    study = _frozen_study(tmp_path)
    messages = []
    # the search's deadline passes before its first trial's first evaluation, which prunes it there
    rows = _compare._search(study, "tpe", _compare.Budget(seconds=1e-3, finish=0.5), 0, "cpu", log=messages.append)
    assert [row["state"] for row in rows] == ["PRUNED"] and not any(row["finish"] for row in rows)
    assert messages == ["compare tiny-compare tpe seed 0: no trial completed before the finishing run; none was run"]


def test_a_finishing_run_counts_within_the_budget_though_its_last_evaluation_ends_past_it():
    trials = pd.DataFrame({
        "arm": ["tpe", "tpe", "tpe", "defaults"], "finish": [False, True, False, None],
        "cum_seconds": [30.0, 120.4, 121.0, 120.3],
    })
    assert _compare.within_budget(trials, _compare.Budget(seconds=120, finish=0.75)).tolist() == [
        True, True, False, True]


def test_finish_with_a_training_loop_of_the_users_own_is_a_usage_error(tmp_path):
    study = _frozen_study(tmp_path)
    setup = study.build(optuna.trial.FixedTrial({"width": 8, "lr_init": 0.1, "weight_decay_init": 1e-3}))
    _runner.check_finish(setup, study)  # hypermeta's own loop: fine
    with pytest.raises(UsageError, match="trains with a loop of its own, whose steps a finishing run cannot set"):
        _runner.check_finish(dataclasses.replace(setup, loop=lambda hyper, report: None), study)


def test_a_finishing_run_takes_steps_or_seconds():
    search = optuna.create_study()
    for limits in ({}, {"steps": 10, "seconds": 1.0}):
        with pytest.raises(ValueError, match="steps or seconds, one of them"):
            _runner.enqueue_finish(search, _searched_trial(), online=False, **limits)
