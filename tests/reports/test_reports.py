"""Reports built from a study stored by a tiny real run: figures, HTML, escaping, errors, atomic writes."""

import dataclasses
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import matplotlib.image
import optuna
import pandas as pd
import pytest
from matplotlib.figure import Figure
from optuna.artifacts import FileSystemArtifactStore, get_all_artifact_meta, upload_artifact

from hypermeta import TRAJECTORY_COLUMNS, reports
from hypermeta._cli import main
from hypermeta._private.files import MARKER
from hypermeta.reports._html import CSV_FILES, FIGURES

STUDY = "<script>alert(1)</script>"
DIRECTORY = "script-alert-1-script"
LR_PARAM = 'a&b"c'
WD_PARAM = "$wd$ <i>"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FIGURE_FILES = [file_name for file_name, *_ in FIGURES]

# Per-layer learning rates in 2 schedule segments and a weight decay, adapted every 10 steps;
# trial 2 fails, trial 3 is pruned at step 30 and trial 5 diverges before its first hyper-step;
# the other 10 complete (enough for parameter importances; one run of 13 trials, the failed one included).
STUDY_FILE = f"""
import optuna
import torch

import hypermeta

DATA = hypermeta.datasets.digits()


class StopTrial3(optuna.pruners.BasePruner):
    def prune(self, study, trial):
        return trial.number == 3 and max(trial.intermediate_values, default=0) >= 30


def build(trial):
    if trial.number == 2:
        raise RuntimeError("this trial fails on purpose")
    diverge = trial.number == 5
    lr = 3.0 if diverge else trial.suggest_float({LR_PARAM!r}, 0.02, 0.3, log=True)
    model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
    return hypermeta.Setup(
        model=model, data=DATA, steps=60, batch_size=32, optimizer="adam" if diverge else "sgd",
        learning_rate=hypermeta.LearningRate(  # trial 5's rate cannot be cut below 3: the guard gives up
            init=lr, scope="per_group", segments=2, bounds=(3.0, 10.0) if diverge else None),
        weight_decay=hypermeta.WeightDecay(init=trial.suggest_float({WD_PARAM!r}, 1e-5, 1e-3, log=True)),
        hypergradient=hypermeta.Hypergradient(horizon=10),
    )


study = hypermeta.Study(name={STUDY!r}, build=build, n_trials=13, pruner=StopTrial3())
"""


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    root = tmp_path_factory.mktemp("stored")
    study_file = root / "tiny_study.py"
    study_file.write_text(STUDY_FILE)
    url = f"sqlite:///{root / 'studies.db'}"
    assert main(["run", str(study_file), "--storage", url, "--quiet"]) == 0
    optuna.create_study(storage=url, study_name="empty")
    return SimpleNamespace(root=root, url=url, artifacts=root / "artifacts")


