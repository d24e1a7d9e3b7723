"""Workers that are interrupted or killed: nothing is lost.

Real processes of the installed ``hypermeta`` command on real SQLite and PostgreSQL storages; signals are
real.
"""

import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from conftest import PostgresServer
from optuna.artifacts import FileSystemArtifactStore, get_all_artifact_meta
from optuna.trial import TrialState

from hypermeta import _runner, _storage
from hypermeta._results import trial_artifacts

STUDY = """
import torch
import hypermeta

DATA = hypermeta.datasets.digits()


def build(trial):
    model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
    return hypermeta.Setup(
        model=model, data=DATA, steps=STEPS, batch_size=32, optimizer_options={"momentum": 0.9},
        learning_rate=hypermeta.LearningRate(init=(0.01, 0.3)),
        hypergradient=hypermeta.Hypergradient(estimator="unrolled", horizon=10),  # slow enough to kill
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
        [HYPERMETA, "run", str(study_file), "--storage", url, "--quiet", "--threads", "1", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _wait_for_running_trial(url: str, *processes: subprocess.Popen, running: int = 1, timeout: float = 60) -> None:
    """Until ``running`` trials are RUNNING at once (with one per worker, every worker is past opening the storage)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for process in processes:
            assert process.poll() is None, process.communicate()
        try:
            trials = optuna.load_study(study_name="workers", storage=url).trials
        except KeyError:
            trials = []
        if sum(t.state == optuna.trial.TrialState.RUNNING for t in trials) >= running:
            time.sleep(0.5)  # well inside the trial's training
            return
        time.sleep(0.2)
    pytest.fail("no trial started")


@pytest.mark.parametrize(
    ("signal_number", "line", "reason"),
    [(signal.SIGINT, "interrupted", "interrupted (Ctrl-C)"), (signal.SIGTERM, "terminated", "terminated (SIGTERM)")],
)
def test_ctrl_c_or_sigterm_fails_the_current_trial_with_a_reason(tmp_path, signal_number, line, reason):
    study_file, url = _setup(tmp_path, steps=5000)
    process = _start(study_file, url)
    _wait_for_running_trial(url, process)
    process.send_signal(signal_number)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == (130 if signal_number == signal.SIGINT else 128 + signal.SIGTERM)
    assert stderr.strip().splitlines() == [f"hypermeta: {line}"]
    (trial,) = optuna.load_study(study_name="workers", storage=url).trials
    assert trial.state == TrialState.FAIL  # not left RUNNING until the grace period
    assert trial.user_attrs["fail_reason"] == trial.user_attrs["stop_reason"] == reason


def test_a_killed_worker_s_trial_is_failed_after_the_grace_period_and_run_again(tmp_path):
    study_file, url = _setup(tmp_path, steps=60)
    first = subprocess.run([HYPERMETA, "run", str(study_file), "--storage", url, "--quiet", "--n-trials", "1"],
                           capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    done_before = _finished_with_files(url)
    assert [name for name, _ in done_before[0][2]] == [_runner.EVALUATIONS_FILE, _runner.TRAJECTORY_FILE]
    study_file.write_text(STUDY.replace("STEPS", "5000"))
    process = _start(study_file, url)
    _wait_for_running_trial(url, process)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=30)
    killed = optuna.load_study(study_name="workers", storage=url).trials[1]
    assert killed.state == TrialState.RUNNING  # nobody has noticed yet
    time.sleep(_storage.GRACE_PERIOD_S + 1)
    study_file.write_text(STUDY.replace("STEPS", "60"))  # the rest may be quick
    finished = subprocess.run(
        [HYPERMETA, "run", str(study_file), "--storage", url, "--quiet"], capture_output=True, text=True, timeout=120
    )
    assert finished.returncode == 0, finished.stderr
    trials = optuna.load_study(study_name="workers", storage=url).trials
    assert trials[1].state == TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retries) == 1 and retries[0].params == killed.params
    assert retries[0].state == TrialState.COMPLETE
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 2
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert _finished_with_files(url)[0] == done_before[0]  # the trial finished before the kill is untouched


def _finished_with_files(url: str) -> dict[int, tuple]:
    """Each finished trial's value, parameters and the bytes of its artifact files, by number."""
    study = optuna.load_study(study_name="workers", storage=url)
    store = FileSystemArtifactStore(str(Path(url.removeprefix("sqlite:///")).parent / "artifacts"))
    results = {}
    for trial in study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED)):
        files = []
        for meta in get_all_artifact_meta(trial, storage=study._storage):
            with store.open_reader(meta.artifact_id) as reader:
                files.append((meta.filename, reader.read()))
        results[trial.number] = (trial.value, trial.params, sorted(files))
    return results


