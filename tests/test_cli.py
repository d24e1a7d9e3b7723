"""The ``hypermeta`` command line, end to end: real study files, real training, real SQLite storages."""

import contextlib
import hashlib
import io
import math
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import sqlalchemy
import torch
from optuna.trial import TrialState

import hypermeta
from hypermeta._cli import main
from hypermeta._storage import MissingArtifactsWarning

STEPS = 40

STUDY = """
import optuna
import torch

import hypermeta

DATA = hypermeta.datasets.digits()


def build(trial):
    width = trial.suggest_int("width", 8, 32, log=True)
    model = torch.nn.Sequential(torch.nn.Linear(64, width), torch.nn.ReLU(), torch.nn.Linear(width, 10))
    return hypermeta.Setup(
        model=model, data=DATA, steps={steps}, batch_size=32, optimizer_options={{"momentum": 0.9}},
        learning_rate=hypermeta.LearningRate(init=trial.suggest_{lr}),
        weight_decay=hypermeta.WeightDecay(init=1e-4),
        hypergradient=hypermeta.Hypergradient(horizon=10),
    )


study = hypermeta.Study(name={name!r}, build=build, metric={metric!r}, n_trials=4{extra})
"""


def study_text(name="tiny", *, metric="valid_loss", lr='float("lr", 0.02, 0.5, log=True)', steps=STEPS, extra=""):
    return STUDY.format(name=name, metric=metric, lr=lr, steps=steps, extra=extra)


def cli(*argv) -> tuple[int, str, str]:
    """``hypermeta ARGV`` in this process: exit status, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def fingerprint(url: str) -> tuple:
    """What a command must not change: the studies, their trials, and the database file's bytes."""
    summaries = [
        (s.study_name, [d.name for d in s.directions], s.n_trials, s.best_trial and s.best_trial.value)
        for s in optuna.get_all_study_summaries(url)
    ]
    return summaries, hashlib.sha256(Path(url.removeprefix("sqlite:///")).read_bytes()).hexdigest()


def files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# --- one shared run, continued twice --------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``run --n-trials 2``, then ``--n-trials 3``, then ``--n-trials 2`` on one SQLite file."""
    root = tmp_path_factory.mktemp("runs")
    (root / "tiny.py").write_text(study_text())
    url = f"sqlite:///{root / 'store' / 'study.db'}"
    (root / "store").mkdir()
    steps = []
    for n in (2, 3, 2):
        code, out, err = cli("run", root / "tiny.py", "--n-trials", n, "--storage", url, "--quiet", "--seed", 3)
        assert (code, err) == (0, ""), err
        study = optuna.load_study(study_name="tiny", storage=url)
        steps.append({"out": out, "trials": study.get_trials(), "fingerprint": fingerprint(url)})
    return {"root": root, "url": url, "steps": steps}


def test_run_stores_complete_trials_with_values_and_test_metrics(runs):
    study = optuna.load_study(study_name="tiny", storage=runs["url"])
    assert study.direction == optuna.study.StudyDirection.MINIMIZE
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    for trial in trials:
        assert set(trial.params) == {"width", "lr"}
        assert math.isfinite(trial.value) and 0 < trial.value < 2.5  # valid loss, below chance's 2.3 + noise
        assert trial.user_attrs["steps"] == STEPS
        assert 0 < trial.user_attrs["test_loss"] < math.inf
        assert 0 <= trial.user_attrs["test_accuracy"] <= 1 and 0 <= trial.user_attrs["test_macro_f1"] <= 1
        assert set(trial.user_attrs["hyperparameters"]) == {"lr/all/0", "weight_decay/all"}
        assert sorted(trial.intermediate_values)[-1] == STEPS
        assert trial.intermediate_values[STEPS] == trial.value
    assert "best trial" in runs["steps"][-1]["out"] and "3 complete" in runs["steps"][-1]["out"]


