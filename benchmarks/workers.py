"""Several `hypermeta run` workers on one storage: throughput, and a soak test with random SIGKILLs.

    python benchmarks/workers.py throughput [--trials 16] [--steps 400] [--storage URL]
    python benchmarks/workers.py soak [--trials 40] [--steps 1200] [--workers 2] [--kills 6] [--storage URL]

``throughput`` runs the same number of trials with 1 and with 2 workers, each with hypermeta's
default threads (no ``--threads``), with ``--threads 1`` and with a thread per core (PyTorch's own
default, ``--threads <cores>``), side by side in one run (every configuration twice, in mirrored
order), each run on a new study, and prints a table of trials per minute.

``soak`` keeps ``--workers`` workers busy on one study, SIGKILLs a random one (at least 6 s old)
every few seconds, ``--kills`` times, starting a replacement each time, then runs `hypermeta run`
again after the grace period until the study holds the requested trials. It prints trials requested / finished / lost
and exits 1 unless lost and duplicated are 0. Lost: requested trials never finished, and finished
trials whose value or trajectory artifact changed or vanished after they were first seen.

The default storage is a new SQLite file in a temporary directory; with ``--storage`` each
configuration gets a study of its own name there. Soak workers run with ``--threads 1``.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import optuna
from optuna.artifacts import FileSystemArtifactStore, get_all_artifact_meta
from optuna.trial import TrialState

from hypermeta import _storage

HYPERMETA = str(Path(sys.executable).parent / "hypermeta")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
STARTUP_S = 6  # a new worker is killed only after it has had time to start a trial
STUDY = """
import optuna, torch
import hypermeta

DATA = hypermeta.datasets.digits()


def build(trial):
    width = trial.suggest_categorical("width", [32, 64])
    model = torch.nn.Sequential(torch.nn.Linear(64, width), torch.nn.ReLU(), torch.nn.Linear(width, 10))
    return hypermeta.Setup(
        model=model, data=DATA, steps={steps}, batch_size=32, optimizer_options={{"momentum": 0.9}},
        learning_rate=hypermeta.LearningRate(init=(0.01, 0.3)),
        hypergradient=hypermeta.Hypergradient(),
    )


study = hypermeta.Study(name="{name}", build=build, n_trials={trials}, pruner=optuna.pruners.NopPruner())
"""


class Workspace:
    """A directory with study files, the artifact store and (by default) the SQLite storage."""

    def __init__(self, directory: Path, storage: str | None) -> None:
        self.directory = directory
        self.storage = storage or f"sqlite:///{directory / 'studies.db'}"
        self.artifacts = directory / "artifacts"
        self.opened = _storage.open_storage(self.storage, create=True)

    def new_study(self, *, trials: int, steps: int) -> tuple[str, Path]:
        name = f"workers-{uuid.uuid4().hex[:8]}"
        path = self.directory / f"{name}.py"
        path.write_text(STUDY.format(name=name, trials=trials, steps=steps))
        return name, path

    def start_worker(self, study_file: Path, *, threads: int | None = 1) -> subprocess.Popen:
        command = [HYPERMETA, "run", str(study_file), "--storage", self.storage, "--artifacts", str(self.artifacts),
                   "--quiet", *(["--threads", str(threads)] if threads else [])]
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def trials(self, name: str) -> list[optuna.trial.FrozenTrial]:
        """The study's trials; none while no worker has created it yet."""
        try:
            return optuna.load_study(study_name=name, storage=self.opened).get_trials(deepcopy=False)
        except KeyError:
            return []


def wait_all(workers: list[subprocess.Popen]) -> None:
    for worker in workers:
        _, stderr = worker.communicate()
        if worker.returncode not in (0, -signal.SIGKILL):
            raise SystemExit(f"a worker failed (exit {worker.returncode}): {stderr.strip()}")


CORES = os.cpu_count() or 1
# (workers, --threads; None: hypermeta's default, CORES: PyTorch's default of a thread per core)
CONFIGURATIONS = [(1, None), (1, 1), (1, CORES), (2, None), (2, 1), (2, CORES)]


def throughput(workspace: Workspace, *, trials: int, steps: int) -> None:
    seconds: dict[tuple, list[float]] = {configuration: [] for configuration in CONFIGURATIONS}
    for n_workers, threads in CONFIGURATIONS + CONFIGURATIONS[::-1]:
        name, study_file = workspace.new_study(trials=trials, steps=steps)
        started = time.perf_counter()
        wait_all([workspace.start_worker(study_file, threads=threads) for _ in range(n_workers)])
        seconds[n_workers, threads].append(time.perf_counter() - started)
        finished = sum(t.state in FINISHED for t in workspace.trials(name))
        assert finished == trials, f"{finished} trials finished, {trials} requested"
    print(f"{trials} trials of {steps} steps per run; {os.cpu_count()} cores; "
          f"storage {_storage.redact(workspace.storage)}")
    print("| workers | --threads | seconds (2 runs) | trials per minute | vs same workers, --threads 1 |")
    print("|---|---|---|---|---|")
    rate = {configuration: 60 * trials * 2 / sum(runs) for configuration, runs in seconds.items()}
    for (n_workers, threads), runs in seconds.items():
        shown = ", ".join(f"{s:.1f}" for s in runs)
        label = "none (default)" if threads is None else threads
        print(f"| {n_workers} | {label} | {shown} | {rate[n_workers, threads]:.1f} | "
              f"{rate[n_workers, threads] / rate[n_workers, 1]:.2f}x |")


