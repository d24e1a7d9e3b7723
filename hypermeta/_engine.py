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

from hypermeta._data import Batches, Dataset, JoinedBatches, LoaderBatches, Loaders, Split
from hypermeta._hyperparameters import HyperParameters, LearningRate, WeightDecay
from hypermeta._metrics import Metric, evaluate, fit_problem
from hypermeta._private import diffopt
from hypermeta._private.denormals import flushing_denormals
from hypermeta._private.first_order import first_order_window
from hypermeta._private.greedy import greedy_window
from hypermeta._private.handoff import Handoff, LossModule, picked
from hypermeta._private.plain import (
    load_optimizer_state,
    optimizer_state,
    set_values,
    snapshot,
    train_step,
    trained_in_place,
)
from hypermeta._private.unrolled import unrolled_window
from hypermeta._private.window import Window
from hypermeta._records import TRAJECTORY_COLUMNS

_ESTIMATORS = {"unrolled": unrolled_window, "first_order": first_order_window, "greedy": greedy_window}
_META_OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}
_OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}
_PLAIN_WINDOW = 10
_OPEN_ENDED = 2**62  # the step budget of a HyperOptimizer run without a schedule


@dataclass(frozen=True, kw_only=True)
class Hypergradient:
    """How the differentiable hyperparameters are adapted during training.

    Args:
        estimator: ``"first_order"`` (the default: plain ``torch.optim`` steps with forward-mode
            tangents through the weights and the optimizer state, training Hessian dropped;
            1.10x (digits MLP) and 1.04x (MNIST-1D CNN) plain training end to end with the
            default ``every=8``, 1.2-1.6x with a hyper-step on every window), ``"unrolled"``
            (exact: truncated reverse mode through ``horizon`` steps with ``higher``; 1.28x and
            1.47x, and 2.9-3.5x on every window) or
            ``"greedy"`` (Baydin et al. 2018: the optimizer state also held fixed). See
            docs/estimators.md.
        horizon: K, the inner steps per hyper-step (a window), settling steps included.
        settle: the window's last steps whose own effect the second estimate leaves out
            (``None``: half the horizon; ``0``: one estimate, as before). Each window yields
            two hypergradients of the validation loss at its end: with respect to the values
            on all its steps, and on all but the settling ones. The first mostly sees the
            gradient noise of the last steps, which smaller learning rates and larger weight
            decays always reduce, so on long runs it pulls the rates down (the short-horizon
            bias); the second misses what the last steps cost, instability included, and so
            pushes the rates up. A value moves only where the two agree in sign, by the
            settled one. ``benchmarks/long_run.py`` measures both sides. A window cut short
            (by an evaluation or the run's end) settles the same fraction of its steps.
        meta_lr: the meta-optimizer's learning rate, in log space, or a ``(low, high)`` range for
            Optuna to choose it from in each trial of a study (with Adam, the default 0.1 moves a
            value by at most about 10% per hyper-step; the digits and MNIST-1D studies' short trials
            take 0.2 or more). Keep ``meta_lr / horizon`` fixed when changing the horizon to keep the
            total movement the same.
        meta_optimizer: ``"adam"`` or ``"sgd"``.
        max_failures: consecutive rejected hyper-steps (NaN/inf) before the run stops.
        valid_batch_size: validation examples per hypergradient, a fresh random subsample each
            hyper-step (the whole split when it is smaller); ``None`` uses the whole split. 256
            costs a quarter of MNIST-1D's 1,000-example split and moved the learned rates no
            further than the whole split in ``benchmarks/short_horizon.py``. With
            :class:`hypermeta.Loaders`, the next consecutive batches of ``valid`` that hold this
            many examples (one batch at least, one pass at most), unless ``valid_batches`` is given;
            with a whole pass over its 10,000 validation examples per hyper-step, the streamed
            study's long adaptive runs took 0.75 of the fixed runs' steps in the same seconds,
            against 0.86 with 256 (``benchmarks/long_run.py``, docs/benchmarks.md).
        carry_segments: when a learning-rate schedule segment begins, start it as far (in log
            space) from its own starting value as the previous segment has moved from its own, so
            the schedule keeps what hypergradients learned instead of jumping back to ``init``.
            ``False`` starts every segment at its starting value. Either way a hyper-step moves
            only the rates of the segment being trained.
        valid_batches: with :class:`hypermeta.Loaders`, the validation batches per hypergradient
            (consecutive batches of ``valid``, epoch after epoch); ``None``: as many as hold
            ``valid_batch_size`` examples, or all of ``valid`` when that is ``None`` too.
        every: take a hyper-step on one window in ``every`` (the first, then every ``every``-th);
            the windows between are plain ``torch.optim`` steps at the current values. The cost
            over plain training shrinks about ``every``-fold, and so does how far the values
            can move in a given number of steps. The default of 8 (with ``meta_lr=0.1``) is for
            runs of tens of thousands of steps, where faster movement let the values drift
            (``benchmarks/long_run.py``, docs/estimators.md); the digits MLP and MNIST-1D studies'
            short trials take 4 with ``meta_lr=0.2`` (the 35-value study 2 with 0.4), and a short
            run that must move a value far (a few hundred steps, a rate 10x off) needs ``every=1``,
            ``meta_lr=0.2`` and ``span=None``.
        confirm: at each evaluation (the whole validation split), keep what the hyper-steps since
            the one before (kept or not) moved only if the validation loss did not rise and, for
            a classifier (a ``valid_accuracy`` measured or reported at both), the accuracy did not
            fall; else the values and the meta-optimizer's state go back to those kept at the last
            evaluation, before the next window (a run that stops there ends with the values it
            reached). A
            hypergradient sees ``horizon`` steps of the validation loss, an evaluation the whole
            stretch since the last and the accuracy too: on long runs the values drift where
            the look-ahead likes them and the run does not (rates down under the short-horizon
            bias, weight decay up for a lower loss but not a higher accuracy); this kept the
            rates up and the test accuracy level or ahead on the committed studies, but not a
            slow rise of the weight decays over MNIST-1D runs of minutes (``benchmarks/long_run.py``,
            docs/benchmarks.md). In the
            short trials of a study it slowed adaptation on MNIST-1D (``benchmarks/hypermeta_arm.py``,
            see docs/estimators.md), so the digits and MNIST-1D studies turn it off. A bare
            :class:`HyperOptimizer` sees no evaluation and keeps every hyper-step.
        span: how far hypergradients may move a value from where the run started it, as a
            factor either way (the default 3: from a third to three times its start), inside its
            bounds; ``None``: anywhere in the bounds. A hypergradient looks ``horizon`` steps
            ahead, and over runs of minutes it kept pushing some values in one direction long
            after the run stopped gaining from it (MNIST-1D at 180 s: a weight decay up 320x, to
            the top of its range, the accuracy a point behind; ``benchmarks/long_run.py``,
            docs/benchmarks.md). A start far from good wants a search (``hypermeta run``) or
            ``span=None``. In a study, each trial's span is around the values Optuna chose for
            it; the digits and MNIST-1D studies pass ``None``, as they were measured.

    Example:
        >>> import hypermeta
        >>> hypermeta.Hypergradient(estimator="greedy", horizon=5, meta_lr=0.05).horizon
        5
    """

    estimator: str = "first_order"
    horizon: int = 40
    settle: int | None = None
    meta_lr: float | tuple[float, float] = 0.1
    meta_optimizer: str = "adam"
    max_failures: int = 5
    valid_batch_size: int | None = 256
    carry_segments: bool = True
    valid_batches: int | None = None
    every: int = 8
    confirm: bool = True
    span: float | None = 3.0

    @property
    def settling_steps(self) -> int:
        """``settle``, or half the horizon when it is ``None``."""
        return self.horizon // 2 if self.settle is None else self.settle

    def __post_init__(self) -> None:
        _one_of("estimator", self.estimator, _ESTIMATORS)
        _one_of("meta_optimizer", self.meta_optimizer, _META_OPTIMIZERS)
        if not isinstance(self.confirm, bool):
            raise ValueError(f"confirm must be True or False, got {self.confirm!r}")
        if self.horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {self.horizon}")
        if self.settle is not None and (
            isinstance(self.settle, bool) or not isinstance(self.settle, int) or not 0 <= self.settle < self.horizon
        ):
            raise ValueError(
                f"settle must be an integer with 0 <= settle < horizon ({self.horizon}), got {self.settle!r}"
            )
        if isinstance(self.meta_lr, tuple):
            if len(self.meta_lr) != 2 or not 0 < self.meta_lr[0] < self.meta_lr[1]:
                raise ValueError(f"a meta_lr range must be (low, high) with 0 < low < high, got {self.meta_lr}")
        elif not self.meta_lr >= 0:
            raise ValueError(f"meta_lr must be >= 0, got {self.meta_lr}")
        if self.max_failures < 0:
            raise ValueError(f"max_failures must be >= 0, got {self.max_failures}")
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"every must be an integer >= 1, got {self.every!r}")
        if self.span is not None and (
            isinstance(self.span, bool) or not isinstance(self.span, int | float) or not self.span >= 1
        ):
            raise ValueError(f"span must be None or a factor >= 1 (10: from a tenth to ten times the start), "
                             f"got {self.span!r}")


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