def test_finish_trains_the_best_trials_choices_from_its_learned_values_as_one_more_trial(tmp_path):
    (tmp_path / "tiny.py").write_text(study_text())
    url = f"sqlite:///{tmp_path / 'study.db'}"
    code, out, err = cli("run", tmp_path / "tiny.py", "--n-trials", 2, "--finish", 0.5, "--storage", url, "--quiet")
    assert (code, err) == (0, ""), err
    assert "3 complete" in out
    study = optuna.load_study(study_name="tiny", storage=url)
    *searched, finishing = study.get_trials()
    best = min(searched, key=lambda trial: trial.value)
    assert finishing.user_attrs["finish"] == {
        "of": best.number, "steps": None, "seconds": 0.5, "start": best.user_attrs["hyperparameters"]
    }
    assert finishing.state == TrialState.COMPLETE and finishing.params == best.params
    # it ran until its seconds passed, not for the study's own steps
    assert finishing.user_attrs["steps"] > STEPS and finishing.user_attrs["seconds"] >= 0.5
    assert math.isfinite(finishing.value)
    code, out, _ = cli("trials", "tiny", "--storage", url)
    assert code == 0 and f"finishing run of trial {best.number}" in out
    # a study that holds its trials already: --finish alone trains its best (the finishing run, maybe) once more
    best_now = study.best_trial.number
    code, out, err = cli("run", tmp_path / "tiny.py", "--n-trials", 2, "--finish", 0.2, "--storage", url, "--quiet")
    assert (code, err) == (0, "") and "4 complete" in out
    assert study.get_trials()[-1].user_attrs["finish"]["of"] == best_now


def test_finish_without_a_completed_trial_is_a_one_line_error_and_keeps_the_trials(tmp_path):
    # a pruner that prunes every trial at its first evaluation
    (tmp_path / "wild.py").write_text(study_text(extra=", pruner=optuna.pruners.ThresholdPruner(upper=0.0)"))
    url = f"sqlite:///{tmp_path / 'study.db'}"
    code, out, err = cli("run", tmp_path / "wild.py", "--n-trials", 1, "--finish", 1, "--storage", url, "--quiet")
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "--finish: no trial of study 'tiny' completed" in err and "hypermeta trials tiny" in err
    assert [t.state for t in optuna.load_study(study_name="tiny", storage=url).get_trials()] == [TrialState.PRUNED]


def test_finish_from_learned_values_outside_the_study_files_ranges_is_a_one_line_error(tmp_path):
    (tmp_path / "tiny.py").write_text(study_text())
    url = f"sqlite:///{tmp_path / 'study.db'}"
    assert cli("run", tmp_path / "tiny.py", "--n-trials", 1, "--storage", url, "--quiet")[0] == 0
    # the user then narrows the learning rate's bounds so that the best trial's learned rate lies outside them
    narrowed = study_text(lr='float("lr", 0.6, 0.7), bounds=(0.55, 0.75)')
    (tmp_path / "tiny.py").write_text(narrowed)
    before = fingerprint(url)
    code, _, err = cli("run", tmp_path / "tiny.py", "--n-trials", 1, "--finish", 1, "--storage", url, "--quiet")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert re.search(r"--finish 'tiny': its lr/all/0 = \S+ lies outside this study's range \(0.55, 0.75\)", err), err
    assert "drop --finish" in err
    assert fingerprint(url) == before  # nothing queued


def test_threads_sets_pytorch_s_cpu_threads(tmp_path):
    (tmp_path / "tiny.py").write_text(study_text())
    url = f"sqlite:///{tmp_path / 'study.db'}"
    try:
        assert cli("run", tmp_path / "tiny.py", "--n-trials", 1, "--quiet", "--storage", url, "--threads", 2)[0] == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)  # as conftest set it


def test_a_study_file_imports_the_module_beside_it(tmp_path, monkeypatch):
    """As ``python studies/tiny.py`` would: the file's directory is first on ``sys.path``."""
    monkeypatch.setattr(sys, "path", list(sys.path))  # put back what the run adds
    (tmp_path / "tiny_widths.py").write_text("WIDTHS = (8, 16)\n")
    text = study_text().replace("import hypermeta\n", "import hypermeta\nfrom tiny_widths import WIDTHS\n", 1)
    (tmp_path / "tiny.py").write_text(text.replace('trial.suggest_int("width", 8, 32, log=True)',
                                                   'trial.suggest_categorical("width", WIDTHS)'))
    url = f"sqlite:///{tmp_path / 'study.db'}"
    try:
        code, _, err = cli("run", tmp_path / "tiny.py", "--n-trials", 1, "--quiet", "--storage", url)
    finally:
        sys.modules.pop("tiny_widths", None)
    assert code == 0, err
    (trial,) = optuna.load_study(study_name="tiny", storage=url).trials
    assert trial.params["width"] in (8, 16)


