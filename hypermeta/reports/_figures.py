"""The report's figures, drawn on plain :class:`matplotlib.figure.Figure` objects (no pyplot state)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import optuna
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from hypermeta._records import SHARED_GROUP, layer_label
from hypermeta.reports._data import ReportData

WIDTH, HEIGHT, DPI = 10.0, 5.0, 100
MAX_HEIGHT = 11.0
BEST_WIDTH, FAINT_WIDTH = 2.4, 1.0
STEP_LABEL = "inner training step"
NAMES = {"lr": "learning rate", "weight_decay": "weight decay", "inner_lr": "inner learning rate"}
STOPPED = {"pruned": ("X", "tab:red"), "diverged": ("v", "tab:purple")}  # marker where such a trial stopped
MIN_IMPORTANCE_TRIALS = 10  # fANOVA over fewer completed trials is noise, not a ranking
PUSHES = {"up": "^", "down": "v"}  # hypergradient sign markers: < 0 pushes the value up


class NoData(ValueError):
    """A figure that has nothing to show for this study; the message says why."""


def learning_rates(data: ReportData) -> Figure:
    names = set(data.trajectories["name"])
    if "lr" not in names and "inner_lr" in names:  # an episodic (few-shot) study
        return _inner_rates_figure(data)
    return _trajectory_figure(data, "lr")


def _inner_rates_figure(data: ReportData) -> Figure:
    """Learned inner learning rates at the end of meta-training against inner step, one panel per layer."""
    frame = data.trajectories[data.trajectories["name"] == "inner_lr"]
    frame = frame[frame["step"] == frame.groupby("trial")["step"].transform("max")]
    groups = list(dict.fromkeys(frame["group"]))
    fig, axes = _panels(len(groups), sharey=True, xlabel="inner step")
    alpha = _faint_alpha(frame["trial"].nunique())
    for ax, group in zip(axes, groups, strict=False):
        for trial, line in frame[frame["group"] == group].groupby("trial", sort=True):
            best = trial == data.best_trial
            line = line.sort_values("segment")
            ax.plot(line["segment"] + 1, line["value"], marker="o", markersize=4, color="tab:blue",
                    linewidth=BEST_WIDTH if best else FAINT_WIDTH, alpha=1.0 if best else alpha,
                    zorder=3 if best else 2)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if groups != [SHARED_GROUP]:
            ax.set_title(_text(_group_label(data, group)), fontsize=10)
    for ax in axes:
        _log_scale(ax)
    fig.supylabel("inner learning rate (log scale)")
    fig.suptitle(_text(f"Learned inner learning rates after meta-training, study '{_name(data)}'"))
    handles = _best_handles(data, color="tab:blue", n_trials=frame["trial"].nunique())
    _figure_legend(fig, handles + _stop_handles(data, frame["trial"].unique()))
    return fig


def weight_decays(data: ReportData) -> Figure:
    return _trajectory_figure(data, "weight_decay")


def hypergradients(data: ReportData) -> Figure:
    """|hypergradient| on a log scale (magnitude), the best trial's points marked by sign (direction)."""
    frame = data.trajectories.dropna(subset=["hypergradient"])
    frame = frame[frame["hypergradient"] != 0]  # exactly 0: the segment was not active in that window
    if frame.empty:
        raise NoData("no hypergradients were recorded (the trials ran without hypergradient adaptation)")
    frame = frame.assign(magnitude=frame["hypergradient"].abs())
    panels = list(dict.fromkeys(zip(frame["name"], frame["group"], strict=True)))
    fig, axes = _panels(len(panels), sharey=False, stacked=True)
    for ax, (name, group) in zip(axes, panels, strict=False):
        rows = frame[(frame["name"] == name) & (frame["group"] == group)]
        _draw_lines(ax, data, rows, "magnitude")
        _mark_signs(ax, data, rows)
        _log_scale(ax)
        ax.set_title(_text(f"{NAMES.get(name, name)}, {_group_label(data, group)}"), fontsize=10)
    fig.supylabel("|d(validation loss) / d(log value)| (log scale)")
    fig.suptitle(_text(f"Hypergradients of the validation loss, study '{_name(data)}'"))
    sign_handles = [
        Line2D([], [], linestyle="none", marker=PUSHES["up"], color="0.2",
               label="best trial, < 0: pushes the value up"),
        Line2D([], [], linestyle="none", marker=PUSHES["down"], markerfacecolor="white", color="0.2",
               label="> 0: pushes it down"),
    ]
    _legend(fig, data, frame, extra=sign_handles if data.best_trial in set(frame["trial"]) else [])
    return fig


