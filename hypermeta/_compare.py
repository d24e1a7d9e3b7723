"""``hypermeta compare``: hypergradients inside trials against black-box search, at equal budget.

Five arms share one budget, counted in inner training steps or in wall-clock seconds (whichever
the user fixes; the other is recorded):

1. ``hypermeta``: Optuna (TPE) over the study's own choices and the initial values; hypergradients
   move the differentiable hyperparameters inside each trial;
2. ``tpe``: every differentiable hyperparameter (each group and segment) is an ordinary Optuna
   parameter over the same range, held fixed during the trial;
3. ``random``: random search over the space of 2;
4. ``hyperband``: TPE over the space of 2 with Hyperband pruning, Optuna's multi-fidelity search
   for a budget: poor trials stop at geometric rungs (the study's evaluation cadence times powers
   of 3), leaving the budget to more trials;
5. ``defaults``: the study's defaults (the middle of every range, the first of every choice)
   trained once, without hypergradients, for the whole budget.

The other search arms use the study's pruner; every arm runs with the same seeds.

With ``finish`` (``--finish 0.75``) each search arm searches for the rest of its budget only and
then spends that fraction on one finishing run of its best trial's choices: hypermeta's from the
values that trial learned, hypergradients moving them on; a black-box arm's at its values, fixed.
It is what a user does after a search, counted inside the same budget.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import torch
from matplotlib.figure import Figure

from hypermeta._engine import Hypergradient, TrainResult
from hypermeta._errors import UsageError
from hypermeta._private.files import check_target, staged_directory
from hypermeta._records import FAIL_REASON, FINISH, trial_reason
from hypermeta._runner import UNTIL_THE_DEADLINE, TrialRunner, enqueue_finish
from hypermeta._study import (
    Setup,
    Study,
    evaluation_cadence,
    hyperparameter_keys,
    resolve,
    spec_of,
    starting_value,
)

ARMS = ("hypermeta", "tpe", "random", "hyperband", "defaults")
HYPERBAND_REDUCTION_FACTOR = 3
MAX_FAILURES_IN_A_ROW = 5


@dataclass(frozen=True, kw_only=True)
class Budget:
    """The total each arm may spend: inner steps or seconds."""

    steps: int | None = None
    seconds: float | None = None
    finish: float | None = None  # the fraction a search arm keeps for one finishing run of its best trial

    def __post_init__(self) -> None:
        if (self.steps is None) == (self.seconds is None):
            raise UsageError("give exactly one of --budget-steps and --budget-seconds")
        if self.finish is not None and not 0 < self.finish < 1:
            raise UsageError(f"--finish must be a fraction between 0 and 1, got {self.finish!r}; try --finish 0.75")

    @property
    def searching(self) -> float:
        """What a search arm spends on its search, before the finishing run."""
        return self.total * (1 - (self.finish or 0))

    @property
    def unit(self) -> str:
        return "steps" if self.steps is not None else "seconds"

    @property
    def total(self) -> float:
        return self.steps if self.steps is not None else self.seconds


def run_arms(study: Study, *, budget: Budget, seeds: int, device: str = "cpu", log=print) -> pd.DataFrame:
    """One row per trial of every arm and seed, with cumulative steps and seconds."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    frames = []
    for seed in range(seeds):
        for arm in ARMS:
            started = time.perf_counter()
            rows = _defaults(study, budget, seed, device) if arm == "defaults" else _search(
                study, arm, budget, seed, device, log=log
            )
            frame = pd.DataFrame(rows).assign(arm=arm, seed=seed)
            frame["cum_steps"] = frame["steps"].cumsum()
            frame["cum_seconds"] = frame["seconds"].cumsum()
            frames.append(frame)
            log(f"seed {seed} {arm:>9}: {len(frame)} trials, {time.perf_counter() - started:.1f} s")
    return pd.concat(frames, ignore_index=True)