def test_run_says_when_a_running_trial_of_another_worker_is_counted(tmp_path):
    (tmp_path / "tiny.py").write_text(study_text())
    url = f"sqlite:///{tmp_path / 'study.db'}"
    assert cli("run", tmp_path / "tiny.py", "--n-trials", 1, "--quiet", "--storage", url)[0] == 0
    optuna.load_study(study_name="tiny", storage=url).ask()  # another worker's trial, running
    code, out, _ = cli("run", tmp_path / "tiny.py", "--n-trials", 2, "--quiet", "--storage", url)
    assert code == 0
    assert "1 trial(s) still running, counted towards the 2" in out and "run again" in out


def test_continuation_reaches_n_finished_trials_not_n_more(runs):
    counts = [len(step["trials"]) for step in runs["steps"]]
    assert counts == [2, 3, 3]
    first, second, third = (step["trials"] for step in runs["steps"])
    key = [(t.number, t.params, t.value, t.user_attrs) for t in first]
    assert [(t.number, t.params, t.value, t.user_attrs) for t in second[:2]] == key
    assert third == second  # the third run had nothing to do and wrote nothing
    assert runs["steps"][2]["fingerprint"] == runs["steps"][1]["fingerprint"]
    assert second[2].params != second[0].params and second[2].params != second[1].params


def test_trajectories_come_back_from_the_url_and_name_alone(runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing relative to the working directory is needed
    frame = hypermeta.load_trajectories(study_name="tiny", storage=runs["url"])
    assert list(frame.columns) == ["trial", *hypermeta.TRAJECTORY_COLUMNS]
    assert sorted(frame["trial"].unique()) == [0, 1, 2]
    for _, rows in frame.groupby("trial"):
        assert sorted(rows["step"].unique()) == [1, 3, 7, *range(10, STEPS + 1, 10)]  # windows of 1, 2, 4, 3, 10, ...
        assert set(rows["name"]) == {"lr", "weight_decay"}
        assert rows["hypergradient"].notna().all() and (rows["value"] > 0).all()
    artifacts = Path(runs["url"].removeprefix("sqlite:///")).parent / "artifacts"
    assert len(list(artifacts.iterdir())) == 2 * 3  # a trajectory and an evaluation file per trial
    assert files(tmp_path) == []


def test_studies_trials_and_best_print_what_is_stored(runs):
    study = optuna.load_study(study_name="tiny", storage=runs["url"])
    code, out, err = cli("studies", "--storage", runs["url"])
    assert (code, err) == (0, "")
    header, row = out.splitlines()
    assert header.split()[:4] == ["study", "direction", "running", "complete"]
    best = f"{study.best_value:.6f}".rstrip("0")  # the table drops trailing zeros
    assert row.split()[:4] == ["tiny", "minimize", "0", "3"] and best in row

    code, out, err = cli("trials", "tiny", "--storage", runs["url"])
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert "param lr" in lines[0] and "final lr/all/0" in lines[0] and "test_accuracy" in lines[0]
    assert [line.split()[:2] for line in lines[1:]] == [[str(n), "COMPLETE"] for n in range(3)]

    code, out, err = cli("best", "tiny", "--storage", runs["url"])
    assert (code, err) == (0, "")
    best = study.best_trial
    assert out.splitlines()[0] == f"best trial of 'tiny': {best.number}"
    shown = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in out.splitlines()[1:])
    assert shown["state"] == "COMPLETE" and shown["param width"] == str(best.params["width"])
    expected = {
        "value": best.value, "param lr": best.params["lr"],
        **{f"final {k}": v for k, v in best.user_attrs["hyperparameters"].items()},
        **{k: best.user_attrs[k] for k in ("test_loss", "test_accuracy", "test_macro_f1")},
    }
    assert {k: float(shown[k]) for k in expected} == pytest.approx(expected, rel=1e-5)


# --- seeds and the default storage -------------------------------------------------------------------