class Diverged(RuntimeError):
    """Raised by :meth:`HyperOptimizer.step` once the divergence guard has ended the run; says why."""


class HyperOptimizer:
    """Hypergradient-driven hyperparameters for a training loop of your own.

    Wraps ``model`` in an inner ``torch.optim`` optimizer (one parameter group per layer, as in
    :func:`hypermeta.train`) whose learning rates and weight decays follow hypergradients of the
    validation loss. Each :meth:`step` does one training step; every ``hypergradient.horizon``
    steps a window ends, ``valid_loss`` is called, and the hyperparameters move. Without
    ``hypergradient`` the steps are plain ``torch.optim`` steps at the initial values.

    ``steps`` (the run's length) is needed only by learning-rate schedules (``segments > 1``).
    The divergence guard works as in :func:`hypermeta.train`, with the limit ``max_loss_ratio``
    times the first step's training loss: a rejected window's steps are undone (weights, buffers,
    optimizer state), and once the guard gives up :meth:`step` raises :class:`Diverged`.

    Example:
        >>> import torch, torch.nn.functional as F, hypermeta
        >>> torch.manual_seed(0) and None
        >>> data = hypermeta.datasets.digits()
        >>> model = torch.nn.Linear(64, 10)
        >>> hyper = hypermeta.HyperOptimizer(
        ...     model, learning_rate=hypermeta.LearningRate(init=0.1),
        ...     hypergradient=hypermeta.Hypergradient(horizon=5))
        >>> for i in range(20):
        ...     x, y = data.train.x[i * 32:(i + 1) * 32], data.train.y[i * 32:(i + 1) * 32]
        ...     loss = hyper.step(lambda m: F.cross_entropy(m(x), y),
        ...                       lambda m: F.cross_entropy(m(data.valid.x), data.valid.y))
        >>> hyper.steps, hyper.trajectory["step"].unique().tolist()
        (20, [5, 10, 15, 20])
        >>> sorted(hyper.hyperparameters)
        ['lr/all/0']
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        learning_rate: LearningRate,
        optimizer: str = "sgd",
        optimizer_options: dict | None = None,
        weight_decay: WeightDecay | None = None,
        hypergradient: Hypergradient | None = None,
        steps: int | None = None,
        initial_values: dict[str, float] | None = None,
        max_loss_ratio: float = 10.0,
    ) -> None:
        self._handoff = Handoff()
        groups = parameter_groups(model)
        run = _new_run(
            LossModule(model), groups, steps=steps or _OPEN_ENDED, learning_rate=learning_rate,
            weight_decay=weight_decay, optimizer=optimizer, optimizer_options=optimizer_options, loss_fn=picked,
            train_batches=self._handoff.train_batches, valid_batches=self._handoff.valid_batches,
        )
        self._start(run, hypergradient, steps, initial_values)
        self._max_loss_ratio = max_loss_ratio

    @classmethod
    def _on_run(
        cls, run: _Run, *, hypergradient, steps, initial_values, loss_limit: float, plain_window: int
    ) -> HyperOptimizer:
        """One driven window by window on ``run``'s own batch streams (how :func:`train` uses it).

        Without hypergradients a window runs up to the next evaluation (``plain_window`` steps):
        each window costs a snapshot, a check and a trajectory row, which plain training need
        not pay every ten steps.
        """
        self = cls.__new__(cls)
        self._handoff = None  # train() drives whole windows itself
        self._start(run, hypergradient, steps, initial_values, plain_window)
        self._loss_limit = loss_limit
        return self

    def _start(self, run, hypergradient, steps, initial_values, plain_window: int = _PLAIN_WINDOW) -> None:
        self._run, self._hypergradient, self._total = run, hypergradient, steps
        run.hyper.load_values(initial_values or {})
        self._meta = _MetaStep(run.hyper, hypergradient) if hypergradient else None
        self._horizon = hypergradient.horizon if hypergradient else plain_window
        self._loss_limit = None
        self._failures = 0
        self._evaluation = None  # (_Evaluation, step) not yet acted on
        self._plain = None  # the plain steps of the user's current window
        self._window_start = self._window_end = 0
        self.steps = 0
        self.rejected_steps = 0
        self.reason: str | None = None
        self.last_train_loss: torch.Tensor | None = None

    def close(self) -> None:
        """End a window left unfinished (a loop stopped mid-window): its worker thread stops and
        nothing of the window is committed. Train no further with this HyperOptimizer afterwards."""
        if self._handoff is not None:
            self._handoff.close()

    @property
    def model(self) -> torch.nn.Module:
        return self._run.model.model if isinstance(self._run.model, LossModule) else self._run.model

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The inner ``torch.optim`` optimizer (its state; its values are written before each step)."""
        return self._run.optimizer

    @property
    def hyperparameters(self) -> dict[str, float]:
        """The current values, keyed ``"lr/<group>/<segment>"`` and ``"weight_decay/<group>"``."""
        return self._run.hyper.values()

    @property
    def trajectory(self) -> pd.DataFrame:
        """One row per hyperparameter per window, in :data:`TRAJECTORY_COLUMNS` (as ``TrainResult.trajectory``)."""
        return pd.DataFrame(self._run.rows, columns=TRAJECTORY_COLUMNS)

    def step(
        self,
        train_loss: Callable[[torch.nn.Module], torch.Tensor],
        valid_loss: Callable[[torch.nn.Module], torch.Tensor],
    ) -> torch.Tensor:
        """One training step on ``train_loss(model)``; returns its loss (detached).

        Both arguments are functions of the model returning a scalar loss; compute the loss from
        the output of the model they get (with ``estimator="unrolled"``, ``higher``'s
        differentiable copy of yours). ``valid_loss`` is called (with Dropout off) only when a
        window ends. They run in a worker thread during a window: set thread-local PyTorch state
        (autocast, the CUDA device) inside them.
        """
        if self.reason is not None:
            raise Diverged(self.reason)
        if self._handoff.broken:
            raise RuntimeError("an earlier step() raised in the middle of a window; start a new HyperOptimizer")
        if self._total is not None and self.steps >= self._total:
            raise ValueError(f"all {self._total} steps of this HyperOptimizer are done (its steps=)")
        losses = []

        def training(model):
            losses.append(train_loss(model))
            return losses[-1]

        if not self._handoff.running and self._plain is None:
            self._begin(self._window_length())
        if self._plain is not None:
            self._plain.take((training, None))
            window = self._plain.window() if self._plain.step == self._window_end else None
        else:
            window = self._handoff.feed(training, valid_loss)
        if self._loss_limit is None:
            self._loss_limit = self._max_loss_ratio * float(losses[0].detach())
        if window is not None:
            self._plain = None
            self._end(window)
        return losses[0].detach()

    def _begin(self, n_steps: int) -> None:
        run, start = self._run, self.steps
        self._window_start, self._window_end = start, start + n_steps
        if not run.model.training:
            run.model.train()
        if self._meta is None:
            self._plain = _PlainSteps(run, start)
        else:
            self._handoff.start(lambda: self._meta.window(run, start, n_steps))

    def _window_length(self, eval_every: int | None = None) -> int:
        step = self.steps
        n_steps = self._horizon
        if self._total is not None:
            n_steps = min(n_steps, self._total - step)
        if eval_every is not None:
            n_steps = min(n_steps, eval_every - step % eval_every)
        if self._meta:
            n_steps = min(n_steps, _to_next_segment(self._run.hyper, step))
        return n_steps

    def _advance(self, n_steps: int) -> bool:
        """One whole window on the run's own batches; whether it was kept (else it was undone)."""
        run = self._run
        self._window_start, self._window_end = self.steps, self.steps + n_steps
        run.model.train()  # evaluation may have left it in eval mode
        if self._meta is None:
            window = _plain_window(run, self.steps, n_steps)
        else:
            window = self._meta.window(run, self.steps, n_steps)
        return self._end(window)

    def _evaluated(self, measured: dict[str, float], step: int) -> None:
        """An evaluation of the model after ``step`` steps (``valid_loss`` and, for a classifier,
        ``valid_accuracy`` in ``measured``): the values may go back (``Hypergradient.confirm``), at
        once or, in the middle of a window (a loop of the user's own), when the window ends."""
        if self._meta is None or measured.get("valid_loss") is None:
            return
        self._evaluation = (_Evaluation(measured["valid_loss"], measured.get("valid_accuracy")), step)
        if not self._in_window():
            self._confirm()

    def _in_window(self) -> bool:
        return self._handoff is not None and self._handoff.running  # with hypergradients every window is handed off

    def _confirm(self) -> None:
        if self._evaluation is not None:
            self._meta.evaluated(*self._evaluation)
            self._evaluation = None

    def _end(self, window: Window) -> bool:
        """The guard, then the window's record and meta step; whether it was kept."""
        start, end = self._window_start, self._window_end
        problem = window.problem(self._loss_limit)
        if problem:
            window.rollback()
            self._failures += 1
            self.rejected_steps += 1
            if self._meta is None or self._failures > self._hypergradient.max_failures:
                self.reason = _divergence(problem, start, self._failures)
                raise Diverged(self.reason)
            self._meta.reject()
            return False
        window.commit()
        self._failures = 0
        _record(self._run, end, window)
        if self._meta and window.moves is not None:
            self._meta.step(window.moves, segment=self._run.hyper.segment(start))
        if self._meta:
            self._confirm()
        self.steps = end
        self.last_train_loss = window.train_loss
        return True