def _search(study: Study, arm: str, budget: Budget, seed: int, device: str, log=print) -> list[dict]:
    search = search_study(study, arm=arm, seed=seed)
    started = time.perf_counter()
    # the trial that crosses the search's deadline is pruned there, and one that crosses the budget is not counted
    deadline = started + budget.searching if budget.seconds else None
    online = arm == "hypermeta"
    runner = TrialRunner(study, seed=seed * 10_000, device=device, online=online, deadline=deadline)
    rows: list[dict] = []
    last = [started]

    def on_trial_end(search: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        now = time.perf_counter()
        rows.append(_row(trial, seconds=now - last[0]))
        last[0] = now
        recent = [row["state"] for row in rows[-MAX_FAILURES_IN_A_ROW:]]
        if len(recent) == MAX_FAILURES_IN_A_ROW and set(recent) == {"FAIL"}:
            search.stop()
        if sum(row[budget.unit] for row in rows) >= budget.searching:
            search.stop()

    search.optimize(runner, catch=(Exception,), callbacks=[on_trial_end])
    if rows and all(row["state"] == "FAIL" for row in rows):
        reason = search.trials[-1].user_attrs.get(FAIL_REASON, "unknown").splitlines()[0]
        raise UsageError(f"every {arm} trial failed ({reason}); fix the study file")
    if budget.finish and _enqueue_finish(search, budget=budget, online=online, started=started, rows=rows, log=log):
        search.optimize(runner, n_trials=1, catch=(Exception,), callbacks=[on_trial_end])
        finishing = search.trials[-1]
        if finishing.state != optuna.trial.TrialState.COMPLETE:
            reason = trial_reason(finishing) or "unknown"
            log(f"{search.study_name}: the finishing run ended {finishing.state.name}: {reason.splitlines()[0]}")
    return rows


def _enqueue_finish(search: optuna.Study, *, budget: Budget, online: bool, started: float, rows: list[dict], log):
    """Queue the finishing run: the best trial's choices for the rest of the budget; False if there is none.

    Under a budget of seconds it trains until the budget's deadline, as the defaults arm's run does
    (guessing its length from the best trial's pace would end it early, leaving budget unspent).
    """
    if not search.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        log(f"{search.study_name}: no trial completed before the finishing run; none was run")
        return False
    left = budget.total - (sum(row["steps"] for row in rows) if budget.steps else time.perf_counter() - started)
    if left <= 0:
        log(f"{search.study_name}: the search spent the whole budget; no finishing run was run")
        return False
    enqueue_finish(search, search.best_trial, online=online, **{budget.unit: left})
    return True


def search_study(study: Study, *, arm: str, seed: int) -> optuna.Study:
    """The in-memory Optuna study a search arm runs in, with the arm's sampler and pruner.

    It is named after the study, arm and seed: Hyperband assigns trials to brackets by the study's
    name, and a name drawn at random would make the arm differ from run to run.
    """
    sampler = optuna.samplers.RandomSampler(seed=seed) if arm == "random" else optuna.samplers.TPESampler(seed=seed)
    pruner = _hyperband(study) if arm == "hyperband" else study.make_pruner()
    return optuna.create_study(
        study_name=f"compare {study.name} {arm} seed {seed}", direction=study.direction, sampler=sampler, pruner=pruner
    )


def _hyperband(study: Study) -> optuna.pruners.HyperbandPruner:
    """Hyperband over a black-box trial's evaluations: the step is the resource, one evaluation the least."""
    _, setup, _ = _black_box_defaults(study)
    return optuna.pruners.HyperbandPruner(
        min_resource=min(evaluation_cadence(setup), setup.steps), max_resource=setup.steps,
        reduction_factor=HYPERBAND_REDUCTION_FACTOR,
    )


def _row(trial: optuna.trial.FrozenTrial, *, seconds: float) -> dict:
    return {
        "trial": trial.number,
        "state": trial.state.name,
        "value": trial.value if trial.state == optuna.trial.TrialState.COMPLETE else math.nan,
        "steps": trial.user_attrs.get("steps", 0),
        "seconds": seconds,
        "finish": FINISH in trial.user_attrs,
        **{k: v for k, v in trial.user_attrs.items() if k.startswith("test_")},
        **{f"param {name}": value for name, value in trial.params.items()},
    }


def _defaults(study: Study, budget: Budget, seed: int, device: str) -> list[dict]:
    """The study's defaults trained once, for the whole budget."""
    return [long_run(study, budget=budget, seed=seed, device=device)]


def long_run(
    study: Study, *, budget: Budget, seed: int, device: str = "cpu", hypergradient: Hypergradient | None = None,
    on_result: Callable[[TrainResult], None] | None = None,
) -> dict:
    """One run from the study's defaults for the whole budget; its row of the trials table.

    Without ``hypergradient`` the values stay at the defaults (the ``defaults`` arm); with it they
    start there and follow hypergradients (``benchmarks/long_run.py``). The row adds ``final
    <key>`` for every value the run ended with; ``on_result`` is given the run's
    :class:`~hypermeta.TrainResult` (its evaluations and trajectory) once the run is timed.
    """
    defaults, setup, values = _black_box_defaults(study)
    setup = dataclasses.replace(setup, hypergradient=hypergradient)
    torch.manual_seed(seed * 10_000)
    started = time.perf_counter()
    steps = budget.steps or UNTIL_THE_DEADLINE
    eval_every = evaluation_cadence(setup)  # the study's cadence, not the long run's
    result = dataclasses.replace(setup, steps=steps, eval_every=eval_every).train(
        initial_values=values, seed=seed * 10_000, device=device, seconds=budget.seconds,
    )
    value = float(result.evaluations[study.metric].iloc[-1]) if len(result.evaluations) else math.nan
    test = setup.test_metrics(result, device=device, seed=seed * 10_000)
    seconds = time.perf_counter() - started
    if on_result is not None:
        on_result(result)
    return {
        "trial": 0, "state": "COMPLETE" if math.isfinite(value) else "FAIL", "value": value,
        "steps": result.steps, "seconds": seconds, "finish": False,
        **{f"test_{k}": v for k, v in test.items()},
        **{f"param {name}": v for name, v in {**defaults.params, **values}.items()},
        **{f"final {key}": v for key, v in result.hyperparameters.items()},
    }


def _black_box_defaults(study: Study) -> tuple[optuna.trial.FixedTrial, Setup, dict[str, float]]:
    """The study's defaults as a black-box trial: the default trial, its set-up without hypergradients,
    and the entries' starting values."""
    defaults = default_trial(study)
    setup = study.build(defaults)
    values = {key: starting_value(spec_of(setup, key)) for key in hyperparameter_keys(setup)}
    setup, _ = resolve(setup, optuna.trial.FixedTrial(values), online=False)
    return defaults, setup, values


def default_trial(study: Study) -> optuna.trial.FixedTrial:
    """A trial that answers every ``suggest_*`` of ``study.build`` with its default."""
    probe = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    study.build(probe)
    return optuna.trial.FixedTrial({name: _default(d) for name, d in probe.distributions.items()})


def _default(distribution: optuna.distributions.BaseDistribution):
    if isinstance(distribution, optuna.distributions.CategoricalDistribution):
        return distribution.choices[0]
    low, high = distribution.low, distribution.high
    middle = math.sqrt(low * high) if distribution.log else (low + high) / 2
    if isinstance(distribution, optuna.distributions.IntDistribution):
        step = distribution.step
        return int(low + round((middle - low) / step) * step)
    return middle


def within_budget(trials: pd.DataFrame, budget: Budget) -> pd.Series:
    """Which trials ended within the budget (the defaults arm's one run, and a finishing run, always do:
    they end at the budget's deadline, then evaluate)."""
    finishing = trials["finish"].eq(True) if "finish" in trials else False
    return (trials[f"cum_{budget.unit}"] <= budget.total * (1 + 1e-9)) | (trials["arm"] == "defaults") | finishing


def summarize(counted: pd.DataFrame, *, direction: str) -> pd.DataFrame:
    """Per arm and seed: the best of the ``counted`` trials, its test metrics, and what was spent."""
    rows = []
    tests = [column for column in counted.columns if column.startswith("test_")]
    for (arm, seed), within in counted.groupby(["arm", "seed"]):
        done = within[within["value"].notna()]
        best = done.loc[done["value"].idxmin() if direction == "minimize" else done["value"].idxmax()] if len(
            done) else None
        rows.append({
            "arm": arm, "seed": seed, "trials": len(within),
            "best valid": best["value"] if best is not None else math.nan,
            "steps": int(within["steps"].sum()), "seconds": float(within["seconds"].sum()),
            **{_test_label(column): best[column] if best is not None else math.nan for column in tests},
        })
    return pd.DataFrame(rows)


def _test_label(column: str) -> str:
    """``test_macro_f1`` -> ``test macro-F1``, ``test_mae`` -> ``test mae``."""
    return "test " + {"macro_f1": "macro-F1"}.get(column.removeprefix("test_"), column.removeprefix("test_"))


def _test_columns(summary: pd.DataFrame) -> list[str]:
    """The test metrics some arm measured: accuracy and macro-F1 first, the loss last."""
    present = [c for c in summary.columns if c.startswith("test ") and summary[c].notna().any()]
    order = {"test accuracy": 0, "test macro-F1": 1, "test loss": 3}
    return sorted(present, key=lambda column: (order.get(column, 2), column))


def budget_fraction_to_reach(counted: pd.DataFrame, *, seed: int, budget: Budget, direction: str) -> float:
    """The fraction of the budget after which hypermeta first matched TPE's best within the whole budget."""
    axis = f"cum_{budget.unit}"
    of_seed = counted[(counted["seed"] == seed) & counted["value"].notna()]
    tpe = of_seed[of_seed["arm"] == "tpe"]["value"]
    ours = of_seed[of_seed["arm"] == "hypermeta"]
    if tpe.empty or ours.empty:
        return math.nan
    target = tpe.min() if direction == "minimize" else tpe.max()
    reached = ours["value"] <= target if direction == "minimize" else ours["value"] >= target
    return _first_fraction(ours.loc[reached, axis], budget)


def median_fraction_to_reach(counted: pd.DataFrame, summary: pd.DataFrame, *, budget: Budget, direction: str) -> float:
    """The fraction of the budget after which hypermeta's median best-so-far first matched TPE's
    median best over the whole budget (``inf``: never; NaN: an arm has no completed trial)."""
    target = summary.loc[summary["arm"] == "tpe", "best valid"].median()
    ours = counted[counted["arm"] == "hypermeta"]
    if not math.isfinite(target) or ours["value"].isna().all():
        return math.nan
    x, median, _, _ = _median_best(ours, f"cum_{budget.unit}", direction)
    reached = median <= target if direction == "minimize" else median >= target
    return _first_fraction(x[reached], budget)


def _first_fraction(reached_at, budget: Budget) -> float:
    """The fraction of the budget at the first of ``reached_at`` (``inf``: none). A finishing run, as
    the defaults arm's run, ends with an evaluation just past the budget: that is all of it."""
    return min(float(reached_at.min() / budget.total), 1.0) if len(reached_at) else math.inf


def write_report(study: Study, trials: pd.DataFrame, *, budget: Budget, out: Path) -> Path:
    """Write the comparison into ``out`` (replacing an older one only once the new one is complete)."""
    check_target(out, study.name)
    trials = trials.assign(within_budget=within_budget(trials, budget))
    counted = trials[trials["within_budget"]]
    summary = summarize(counted, direction=study.direction)
    fractions = [
        budget_fraction_to_reach(counted, seed=seed, budget=budget, direction=study.direction)
        for seed in sorted(trials["seed"].unique())
    ]
    median_fraction = median_fraction_to_reach(counted, summary, budget=budget, direction=study.direction)
    with staged_directory(out, study.name) as staging:
        trials.to_csv(staging / "trials.csv", index=False)
        summary.to_csv(staging / "summary.csv", index=False)
        table = markdown_table(
            summary, study=study, budget=budget, fractions=fractions, median_fraction=median_fraction
        )
        (staging / "README.md").write_text(table)
        for axis in ("steps", "seconds"):
            figure = plot_best_so_far(
                counted, axis=axis, study_name=study.name, metric=study.metric, direction=study.direction
            )
            figure.savefig(staging / f"best_vs_{axis}.png", dpi=100)
    return out


def markdown_table(
    summary: pd.DataFrame, *, study: Study, budget: Budget, fractions: list[float], median_fraction: float
) -> str:
    tests = _test_columns(summary)
    lines = [
        f"# compare {study.name}: equal budget of {budget.total:g} {budget.unit}, {summary['seed'].nunique()} seeds",
        "",
        f"Median over seeds [min, max]; `best valid` is the best {study.metric} within the budget.",
        *(["", f"Each search arm spent the last {budget.finish:g} of its budget on one finishing run of its best "
               "trial's choices (hypermeta's from the values that trial learned, adapting)."] if budget.finish else []),
        "",
        "| arm | best valid | " + "".join(f"{column} | " for column in tests) + "trials | steps | seconds |",
        "|---|---|" + "---|" * len(tests) + "---|---|---|",
    ]
    for arm in ARMS:
        rows = summary[summary["arm"] == arm]
        lines.append(
            f"| {arm} | {_spread(rows['best valid'], '.4f')} | "
            + "".join(f"{_spread(rows[column], '.3f' if column != 'test loss' else '.4f')} | " for column in tests)
            + f"{rows['trials'].median():.0f} | {rows['steps'].median():.0f} | {rows['seconds'].median():.1f} |"
        )
    shown = ", ".join(_fraction(f) for f in fractions)
    medians = summary.groupby("arm")["best valid"].median()
    better = medians.lt if study.direction == "minimize" else medians.gt
    ahead = [arm for arm in ARMS if arm != "hypermeta" and arm in medians and better(medians["hypermeta"])[arm]]
    lines += [
        "",
        f"Fraction of the budget after which hypermeta matched TPE's full-budget best, per seed: {shown}; "
        f"hypermeta's median best-so-far matched TPE's median best after {_fraction(median_fraction)}.",
        "",
        "hypermeta's median best valid is at or ahead of every other arm's."
        if not ahead else f"Arms ahead of hypermeta in the median: {', '.join(ahead)}.",
    ]
    return "\n".join(lines) + "\n"


def _fraction(fraction: float) -> str:
    return "never" if math.isinf(fraction) else "-" if math.isnan(fraction) else f"{fraction:.2f}"


def _spread(values: pd.Series, spec: str) -> str:
    values = values.dropna()
    if values.empty:
        return "-"
    return f"{values.median():{spec}} [{values.min():{spec}}, {values.max():{spec}}]"


ARM_STYLES = {  # colour, line style, marker: every arm distinguishable in colour and in grey
    "hypermeta": ("tab:blue", "-", "o"),
    "tpe": ("tab:orange", "--", "s"),
    "random": ("tab:green", ":", "^"),
    "hyperband": ("tab:purple", "-.", "D"),
    "defaults": ("tab:red", "none", "*"),
}


def plot_best_so_far(trials: pd.DataFrame, *, axis: str, study_name: str, metric: str, direction: str) -> Figure:
    """Best-so-far ``metric`` against the budget spent (``axis``: steps or seconds), median over seeds.

    Each arm's line starts once every seed has a completed trial and ends where its last seed
    stopped; the defaults arm (one long run per seed) is a single point. A narrow panel on the
    right shows each arm's final best: median and range over seeds.
    """
    column = f"cum_{axis}"
    figure = Figure(figsize=(10, 5.5), layout="constrained")
    ax, finals = figure.subplots(1, 2, sharey=True, width_ratios=[6, 1])
    arms = [arm for arm in ARMS if arm in set(trials["arm"])]
    for index, arm in enumerate(arms):
        color, linestyle, marker = ARM_STYLES[arm]
        x, median, low, high = _median_best(trials[trials["arm"] == arm], column, direction)
        if not len(x):
            continue
        size = 11 if marker == "*" else 6
        ax.plot(x, median, drawstyle="steps-post", color=color, linestyle=linestyle, marker=marker,
                markersize=size, linewidth=2, label=arm, zorder=3)
        finals.errorbar([index], [median[-1]], yerr=[[median[-1] - low], [high - median[-1]]], color=color,
                        marker=marker, markersize=size, capsize=4, elinewidth=1.5)
    ax.set_xlim(0, float(trials[column].max()) * 1.03 or 1.0)
    ax.set_xlabel(f"budget spent ({'inner training steps' if axis == 'steps' else 'wall-clock seconds'})")
    ax.set_ylabel(f"best {metric} so far" + (" (log scale)" if direction == "minimize" else ""))
    if direction == "minimize":
        ax.set_yscale("log")
    ax.set_title(f"{study_name}: best so far against {axis}, median over {trials['seed'].nunique()} seeds")
    finals.set_xticks(range(len(arms)), labels=arms, rotation=45, ha="right")
    finals.set_xlim(-0.6, len(arms) - 0.4)
    finals.set_title("final best:\nmedian, range", fontsize=9)
    for panel in (ax, finals):
        panel.grid(alpha=0.3)
    figure.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=len(arms), frameon=False)
    return figure


def _median_best(trials: pd.DataFrame, column: str, direction: str):
    """Change points of the median best-so-far over seeds, and the seeds' final min and max."""
    per_seed = []
    for _, frame in trials.groupby("seed"):
        frame = frame.sort_values(column)
        expanding = frame["value"].expanding(min_periods=1)
        best = expanding.min() if direction == "minimize" else expanding.max()
        per_seed.append((frame[column].to_numpy(float), best.to_numpy(float)))
    points = np.unique(np.concatenate([x for x, _ in per_seed]))
    values = np.array([[_value_at(x, best, p) for p in points] for x, best in per_seed])
    median = np.median(values, axis=0)  # NaN until every seed has a completed trial
    keep = ~np.isnan(median)
    points, median = points[keep], median[keep]
    changes = np.r_[True, median[1:] != median[:-1]] if len(median) else keep[:0]
    changes[-1:] = True  # the end, where the arm stopped
    finals = values[:, -1]
    return points[changes], median[changes], np.nanmin(finals), np.nanmax(finals)


def _value_at(x: np.ndarray, best: np.ndarray, point: float) -> float:
    index = np.searchsorted(x, point, side="right") - 1
    return float(best[index]) if index >= 0 else math.nan