def test_same_seed_same_study_in_the_default_and_an_explicit_storage(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.py").write_text(study_text(steps=20))
    assert cli("run", "tiny.py", "--n-trials", 2, "--seed", 11, "--quiet")[0] == 0
    assert files(tmp_path / ".hypermeta")[:2] == ["artifacts", "artifacts/" + sorted(
        p.name for p in (tmp_path / ".hypermeta" / "artifacts").iterdir())[0]]
    assert (tmp_path / ".hypermeta" / "hypermeta.db").is_file()
    default = f"sqlite:///{tmp_path / '.hypermeta' / 'hypermeta.db'}"
    twin = f"sqlite:///{tmp_path / 'twin.db'}"
    other = f"sqlite:///{tmp_path / 'other.db'}"
    assert cli("run", "tiny.py", "--n-trials", 2, "--seed", 11, "--quiet", "--storage", twin)[0] == 0
    assert cli("run", "tiny.py", "--n-trials", 1, "--seed", 12, "--quiet", "--storage", other)[0] == 0

    def trials(url):
        study = optuna.load_study(study_name="tiny", storage=url)
        timeless = ({k: v for k, v in t.user_attrs.items() if k != "seconds"} for t in study.trials)  # wall clock
        return [(t.params, t.value, attrs) for t, attrs in zip(study.trials, timeless, strict=True)]

    assert trials(default) == trials(twin)
    assert len(trials(default)) == 2 and trials(other)[0][0] != trials(default)[0][0]
    pd.testing.assert_frame_equal(
        hypermeta.load_trajectories(study_name="tiny"), hypermeta.load_trajectories(study_name="tiny", storage=twin)
    )
    pd.testing.assert_frame_equal(
        hypermeta.load_evaluations(study_name="tiny"), hypermeta.load_evaluations(study_name="tiny", storage=twin)
    )


# --- pruning -------------------------------------------------------------------------------------------


def test_the_pruner_stops_hopeless_trials(tmp_path):
    budget = 40
    text = study_text(
        name="prune", lr='categorical("lr", [0.1, 1e-6])', steps=budget,
        extra=", pruner=optuna.pruners.MedianPruner(n_startup_trials=1)",
    )
    (tmp_path / "prune.py").write_text(text)
    url = f"sqlite:///{tmp_path / 'prune.db'}"
    # --seed 0 draws a good rate first, so the hopeless ones meet a completed good trial at step 10
    argv = ["run", tmp_path / "prune.py", "--n-trials", 6, "--sampler", "random", "--seed", 0, "--storage", url]
    code, out, err = cli(*argv, "--quiet")
    assert (code, err) == (0, "")
    trials = optuna.load_study(study_name="prune", storage=url).trials
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(pruned) + len(complete) == 6 and pruned and complete, [(t.params, t.state) for t in trials]
    assert 1e-6 in {t.params["lr"] for t in pruned}
    assert optuna.load_study(study_name="prune", storage=url).best_trial.params["lr"] == 0.1
    for trial in pruned:
        assert trial.user_attrs["steps"] < budget
        assert trial.user_attrs["stop_reason"] == f"pruned at step {trial.user_attrs['steps']}"
        assert "test_loss" not in trial.user_attrs
    assert all(t.user_attrs["steps"] == budget and "test_loss" in t.user_attrs for t in complete)
    assert f"{len(complete)} complete, {len(pruned)} pruned" in out
    stopped = hypermeta.load_trajectories(study_name="prune", storage=url).groupby("trial")["step"].max()
    assert all(stopped[t.number] == t.user_attrs["steps"] for t in trials)


# --- bad input: one line, exit status 2, nothing written ----------------------------------------------


def assert_usage_error(result, *words):
    code, out, err = result
    assert code == 2, (out, err)
    assert out == ""
    assert err.startswith("hypermeta: error: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for word in words:
        assert word in err, (word, err)


BAD_FILES = {
    "syntax.py": ("x = (\n", ["syntax.py", "syntax error"]),
    "empty.py": ("import hypermeta\n", ["defines no hypermeta.Study", "study = hypermeta.Study("]),
    "two.py": (study_text("a") + study_text("b").replace("study =", "other ="), ["defines 2 studies"]),
    "raises.py": (
        study_text("r").replace("def build(trial):", "def build(trial):\n    raise KeyError('dataset')"),
        ["build function of study 'r' raised KeyError", "fix it"],
    ),
    "dict.py": (study_text("d").replace("return hypermeta.Setup(", "return dict("), ["returned dict", "Setup"]),
    "steps0.py": (study_text("z", steps=0), ["Setup.steps must be an integer >= 1"]),
    "direction.py": (study_text("tiny", metric="valid_accuracy"), ["stored with direction minimize", "rename"]),
}


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    for name, (text, _) in BAD_FILES.items():
        (root / name).write_text(text)
    (root / "good.py").write_text(study_text("fresh"))
    return root


@pytest.fixture
def new_store(tmp_path, monkeypatch):
    """A working directory with nothing in it and a storage URL that does not exist yet."""
    monkeypatch.chdir(tmp_path)
    yield f"sqlite:///{tmp_path / 'new.db'}"
    assert files(tmp_path) == [], "a failed command wrote something"


@pytest.fixture
def existing_store(runs, tmp_path, monkeypatch):
    """The shared storage, which must come out of a failed command exactly as it went in."""
    monkeypatch.chdir(tmp_path)
    before = fingerprint(runs["url"]), files(runs["root"])
    yield runs["url"]
    assert (fingerprint(runs["url"]), files(runs["root"])) == before
    assert files(tmp_path) == []


@pytest.mark.parametrize("store", ["new_store", "existing_store"])
@pytest.mark.parametrize("name", [n for n in BAD_FILES if n != "direction.py"] + ["missing.py"])
def test_bad_study_file(request, bad_files, store, name):
    url = request.getfixturevalue(store)
    words = BAD_FILES[name][1] if name in BAD_FILES else ["missing.py does not exist"]
    assert_usage_error(cli("run", bad_files / name, "--storage", url, "--quiet"), *words)


def test_existing_study_with_another_direction_is_left_alone(bad_files, existing_store):
    result = cli("run", bad_files / "direction.py", "--storage", existing_store, "--quiet")
    assert_usage_error(result, "'tiny'", "stored with direction minimize", "'valid_accuracy' is to maximize")


@pytest.mark.parametrize("store", ["new_store", "existing_store"])
@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--n-trials", "0"], ["--n-trials", "integer >= 1", "'0'", "--help"]),
        (["--n-trials", "abc"], ["--n-trials", "'abc'"]),
        (["--timeout", "-1"], ["--timeout", "number > 0", "'-1'"]),
        (["--timeout", "nan"], ["--timeout", "'nan'"]),
        (["--sampler", "nope"], ["--sampler", "'nope'", "tpe"]),
        (["--seed", "-3"], ["--seed", "'-3'"]),
        (["--seed", str(2**32)], ["--seed", "2**32 - 1"]),
        (["--device", "tpu"], ["--device", "'tpu'", "cuda"]),
        (["--threads", "0"], ["--threads", "integer >= 1", "'0'"]),
        (["--finish", "0"], ["--finish", "number > 0", "'0'"]),
        (["--finish", "long"], ["--finish", "'long'"]),
        (["--finish", "inf"], ["--finish", "finite number of seconds", "'inf'"]),
        (["--frobnicate"], ["unrecognized arguments: --frobnicate"]),
    ],
)
def test_invalid_option_values(request, bad_files, store, flags, words):
    url = request.getfixturevalue(store)
    assert_usage_error(cli("run", bad_files / "good.py", "--storage", url, "--quiet", *flags), *words)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_device_cuda_without_cuda(bad_files, existing_store):
    result = cli("run", bad_files / "good.py", "--storage", existing_store, "--device", "cuda", "--quiet")
    assert_usage_error(result, "--device cuda", "no CUDA device", "--device cpu")


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("foo://x", ["cannot open storage foo://x", "check the URL"]),
        ("not-a-url", ["'not-a-url' is not a URL", "sqlite:///"]),
        ("sqlite:///{tmp}/no/such/dir/x.db", ["no/such/dir does not exist", "create it"]),
        ("postgresql://user:secret@127.0.0.1:1/db", ["postgresql://user:***@127.0.0.1:1/db"]),
    ],
)
@pytest.mark.parametrize("command", ["run", "studies", "trials", "best"])
def test_bad_storage_urls(bad_files, tmp_path, monkeypatch, url, words, command):
    monkeypatch.chdir(tmp_path)
    url = url.format(tmp=tmp_path)
    argv = {"run": ["run", bad_files / "good.py", "--quiet"], "studies": ["studies"]}.get(command, [command, "tiny"])
    result = cli(*argv, "--storage", url)
    if command != "run" and url.startswith("sqlite"):
        words = ["no study storage at", "hypermeta run STUDY_FILE"]
    assert_usage_error(result, *words)
    assert "secret" not in result[1] + result[2]
    assert files(tmp_path) == []


