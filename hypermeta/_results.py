"""Reading stored studies back: trials, trajectories and learning curves, from the storage alone."""

from __future__ import annotations

import warnings

import optuna
import pandas as pd
from optuna.artifacts import get_all_artifact_meta
from optuna.artifacts.exceptions import ArtifactNotFound

from hypermeta import _storage
from hypermeta._records import (
    EVALUATIONS_FILE,
    FINISH,
    HYPERPARAMETERS,
    TEST_PREFIX,
    TRAJECTORY_COLUMNS,
    TRAJECTORY_FILE,
    trial_reason,
)


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


def trial_artifacts(
    study: optuna.Study, store, file_name: str, *, trials=None, notes: list[str] | None = None
) -> dict[int, pd.DataFrame]:
    """``file_name`` of each of ``trials`` (default: all) that stored one, by trial number.

    Hyperparameter names and groups stay strings (a layer named ``"0"`` is not the number 0).
    A file listed in the storage but missing from ``store`` is skipped, with a line in ``notes``.
    """
    frames = {}
    for trial in study.get_trials(deepcopy=False) if trials is None else trials:
        metas = [m for m in get_all_artifact_meta(trial, storage=study._storage) if m.filename == file_name]
        if not metas:
            continue
        try:
            with store.open_reader(metas[-1].artifact_id) as reader:
                frames[trial.number] = pd.read_csv(reader, dtype={"name": str, "group": str})
        except ArtifactNotFound:
            if notes is not None:
                notes.append(f"trial {trial.number}: {file_name} is missing from the artifact store")
        except pd.errors.EmptyDataError:  # a run that ended before its first hyper-step or evaluation
            frames[trial.number] = pd.DataFrame()
    return frames


def concat_by_trial(frames: dict[int, pd.DataFrame], columns: list[str]) -> pd.DataFrame:
    """One long DataFrame with a leading ``trial`` column (``columns`` when there is nothing)."""
    frames = {n: f for n, f in frames.items() if not f.empty}
    if not frames:
        return pd.DataFrame(columns=["trial", *columns])
    frame = pd.concat([f.assign(trial=n) for n, f in sorted(frames.items())], ignore_index=True)
    return frame[["trial", *[c for c in frame.columns if c != "trial"]]]


def trials_table(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: number, state, value, parameters, final hyperparameters, test metrics."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        values = trial.values or [None]
        row = {"trial": trial.number, "state": trial.state.name, "value": values[0] if len(values) == 1 else values}
        row.update({f"param {k}": v for k, v in trial.params.items()})
        row.update({f"final {k}": v for k, v in trial.user_attrs.get(HYPERPARAMETERS, {}).items()})
        row.update({k: v for k, v in trial.user_attrs.items() if k.startswith(TEST_PREFIX)})
        notes = [f"finishing run of trial {trial.user_attrs[FINISH]['of']}"] if FINISH in trial.user_attrs else []
        notes += [reason] if (reason := trial_reason(trial)) else []
        if notes:
            row["note"] = "; ".join(notes)
        rows.append(row)
    return pd.DataFrame(rows)


def why_none_completed(study: optuna.Study) -> str:
    """What to tell a user who asks for results of a study without a completed trial."""
    failed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))
    if not failed or len(failed) < len(study.get_trials(deepcopy=False)):
        return "run it first (hypermeta run STUDY_FILE)"
    return (f"all {len(failed)} of its trials failed, the last with: {trial_reason(failed[-1])};"
            " fix the study file, then run it again")


def _load(study_name, storage, artifacts, file_name, columns) -> pd.DataFrame:
    study = open_study(study_name, storage)
    store = _storage.artifact_store(storage, artifacts, create=False)
    notes: list[str] = []
    frames = trial_artifacts(study, store, file_name, notes=notes)
    warn_missing(notes, study_name, _storage.artifact_directory(storage, artifacts))
    return concat_by_trial(frames, columns)


def warn_missing(notes: list[str], study_name: str, directory) -> None:
    """One warning naming how many trials' files :func:`trial_artifacts` did not find."""
    trials = sorted({note.split(":")[0] for note in notes}, key=lambda t: int(t.split()[-1]))
    if trials:
        shown = ", ".join(trials[:5]) + (", ..." if len(trials) > 5 else "")
        warnings.warn(
            f"{len(trials)} trial(s) of study {study_name!r} have files missing from the artifact store {directory}"
            f" ({shown}); they are left out",
            _storage.MissingArtifactsWarning, stacklevel=3,
        )
