"""Writing reports: figures, CSV files and one offline HTML page per study, put in place atomically."""

from __future__ import annotations

import datetime
import html
import math
import numbers
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from hypermeta import _storage
from hypermeta._errors import UsageError
from hypermeta._private.files import check_target, directory_name, new_directories, staged_directory
from hypermeta._records import HYPERPARAMETERS, STUDY_WARM_START, TEST_PREFIX
from hypermeta.reports import _figures
from hypermeta.reports._data import TEST_METRICS, ReportData, load_report_data

DEFAULT_ROOT = "reports"
GENERATOR = '<meta name="generator" content="hypermeta report">'
FIGURES: list[tuple[str, str, Callable[[ReportData], Figure], str]] = [
    ("learning-rates.png", "Learning rates", _figures.learning_rates,
     "Learning rate against inner training step for each layer (one line per schedule segment), as adapted by"
     " hypergradients: every finished trial drawn faintly, the best trial bold. For an episodic (few-shot) study:"
     " the learned inner learning rate of each layer against inner step, at the end of meta-training."),
    ("weight-decays.png", "Weight decay", _figures.weight_decays,
     "Weight decay against inner training step, in the same form."),
    ("hypergradients.png", "Hypergradients", _figures.hypergradients,
     "Hypergradient of the validation loss with respect to the log of each hyperparameter, at each hyper-step;"
     " negative values push the hyperparameter up. Windows where a schedule segment was not active are left out."),
    ("learning-curves.png", "Learning curves", _figures.learning_curves,
     "The objective on the validation split at each evaluation step; pruned and diverged trials are marked where"
     " they stopped."),
    ("optimization-history.png", "Optimization history", _figures.optimization_history,
     "The objective of each completed trial in the order they ran, and the best so far."),
    ("param-importances.png", "Parameter importances", _figures.param_importances,
     "How much of the variation of the objective over completed trials each searched parameter explains"
     " (Optuna's fANOVA evaluator), over completed trials only; left out below"
     f" {_figures.MIN_IMPORTANCE_TRIALS} of them."),
]
CSV_FILES = ("trials.csv", "trajectories.csv", "evaluations.csv")


@dataclass(frozen=True)
class AllReports:
    """What :func:`write_all_reports` wrote: ``index`` page, ``reports`` by study, ``skipped`` with reasons."""

    index: Path
    reports: dict[str, Path]
    skipped: dict[str, str]


def write_report(
    *, study_name: str, storage: str | None = None, artifacts: str | None = None, out: str | os.PathLike | None = None
) -> Path:
    """Write the report of ``study_name`` into ``out`` (default ``reports/<study name>/``); return its index.html.

    The report is built in a temporary directory beside ``out`` and renamed into place once
    complete, replacing an older report of the same study; a directory that holds anything else
    is never touched. Errors (unknown study, no finished trial, no artifacts, ``out`` not a
    report) raise :class:`hypermeta._errors.UsageError` before anything is written.

    Example:
        >>> from hypermeta import reports
        >>> reports.write_report(study_name="digits-mlp")  # doctest: +SKIP
        PosixPath('reports/digits-mlp/index.html')
    """
    data = load_report_data(study_name=study_name, storage=storage, artifacts=artifacts)
    target = Path(out) if out is not None else Path(DEFAULT_ROOT) / directory_name(study_name)
    check_target(target, study_name)
    _write_study(data, target)
    return target / "index.html"


def write_all_reports(
    *, storage: str | None = None, artifacts: str | None = None, out: str | os.PathLike | None = None
) -> AllReports:
    """One report per stored study under ``out`` (default ``reports/``), and ``out/index.html`` linking them.

    Studies without a finished trial are skipped (listed in the index); if no study can be
    reported, :class:`hypermeta._errors.UsageError` is raised and nothing is written.

    Example:
        >>> from hypermeta import reports
        >>> reports.write_all_reports(storage="sqlite:///studies.db").index  # doctest: +SKIP
        PosixPath('reports/index.html')
    """
    url = storage or _storage.default_url()
    names = sorted(s.study_name for s in _storage.open_storage(storage, create=False).get_all_studies())
    if not names:
        raise UsageError(f"no studies in {_storage.redact(url)}; run `hypermeta run STUDY_FILE` first")
    _storage.artifact_store(storage, artifacts, create=False)  # one clear error rather than one per study
    loaded, skipped = {}, {}
    for name in names:
        try:
            loaded[name] = load_report_data(study_name=name, storage=storage, artifacts=artifacts)
        except UsageError as error:
            skipped[name] = str(error)
    if not loaded:
        raise UsageError(f"no study in {_storage.redact(url)} has a finished trial with stored trajectories; "
                         "run one first (hypermeta run STUDY_FILE)")
    root = Path(out) if out is not None else Path(DEFAULT_ROOT)
    if root.exists() and not root.is_dir():
        raise UsageError(f"--out {root} is a file; give a directory")
    targets = dict(zip(loaded, _unique_names(list(loaded)), strict=True))
    for name, directory in targets.items():
        check_target(root / directory, name)
    index = root / "index.html"
    if index.exists() and (not index.is_file() or GENERATOR not in index.read_text(errors="replace")):
        raise UsageError(f"{index} exists and is not a hypermeta report index; choose another --out DIR")
    for name, directory in targets.items():
        _write_study(loaded[name], root / directory)
    page = _all_page(loaded, targets, skipped, _storage.redact(url))
    with new_directories(root):
        temporary = root / f".index.html.partial-{secrets.token_hex(4)}"
        try:
            temporary.write_text(page, encoding="utf-8")
            os.replace(temporary, index)
        finally:
            temporary.unlink(missing_ok=True)
    return AllReports(index=index, reports={n: root / d / "index.html" for n, d in targets.items()}, skipped=skipped)


