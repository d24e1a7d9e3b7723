"""One Optuna trial of an episodic study: :func:`hypermeta.meta_train` in place of ``train``.

The runner hands over a trial whose build function returned an :class:`hypermeta.EpisodicSetup`;
what is stored is what an ordinary trial stores (trajectory and evaluations artifacts, final
values, test metrics), so the reading commands and reports need nothing else.
"""

from __future__ import annotations

import dataclasses
import time

import optuna

from hypermeta._episodic import EpisodicSetup, evaluate_tasks, meta_train

METRICS = ("valid_loss", "valid_accuracy")


def check_metric(setup: EpisodicSetup, metric: str) -> str | None:
    """Why ``metric`` cannot be the objective of this setup, or ``None``."""
    if metric not in METRICS:
        return f"an episodic study's metric must be one of {METRICS}, got {metric!r}"
    if metric == "valid_accuracy" and not getattr(setup.tasks, "classification", False):
        return f"metric 'valid_accuracy' needs classification tasks; {type(setup.tasks).__name__} is regression"
    return None


def run_trial(runner, trial: optuna.Trial, setup: EpisodicSetup, seed: int) -> float:
    """Meta-train, report each meta-validation evaluation, store, and return the final metric."""
    if not runner.online:
        raise TypeError("episodic studies are run with hypergradients only (`hypermeta run`), not compared black-box")
    problem = check_metric(setup, runner.study.metric)
    if problem:
        raise ValueError(problem)
    if isinstance(setup.meta_lr, tuple):
        setup = dataclasses.replace(setup, meta_lr=trial.suggest_float("meta_lr", *setup.meta_lr, log=True))
    runner.progress.start_trial(setup.meta_steps)
    started = time.perf_counter()
    result = meta_train(
        setup.model, tasks=setup.tasks, shots=setup.shots, query=setup.query, inner_steps=setup.inner_steps,
        meta_steps=setup.meta_steps, meta_batch=setup.meta_batch, inner_lr=setup.inner_lr,
        inner_weight_decay=setup.inner_weight_decay, meta_lr=setup.meta_lr,
        multi_step_loss=setup.multi_step_loss, eval_every=setup.eval_every,
        valid_tasks=setup.valid_tasks, seed=seed, device=runner.device,
        on_evaluation=lambda step, metrics: runner._report(trial, step, metrics, setup.meta_steps),
        on_steps=runner.progress.steps,
    )
    trial.set_user_attr("seconds", time.perf_counter() - started)
    trial.set_user_attr("inner_lr_form", setup.inner_lr.form)
    runner._store(trial, result)
    if result.status != "completed":
        reason = f"pruned at meta step {result.steps}" if result.status == "stopped" else result.reason
        trial.set_user_attr("stop_reason", reason)
        raise optuna.TrialPruned(reason)
    test = evaluate_tasks(
        result, tasks=setup.tasks, shots=setup.shots, query=setup.query, steps=(setup.inner_steps,),
        n_tasks=setup.test_tasks, seed=seed,
    ).iloc[0]
    trial.set_user_attr("test_loss", float(test["loss"]))
    if "accuracy" in test:
        trial.set_user_attr("test_accuracy", float(test["accuracy"]))
    return float(result.evaluations[runner.study.metric].iloc[-1])