def _mark_signs(ax, data: ReportData, rows) -> None:
    """The best trial's hypergradients marked by direction: filled up (value pushed up), hollow down."""
    best = rows[rows["trial"] == data.best_trial]
    segments = _segments(data)
    for segment, line in best.groupby("segment"):
        up = line["hypergradient"] < 0
        color = segments[segment]
        ax.plot(line.loc[up, "step"], line.loc[up, "magnitude"], linestyle="none", marker=PUSHES["up"],
                markersize=5, color=color, zorder=4)
        ax.plot(line.loc[~up, "step"], line.loc[~up, "magnitude"], linestyle="none", marker=PUSHES["down"],
                markersize=5, color=color, markerfacecolor="white", zorder=4)


def learning_curves(data: ReportData) -> Figure:
    trials = [t for t in data.finished() if t.intermediate_values]
    if not trials:
        raise NoData("no trial reported a validation metric")
    fig, (ax,) = _panels(1, sharey=False)
    alpha = _faint_alpha(len(trials))
    for trial in sorted(trials, key=lambda t: t.number == data.best_trial):
        steps = sorted(trial.intermediate_values)
        values = [trial.intermediate_values[s] for s in steps]
        best = trial.number == data.best_trial
        ax.plot(steps, values, color="tab:blue", linewidth=BEST_WIDTH if best else FAINT_WIDTH,
                alpha=1.0 if best else alpha, zorder=3 if best else 2)
        _mark_stop(ax, data, trial.number, steps[-1], values[-1])
    all_values = [v for t in trials for v in t.intermediate_values.values()]
    log = _use_log(data.metric, all_values)
    if log:
        _log_scale(ax)
    ax.set_ylabel(_metric_axis(data, log))
    ax.set_title(_text(f"Learning curves ({data.direction}), study '{_name(data)}'"))
    handles = _best_handles(data, color="tab:blue", n_trials=len(trials))
    handles += _stop_handles(data, [t.number for t in trials])
    _figure_legend(fig, handles)
    return fig


def optimization_history(data: ReportData) -> Figure:
    complete = sorted(
        (t for t in data.finished() if t.state == optuna.trial.TrialState.COMPLETE), key=lambda t: t.number
    )
    if len(complete) < 2:
        raise NoData(f"the optimization history needs at least 2 completed trials; this study has {len(complete)}")
    fig, (ax,) = _panels(1, sharey=False, xlabel="trial number")
    numbers = [t.number for t in complete]
    values = np.array([t.value for t in complete])
    best = np.minimum.accumulate(values) if data.direction == "minimize" else np.maximum.accumulate(values)
    stopped = [t for t in data.finished() if t.state == optuna.trial.TrialState.PRUNED and t.value is not None]
    ax.plot(numbers, values, linestyle="none", marker="o", color="tab:blue", alpha=0.7, label="completed trial")
    if stopped:
        ax.plot([t.number for t in stopped], [t.value for t in stopped], linestyle="none", marker="X",
                color="tab:red", alpha=0.6, label="pruned / diverged (last reported)")
    last = max(t.number for t in data.finished())  # carry the best on past later pruned trials
    ax.step([*numbers, last], [*best, best[-1]], where="post", color="tab:orange", linewidth=BEST_WIDTH,
            label="best so far")
    log = _use_log(data.metric, [*values, *(t.value for t in stopped)])
    if log:
        _log_scale(ax)
    ax.set_ylabel(_metric_axis(data, log))
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_title(_text(f"Optimization history ({data.direction}), study '{_name(data)}'"))
    _figure_legend(fig, ax.get_legend_handles_labels()[0])
    return fig