def _unique_names(study_names: list[str]) -> list[str]:
    used: set[str] = set()
    out = []
    for study_name in study_names:
        base = name = directory_name(study_name)
        counter = 2
        while name.lower() in used:  # case-insensitive file systems too
            name, counter = f"{base}-{counter}", counter + 1
        used.add(name.lower())
        out.append(name)
    return out


def _write_study(data: ReportData, target: Path) -> None:
    with staged_directory(target, data.study_name) as staging:
        _render(data, staging)


def _render(data: ReportData, directory: Path) -> None:
    figures = []
    for file_name, title, draw, caption in FIGURES:
        try:
            figure = draw(data)
        except _figures.NoData as reason:
            figures.append((file_name, title, None, str(reason)))
            continue
        figure.savefig(directory / file_name, dpi=_figures.DPI)
        figures.append((file_name, title, caption, None))
    data.trials.to_csv(directory / "trials.csv", index=False)
    data.trajectories.to_csv(directory / "trajectories.csv", index=False)
    data.evaluations.to_csv(directory / "evaluations.csv", index=False)
    (directory / "index.html").write_text(_study_page(data, figures), encoding="utf-8")


_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1100px;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
code { background: #f4f4f4; padding: 0 .25em; }
table { border-collapse: collapse; font-size: .9em; margin: .5em 0; }
th, td { border: 1px solid #ddd; padding: .2em .5em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.best { background: #fff3d6; font-weight: 600; }
.scroll { overflow: auto; max-height: 36em; border: 1px solid #ddd; }
.scroll table { margin: 0; } .scroll th { position: sticky; top: 0; background: #f6f6f6; }
.meta { color: #555; }
.note { color: #7a5a00; background: #fffaf0; padding: .4em .6em; border-left: 3px solid #e0b040; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: .9em; }
.cards { display: flex; flex-wrap: wrap; gap: 2em; }
"""


def _page(title: str, body: str) -> str:
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n{GENERATOR}\n'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_e(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


def _study_page(data: ReportData, figures) -> str:
    counts = pd.Series(list(data.outcomes.values())).value_counts()
    summary = ", ".join(f"{n} {outcome}" for outcome, n in counts.items())
    parts = [
        f"<h1>Study <code>{_e(data.study_name)}</code></h1>",
        f'<p class="meta">Storage <code>{_e(data.storage)}</code> &middot; objective: {_e(data.metric_label)}, '
        f"{_e(data.direction)} &middot; {len(data.outcomes)} trials: {_e(summary)} &middot; generated "
        f"{_e(datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z'))} by hypermeta report</p>",
        "<nav>" + " &middot; ".join(
            ['<a href="#best">Best trial</a>']
            + [f'<a href="#{_anchor(f)}">{_e(t)}</a>' for f, t, _, _ in figures]
            + ['<a href="#trials">All trials</a>', '<a href="#data">Data</a>']
        ) + "</nav>",
        *(f'<p class="note">{_e(note)}</p>' for note in data.notes),
        _warm_start(data),
        '<h2 id="best">Best trial</h2>',
        _best_section(data),
    ]
    for file_name, title, caption, reason in figures:
        parts.append(f'<h2 id="{_anchor(file_name)}">{_e(title)}</h2>')
        if reason is not None:
            parts.append(f'<p class="note">Not drawn: {_e(reason)}.</p>')
        else:
            parts.append(
                f'<figure><img src="{_e(file_name)}" alt="{_e(title)}, study {_e(data.study_name)}" width="1000">'
                f"<figcaption>{_e(caption)}</figcaption></figure>"
            )
    parts += [
        '<h2 id="trials">All trials</h2>',
        f'<p class="meta">value: final {_e(data.metric_label)}; final: hyperparameter values at the end of the'
        " run (lr/&lt;layer&gt;/&lt;segment&gt;); test metrics of completed trials only.</p>",
        _trials_table(data),
        '<h2 id="data">Data</h2>',
        "<p>" + " &middot; ".join(f'<a href="{f}">{f}</a>' for f in CSV_FILES) + "</p>",
        "<pre><code>import pandas as pd\ntrajectories = pd.read_csv(\"trajectories.csv\", "
        "dtype={\"group\": str})  # trial, step, name, group, segment, value, hypergradient, ...</code></pre>",
    ]
    return _page(f"hypermeta report: {data.study_name}", "\n".join(parts))


def _warm_start(data: ReportData) -> str:
    warm = data.study.user_attrs.get(STUDY_WARM_START)
    if not warm:
        return ""
    values = ", ".join(f"{k} = {_format(v)}" for k, v in warm["values"].items())
    return (
        f'<p class="note">Warm-started from study <code>{_e(warm["study"])}</code>, trial {_e(warm["trial"])}: '
        f"its final values ({_e(values)}) were the starting values where layers and segments match.</p>"
    )


def _best_section(data: ReportData) -> str:
    if data.best_trial is None:
        return '<p class="note">No trial has completed yet (all finished trials were pruned or diverged).</p>'
    best = data.study.best_trial
    hyper = best.user_attrs.get(HYPERPARAMETERS, {})
    known = dict(TEST_METRICS)
    tests = [(label, best.user_attrs[key]) for key, label in TEST_METRICS if key in best.user_attrs] + [
        (key.removeprefix(TEST_PREFIX), value) for key, value in best.user_attrs.items()
        if key.startswith(TEST_PREFIX) and key not in known
    ]
    return (
        f"<p>Trial <strong>#{best.number}</strong>: final {_e(data.metric_label)} "
        f"<strong>{_e(_format(best.value))}</strong>.</p>\n<div class=\"cards\">"
        + _key_values("Parameters (searched by Optuna)", best.params.items())
        + _key_values("Final hyperparameters (adapted)", hyper.items())
        + _key_values("Test metrics", tests)
        + "</div>"
    )


def _key_values(title: str, items) -> str:
    items = list(items)
    rows = "".join(f'<tr><th>{_e(k)}</th><td class="num">{_e(_format(v))}</td></tr>' for k, v in items)
    body = f"<table>{rows}</table>" if items else "<p>none stored</p>"
    return f"<div><h3>{_e(title)}</h3>{body}</div>"


def _trials_table(data: ReportData) -> str:
    frame = data.trials
    header = "".join(f"<th>{_e(c)}</th>" for c in frame.columns)
    rows = []
    for record in frame.to_dict("records"):
        cells = "".join(
            f'<td class="num">{_e(_format(v))}</td>' if _is_number(v) else f"<td>{_e(_format(v))}</td>"
            for v in record.values()
        )
        best = ' class="best"' if record.get("trial") == data.best_trial else ""
        rows.append(f"<tr{best}>{cells}</tr>")
    return f'<div class="scroll"><table><tr>{header}</tr>{"".join(rows)}</table></div>'


def _all_page(loaded: dict[str, ReportData], targets: dict[str, str], skipped: dict[str, str], url: str) -> str:
    rows = []
    for name, data in loaded.items():
        counts = pd.Series(list(data.outcomes.values())).value_counts()
        best = "" if data.best_trial is None else _format(data.study.best_value)
        rows.append(
            f'<tr><td><a href="{_e(targets[name])}/index.html">{_e(name)}</a></td>'
            f"<td>{_e(data.metric_label)} ({_e(data.direction)})</td><td class=\"num\">{len(data.outcomes)}</td>"
            f"<td>{_e(', '.join(f'{n} {o}' for o, n in counts.items()))}</td><td class=\"num\">{_e(best)}</td></tr>"
        )
    parts = [
        "<h1>hypermeta reports</h1>",
        f'<p class="meta">Storage <code>{_e(url)}</code> &middot; generated '
        f"{_e(datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z'))}</p>",
        "<table><tr><th>study</th><th>objective</th><th>trials</th><th>outcomes</th><th>best value</th></tr>"
        + "".join(rows) + "</table>",
    ]
    if skipped:
        parts.append("<h2>Not reported</h2><ul>"
                     + "".join(f"<li><code>{_e(n)}</code>: {_e(r)}</li>" for n, r in skipped.items()) + "</ul>")
    return _page("hypermeta reports", "\n".join(parts))


def _anchor(file_name: str) -> str:
    return file_name.removesuffix(".png")


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _format(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _e(text) -> str:
    return html.escape(str(text), quote=True)
