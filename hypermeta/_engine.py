"""The engine: one training run whose hyperparameters follow hypergradients as it trains.

It knows nothing of Optuna. A run is a sequence of windows of inner steps; after each window an
estimator returns hypergradients of the validation loss, and a meta-optimizer updates the
hyperparameters (in log space) before the next window.
"""

from __future__ import annotations

import math
import time
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
from hypermeta._private.plain import set_values, snapshot, train_step, trained_in_place
from hypermeta._private.rprop import Rprop
from hypermeta._private.unrolled import unrolled_window
from hypermeta._private.window import Window
from hypermeta._records import TRAJECTORY_COLUMNS

_ESTIMATORS = {"unrolled": unrolled_window, "first_order": first_order_window, "greedy": greedy_window}
MAX_FAILURES = 5  # windows rejected in a row that end a run with hypergradients as diverged
JUMPS = (2.0, 4.0)  # a window's training / validation loss may not exceed this times the previous window's ...
FITTED = 0.1  # ... unless it is below this fraction of the initial loss: the model fits (also the learning rates' pace)
CUT = 3.0  # a rejected window's learning rates are divided by this
_OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}
_PLAIN_WINDOW = 10
_OPEN_ENDED = 2**62  # the step budget of a HyperOptimizer run without a schedule


@dataclass(frozen=True, kw_only=True)
class Hypergradient:
    """How the differentiable hyperparameters follow hypergradients of the validation loss.

    The run is cut into windows of inner steps: 1, 2, 4, ... steps at first, then ``horizon``.
    At the end of every window the estimator returns d(validation loss)/d(log value) for every
    learning rate and weight decay, on ``valid_batch_size`` validation examples, and each value
    moves in log space by a sign step with a step size of its own (Rprop): the step size grows
    by 1.2 while the hypergradient keeps its sign and halves when it flips, from 0.3 (a factor of
    1.35) within 0.001..1. Learning rates move at full pace while the training loss is above a
    tenth of where it started; once the model fits, by at most the window's share of the steps
    left (the window's length over the steps left), so a look-ahead of a few windows cannot anneal a rate early
    in a long run but can at its end. A window whose loss is not finite, exceeds the run's limit,
    or jumps (the training loss more than doubles from the window before, or the validation loss
    more than quadruples, while above a tenth of where it started) is undone together with the
    hyper-step that led into it, and the window's learning rates are cut threefold. See
    docs/estimators.md.

    Args:
        estimator: ``"first_order"`` (the default: plain ``torch.optim`` steps; the tangents of
            the weights with respect to each value, the training loss's Hessian dropped, carried
            over the run so that a hypergradient looks back over about a third of it),
            ``"unrolled"`` (exact over each window: reverse mode through its steps with
            ``higher``) or ``"greedy"`` (Baydin et al. 2018: each window's steps with the
            optimizer state held fixed). All three are exact over one step.
        horizon: inner steps per window once the first windows have doubled up to it (default
            40). Longer windows cost less (one validation gradient per window) and move the values
            less often; the unrolled estimator keeps a window's graph in memory.
        valid_batch_size: validation examples per hypergradient, a fresh random subsample each
            window (the whole split when it is smaller); ``None`` uses the whole split. With
            :class:`hypermeta.Loaders`, the next consecutive batches of ``valid`` that hold this
            many examples (one batch at least, one pass at most).

    Example:
        >>> import hypermeta
        >>> hypermeta.Hypergradient(estimator="greedy", horizon=5).horizon
        5
    """

    estimator: str = "first_order"
    horizon: int = 40
    valid_batch_size: int | None = 256

    def __post_init__(self) -> None:
        _one_of("estimator", self.estimator, _ESTIMATORS)
        if isinstance(self.horizon, bool) or not isinstance(self.horizon, int) or self.horizon < 1:
            raise ValueError(f"horizon must be an integer >= 1, got {self.horizon!r}")
        size = self.valid_batch_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"valid_batch_size must be an integer >= 1 or None, got {size!r}")


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
    carried: Any = None  # the first-order estimator's tangents, carried from window to window


class Diverged(RuntimeError):
    """Raised by :meth:`HyperOptimizer.step` once the divergence guard has ended the run; says why."""