def test_artifacts_that_are_a_file(bad_files, new_store, tmp_path):
    (tmp_path / "afile").write_text("")
    result = cli("run", bad_files / "good.py", "--storage", new_store, "--artifacts", tmp_path / "afile", "--quiet")
    assert_usage_error(result, "is a file, not a directory", "--artifacts")
    (tmp_path / "afile").unlink()


@pytest.mark.parametrize("command", ["trials", "best"])
def test_unknown_study_name(existing_store, command):
    assert_usage_error(cli(command, "nope", "--storage", existing_store), "no study named 'nope'", "tiny")


@pytest.mark.parametrize("command", [["studies"], ["trials", "tiny"], ["best", "tiny"]])
def test_missing_default_storage(new_store, command):
    assert_usage_error(cli(*command), "no study storage at", ".hypermeta/hypermeta.db", "--storage")


def test_other_optuna_studies_in_the_storage(bad_files, tmp_path):
    """A storage may hold studies hypermeta did not write: an empty one and a multi-objective one."""
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    optuna.create_study(storage=url, study_name="empty")
    multi = optuna.create_study(storage=url, study_name="multi", directions=["minimize", "maximize"])
    multi.tell(multi.ask({"x": optuna.distributions.FloatDistribution(0, 1)}), [1.0, 2.0])
    before = fingerprint(url)
    code, out, err = cli("studies", "--storage", url)
    assert (code, err) == (0, "") and "minimize/maximize" in out and "empty" in out
    code, out, err = cli("trials", "multi", "--storage", url)
    assert (code, err) == (0, "") and "[1.0, 2.0]" in out
    code, out, err = cli("trials", "empty", "--storage", url)
    assert (code, err, out) == (0, "", "study 'empty' has no trials\n")
    assert_usage_error(cli("best", "empty", "--storage", url), "no completed trial", "run it first")
    assert_usage_error(cli("best", "multi", "--storage", url), "2 objectives")
    (tmp_path / "multi.py").write_text(study_text("multi"))
    result = cli("run", tmp_path / "multi.py", "--storage", url, "--quiet")
    assert_usage_error(result, "stored with direction minimize/maximize", "rename the study")
    assert fingerprint(url) == before