def param_importances(data: ReportData) -> Figure:
    complete = data.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < MIN_IMPORTANCE_TRIALS:
        raise NoData(
            f"parameter importances would rest on {len(complete)} completed trial{'s' * (len(complete) != 1)};"
            f" they are drawn from {MIN_IMPORTANCE_TRIALS} on (pruned and failed trials do not count)"
        )
    varying = {
        name for name in set().union(*(t.params for t in complete))
        if len({repr(t.params.get(name)) for t in complete}) > 1
    }
    if not varying:
        raise NoData("parameter importances need parameters that vary between completed trials")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            importances = optuna.importance.get_param_importances(
                data.study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)
            )
    except (ValueError, RuntimeError, ImportError) as error:  # e.g. no parameter common to all trials
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        raise NoData(f"Optuna could not evaluate parameter importances: {reason}") from None
    if not importances:
        raise NoData("no parameter is shared by all completed trials")
    names = list(importances)[::-1]  # most important on top
    values = [float(importances[n]) for n in names]
    height = min(MAX_HEIGHT, max(HEIGHT, 0.45 * len(names) + 1.5))
    fig = Figure(figsize=(WIDTH, height), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    bars = ax.barh(range(len(names)), values, color="tab:blue")
    ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], padding=3, fontsize=9)
    ax.set_yticks(range(len(names)), labels=[_text(_shorten(n, 40)) for n in names])
    ax.set_xlim(0, max(values) * 1.15 if max(values) > 0 else 1)
    ax.set_xlabel(f"importance (share of objective variance, fANOVA over {len(complete)} completed trials)")
    ax.set_title(_text(f"Parameter importances from {len(complete)} completed trials, study '{_name(data)}'"))
    return fig


def _trajectory_figure(data: ReportData, name: str) -> Figure:
    """One panel per layer (shared y axis, log scale), one line per trial and schedule segment."""
    frame = data.trajectories[data.trajectories["name"] == name]
    if frame.empty:
        raise NoData(f"no {NAMES[name]} was adapted in this study")
    groups = list(dict.fromkeys(frame["group"]))
    fig, axes = _panels(len(groups), sharey=True)
    for ax, group in zip(axes, groups, strict=False):
        _draw_lines(ax, data, frame[frame["group"] == group], "value")
        if groups != [SHARED_GROUP]:
            ax.set_title(_text(_group_label(data, group)), fontsize=10)
    for ax in axes:
        _log_scale(ax)
    fig.supylabel(f"{NAMES[name]} (log scale)")
    per = "per layer" if len(groups) > 1 else "shared by all layers" if groups == [SHARED_GROUP] else ""
    fig.suptitle(_text(f"Adaptive {NAMES[name]} {per}, study '{_name(data)}'".replace("  ", " ")))
    _legend(fig, data, frame)
    return fig


def _draw_lines(ax, data: ReportData, rows, column: str) -> None:
    """One line per (trial, schedule segment): colour by segment, the best trial bold, the rest faint."""
    segments = _segments(data)
    alpha = _faint_alpha(rows["trial"].nunique())
    for (trial, segment), line in rows.groupby(["trial", "segment"], sort=True):
        best = trial == data.best_trial
        ax.plot(line["step"], line[column], color=segments[segment], linewidth=BEST_WIDTH if best else FAINT_WIDTH,
                alpha=1.0 if best else alpha, zorder=3 if best else 2)
        _mark_stop(ax, data, trial, line["step"].iloc[-1], line[column].iloc[-1])


def _mark_stop(ax, data: ReportData, trial: int, step, value) -> None:
    if data.outcomes.get(trial) in STOPPED:
        marker, color = STOPPED[data.outcomes[trial]]
        ax.plot([step], [value], linestyle="none", marker=marker, markersize=7, color=color, zorder=4)


def _stop_handles(data: ReportData, trials) -> list[Line2D]:
    handles = []
    for outcome, (marker, color) in STOPPED.items():
        n = sum(data.outcomes.get(t) == outcome for t in set(trials))
        if n:
            handles.append(Line2D([], [], linestyle="none", marker=marker, markersize=7, color=color,
                                  label=f"{outcome}: stopped here ({n})"))
    return handles


def _legend(fig: Figure, data: ReportData, frame, *, extra=()) -> None:
    """Best and other trials in the colour of their lines (the first segment's), then one swatch per segment."""
    segments = _segments(data)
    shown = sorted(frame["segment"].unique())
    handles = _best_handles(data, color=segments[shown[0]], n_trials=frame["trial"].nunique())
    if len(shown) > 1:
        handles += [Patch(color=segments[s], label=f"schedule segment {s}") for s in shown]
    handles += [*extra, *_stop_handles(data, frame["trial"].unique())]
    _figure_legend(fig, handles)