def train(
    model: torch.nn.Module,
    *,
    data: Dataset | Loaders,
    steps: int,
    batch_size: int | None = None,
    learning_rate: LearningRate,
    weight_decay: WeightDecay | None = None,
    optimizer: str = "sgd",
    optimizer_options: dict | None = None,
    hypergradient: Hypergradient | None = None,
    loss_fn: Callable[..., torch.Tensor] = F.cross_entropy,
    metrics: dict[str, Metric] | None = None,
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
    hypergradients) the run ends with ``status="diverged"`` and the reason. Without
    hypergradients a window runs from one evaluation to the next.

    While it trains, the CPU flushes denormal floats to zero (``torch.set_flush_denormal``, put
    back after): late in a run they had made steps several times slower (docs/estimators.md).

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
    check_data(data, batch_size)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    eval_every = evaluation_cadence(steps, hypergradient, eval_every)
    model = model.to(device)
    if isinstance(data, Dataset):
        data = data.to(device, next(model.parameters()).dtype)
    run = build_run(
        model, data=data, steps=steps, batch_size=batch_size, learning_rate=learning_rate,
        weight_decay=weight_decay, optimizer=optimizer, optimizer_options=optimizer_options,
        loss_fn=loss_fn, seed=seed,
        valid_batch_size=(hypergradient and hypergradient.valid_batch_size) or _size(data.valid),
        valid_batches=hypergradient and hypergradient.valid_batches,
    )
    problem = fit_problem(model, run.train_batches.peek(), loss_fn, "train")
    if problem:
        raise ValueError(problem)
    hyper = HyperOptimizer._on_run(
        run, hypergradient=hypergradient, steps=steps, initial_values=initial_values,
        loss_limit=max_loss_ratio * evaluate(model, data.valid, loss_fn)["loss"], plain_window=eval_every,
    )
    with flushing_denormals():
        outcome = _loop(hyper, data.valid, metrics, steps, eval_every, on_evaluation, on_steps or (lambda n: None))
    return TrainResult(
        model=model,
        optimizer=run.optimizer,
        trajectory=hyper.trajectory,
        evaluations=pd.DataFrame(outcome.evaluations),
        hyperparameters=hyper.hyperparameters,
        status=outcome.status,
        reason=outcome.reason,
        steps=hyper.steps,
        rejected_steps=hyper.rejected_steps,
    )