def soak(workspace: Workspace, *, trials: int, steps: int, n_workers: int, kills: int, seed: int) -> bool:
    chooser = random.Random(seed)
    name, study_file = workspace.new_study(trials=trials, steps=steps)
    workers = [workspace.start_worker(study_file) for _ in range(n_workers)]
    while not any(t.state == TrialState.RUNNING for t in workspace.trials(name)):
        time.sleep(0.2)  # kill workers in their trials, not while they start up
    seen: dict[int, tuple] = {}
    started = {worker: time.monotonic() for worker in workers}
    sent = 0
    while sent < kills and any(w.poll() is None for w in workers):
        time.sleep(chooser.uniform(0.5, 4))
        seen.update(finished_results(workspace, name))
        working = [w for w in workers if w.poll() is None and time.monotonic() - started[w] > STARTUP_S]
        if working:
            chooser.choice(working).send_signal(signal.SIGKILL)
            sent += 1
            workers.append(workspace.start_worker(study_file))
            started[workers[-1]] = time.monotonic()
    wait_all(workers)
    resumes = 0
    while sum(t.state in FINISHED for t in workspace.trials(name)) < trials and resumes < 3:
        time.sleep(_storage.GRACE_PERIOD_S + 1)  # until killed workers' trials count as failed
        wait_all([workspace.start_worker(study_file)])
        resumes += 1
    return report(workspace, name, trials=trials, seen=seen, kills=sent, resumes=resumes)


def finished_results(workspace: Workspace, name: str) -> dict[int, tuple]:
    """Each finished trial's value and its stored artifact files, by trial number."""
    store = FileSystemArtifactStore(str(workspace.artifacts))
    results = {}
    for trial in workspace.trials(name):
        if trial.state not in FINISHED:
            continue
        files = []
        for meta in get_all_artifact_meta(trial, storage=workspace.opened):
            try:
                with store.open_reader(meta.artifact_id) as reader:
                    files.append((meta.filename, reader.read()))
            except Exception:
                files.append((meta.filename, None))
        results[trial.number] = (trial.state, trial.value, tuple(sorted(files)))
    return results


def report(
    workspace: Workspace, name: str, *, trials: int, seen: dict[int, tuple], kills: int, resumes: int
) -> bool:
    all_trials = workspace.trials(name)
    final = finished_results(workspace, name)
    changed = [n for n, result in seen.items() if final.get(n) != result]
    missing_files = [n for n, (_, _, files) in final.items() if len(files) < 2 or any(f is None for _, f in files)]
    surplus = [t for t in all_trials if t.user_attrs.get("stop_reason", "").startswith("not run")]
    killed = [t for t in all_trials if t.state == TrialState.FAIL and t not in surplus]
    retried = [t for t in all_trials if "failed_trial" in t.system_attrs]
    origins = [t.system_attrs["failed_trial"] for t in retried if t.state in FINISHED]
    duplicated = max(0, len(final) - trials) + len(origins) - len(set(origins))
    lost = max(0, trials - len(final)) + len(set(changed) | set(missing_files))
    running = sum(t.state == TrialState.RUNNING for t in all_trials)
    print(f"trials requested {trials}, finished {len(final)}, lost {lost}, duplicated {duplicated}; "
          f"SIGKILLs {kills}, trials killed mid-run {len(killed)}, re-run {len(retried)}, "
          f"not run (surplus) {len(surplus)}, resumed runs {resumes}, still running {running}")
    return lost == 0 and duplicated == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["throughput", "soak"])
    parser.add_argument("--trials", type=int)
    parser.add_argument("--steps", type=int, help="inner steps per trial (throughput 400, soak 1200)")
    parser.add_argument("--workers", type=int, default=2, help="soak: workers kept running")
    parser.add_argument("--kills", type=int, default=6, help="soak: SIGKILLs sent")
    parser.add_argument("--seed", type=int, default=0, help="soak: when and whom to kill")
    parser.add_argument("--storage", help="an Optuna storage URL (default: a new SQLite file)")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="hypermeta-workers-") as directory:
        workspace = Workspace(Path(directory), args.storage)
        if args.mode == "throughput":
            throughput(workspace, trials=args.trials or 16, steps=args.steps or 400)
        elif not soak(workspace, trials=args.trials or 40, steps=args.steps or 1200, n_workers=args.workers,
                      kills=args.kills, seed=args.seed):
            sys.exit(1)


if __name__ == "__main__":
    main()