def _figure_legend(fig: Figure, handles) -> None:
    """Below the panels, where it covers no data and leaves the panels the full width."""
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 4), fontsize=9, frameon=False)


def _best_handles(data: ReportData, *, color: str, n_trials: int) -> list[Line2D]:
    handles = []
    if data.best_trial is not None:
        handles.append(Line2D([], [], color=color, linewidth=BEST_WIDTH, label=f"best trial #{data.best_trial}"))
    others = n_trials - (data.best_trial is not None)
    if others > 0:
        handles.append(Line2D([], [], color=color, linewidth=FAINT_WIDTH, alpha=0.5,
                              label=f"other trials ({others})"))
    return handles


def _panels(n: int, *, sharey: bool, stacked: bool = False, xlabel: str = STEP_LABEL):
    """A grid of ``n`` panels: side by side for a few, or ``stacked`` in one column (wide time series)."""
    if stacked:
        ncols = 1 if n <= 3 else 2 if n <= 8 else 3
        row = 2.3
    else:
        ncols = n if n <= 3 else 2 if n == 4 else 3
        row = 2.8
    nrows = math.ceil(n / ncols)
    height = min(MAX_HEIGHT, max(HEIGHT, row * nrows + 1.2))
    fig = Figure(figsize=(WIDTH, height), dpi=DPI, layout="constrained")
    axes = fig.subplots(nrows, ncols, sharex=True, sharey=sharey, squeeze=False).flatten()
    for index, ax in enumerate(axes):
        ax.grid(True, which="major", alpha=0.3)
        if index >= n:
            ax.set_visible(False)
            axes[index - ncols].xaxis.set_tick_params(labelbottom=True)
        if n - ncols <= index < n:  # the lowest panel of its column
            ax.set_xlabel(xlabel)
    return fig, list(axes[:n])


def _segments(data: ReportData) -> dict[int, str]:
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive"]
    segments = sorted(data.trajectories["segment"].unique()) if not data.trajectories.empty else [0]
    return {s: palette[i % len(palette)] for i, s in enumerate(segments)}


def _log_scale(ax) -> None:
    """Log scale with plain numbers (0.02, 0.05, 0.1) as labels, enough of them even within one decade."""
    ax.set_yscale("log")
    low, high = ax.get_ylim()
    decades = math.log10(high / low) if low > 0 and high > low else 1.0
    subs = (1.0,) if decades > 3 else (1.0, 2.0, 5.0) if decades > 1.2 else (1.0, 1.5, 2.0, 3.0, 5.0, 7.0)
    locator = LogLocator(base=10, subs=subs, numticks=15)
    if sum(low <= tick <= high for tick in locator.tick_values(low, high)) < 2:
        return  # a very narrow range: matplotlib's own log ticks label the minor ticks then
    ax.yaxis.set_major_locator(locator)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _faint_alpha(n_trials: int) -> float:
    """Faint enough that many trials make a cloud, visible enough that a few still show."""
    return float(min(0.45, max(0.08, 4.0 / max(n_trials, 1))))


def _use_log(metric: str, values) -> bool:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return "loss" in metric and bool(finite) and min(finite) > 0


def _metric_axis(data: ReportData, log: bool) -> str:
    unit = {"valid_accuracy": " (fraction correct)", "valid_macro_f1": " (0 to 1)"}.get(data.metric, "")
    return f"{data.metric_label}{unit}" + (" (log scale)" if log else "")


def _name(data: ReportData) -> str:
    return _shorten(data.study_name, 50)


def _group_label(data: ReportData, group: str) -> str:
    """``layer 0 Linear(64->128)``: module path and type as the best trial stored them (bare name if not stored)."""
    if group == SHARED_GROUP:
        return "all layers (one shared value)"
    label = layer_label(group, data.layers)
    return f"layer {_shorten(label, 60)}"


def _shorten(text: str, limit: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _text(text: str) -> str:
    """User text for matplotlib: no mathtext (``$...$``), one line, not too long."""
    return _shorten(text, 110).replace("$", r"\$")
