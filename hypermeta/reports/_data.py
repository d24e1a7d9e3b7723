"""What a report is made of, read from the storage and its artifacts alone."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import optuna
import pandas as pd
from optuna.trial import TrialState

from hypermeta import _results, _storage
from hypermeta._errors import UsageError
from hypermeta._records import (
    EVALUATION_STEP,
    EVALUATIONS_FILE,
    LAYERS,
    STOP_REASON,
    STUDY_METRIC,
    TEST_PREFIX,
    TRAJECTORY_COLUMNS,
    TRAJECTORY_FILE,
    VALID_METRICS,
)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
METRIC_LABELS = {
    "valid_loss": "validation loss",
    "valid_accuracy": "validation accuracy",
    "valid_macro_f1": "validation macro-F1",
    "valid_f1": "validation F1",
    "objective": "objective value",
}
TEST_METRICS = ((f"{TEST_PREFIX}loss", "loss"), (f"{TEST_PREFIX}accuracy", "accuracy"),
                (f"{TEST_PREFIX}macro_f1", "macro-F1"), (f"{TEST_PREFIX}f1", "F1"))


@dataclass(frozen=True, kw_only=True)
class ReportData:
    """A stored study as the report sees it; build it with :func:`load_report_data`.

    ``trajectories`` and ``evaluations`` are long DataFrames with a ``trial`` column (finished
    trials only); ``trials`` is one row per trial, failed ones included; ``outcomes`` maps each
    trial number to ``"complete"``, ``"pruned"``, ``"diverged"``, ``"failed"``, ``"running"`` or
    ``"waiting"``; ``metric`` is the study's objective (``"valid_loss"``...) as found in the
    stored learning curves, or ``"objective"``; ``best_trial`` is ``None`` while no trial has completed.
    ``layers`` maps each parameter group to its module type and shape (``"Linear(64->128)"``) as the
    best trial (else the first finished one) stored it, marked ``(best trial)`` where trials differ;
    empty for studies stored before layers were recorded.
    """

    study_name: str
    storage: str
    study: optuna.Study
    direction: str
    metric: str
    trials: pd.DataFrame
    trajectories: pd.DataFrame
    evaluations: pd.DataFrame
    outcomes: dict[int, str]
    best_trial: int | None
    layers: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def metric_label(self) -> str:
        # a metric of the user's own (``valid_mae``) is labelled by its name
        return METRIC_LABELS.get(self.metric) or f"validation {self.metric.removeprefix('valid_')}"

    def finished(self) -> list[optuna.trial.FrozenTrial]:
        return self.study.get_trials(deepcopy=False, states=FINISHED)


def load_report_data(*, study_name: str, storage: str | None = None, artifacts: str | None = None) -> ReportData:
    """Everything a report of ``study_name`` shows, read from ``storage`` and its artifact store.

    Raises :class:`hypermeta._errors.UsageError` (one line, what to do) for an unknown study or
    storage, a study without a finished trial, and a missing or wrong artifact store.

    Example:
        >>> from hypermeta import reports
        >>> data = reports.load_report_data(study_name="digits-mlp")  # doctest: +SKIP
        >>> data.best_trial, data.metric  # doctest: +SKIP
        (2, 'valid_loss')
    """
    study = _results.open_study(study_name, storage)
    if len(study.directions) != 1:
        raise UsageError(
            f"study {study_name!r} has {len(study.directions)} objectives; reports cover single-objective studies"
        )
    finished = study.get_trials(deepcopy=False, states=FINISHED)
    if not finished:
        raise UsageError(f"study {study_name!r} has no finished trial yet; {_results.why_none_completed(study)}")
    store = _storage.artifact_store(storage, artifacts, create=False)
    notes: list[str] = []
    trajectories = _results.trial_artifacts(study, store, TRAJECTORY_FILE, trials=finished, notes=notes)
    if not trajectories:
        raise UsageError(
            f"study {study_name!r}: no finished trial has a stored trajectory in"
            f" {_storage.artifact_directory(storage, artifacts)};"
            " pass --artifacts DIR where the trajectories are"
        )
    evaluations = _results.trial_artifacts(study, store, EVALUATIONS_FILE, trials=finished, notes=notes)
    _results.warn_missing(notes, study_name, _storage.artifact_directory(storage, artifacts))
    complete = [t for t in finished if t.state == TrialState.COMPLETE]
    return ReportData(
        study_name=study_name,
        storage=_storage.redact(storage or _storage.default_url()),
        study=study,
        direction=study.direction.name.lower(),
        metric=study.user_attrs.get(STUDY_METRIC) or _objective_metric(complete, evaluations),
        trials=_results.trials_table(study),
        trajectories=_results.concat_by_trial(trajectories, TRAJECTORY_COLUMNS),
        evaluations=_results.concat_by_trial(evaluations, [EVALUATION_STEP]),
        outcomes={t.number: _outcome(t) for t in study.get_trials(deepcopy=False)},
        best_trial=study.best_trial.number if complete else None,
        layers=_layers(finished, study.best_trial if complete else None),
        notes=notes,
    )


def _objective_metric(complete, evaluations: dict[int, pd.DataFrame]) -> str:
    """Which stored validation metric the trials reported, for studies stored without it."""
    for metric in VALID_METRICS:
        checked = 0
        for trial in complete:
            frame = evaluations.get(trial.number)
            if frame is None or metric not in frame or frame.empty:
                continue
            checked += 1
            if not math.isclose(float(frame[metric].iloc[-1]), trial.value, rel_tol=1e-6, abs_tol=1e-9):
                break
        else:
            if checked:
                return metric
    return "objective"


def _layers(finished, best) -> dict[str, str]:
    """The stored layer descriptions of ``best`` (else of the first finished trial that has them)."""
    described = [t for t in finished if t.user_attrs.get(LAYERS)]
    if not described:
        return {}
    chosen = best if best is not None and best.user_attrs.get(LAYERS) else described[0]
    who = "best trial" if chosen is best else f"trial #{chosen.number}"
    return {
        group: text if all(t.user_attrs[LAYERS].get(group) == text for t in described) else f"{text} ({who})"
        for group, text in chosen.user_attrs[LAYERS].items()
    }


def _outcome(trial: optuna.trial.FrozenTrial) -> str:
    if trial.state == TrialState.PRUNED:
        return "diverged" if str(trial.user_attrs.get(STOP_REASON, "")).startswith("diverged") else "pruned"
    return {TrialState.COMPLETE: "complete", TrialState.FAIL: "failed"}.get(trial.state, trial.state.name.lower())