def _run_workers(
    study_file: Path, url: str, artifacts: Path, *, workers: int, n_trials: int, extra: tuple = ()
) -> list[tuple]:
    processes = [
        _start(study_file, url, "--artifacts", str(artifacts), "--n-trials", str(n_trials), *extra)
        for _ in range(workers)
    ]
    outputs = [process.communicate(timeout=300) for process in processes]
    return [(process.returncode, *output) for process, output in zip(processes, outputs, strict=True)]


def _check_exactly_finished(url: str, artifacts: Path, n_trials: int) -> None:
    """``n_trials`` finished, none duplicated or lost, none left running, every trajectory artifact there."""
    study = optuna.load_study(study_name="workers", storage=url)
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == n_trials
    assert len({t.number for t in study.trials}) == len(study.trials)
    drawn = [tuple(sorted(t.params.items())) for t in study.trials if t.params and "failed_trial" not in t.system_attrs]
    assert len(set(drawn)) == len(drawn), "workers drew the same trial"  # only a re-run repeats one
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]
    others = [t for t in study.trials if t.state not in (TrialState.COMPLETE, TrialState.PRUNED)]
    surplus = ("not run:", "stopped after")  # surplus: nothing trained, or dropped after its first steps
    assert all(t.user_attrs["stop_reason"].startswith(surplus) for t in others)
    store = FileSystemArtifactStore(str(artifacts))
    for file_name in (_runner.TRAJECTORY_FILE, _runner.EVALUATIONS_FILE):
        frames = trial_artifacts(study, store, file_name, trials=finished)
        assert sorted(frames) == sorted(t.number for t in finished)
        assert all(len(frame) > 0 for frame in frames.values())


def test_four_workers_on_postgresql_finish_exactly_the_requested_trials(postgres_url, tmp_path):
    study_file, _ = _setup(tmp_path, steps=60)
    outcomes = _run_workers(study_file, postgres_url, tmp_path / "artifacts", workers=4, n_trials=12)
    for returncode, stdout, stderr in outcomes:
        assert returncode == 0, stderr
        assert PostgresServer.PASSWORD not in stdout + stderr
        assert "***@127.0.0.1" in stdout  # the summary names the storage, password hidden
    _check_exactly_finished(postgres_url, tmp_path / "artifacts", 12)


def test_three_workers_start_together_on_a_new_sqlite_file(tmp_path):
    """Optuna creates a new database's tables without a lock; workers that race there must not fail."""
    study_file, url = _setup(tmp_path, steps=60)
    outcomes = _run_workers(study_file, url, tmp_path / "artifacts", workers=3, n_trials=9)
    for returncode, _, stderr in outcomes:
        assert returncode == 0, stderr
        assert "locked" not in stderr
    _check_exactly_finished(url, tmp_path / "artifacts", 9)


PAUSED = STUDY.replace("steps=STEPS,", "steps=5000 if trial.number == 0 else 20, eval_every=20,")


def test_a_paused_worker_whose_trial_was_failed_meanwhile_goes_on_with_the_next(tmp_path):
    """SIGSTOP, then the trial is failed as another worker's stale check does (through the storage API)."""
    study_file, url = _setup(tmp_path, steps=0)
    study_file.write_text(PAUSED)
    process = _start(study_file, url, "--n-trials", "1")
    _wait_for_running_trial(url, process)
    process.send_signal(signal.SIGSTOP)
    storage = optuna.storages.RDBStorage(url)
    (paused,) = optuna.load_study(study_name="workers", storage=storage).trials
    storage.set_trial_state_values(paused._trial_id, TrialState.FAIL)
    process.send_signal(signal.SIGCONT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr and "Cannot tell" not in stderr
    assert "trial 0 was failed by another worker while this one was paused" in stderr
    trials = optuna.load_study(study_name="workers", storage=url).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]


def test_workers_survive_a_postgresql_restart(postgres_server, postgres_url, tmp_path):
    study_file, _ = _setup(tmp_path, steps=300)
    processes = [_start(study_file, postgres_url, "--artifacts", str(tmp_path / "artifacts"), "--n-trials", "4")
                 for _ in range(2)]
    # both workers in a trial: one still opening the storage when it goes away fails at once, as it should
    _wait_for_running_trial(postgres_url, *processes, running=2)
    postgres_server.stop()
    time.sleep(3)
    postgres_server.start()
    for process in processes:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr
        assert "Traceback" not in stderr and PostgresServer.PASSWORD not in stderr
    _check_exactly_finished(postgres_url, tmp_path / "artifacts", 4)
