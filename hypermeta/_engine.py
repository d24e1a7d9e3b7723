"""The engine: one training run whose hyperparameters follow hypergradients as it trains.

It knows nothing of Optuna. A run is a sequence of windows of inner steps; after each window an
estimator returns hypergradients of the validation loss, and a meta-optimizer updates the
hyperparameters (in log space) before the next window.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F

from hypermeta._data import Batches, Dataset
from hypermeta._hyperparameters import HyperParameters, LearningRate, WeightDecay
from hypermeta._metrics import evaluate
from hypermeta._private import diffopt
from hypermeta._private.first_order import first_order_window
from hypermeta._private.greedy import greedy_window
from hypermeta._private.plain import load_optimizer_state, optimizer_state, plain_step, restore, snapshot
from hypermeta._private.unrolled import unrolled_window
from hypermeta._private.window import Window, nothing

_ESTIMATORS = {"unrolled": unrolled_window, "first_order": first_order_window, "greedy": greedy_window}
_META_OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}
_OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}
_PLAIN_WINDOW = 10

TRAJECTORY_COLUMNS = [
    "step", "name", "group", "segment", "value", "hypergradient", "train_loss", "valid_loss",
]


@dataclass(frozen=True, kw_only=True)
class Hypergradient:
    """How the differentiable hyperparameters are adapted during training.

    Args:
        estimator: ``"first_order"`` (the default: plain ``torch.optim`` steps with forward-mode
            tangents through the weights and the optimizer state, training Hessian dropped;
            about 1.3-1.5x plain training end to end), ``"unrolled"`` (exact: truncated reverse
            mode through ``horizon`` steps with ``higher``; about 2.5-3x) or ``"greedy"`` (Baydin
            et al. 2018: the optimizer state also held fixed). See docs/estimators.md.
        horizon: K, the inner steps per hyper-step. Short horizons make the learned learning
            rate collapse (short-horizon bias); at 20 neither the first-order nor the unrolled
            estimate collapsed the rate in ``benchmarks/short_horizon.py``.
        meta_lr: the meta-optimizer's learning rate, in log space, or a ``(low, high)`` range for
            Optuna to choose it from in each trial of a study (with Adam, 0.2 moves a value
            by at most about 20% per hyper-step). Keep ``meta_lr / horizon`` fixed when changing
            the horizon to keep the total movement the same.
        meta_optimizer: ``"adam"`` or ``"sgd"``.
        max_failures: consecutive rejected hyper-steps (NaN/inf) before the run stops.
        valid_batch_size: validation examples per hypergradient, a fresh random subsample each
            hyper-step (the whole split when it is smaller); ``None`` uses the whole split. 256
            costs a quarter of MNIST-1D's 1,000-example split and moved the learned rates no
            further than the whole split in ``benchmarks/short_horizon.py``.
        carry_segments: when a learning-rate schedule segment begins, start it as far (in log
            space) from its own starting value as the previous segment has moved from its own, so
            the schedule keeps what hypergradients learned instead of jumping back to ``init``.
            ``False`` starts every segment at its starting value. Either way a hyper-step moves
            only the rates of the segment being trained.

    Example:
        >>> import hypermeta
        >>> hypermeta.Hypergradient(estimator="greedy", horizon=5, meta_lr=0.05).horizon
        5
    """

    estimator: str = "first_order"
    horizon: int = 20
    meta_lr: float | tuple[float, float] = 0.2
    meta_optimizer: str = "adam"
    max_failures: int = 5
    valid_batch_size: int | None = 256
    carry_segments: bool = True

    def __post_init__(self) -> None:
        _one_of("estimator", self.estimator, _ESTIMATORS)
        _one_of("meta_optimizer", self.meta_optimizer, _META_OPTIMIZERS)
        if self.horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {self.horizon}")
        if isinstance(self.meta_lr, tuple):
            if len(self.meta_lr) != 2 or not 0 < self.meta_lr[0] < self.meta_lr[1]:
                raise ValueError(f"a meta_lr range must be (low, high) with 0 < low < high, got {self.meta_lr}")
        elif not self.meta_lr >= 0:
            raise ValueError(f"meta_lr must be >= 0, got {self.meta_lr}")
        if self.max_failures < 0:
            raise ValueError(f"max_failures must be >= 0, got {self.max_failures}")


@dataclass
class TrainResult:
    """The outcome of :func:`train`.

    ``model`` and ``optimizer`` hold the trained weights and the inner optimizer's state.
    ``status`` is ``"completed"``, ``"stopped"`` (by ``on_evaluation``) or ``"diverged"``;
    ``reason`` says why a run did not complete. ``trajectory`` has one row per hyperparameter
    per hyper-step (columns :data:`TRAJECTORY_COLUMNS`; ``hypergradient`` is d(valid loss)/d(log
    value), NaN without hypergradients). ``evaluations`` has one row per evaluation on the
    validation split. ``rejected_steps`` counts windows the divergence guard threw away.
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    trajectory: pd.DataFrame
    evaluations: pd.DataFrame
    hyperparameters: dict[str, float]
    status: str
    reason: str | None
    steps: int
    rejected_steps: int