def test_console_script_reports_one_line_and_status_2(tmp_path):
    script = Path(sys.executable).with_name("hypermeta")
    assert script.is_file(), "the package is not installed with its console script"
    process = subprocess.run(
        [str(script), "run", "missing.py", "--storage", "postgresql://user:secret@127.0.0.1:1/db"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert process.returncode == 2
    assert process.stdout == "" and "Traceback" not in process.stderr
    assert process.stderr.count("\n") == 1 and process.stderr.startswith("hypermeta: error: study file missing.py")
    assert list(tmp_path.iterdir()) == []


# --- failures say why, where the user looks ------------------------------------------------------------

FAILING = """
import itertools
import torch
import hypermeta

DATA = hypermeta.datasets.digits()
CALLS = itertools.count()


def build(trial):
    trial.suggest_float("x", 0, 1)
    if next(CALLS) > 0:  # the first call is the check before the run: the trials themselves fail
        raise ValueError("targets must be class indices\\nmore detail")
    return hypermeta.Setup(model=torch.nn.Linear(64, 10), data=DATA, steps=5, batch_size=8,
                           learning_rate=hypermeta.LearningRate(init=0.1))


study = hypermeta.Study(name="broken", build=build, n_trials=2)
"""


def test_a_run_whose_trials_all_fail_says_why_everywhere_and_exits_1(tmp_path):
    (tmp_path / "broken.py").write_text(FAILING)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    code, out, err = cli("run", tmp_path / "broken.py", "--quiet", "--storage", url)
    reason = "ValueError: targets must be class indices"
    assert (code, out) == (1, "")
    assert err.splitlines() == [
        f"hypermeta: trial 0 failed: {reason}",
        f"hypermeta: trial 1 failed: {reason}",
        f"hypermeta: error: none of the 2 trials this run started finished (trial 1: {reason});"
        " see `hypermeta trials broken`",
    ]
    code, out, _ = cli("trials", "broken", "--storage", url)
    assert code == 0 and out.count(reason) == 2 and "note" in out
    assert_usage_error(cli("best", "broken", "--storage", url), "all 2 of its trials failed", reason)
    assert_usage_error(cli("report", "broken", "--storage", url, "--out", tmp_path / "r"), "all 2", reason)
    assert optuna.load_study(study_name="broken", storage=url).trials[0].user_attrs["fail_reason"] == reason


def test_a_run_with_a_failed_trial_says_the_study_is_short_of_its_target(tmp_path):
    (tmp_path / "some.py").write_text(FAILING.replace("next(CALLS) > 0", "next(CALLS) == 2").replace(
        'name="broken"', 'name="some"'))
    url = f"sqlite:///{tmp_path / 'study.db'}"
    code, out, err = cli("run", tmp_path / "some.py", "--quiet", "--storage", url)
    assert code == 0 and err.startswith("hypermeta: trial 1 failed: ValueError")
    assert out.splitlines()[-1] == (
        "1 of the 2 trials finished: failed trials do not count (their reasons are in `hypermeta trials some`);"
        " run again to continue"
    )


def test_a_deleted_artifact_store_is_reported_by_run_and_readers(tmp_path):
    (tmp_path / "tiny.py").write_text(study_text(steps=20))
    url = f"sqlite:///{tmp_path / 'study.db'}"
    assert cli("run", tmp_path / "tiny.py", "--n-trials", 1, "--quiet", "--storage", url)[0] == 0
    shutil.rmtree(tmp_path / "artifacts")
    code, _, err = cli("run", tmp_path / "tiny.py", "--n-trials", 2, "--quiet", "--storage", url)
    assert code == 0
    assert err.splitlines() == [
        f"hypermeta: warning: artifact store {tmp_path / 'artifacts'} did not exist, but 1 trial(s) of study 'tiny'"
        " stored files there: created it anew, their trajectories are missing (restore the directory, or pass"
        " --artifacts DIR where it is now)"
    ]
    with pytest.warns(MissingArtifactsWarning, match=r"^1 trial\(s\) of study 'tiny' have files missing .*\(trial 0\)"):
        trajectories = hypermeta.load_trajectories(study_name="tiny", storage=url)
    assert set(trajectories["trial"]) == {1}
    code, _, err = cli("report", "tiny", "--storage", url, "--out", tmp_path / "r")
    assert code == 0 and err.startswith("hypermeta: warning: 1 trial(s) of study 'tiny' have files missing")


def test_threads_default_to_one(tmp_path):
    (tmp_path / "tiny.py").write_text(study_text(steps=10))
    torch.set_num_threads(2)
    try:
        url = f"sqlite:///{tmp_path / 'x.db'}"
        assert cli("run", tmp_path / "tiny.py", "--n-trials", 1, "--quiet", "--storage", url)[0] == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(1)


def test_unwritable_artifacts_write_nothing_to_postgresql(bad_files, postgres_url, tmp_path):
    result = cli("run", bad_files / "good.py", "--storage", postgres_url, "--artifacts", "/proc/x", "--quiet")
    assert_usage_error(result, "cannot write to artifact store /proc/x", "--artifacts DIR")
    assert sqlalchemy.inspect(sqlalchemy.create_engine(postgres_url)).get_table_names() == []


def test_ctrl_c_while_the_libraries_load_ends_quietly(tmp_path):
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "hypermeta"]
    assert script.value == "hypermeta._main:main"
    process = subprocess.Popen(
        [sys.executable, "-c", "import sys; from hypermeta._main import main; sys.exit(main())", "studies"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    time.sleep(0.5)  # torch, Optuna and pandas take seconds to load
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert out == "" and err == "hypermeta: interrupted\n"
    assert list(tmp_path.iterdir()) == []