class HyperOptimizer:
    """Hypergradient-driven hyperparameters for a training loop of your own.

    Wraps ``model`` in an inner ``torch.optim`` optimizer (one parameter group per layer, as in
    :func:`hypermeta.train`) whose learning rates and weight decays follow hypergradients of the
    validation loss. Each :meth:`step` does one training step; when a window ends (after 1, 2, 4,
    ... steps, then every ``hypergradient.horizon``), ``valid_loss`` is called and the
    hyperparameters move. Without ``hypergradient`` the steps are plain ``torch.optim`` steps at
    the initial values.

    ``steps``, the run's length, paces the learning rates (see :class:`Hypergradient`; without
    it the run is taken to go on as long again as it has gone) and is required by learning-rate
    schedules (``segments > 1``), whose segments split it. The divergence guard works as in
    :func:`hypermeta.train`, with the limit ``max_loss_ratio`` times the first step's training
    loss: a rejected window's steps are undone (weights, buffers, optimizer state), and once the
    guard gives up :meth:`step` raises :class:`Diverged`.

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
        >>> hyper.steps, hyper.trajectory["step"].unique().tolist()  # windows of 1, 2, 4, 5 and 5 steps
        (20, [1, 3, 7, 12, 17])
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
        if steps is None and learning_rate.segments > 1:
            raise ValueError(
                f"a learning-rate schedule of {learning_rate.segments} segments splits the run's steps; "
                "give HyperOptimizer(steps=...), the length of your run"
            )
        self._handoff = Handoff()
        groups = parameter_groups(model)
        run = _new_run(
            LossModule(model), groups, steps=steps or _OPEN_ENDED, learning_rate=learning_rate,
            weight_decay=weight_decay, optimizer=optimizer, optimizer_options=optimizer_options, loss_fn=picked,
            train_batches=self._handoff.train_batches, valid_batches=self._handoff.valid_batches,
        )
        self._start(run, hypergradient, steps, initial_values, max_loss_ratio)

    @classmethod
    def _on_run(
        cls, run: _Run, *, hypergradient, steps, initial_values, initial_loss: float, max_loss_ratio: float,
        plain_window: int, stop_at: float = math.inf,
    ) -> HyperOptimizer:
        """One driven window by window on ``run``'s own batch streams (how :func:`train` uses it).

        Without hypergradients a window runs up to the next evaluation (``plain_window`` steps):
        each window costs a snapshot, a check and a trajectory row, which plain training need
        not pay every ten steps.
        """
        self = cls.__new__(cls)
        self._handoff = None  # train() drives whole windows itself
        self._start(run, hypergradient, steps, initial_values, max_loss_ratio, plain_window)
        self._initial_loss = initial_loss
        if stop_at < math.inf:
            self._deadline = (time.perf_counter(), stop_at)
        return self

    def _start(
        self, run, hypergradient, steps, initial_values, max_loss_ratio, plain_window: int = _PLAIN_WINDOW
    ) -> None:
        self._run, self._hypergradient, self._total = run, hypergradient, steps
        self._max_loss_ratio = max_loss_ratio
        self._initial_loss = None  # the validation loss before training (train()), else the first step's loss
        self._failures = 0
        run.hyper.load_values(initial_values or {})
        self._meta = _MetaStep(run.hyper, hypergradient, self._steps_left) if hypergradient else None
        self._horizon = hypergradient.horizon if hypergradient else plain_window
        self._guard = _Guard()
        self._deadline = None  # (start, stop time) of a run with a time budget, on time.perf_counter()
        self._plain = None  # the plain steps of the user's current window
        self._window_start = self._window_end = 0
        self._done = 0  # the steps of the windows kept so far
        self._fed = 0  # the steps fed to the window under way (a loop of the user's own)
        self.rejected_steps = 0
        self.reason: str | None = None
        self.last_train_loss: torch.Tensor | None = None

    def _steps_left(self, step: int) -> float:
        """The steps the run has left after ``step``: its own count, else as many as so far (an open-ended
        run), or what its time budget will allow at the pace so far."""
        left = step if self._total is None else self._total - step
        if self._deadline is not None:
            started, stop_at = self._deadline
            now = time.perf_counter()
            if now > started:
                left = min(left, step * max(stop_at - now, 0.0) / (now - started))
        return left

    def close(self) -> None:
        """End a window left unfinished (a loop stopped mid-window): its worker thread stops and its
        steps are undone. Train no further with this HyperOptimizer afterwards."""
        if self._handoff is not None:
            self._handoff.close()
        if self._plain is not None:
            self._plain.window().rollback()
            self._plain = None

    @property
    def steps(self) -> int:
        """Training steps taken and kept: those of the windows kept and of the window under way."""
        running = self._handoff is not None and self._handoff.running or self._plain is not None
        return self._done + (self._fed if running else 0)

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
            self._fed = 0
        self._fed += 1
        if self._plain is not None:
            self._plain.take((training, None))
            window = self._plain.window() if self._plain.step == self._window_end else None
        else:
            window = self._handoff.feed(training, valid_loss)
        if self._initial_loss is None:
            self._initial_loss = float(losses[0].detach())
        if window is not None:
            self._plain = None
            self._end(window)
        return losses[0].detach()

    def _begin(self, n_steps: int) -> None:
        run, start = self._run, self._done
        self._window_start, self._window_end = start, start + n_steps
        if not run.model.training:
            run.model.train()
        if self._meta is None:
            self._plain = _PlainSteps(run, start)
        else:
            self._handoff.start(lambda: self._meta.window(run, start, n_steps))

    def _window_length(self, eval_every: int | None = None) -> int:
        step = self._done
        n_steps = self._meta.window_length() if self._meta else self._horizon
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
        self._window_start, self._window_end = self._done, self._done + n_steps
        run.model.train()  # evaluation may have left it in eval mode
        if self._meta is None:
            window = _plain_window(run, self._done, n_steps)
        else:
            window = self._meta.window(run, self._done, n_steps)
        return self._end(window)

    def _end(self, window: Window) -> bool:
        """The guard, then the window's record and meta step; whether it was kept."""
        start, end = self._window_start, self._window_end
        problem = window.problem(self._max_loss_ratio * self._initial_loss)
        if not problem and self._meta is not None:
            problem = self._guard.jump(window, initial=self._initial_loss)
        if problem:
            window.rollback()
            self._failures += 1
            self.rejected_steps += 1
            if self._meta is None or self._failures >= MAX_FAILURES:
                self.reason = _divergence(problem, start, self._failures)
                raise Diverged(self.reason)
            self._meta.reject(self._run.hyper.segment(start))
            return False
        window.commit()
        self._failures = 0
        self._guard.kept(window)
        _record(self._run, end, window)
        if self._meta and window.hypergradients is not None:
            self._meta.step(window, segment=self._run.hyper.segment(start), start=start, end=end)
        self._done = end
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
    seconds: float | None = None,
) -> TrainResult:
    """Train ``model`` for ``steps`` inner steps, adapting its hyperparameters on the way.

    Parameters are grouped by the module that owns them (one group per layer). Without
    ``hypergradient`` this is plain ``torch.optim`` training at the initial values.
    ``initial_values`` starts single entries elsewhere than ``init``, keyed as
    ``TrainResult.hyperparameters`` is (``"lr/<group>/<segment>"``, ``"weight_decay/<group>"``).
    ``on_evaluation(step, metrics)`` is called after each evaluation on the validation split
    (every ``eval_every`` steps -- by default about 10 times, at window ends -- and at the
    end); returning ``True`` stops the run.
    ``on_steps(n)`` is told of every ``n`` inner steps done. ``seconds``, a time budget, ends the
    run at its first evaluation after that many seconds (``steps`` is then the most it may take;
    a hypergradient run paces its learning rates by the steps the budget leaves at the pace so
    far). Test data is never read.

    Divergence guard: a window whose loss is not finite or above ``max_loss_ratio`` times the
    initial validation loss, or whose hypergradient is not finite, is rejected: the weights,
    buffers and optimizer state go back to before it. Without hypergradients the run then ends
    with ``status="diverged"`` and the reason (a window runs from one evaluation to the next).
    With them, a window whose loss jumps is rejected too, the hyper-step that led into it is
    undone and its learning rates are cut threefold (see :class:`Hypergradient`); after 5
    rejections in a row the run ends as diverged.

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
        >>> result.status, result.trajectory["step"].unique().tolist()  # cut at the evaluations, every 5
        ('completed', [1, 3, 5, 10, 15, 20])
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
    )
    problem = fit_problem(model, run.train_batches.peek(), loss_fn, "train")
    if problem:
        raise ValueError(problem)
    initial_loss = evaluate(model, data.valid, loss_fn)["loss"]
    stop_at = math.inf if seconds is None else time.perf_counter() + seconds
    hyper = HyperOptimizer._on_run(
        run, hypergradient=hypergradient, steps=steps, initial_values=initial_values,
        initial_loss=initial_loss, max_loss_ratio=max_loss_ratio, plain_window=eval_every, stop_at=stop_at,
    )
    with flushing_denormals():
        outcome = _loop(hyper, data.valid, metrics, steps, eval_every, on_evaluation, on_steps or (lambda n: None),
                        stop_at)
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
        ('completed', ['step', 'valid_loss'], [1, 3, 7, 15, 25, 30])
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


def _loop(hyper: HyperOptimizer, valid, metrics, steps, eval_every, on_evaluation, on_steps, stop_at) -> _Outcome:
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
            if on_evaluation is not None and on_evaluation(step, measured):
                return outcome.end("stopped", f"stopped at step {step} by on_evaluation")
            if time.perf_counter() >= stop_at:
                return outcome
    return outcome


def build_run(
    model, *, data, steps, batch_size, learning_rate, optimizer, optimizer_options, weight_decay=None,
    loss_fn, seed, valid_batch_size=None,
) -> _Run:
    """Everything a window needs; ``model`` (and a ``Dataset``'s tensors) already on one device and dtype.

    Training and validation batches come from separate generators (or loaders), so the training
    batches of a run do not depend on whether hypergradients are computed.
    """
    return _new_run(
        model, parameter_groups(model), steps=steps, learning_rate=learning_rate, weight_decay=weight_decay,
        optimizer=optimizer, optimizer_options=optimizer_options, loss_fn=loss_fn,
        **_streams(data, batch_size, valid_batch_size, seed, next(model.parameters())),
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


def _streams(data, batch_size, valid_batch_size, seed, parameter) -> dict:
    if isinstance(data, Loaders):
        device, dtype = parameter.device, parameter.dtype
        return {
            "train_batches": LoaderBatches(data.train, device=device, dtype=dtype, where="train"),
            "valid_batches": JoinedBatches(
                data.valid, examples=valid_batch_size, device=device, dtype=dtype,
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


class _Guard:
    """Remembers the last kept window's losses, against which the next one may not jump."""

    def __init__(self) -> None:
        self.last: tuple[float, float] | None = None  # training, validation loss of the last kept window

    def jump(self, window: Window, *, initial: float) -> str | None:
        """Why ``window``'s losses jumped (``None``: they did not). Before any window was kept, the
        reference is ``initial``: the validation loss before training (or the first step's loss)."""
        reference = self.last or (initial, initial)
        losses = (float(window.train_loss), math.nan if window.valid_loss is None else float(window.valid_loss))
        for what, loss, before, factor in zip(("training", "validation"), losses, reference, JUMPS, strict=True):
            if loss > factor * before and loss > FITTED * initial:
                return f"{what} loss {loss:.4g} jumped above {factor:g}x the previous window's ({before:.4g})"
        return None

    def kept(self, window: Window) -> None:
        valid = math.nan if window.valid_loss is None else float(window.valid_loss)
        self.last = (float(window.train_loss), valid if math.isfinite(valid) else math.inf)


class _MetaStep:
    """The values' moves (Rprop, paced) and what the divergence guard needs to undo the last one."""

    def __init__(self, hyper: HyperParameters, hypergradient: Hypergradient, steps_left) -> None:
        self.hyper, self.horizon, self.steps_left = hyper, hypergradient.horizon, steps_left
        self.estimator = _ESTIMATORS[hypergradient.estimator]
        self.rprop = Rprop(hyper.tensors())
        self.saved = self._save()  # the state before the last hyper-step
        self.kept = 0  # hyper-steps taken
        self.first_loss: float | None = None  # the first window's training loss

    def window_length(self) -> int:
        """1, 2, 4, ... steps for the first windows, then the horizon."""
        return min(self.horizon, 2 ** min(self.kept, 30))

    def window(self, run, step: int, n_steps: int) -> Window:
        self.hyper.carry_into(step)
        return self.estimator(run, step, n_steps)

    @torch.no_grad()
    def step(self, window: Window, *, segment: int, start: int, end: int) -> None:
        """Move the values; of the learning rates only those of ``segment``, the window's, at their pace."""
        self.saved = self._save()
        self.kept += 1
        train_loss = float(window.train_loss)
        if self.first_loss is None:
            self.first_loss = train_loss
        moves = self.rprop.moves(window.hypergradients)
        if train_loss <= FITTED * self.first_loss:  # once the model fits, learning rates move at the run's pace
            moves[0] *= min(1.0, (end - start) / max(self.steps_left(end), 1.0))
        for tensor, move in zip(self.hyper.tensors(), moves, strict=True):
            tensor += move
        self.hyper.keep_other_segments(self.saved[0], segment)
        self.hyper.project()

    @torch.no_grad()
    def reject(self, segment: int) -> None:
        """Undo the last hyper-step and cut the learning rates of ``segment``."""
        hyper_state, rprop_state = self.saved
        self.hyper.load_state(hyper_state)
        self.rprop.load_state(rprop_state)
        self.hyper.log_lr[segment] -= math.log(CUT)
        self.hyper.project()
        self.saved = self._save()

    def _save(self):
        return self.hyper.state(), self.rprop.state()


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
    grads = window.hypergradients
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