def evaluation_cadence(steps: int, hypergradient: Hypergradient | None, eval_every: int | None) -> int:
    """Every how many steps :func:`train` evaluates: ``eval_every``, else about 10 times, at window ends."""
    horizon = hypergradient.horizon if hypergradient else _PLAIN_WINDOW
    return eval_every or horizon * max(1, steps // (10 * horizon))


class _StopLoop(Exception):
    """Raised from ``report`` in a loop of the user's own to end it (pruned or diverged)."""


def train_loop(
    loop: Callable[[HyperOptimizer, Callable[[dict[str, float]], None]], None],
    model: torch.nn.Module,
    *,
    steps: int,
    learning_rate: LearningRate,
    weight_decay: WeightDecay | None = None,
    optimizer: str = "sgd",
    optimizer_options: dict | None = None,
    hypergradient: Hypergradient | None = None,
    initial_values: dict[str, float] | None = None,
    max_loss_ratio: float = 10.0,
    device: str | torch.device = "cpu",
    on_evaluation: Callable[[int, dict[str, float]], bool] | None = None,
    on_steps: Callable[[int], None] | None = None,
) -> TrainResult:
    """Run ``loop(hyper, report)``, a training loop of your own, as :func:`train` runs its own.

    ``hyper`` is a :class:`HyperOptimizer` of ``model`` (moved to ``device``) with these settings;
    ``loop`` calls ``hyper.step`` for each training step (``steps`` in all) and
    ``report({"valid_loss": ..., ...})`` after each evaluation of its own, at least once at the
    end. The evaluations are recorded at ``hyper.steps`` with a ``valid_`` prefix added where
    missing; when ``on_evaluation`` asks to stop (a pruned trial) ``report`` ends the loop by
    raising, as does ``hyper.step`` when the run diverges and ``report`` given a validation loss that is
    not finite. Denormal floats are flushed to zero while ``loop`` runs, as in :func:`train`.

    Example:
        >>> import torch, torch.nn.functional as F, hypermeta
        >>> data = hypermeta.datasets.digits()
        >>> def loop(hyper, report):
        ...     for i in range(30):
        ...         x, y = data.train.x[i * 32:(i + 1) * 32], data.train.y[i * 32:(i + 1) * 32]
        ...         hyper.step(lambda m: F.cross_entropy(m(x), y),
        ...                    lambda m: F.cross_entropy(m(data.valid.x), data.valid.y))
        ...     report({"loss": hypermeta.evaluate(hyper.model, data.valid, F.cross_entropy)["loss"]})
        >>> result = hypermeta._engine.train_loop(
        ...     loop, torch.nn.Linear(64, 10), steps=30, learning_rate=hypermeta.LearningRate(init=0.1),
        ...     hypergradient=hypermeta.Hypergradient(horizon=10))
        >>> result.status, result.evaluations.columns.tolist(), result.trajectory["step"].unique().tolist()
        ('completed', ['step', 'valid_loss'], [10, 20, 30])
    """
    hyper = HyperOptimizer(
        model.to(device), learning_rate=learning_rate, optimizer=optimizer, optimizer_options=optimizer_options,
        weight_decay=weight_decay, hypergradient=hypergradient, steps=steps, initial_values=initial_values,
        max_loss_ratio=max_loss_ratio,
    )
    outcome, reported = _Outcome(), [0]

    def report(metrics: dict[str, float]) -> None:
        step = hyper.steps
        (on_steps or (lambda n: None))(step - reported[0])
        reported[0] = step
        measured = {"step": step, **{_valid(k): float(v) for k, v in metrics.items()}}
        outcome.evaluations.append(measured)
        if not math.isfinite(measured.get("valid_loss", 0.0)):
            outcome.end("diverged", f"validation loss is not finite at step {step}")
            raise _StopLoop
        hyper._evaluated(measured, step)
        if on_evaluation is not None and on_evaluation(step, measured):
            outcome.end("stopped", f"stopped at step {step} by on_evaluation")
            raise _StopLoop

    try:
        with flushing_denormals():
            loop(hyper, report)
    except _StopLoop:
        pass
    except Diverged as diverged:
        outcome.end("diverged", str(diverged))
    finally:
        hyper.close()
    if not outcome.evaluations:
        raise ValueError("the training loop reported no evaluation: call report({'valid_loss': ...}) at its end")
    return TrainResult(
        model=hyper.model, optimizer=hyper.optimizer, trajectory=hyper.trajectory,
        evaluations=pd.DataFrame(outcome.evaluations), hyperparameters=hyper.hyperparameters,
        status=outcome.status, reason=outcome.reason, steps=hyper.steps, rejected_steps=hyper.rejected_steps,
    )


def _valid(name: str) -> str:
    return name if name.startswith("valid_") else f"valid_{name}"


@dataclass
class _Outcome:
    evaluations: list[dict] = field(default_factory=list)
    status: str = "completed"
    reason: str | None = None

    def end(self, status: str, reason: str) -> _Outcome:
        self.status, self.reason = status, reason
        return self


def _loop(hyper: HyperOptimizer, valid, metrics, steps, eval_every, on_evaluation, on_steps) -> _Outcome:
    outcome = _Outcome()
    run = hyper._run
    while hyper.steps < steps:
        n_steps = hyper._window_length(eval_every)
        try:
            if not hyper._advance(n_steps):
                continue
        except Diverged as diverged:
            return outcome.end("diverged", str(diverged))
        on_steps(n_steps)
        step = hyper.steps
        if step % eval_every == 0 or step == steps:
            measured = {"step": step, "train_loss": float(hyper.last_train_loss)}
            measured.update({f"valid_{k}": v for k, v in evaluate(run.model, valid, run.loss_fn, metrics).items()})
            outcome.evaluations.append(measured)
            if not math.isfinite(measured["valid_loss"]):
                return outcome.end("diverged", f"validation loss is not finite at step {step}")
            hyper._evaluated(measured, step)
            if on_evaluation is not None and on_evaluation(step, measured):
                return outcome.end("stopped", f"stopped at step {step} by on_evaluation")
    return outcome


def build_run(
    model, *, data, steps, batch_size, learning_rate, optimizer, optimizer_options, weight_decay=None,
    loss_fn, seed, valid_batch_size=None, valid_batches=None,
) -> _Run:
    """Everything a window needs; ``model`` (and a ``Dataset``'s tensors) already on one device and dtype.

    Training and validation batches come from separate generators (or loaders), so the training
    batches of a run do not depend on whether hypergradients are computed.
    """
    return _new_run(
        model, parameter_groups(model), steps=steps, learning_rate=learning_rate, weight_decay=weight_decay,
        optimizer=optimizer, optimizer_options=optimizer_options, loss_fn=loss_fn,
        **_streams(data, batch_size, valid_batch_size, valid_batches, seed, next(model.parameters())),
    )


def _new_run(
    model, groups, *, steps, learning_rate, weight_decay, optimizer, optimizer_options, loss_fn,
    train_batches, valid_batches,
) -> _Run:
    parameter = next(model.parameters())
    hyper = HyperParameters(
        learning_rate=learning_rate, weight_decay=weight_decay, group_names=list(groups),
        total_steps=steps, dtype=parameter.dtype, device=parameter.device,
    )
    return _Run(
        model=model, hyper=hyper, loss_fn=loss_fn,
        optimizer=_inner_optimizer(optimizer, optimizer_options, groups, learning_rate, weight_decay),
        train_batches=train_batches, valid_batches=valid_batches,
    )


def _streams(data, batch_size, valid_batch_size, valid_batches, seed, parameter) -> dict:
    if isinstance(data, Loaders):
        device, dtype = parameter.device, parameter.dtype
        return {
            "train_batches": LoaderBatches(data.train, device=device, dtype=dtype, where="train"),
            "valid_batches": JoinedBatches(
                data.valid, n=valid_batches, examples=valid_batch_size, device=device, dtype=dtype,
            ),
        }
    return {
        "train_batches": Batches(data.train, batch_size=batch_size, generator=torch.Generator().manual_seed(seed)),
        "valid_batches": Batches(
            data.valid, batch_size=valid_batch_size or len(data.valid),
            generator=torch.Generator().manual_seed(seed + 1),
        ),
    }


def check_data(data, batch_size) -> None:
    """A ``Dataset`` needs a batch size; ``Loaders`` bring their own."""
    if isinstance(data, Loaders):
        if batch_size is not None:
            raise ValueError("with Loaders the loaders decide the batch size: leave batch_size out")
    elif isinstance(data, Dataset):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"a Dataset needs batch_size, an integer >= 1, got {batch_size!r}")
    else:
        raise TypeError(f"data must be a hypermeta.Dataset or hypermeta.Loaders, got {type(data).__name__}")