@pytest.fixture(scope="module")
def report(stored, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "report"
    assert main(["report", STUDY, "--storage", stored.url, "--out", str(out)]) == 0
    return out


class _Tags(HTMLParser):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags, self.images, self.links = [], [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "a":
            self.links.append(attrs["href"])


def _check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE), path.name
    assert len(data) > 10_000, path.name
    image = matplotlib.image.imread(path)
    height, width, channels = image.shape
    assert width == 1000 and 500 <= height <= 1100 and channels in (3, 4), (path.name, image.shape)
    assert image[..., :3].std() > 0.05, f"{path.name} is blank"


def test_report_has_every_figure_and_an_index_that_shows_them(report):
    for file_name in FIGURE_FILES:
        _check_png(report / file_name)
    page = _Tags((report / "index.html").read_text(encoding="utf-8"))
    assert page.images == FIGURE_FILES
    assert set(CSV_FILES) <= set(page.links)
    assert not [tag for tag in page.tags if tag in ("script", "iframe", "link")]  # offline, self-contained page


def test_report_shows_the_best_trial_and_every_trial(stored, report):
    best = optuna.load_study(study_name=STUDY, storage=stored.url).best_trial
    text = (report / "index.html").read_text(encoding="utf-8")
    assert f"Trial <strong>#{best.number}</strong>" in text
    for key in ("lr/0/1", "lr/2/0", "weight_decay/all", "macro-F1", "accuracy"):
        assert key in text
    trials = pd.read_csv(report / "trials.csv")
    expected = ["COMPLETE", "COMPLETE", "FAIL", "PRUNED", "COMPLETE", "PRUNED", *["COMPLETE"] * 7]
    assert trials["state"].tolist() == expected
    assert trials.loc[5, "note"].startswith("diverged")
    trajectories = pd.read_csv(report / "trajectories.csv", dtype={"group": str})
    assert set(trajectories["name"]) == {"lr", "weight_decay"}
    assert set(trajectories["segment"]) == {0, 1}
    assert set(trajectories["group"]) == {"0", "2", "all"}
    drawn = set(range(13)) - {2, 5}  # failed trial 2 has none, diverged trial 5 an empty one
    assert set(trajectories["trial"]) == drawn
    assert set(pd.read_csv(report / "evaluations.csv")["trial"]) == drawn


def test_user_strings_are_escaped_in_the_html(report):
    text = (report / "index.html").read_text(encoding="utf-8")
    for raw, escaped in ((STUDY, "&lt;script&gt;alert(1)&lt;/script&gt;"), (LR_PARAM, "a&amp;b&quot;c"),
                         (WD_PARAM, "$wd$ &lt;i&gt;")):
        assert raw not in text
        assert escaped in text
    assert "<script" not in text.lower()


def test_default_directory_and_a_second_report_replaces_the_first(stored, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["report", STUDY, "--storage", stored.url]) == 0
    target = tmp_path / "reports" / DIRECTORY
    assert capsys.readouterr().out == f"report of study {STUDY!r}: {Path('reports', DIRECTORY, 'index.html')}\n"
    (target / "stale.txt").write_text("from an older report")
    assert main(["report", STUDY, "--storage", stored.url]) == 0
    assert not (target / "stale.txt").exists()
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == [DIRECTORY]  # no temporary left behind
    assert json.loads((target / MARKER).read_text()) == {"study": STUDY}
    for file_name in FIGURE_FILES:
        _check_png(target / file_name)


def test_all_writes_a_report_per_study_and_an_index(stored, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["report", "--all", "--storage", stored.url]) == 0
    captured = capsys.readouterr()
    assert "hypermeta: skipped study 'empty': " in captured.err
    index = (tmp_path / "reports" / "index.html").read_text(encoding="utf-8")
    assert f"{DIRECTORY}/index.html" in _Tags(index).links
    assert "&lt;script&gt;" in index and "<script" not in index
    assert (tmp_path / "reports" / DIRECTORY / "learning-rates.png").is_file()


def test_figures_from_python(stored):
    data = reports.load_report_data(study_name=STUDY, storage=stored.url)
    assert data.metric == "valid_loss" and data.outcomes[5] == "diverged" and data.outcomes[2] == "failed"
    functions = [reports.plot_learning_rates, reports.plot_weight_decays, reports.plot_hypergradients,
                 reports.plot_learning_curves, reports.plot_optimization_history, reports.plot_param_importances]
    for function in functions:
        figure = function(data=data)
        assert isinstance(figure, Figure) and figure.axes, function.__name__
    figure = reports.plot_learning_rates(study_name=STUDY, storage=stored.url)
    assert [ax.get_yscale() for ax in figure.axes] == ["log", "log"]
    assert [ax.get_title() for ax in figure.axes] == ["layer 0 Linear(64->16)", "layer 2 Linear(16->10)"]
    old = dataclasses.replace(data, layers={})  # a study stored before layers were described
    assert [ax.get_title() for ax in reports.plot_learning_rates(data=old).axes] == ["layer 0", "layer 2"]
    with pytest.raises(ValueError, match="either study_name= .* or data="):
        reports.plot_learning_rates()
    without_decay = data.trajectories[data.trajectories["name"] == "lr"]
    with pytest.raises(ValueError, match="no weight decay"):
        reports.plot_weight_decays(data=dataclasses.replace(data, trajectories=without_decay))


def _best_lines(figure, data):
    """The best trial's lines: the bold ones."""
    from hypermeta.reports._figures import BEST_WIDTH

    return [line for ax in figure.axes for line in ax.get_lines() if line.get_linewidth() == BEST_WIDTH]


def test_the_best_trials_legend_swatch_has_its_lines_colour(stored):
    data = reports.load_report_data(study_name=STUDY, storage=stored.url)
    data = dataclasses.replace(data, trajectories=data.trajectories[data.trajectories["segment"] == 0])
    for plot in (reports.plot_learning_rates, reports.plot_weight_decays, reports.plot_hypergradients):
        figure = plot(data=data)
        (legend,) = figure.legends
        swatch = next(h for h, t in zip(legend.legend_handles, legend.get_texts(), strict=True)
                      if t.get_text() == f"best trial #{data.best_trial}")
        assert {line.get_color() for line in _best_lines(figure, data)} == {swatch.get_color()}, plot.__name__


def test_hypergradients_show_magnitude_on_a_log_scale_and_sign_by_marker(stored):
    data = reports.load_report_data(study_name=STUDY, storage=stored.url)
    figure = reports.plot_hypergradients(data=data)
    assert {ax.get_yscale() for ax in figure.axes} == {"log"}
    frame = data.trajectories[data.trajectories["trial"] == data.best_trial]
    frame = frame[frame["hypergradient"] != 0]
    for ax, ((name, group), rows) in zip(figure.axes, frame.groupby(["name", "group"], sort=False), strict=True):
        ups = [line for line in ax.get_lines() if line.get_marker() == "^"]
        downs = [line for line in ax.get_lines() if line.get_marker() == "v" and line.get_markerfacecolor() == "white"]
        assert sum(len(line.get_xdata()) for line in ups) == (rows["hypergradient"] < 0).sum(), (name, group)
        assert sum(len(line.get_xdata()) for line in downs) == (rows["hypergradient"] > 0).sum(), (name, group)
        assert all(y > 0 for line in ups + downs for y in line.get_ydata())


def test_importances_say_how_many_trials_they_rest_on(stored):
    data = reports.load_report_data(study_name=STUDY, storage=stored.url)
    figure = reports.plot_param_importances(data=data)
    assert "from 10 completed trials" in figure.axes[0].get_title()


def test_the_trials_table_scrolls_in_its_own_box(report):
    from hypermeta.reports._html import _STYLE

    text = (report / "index.html").read_text(encoding="utf-8")
    assert '<div class="scroll"><table>' in text
    rule = _STYLE[_STYLE.index(".scroll {"):].split("}")[0]
    assert "overflow: auto" in rule and "max-height" in rule


def test_a_missing_artifact_file_is_noted_and_the_rest_reported(stored, tmp_path):
    shutil.copy(stored.root / "studies.db", tmp_path / "studies.db")
    shutil.copytree(stored.artifacts, tmp_path / "artifacts")
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    study = optuna.load_study(study_name=STUDY, storage=url)
    metas = get_all_artifact_meta(study.trials[0], storage=study._storage)
    (tmp_path / "artifacts" / next(m for m in metas if m.filename == "trajectory.csv").artifact_id).unlink()
    with pytest.warns(UserWarning, match=r"1 trial\(s\) of study .* have files missing"):
        data = reports.load_report_data(study_name=STUDY, storage=url)
    assert data.notes == ["trial 0: trajectory.csv is missing from the artifact store"]
    assert set(data.trajectories["trial"]) == set(range(13)) - {0, 2, 5}


def test_figures_that_need_more_trials_are_left_out_with_a_note(stored, tmp_path):
    study = optuna.create_study(storage=stored.url, study_name="one trial")
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0.0, 1.0)})
    rows = [(step, "lr", "all", 0, 0.1 * step, -0.01, 2.0, 2.1) for step in (10, 20, 30)]
    trajectory = tmp_path / "trajectory.csv"
    pd.DataFrame(rows, columns=TRAJECTORY_COLUMNS).to_csv(trajectory, index=False)
    upload_artifact(artifact_store=FileSystemArtifactStore(stored.artifacts), file_path=str(trajectory),
                    study_or_trial=trial)
    trial.report(2.1, 30)
    study.tell(trial, 2.1)
    out = tmp_path / "out"
    assert main(["report", "one trial", "--storage", stored.url, "--out", str(out)]) == 0
    text = (out / "index.html").read_text(encoding="utf-8")
    assert _Tags(text).images == ["learning-rates.png", "hypergradients.png", "learning-curves.png"]
    assert "Not drawn: no weight decay was adapted in this study." in text
    assert "Not drawn: parameter importances would rest on 1 completed trial; they are drawn from 10 on" in text
    assert not (out / "param-importances.png").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["report", "nope"], "no study named 'nope' in this storage"),
        (["report", "empty"], "study 'empty' has no finished trial yet"),
        (["report", STUDY, "--artifacts", "{tmp}/missing"], "no artifact store at"),
        (["report", STUDY, "--artifacts", "{tmp}"], "no finished trial has a stored trajectory in"),
        (["report"], "one of the arguments name --all is required"),
        (["report", STUDY, "--all"], "not allowed with argument name"),
        (["report", STUDY, "--storage", "sqlite:///{tmp}/none.db"], "no study storage at"),
        (["report", "--all", "--storage", "sqlite:///{tmp}/none.db"], "no study storage at"),
    ],
)
def test_errors_are_one_line_exit_2_and_write_nothing(stored, tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--storage" not in args:
        args += ["--storage", stored.url]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("hypermeta: error: ") and captured.err.count("\n") == 1
    assert message in captured.err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("owner", [None, "another study"])
def test_a_directory_that_is_not_this_studys_report_is_left_alone(stored, tmp_path, capsys, owner):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    if owner is not None:
        (out / MARKER).write_text(json.dumps({"study": owner}))
    assert main(["report", STUDY, "--storage", stored.url, "--out", str(out)]) == 2
    assert "choose another --out DIR" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
    assert (out / "notes.txt").read_text() == "mine" and not (out / "index.html").exists()


REGRESSION_STUDY = """
import torch
import torch.nn.functional as F
import hypermeta

g = torch.Generator().manual_seed(0)
x = torch.randn(120, 3, generator=g)
y = x @ torch.tensor([[1.0], [-2.0], [0.5]])
DATA = hypermeta.Dataset(train=hypermeta.Split(x[:80], y[:80]), valid=hypermeta.Split(x[80:100], y[80:100]),
                         test=hypermeta.Split(x[100:], y[100:]))


def build(trial):
    return hypermeta.Setup(
        model=torch.nn.Linear(3, 1), data=DATA, steps=40, batch_size=16, loss_fn=F.mse_loss,
        metrics={"mae": lambda output, target: (output - target).abs().mean()},
        learning_rate=hypermeta.LearningRate(init=(0.01, 0.1)), hypergradient=hypermeta.Hypergradient(horizon=10),
    )


study = hypermeta.Study(name="regression", build=build, metric="valid_mae", direction="minimize", n_trials=2)
"""


def test_a_study_with_a_metric_of_its_own_is_reported_with_its_name(tmp_path):
    (tmp_path / "regression.py").write_text(REGRESSION_STUDY)
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    assert main(["run", str(tmp_path / "regression.py"), "--storage", url, "--quiet"]) == 0
    out = tmp_path / "report"
    assert main(["report", "regression", "--storage", url, "--out", str(out)]) == 0
    page = (out / "index.html").read_text()
    assert "final validation mae" in page
    assert ">mae<" in page.split("Test metrics")[1].split("</div>")[0]
