"""Workers that are interrupted or killed: nothing is lost.

Real processes of the installed ``hypermeta`` command on a real SQLite storage; signals are real.
"""

import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from hypermeta import _storage

STUDY = """
import torch
import hypermeta

DATA = hypermeta.datasets.digits()


def build(trial):
    model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
    return hypermeta.Setup(
        model=model, data=DATA, steps=STEPS, batch_size=32, optimizer_options={"momentum": 0.9},
        learning_rate=hypermeta.LearningRate(init=(0.01, 0.3)),
        hypergradient=hypermeta.Hypergradient(horizon=10, meta_lr=0.1),
    )


study = hypermeta.Study(name="workers", build=build, n_trials=2, pruner=__import__("optuna").pruners.NopPruner())
"""
HYPERMETA = str(Path(sys.executable).parent / "hypermeta")


def _setup(tmp_path: Path, steps: int) -> tuple[Path, str]:
    study_file = tmp_path / "study.py"
    study_file.write_text(STUDY.replace("STEPS", str(steps)))
    return study_file, f"sqlite:///{tmp_path / 'studies.db'}"


def _start(study_file: Path, url: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [HYPERMETA, "run", str(study_file), "--storage", url, "--quiet", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _wait_for_running_trial(url: str, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        try:
            trials = optuna.load_study(study_name="workers", storage=url).trials
        except KeyError:
            trials = []
        if any(t.state == optuna.trial.TrialState.RUNNING for t in trials):
            time.sleep(0.5)  # well inside the trial's training
            return
        time.sleep(0.2)
    pytest.fail("no trial started")


def test_ctrl_c_fails_the_current_trial_with_a_reason_and_exits_130(tmp_path):
    study_file, url = _setup(tmp_path, steps=5000)
    process = _start(study_file, url)
    _wait_for_running_trial(url, process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert stderr.strip().splitlines() == ["hypermeta: interrupted"]
    trials = optuna.load_study(study_name="workers", storage=url).trials
    assert [t.state.name for t in trials] == ["FAIL"]
    assert trials[0].user_attrs["stop_reason"] == "interrupted (Ctrl-C)"


def test_a_killed_worker_s_trial_is_failed_after_the_grace_period_and_run_again(tmp_path):
    study_file, url = _setup(tmp_path, steps=5000)
    process = _start(study_file, url)
    _wait_for_running_trial(url, process)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=30)
    killed = optuna.load_study(study_name="workers", storage=url).trials[0]
    assert killed.state == optuna.trial.TrialState.RUNNING  # nobody has noticed yet
    time.sleep(_storage.GRACE_PERIOD_S + 1)
    study_file.write_text(STUDY.replace("STEPS", "60"))  # the rest may be quick
    finished = subprocess.run(
        [HYPERMETA, "run", str(study_file), "--storage", url, "--quiet"], capture_output=True, text=True, timeout=120
    )
    assert finished.returncode == 0, finished.stderr
    trials = optuna.load_study(study_name="workers", storage=url).trials
    assert trials[0].state == optuna.trial.TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retries) == 1 and retries[0].params == killed.params
    assert retries[0].state == optuna.trial.TrialState.COMPLETE
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials) == 2
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