def _size(split) -> int | None:
    return len(split) if isinstance(split, Split) else None


@dataclass(frozen=True)
class _Evaluation:
    """What confirmation compares: the validation loss and, for a classifier, the accuracy."""

    loss: float
    accuracy: float | None

    def no_worse_than(self, other: _Evaluation) -> bool:
        """The loss no higher and the accuracy (where both have one) no lower."""
        lower_accuracy = self.accuracy is not None and other.accuracy is not None and self.accuracy < other.accuracy
        return self.loss <= other.loss and not lower_accuracy


class _MetaStep:
    """The meta-optimizer, with the divergence guard's memory of the last good state."""

    def __init__(self, hyper: HyperParameters, hypergradient: Hypergradient) -> None:
        self.hyper = hyper
        self.estimator = _ESTIMATORS[hypergradient.estimator]
        if isinstance(hypergradient.meta_lr, tuple):
            raise ValueError(f"meta_lr={hypergradient.meta_lr} is a search range; give train() a number")
        self.meta_lr = hypergradient.meta_lr
        self.carry_segments = hypergradient.carry_segments
        self.every = hypergradient.every
        self.horizon, self.settle = hypergradient.horizon, hypergradient.settling_steps
        self.windows = 0  # begun so far, rejected ones included
        self.optimizer = _META_OPTIMIZERS[hypergradient.meta_optimizer](hyper.tensors(), lr=self.meta_lr)
        self.saved = self._save()
        self.confirm = hypergradient.confirm
        hyper.hold_within(hypergradient.span)  # so carry_into and restore keep the span too
        self.last = _Evaluation(math.inf, None)
        self.confirmed, self.confirmed_in = self.saved, 0
        self.put_back_into: int | None = None  # the segment whose rates go back before the next window

    def evaluated(self, evaluation: _Evaluation, step: int) -> None:
        """Keep the values if the evaluation at ``step`` is no worse than the one before, else put
        back those kept then (see ``Hypergradient.confirm``).

        The values go back when the next window begins: a run that ends here ends with (and
        reports) the values it reached.
        """
        if not self.confirm:
            return
        self._put_back()  # a pending put-back first, as an immediate one would have been
        segment = self.hyper.segment(max(step - 1, 0))  # the values the evaluated model was trained with
        previous, self.last = self.last, evaluation
        if evaluation.no_worse_than(previous):
            self.confirmed, self.confirmed_in = self._save(), segment
        else:
            self.put_back_into = segment

    def _put_back(self) -> None:
        if self.put_back_into is None:
            return
        hyper_state, meta_state = self.confirmed
        self.hyper.restore(
            hyper_state, saved_in=self.confirmed_in, segment=self.put_back_into, carry=self.carry_segments
        )
        load_optimizer_state(self.optimizer, meta_state)
        self.saved = self._save()
        self.put_back_into = None

    def window(self, run, step: int, n_steps: int) -> Window:
        self._put_back()
        if self.carry_segments:
            self.hyper.carry_into(step)
        self.windows += 1
        if (self.windows - 1) % self.every:
            return _plain_window(run, step, n_steps)
        return self.estimator(run, step, n_steps, settle=self.settle * n_steps // self.horizon)

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


class _PlainSteps:
    """The plain ``torch.optim`` steps of one window, taken one by one, and the window they make."""

    def __init__(self, run: _Run, start: int) -> None:
        self.run, self.step = run, start
        self.saved = snapshot(run.model, run.optimizer)
        self.losses = []
        self.segment = None  # whose values the optimizer holds

    def take(self, batch) -> None:
        run = self.run
        segment = run.hyper.segment(self.step)
        if segment != self.segment:  # values change only between windows and where a schedule segment begins
            set_values(run.optimizer, run.hyper, self.step)
            self.segment = segment
        self.losses.append(train_step(run.model, run.optimizer, run.loss_fn, batch))
        self.step += 1

    def window(self) -> Window:
        return trained_in_place(self.run.model, self.run.optimizer, self.saved, self.losses)


def _plain_window(run: _Run, start: int, n_steps: int) -> Window:
    steps = _PlainSteps(run, start)
    for _ in range(n_steps):
        steps.take(run.train_batches.next())
    return steps.window()


def _record(run: _Run, step: int, window: Window) -> None:
    grads = window.moves
    valid_loss = float("nan") if window.valid_loss is None else float(window.valid_loss)
    train_loss = float(window.train_loss)
    leaves = run.hyper.tensors()
    values = [leaf.detach().exp().flatten().tolist() for leaf in leaves]  # one conversion per leaf, not per entry
    moved = None if grads is None else [grad.flatten().tolist() for grad in grads]
    for name, group, segment, tensor, index in run.hyper.entries():
        leaf = next(i for i, t in enumerate(leaves) if t is tensor)
        run.rows.append({
            "step": step, "name": name, "group": group, "segment": segment, "value": values[leaf][index],
            "hypergradient": float("nan") if moved is None else moved[leaf][index],
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