@dataclass
class _Run:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    hyper: HyperParameters
    loss_fn: Callable[..., torch.Tensor]
    train_batches: Batches
    valid_batches: Batches
    rows: list[dict] = field(default_factory=list)
    patched: Any = None  # the unrolled estimator's monkey-patched model, made once per run


def train(
    model: torch.nn.Module,
    *,
    data: Dataset,
    steps: int,
    batch_size: int,
    learning_rate: LearningRate,
    weight_decay: WeightDecay | None = None,
    optimizer: str = "sgd",
    optimizer_options: dict | None = None,
    hypergradient: Hypergradient | None = None,
    loss_fn: Callable[..., torch.Tensor] = F.cross_entropy,
    initial_values: dict[str, float] | None = None,
    eval_every: int | None = None,
    max_loss_ratio: float = 10.0,
    seed: int = 0,
    device: str | torch.device = "cpu",
    on_evaluation: Callable[[int, dict[str, float]], bool] | None = None,
    on_steps: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train ``model`` for ``steps`` inner steps, adapting its hyperparameters on the way.

    Parameters are grouped by the module that owns them (one group per layer). Without
    ``hypergradient`` this is plain ``torch.optim`` training at the initial values.
    ``initial_values`` starts single entries elsewhere than ``init``, keyed as
    ``TrainResult.hyperparameters`` is (``"lr/<group>/<segment>"``, ``"weight_decay/<group>"``).
    ``on_evaluation(step, metrics)`` is called after each evaluation on the validation split
    (every ``eval_every`` steps -- by default about 10 times, at window ends -- and at the
    end); returning ``True`` stops the run.
    ``on_steps(n)`` is told of every ``n`` inner steps done. Test data is never read.

    Divergence guard: a window whose loss is not finite or above ``max_loss_ratio`` times the
    initial validation loss, or whose hypergradient is not finite, is rejected; the weights,
    optimizer state and hyperparameters go back to the last good state and the meta learning
    rate is halved. After ``hypergradient.max_failures`` rejections in a row (at once without
    hypergradients) the run ends with ``status="diverged"`` and the reason.

    Example:
        >>> import torch, hypermeta
        >>> torch.manual_seed(0) and None
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 10))
        >>> result = hypermeta.train(
        ...     model, data=hypermeta.datasets.digits(), steps=20, batch_size=32,
        ...     learning_rate=hypermeta.LearningRate(init=0.1),
        ...     hypergradient=hypermeta.Hypergradient(horizon=5))
        >>> result.status, result.trajectory["step"].unique().tolist()
        ('completed', [5, 10, 15, 20])
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    horizon = hypergradient.horizon if hypergradient else _PLAIN_WINDOW
    eval_every = eval_every or horizon * max(1, steps // (10 * horizon))
    model = model.to(device)
    data = data.to(device, next(model.parameters()).dtype)
    run = build_run(
        model, data=data, steps=steps, batch_size=batch_size, learning_rate=learning_rate,
        weight_decay=weight_decay, optimizer=optimizer, optimizer_options=optimizer_options,
        loss_fn=loss_fn, seed=seed,
        valid_batch_size=(hypergradient and hypergradient.valid_batch_size) or len(data.valid),
    )
    run.hyper.load_values(initial_values or {})
    on_steps = on_steps or (lambda n: None)
    outcome = _loop(run, data, hypergradient, steps, eval_every, max_loss_ratio, on_evaluation, on_steps)
    return TrainResult(
        model=model,
        optimizer=run.optimizer,
        trajectory=pd.DataFrame(run.rows, columns=TRAJECTORY_COLUMNS),
        evaluations=pd.DataFrame(outcome.evaluations),
        hyperparameters=run.hyper.values(),
        status=outcome.status,
        reason=outcome.reason,
        steps=outcome.step,
        rejected_steps=outcome.rejected,
    )


def build_run(
    model, *, data, steps, batch_size, learning_rate, optimizer, optimizer_options, weight_decay=None,
    loss_fn, seed, valid_batch_size,
) -> _Run:
    """Everything a window needs; ``data`` and ``model`` already on one device and dtype.

    Training and validation batches come from separate generators, so the training batches of a
    run do not depend on whether hypergradients are computed.
    """
    groups = parameter_groups(model)
    parameter = next(model.parameters())
    hyper = HyperParameters(
        learning_rate=learning_rate, weight_decay=weight_decay, group_names=list(groups),
        total_steps=steps, dtype=parameter.dtype, device=parameter.device,
    )
    return _Run(
        model=model, hyper=hyper, loss_fn=loss_fn,
        optimizer=_inner_optimizer(optimizer, optimizer_options, groups, learning_rate, weight_decay),
        train_batches=Batches(
            data.train, batch_size=batch_size, generator=torch.Generator().manual_seed(seed)
        ),
        valid_batches=Batches(
            data.valid, batch_size=valid_batch_size,
            generator=torch.Generator().manual_seed(seed + 1),
        ),
    )


@dataclass
class _Outcome:
    evaluations: list[dict] = field(default_factory=list)
    status: str = "completed"
    reason: str | None = None
    step: int = 0
    rejected: int = 0

    def end(self, status: str, reason: str) -> _Outcome:
        self.status, self.reason = status, reason
        return self


def _loop(run, data, hypergradient, steps, eval_every, max_loss_ratio, on_evaluation, on_steps) -> _Outcome:
    meta = _MetaStep(run.hyper, hypergradient) if hypergradient else None
    horizon = hypergradient.horizon if hypergradient else _PLAIN_WINDOW
    outcome = _Outcome()
    failures = 0
    loss_limit = max_loss_ratio * evaluate(run.model, data.valid, run.loss_fn)["loss"]
    while outcome.step < steps:
        step = outcome.step
        n_steps = min(horizon, steps - step, eval_every - step % eval_every)
        if meta:
            n_steps = min(n_steps, _to_next_segment(run.hyper, step))
        window = meta.window(run, step, n_steps) if meta else _plain_window(run, step, n_steps)
        problem = window.problem(loss_limit)
        if problem:
            window.rollback()
            failures += 1
            outcome.rejected += 1
            if meta is None or failures > hypergradient.max_failures:
                return outcome.end("diverged", _divergence(problem, step, failures))
            meta.reject()
            continue
        window.commit()
        failures = 0
        _record(run, step + n_steps, window)
        if meta:
            meta.step(window.hypergradients, segment=run.hyper.segment(step))
        outcome.step = step = step + n_steps
        on_steps(n_steps)
        if step % eval_every == 0 or step == steps:
            metrics = {"step": step, "train_loss": float(window.train_loss)}
            valid = evaluate(run.model, data.valid, run.loss_fn)
            metrics.update({f"valid_{k}": v for k, v in valid.items()})
            outcome.evaluations.append(metrics)
            if not math.isfinite(metrics["valid_loss"]):
                return outcome.end("diverged", f"validation loss is not finite at step {step}")
            if on_evaluation is not None and on_evaluation(step, metrics):
                return outcome.end("stopped", f"stopped at step {step} by on_evaluation")
    return outcome


class _MetaStep:
    """The meta-optimizer, with the divergence guard's memory of the last good state."""

    def __init__(self, hyper: HyperParameters, hypergradient: Hypergradient) -> None:
        self.hyper = hyper
        self.estimator = _ESTIMATORS[hypergradient.estimator]
        if isinstance(hypergradient.meta_lr, tuple):
            raise ValueError(f"meta_lr={hypergradient.meta_lr} is a search range; give train() a number")
        self.meta_lr = hypergradient.meta_lr
        self.carry_segments = hypergradient.carry_segments
        self.optimizer = _META_OPTIMIZERS[hypergradient.meta_optimizer](hyper.tensors(), lr=self.meta_lr)
        self.saved = self._save()

    def window(self, run, step: int, n_steps: int) -> Window:
        if self.carry_segments:
            self.hyper.carry_into(step)
        return self.estimator(run, step, n_steps)

    def step(self, hypergradients: list[torch.Tensor], *, segment: int) -> None:
        """Update the values; of the learning rates only those of ``segment``, the window's."""
        self.saved = self._save()
        for tensor, grad in zip(self.hyper.tensors(), hypergradients, strict=True):
            tensor.grad = grad
        self.optimizer.step()
        self.hyper.keep_other_segments(self.saved[0], segment)
        self.hyper.project()

    def reject(self) -> None:
        """Back to the values before the last meta step, with half the meta learning rate."""
        hyper_state, meta_state = self.saved
        self.hyper.load_state(hyper_state)
        load_optimizer_state(self.optimizer, meta_state)
        self.meta_lr /= 2
        for group in self.optimizer.param_groups:
            group["lr"] = self.meta_lr

    def _save(self):
        return self.hyper.state(), optimizer_state(self.optimizer)


def _to_next_segment(hyper: HyperParameters, step: int) -> int:
    """Inner steps until the next schedule segment begins (or the run ends), so that no window spans two."""
    return hyper.segment_start(hyper.segment(step) + 1) - step


def _plain_window(run: _Run, start: int, n_steps: int) -> Window:
    saved = snapshot(run.model, run.optimizer)
    losses = [
        plain_step(run.model, run.optimizer, run.hyper, run.loss_fn, run.train_batches.next(), step)
        for step in range(start, start + n_steps)
    ]
    return Window(
        train_loss=torch.stack(losses).mean(), valid_loss=None, hypergradients=None,
        commit=nothing, rollback=lambda: restore(run.model, run.optimizer, saved),
    )


def _record(run: _Run, step: int, window: Window) -> None:
    grads = window.hypergradients
    valid_loss = float("nan") if window.valid_loss is None else float(window.valid_loss)
    train_loss = float(window.train_loss)
    leaves = run.hyper.tensors()
    for name, group, segment, tensor, index in run.hyper.entries():
        leaf = next(i for i, t in enumerate(leaves) if t is tensor)
        run.rows.append({
            "step": step, "name": name, "group": group, "segment": segment,
            "value": float(tensor.detach().flatten()[index].exp()),
            "hypergradient": float("nan") if grads is None else float(grads[leaf].flatten()[index]),
            "train_loss": train_loss, "valid_loss": valid_loss,
        })


def _divergence(problem: str, step: int, failures: int) -> str:
    tries = f" ({failures} windows rejected in a row)" if failures > 1 else ""
    return f"diverged after step {step}: {problem}{tries}; lower the initial learning rate"


def parameter_groups(model: torch.nn.Module) -> dict[str, list[torch.nn.Parameter]]:
    """One group per module that owns trainable parameters, named as in ``named_modules``."""
    groups = {}
    for name, module in model.named_modules():
        params = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if params:
            groups[name or "model"] = params
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return groups


def _inner_optimizer(name, options, groups, learning_rate, weight_decay) -> torch.optim.Optimizer:
    _one_of("optimizer", name, _OPTIMIZERS)
    for reserved in ("lr", "weight_decay"):
        if reserved in (options or {}):
            raise ValueError(f"optimizer_options must not set {reserved!r}: use learning_rate= / weight_decay=")
    param_groups = [{"params": params} for params in groups.values()]
    optimizer = _OPTIMIZERS[name](
        param_groups, lr=learning_rate.init,
        weight_decay=0.0 if weight_decay is None else weight_decay.init, **(options or {}),
    )
    diffopt.check_supported(optimizer)
    return optimizer


def _one_of(what: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{what} must be one of {sorted(choices)}, got {value!r}")
