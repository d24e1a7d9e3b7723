"""Reports of stored studies: how learning rates and weight decay moved during each trial.

Everything here reads the Optuna storage and its artifact store only; no study file and no
training code is needed. The figure functions return :class:`matplotlib.figure.Figure` objects
(drawn without pyplot), for notebooks; :func:`write_report` writes them all, with CSV files and an
offline ``index.html``, which is what ``hypermeta report NAME`` does.

Each figure function takes either ``study_name=`` (and ``storage=``, ``artifacts=``) or
``data=``, a :class:`ReportData` from :func:`load_report_data`, to read the storage once for
several figures. A figure with nothing to show (weight decay in a study without it, importances
with fewer than 2 completed trials) raises :class:`ValueError` saying why.

Example:
    >>> from hypermeta import reports
    >>> data = reports.load_report_data(study_name="digits-mlp", storage="sqlite:///studies.db")  # doctest: +SKIP
    >>> fig = reports.plot_learning_rates(data=data)  # doctest: +SKIP
    >>> fig.savefig("learning-rates.png")  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable

from matplotlib.figure import Figure

from hypermeta.reports import _figures
from hypermeta.reports._data import ReportData, load_report_data
from hypermeta.reports._html import AllReports, directory_name, write_all_reports, write_report

__all__ = [
    "AllReports",
    "ReportData",
    "directory_name",
    "load_report_data",
    "plot_hypergradients",
    "plot_learning_curves",
    "plot_learning_rates",
    "plot_optimization_history",
    "plot_param_importances",
    "plot_weight_decays",
    "write_all_reports",
    "write_report",
]


def plot_learning_rates(
    *, study_name: str | None = None, storage: str | None = None, artifacts: str | None = None,
    data: ReportData | None = None,
) -> Figure:
    """Learning rate against inner training step, one panel per layer, log scale.

    One line per trial and schedule segment (colour), every trial faint, the best trial bold.

    Example:
        >>> from hypermeta import reports
        >>> reports.plot_learning_rates(study_name="digits-mlp")  # doctest: +SKIP
        <Figure size 1000x500 with 2 Axes>
    """
    return _draw(_figures.learning_rates, study_name, storage, artifacts, data)


def plot_weight_decays(
    *, study_name: str | None = None, storage: str | None = None, artifacts: str | None = None,
    data: ReportData | None = None,
) -> Figure:
    """Weight decay against inner training step, one panel per layer (or one shared), log scale.

    Example:
        >>> from hypermeta import reports
        >>> reports.plot_weight_decays(study_name="digits-mlp")  # doctest: +SKIP
        <Figure size 1000x500 with 1 Axes>
    """
    return _draw(_figures.weight_decays, study_name, storage, artifacts, data)


def plot_hypergradients(
    *, study_name: str | None = None, storage: str | None = None, artifacts: str | None = None,
    data: ReportData | None = None,
) -> Figure:
    """d(validation loss)/d(log hyperparameter) at each hyper-step, one panel per hyperparameter and layer.

    Example:
        >>> from hypermeta import reports
        >>> reports.plot_hypergradients(study_name="digits-mlp")  # doctest: +SKIP
        <Figure size 1000x500 with 3 Axes>
    """
    return _draw(_figures.hypergradients, study_name, storage, artifacts, data)


def plot_learning_curves(
    *, study_name: str | None = None, storage: str | None = None, artifacts: str | None = None,
    data: ReportData | None = None,
) -> Figure:
    """The objective on the validation split against step for each trial; pruned trials marked where they stopped.

    Example:
        >>> from hypermeta import reports
        >>> reports.plot_learning_curves(study_name="digits-mlp")  # doctest: +SKIP
        <Figure size 1000x500 with 1 Axes>
    """
    return _draw(_figures.learning_curves, study_name, storage, artifacts, data)


def plot_optimization_history(
    *, study_name: str | None = None, storage: str | None = None, artifacts: str | None = None,
    data: ReportData | None = None,
) -> Figure:
    """Objective of each completed trial by trial number and the best so far (needs 2 completed trials).

    Example:
        >>> from hypermeta import reports
        >>> reports.plot_optimization_history(study_name="digits-mlp")  # doctest: +SKIP
        <Figure size 1000x500 with 1 Axes>
    """
    return _draw(_figures.optimization_history, study_name, storage, artifacts, data)


def plot_param_importances(
    *, study_name: str | None = None, storage: str | None = None, artifacts: str | None = None,
    data: ReportData | None = None,
) -> Figure:
    """Importance of each searched parameter by Optuna's fANOVA evaluator (needs 2 completed trials).

    Example:
        >>> from hypermeta import reports
        >>> reports.plot_param_importances(study_name="digits-mlp")  # doctest: +SKIP
        <Figure size 1000x500 with 1 Axes>
    """
    return _draw(_figures.param_importances, study_name, storage, artifacts, data)


def _draw(
    draw: Callable[[ReportData], Figure], study_name: str | None, storage: str | None, artifacts: str | None,
    data: ReportData | None,
) -> Figure:
    if (study_name is None) == (data is None):
        raise ValueError("give either study_name= (with storage= and artifacts= if not the defaults) or data=")
    if data is None:
        data = load_report_data(study_name=study_name, storage=storage, artifacts=artifacts)
    return draw(data)
