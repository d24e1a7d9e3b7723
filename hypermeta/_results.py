"""Reading stored studies back: trials, trajectories and learning curves, from the storage alone."""

from __future__ import annotations

import tempfile
from pathlib import Path

import optuna
import pandas as pd
from optuna.artifacts import download_artifact, get_all_artifact_meta

from hypermeta import _storage
from hypermeta._engine import TRAJECTORY_COLUMNS
from hypermeta._runner import EVALUATIONS_FILE, TRAJECTORY_FILE


def load_trajectories(*, study_name: str, storage: str | None = None, artifacts: str | None = None) -> pd.DataFrame:
    """Every trial's hyperparameter trajectory as one long DataFrame with a ``trial`` column.

    Args:
        study_name: the stored study.
        storage: its Optuna storage URL (default: the project's SQLite file).
        artifacts: the artifact directory, if not the default beside the database.

    Example:
        >>> import hypermeta
        >>> hypermeta.load_trajectories(study_name="digits-mlp")  # doctest: +SKIP
           trial  step name group  segment     value  hypergradient  train_loss  valid_loss
        0      0    20   lr   all        0  0.010000      -0.003172    1.967281    1.772015
    """
    return _load(study_name, storage, artifacts, TRAJECTORY_FILE, TRAJECTORY_COLUMNS)


def load_evaluations(*, study_name: str, storage: str | None = None, artifacts: str | None = None) -> pd.DataFrame:
    """Every trial's validation metrics at each evaluation step, with a ``trial`` column."""
    return _load(study_name, storage, artifacts, EVALUATIONS_FILE, ["step"])


def open_study(study_name: str, storage: str | None) -> optuna.Study:
    """A stored study, read-only in spirit: nothing is created if it is missing."""
    return _storage.load_study(_storage.open_storage(storage, create=False), study_name)


def trial_artifacts(study: optuna.Study, store, file_name: str) -> dict[int, pd.DataFrame]:
    """``file_name`` of each trial that stored one, by trial number."""
    frames = {}
    with tempfile.TemporaryDirectory() as directory:
        for trial in study.get_trials(deepcopy=False):
            metas = [m for m in get_all_artifact_meta(trial, storage=study._storage) if m.filename == file_name]
            if not metas:
                continue
            path = Path(directory) / f"{trial.number}-{file_name}"
            download_artifact(artifact_store=store, file_path=str(path), artifact_id=metas[-1].artifact_id)
            try:
                frames[trial.number] = pd.read_csv(path)
            except pd.errors.EmptyDataError:  # a run that ended before its first evaluation
                frames[trial.number] = pd.DataFrame()
    return frames


def trials_table(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: number, state, value, parameters, final hyperparameters, test metrics."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        values = trial.values or [None]
        row = {"trial": trial.number, "state": trial.state.name, "value": values[0] if len(values) == 1 else values}
        row.update({f"param {k}": v for k, v in trial.params.items()})
        row.update({f"final {k}": v for k, v in trial.user_attrs.get("hyperparameters", {}).items()})
        row.update({k: v for k, v in trial.user_attrs.items() if k.startswith("test_")})
        if "stop_reason" in trial.user_attrs:
            row["note"] = trial.user_attrs["stop_reason"]
        elif "fail_reason" in trial.system_attrs:
            row["note"] = trial.system_attrs["fail_reason"].splitlines()[0]
        rows.append(row)
    return pd.DataFrame(rows)


def _load(study_name, storage, artifacts, file_name, columns) -> pd.DataFrame:
    study = open_study(study_name, storage)
    store = _storage.artifact_store(storage, artifacts, create=False)
    frames = trial_artifacts(study, store, file_name)
    if not frames:
        return pd.DataFrame(columns=["trial", *columns])
    frame = pd.concat([f.assign(trial=n) for n, f in frames.items()], ignore_index=True)
    return frame[["trial", *[c for c in frame.columns if c != "trial"]]]
