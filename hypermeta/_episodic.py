"""The episodic engine: meta-learning an initialization and its inner learning rates over tasks.

It knows nothing of Optuna. Each meta step samples a meta-batch of tasks, adapts the shared
initial weights to every task's support set with a few differentiable SGD steps (``higher``),
and back-propagates the mean query loss through those steps into the initialization (MAML) and
the learned inner learning rates (per layer and step as in MAML++, or per parameter as in
Meta-SGD) and weight decay; Adam takes the meta step.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd
import torch

from hypermeta._data import Split
from hypermeta._engine import parameter_groups
from hypermeta._hyperparameters import LR_BOUNDS, WeightDecay
from hypermeta._private.episodes import InnerLoop, InnerRates
from hypermeta._records import TRAJECTORY_COLUMNS
from hypermeta.tasks import Episodes

FORMS = ("fixed", "per_layer", "per_layer_per_step", "per_parameter")
EPISODIC_METRICS = ("valid_loss", "valid_accuracy")
TEST_SEED_OFFSET = 2**31  # meta-test tasks come from a stream of their own, apart from any training seed


@dataclass(frozen=True, kw_only=True)
class InnerLearningRate:
    """The inner loop's learning rates, learned across tasks (or fixed, as in MAML).

    Args:
        init: the starting value of every rate.
        form: ``"fixed"`` (MAML: one rate, not learned), ``"per_layer"`` (one learned rate per
            layer), ``"per_layer_per_step"`` (MAML++: one per layer and inner step) or
            ``"per_parameter"`` (Meta-SGD: one per weight, shared by the inner steps).
        meta_lr: Adam's learning rate for the rates, which live in log space (0.01 changes a
            rate by about 1% per meta step).
        bounds: ``(low, high)`` the rates are projected into after every meta step.

    Example:
        >>> import hypermeta
        >>> hypermeta.InnerLearningRate(init=0.01, form="per_parameter").learned
        True
    """

    init: float = 0.01
    form: str = "per_layer_per_step"
    meta_lr: float = 0.01
    bounds: tuple[float, float] = LR_BOUNDS

    def __post_init__(self) -> None:
        if self.form not in FORMS:
            raise ValueError(f"inner learning rate form must be one of {FORMS}, got {self.form!r}")
        low, high = self.bounds
        if not 0 < low < high:
            raise ValueError(f"inner learning rate bounds must satisfy 0 < low < high, got {self.bounds!r}")
        if isinstance(self.init, bool) or not isinstance(self.init, numbers.Real) or not low <= self.init <= high:
            raise ValueError(f"inner learning rate init {self.init!r} must be a number inside its bounds {self.bounds}")
        if not self.meta_lr >= 0:
            raise ValueError(f"inner learning rate meta_lr must be >= 0, got {self.meta_lr!r}")

    @property
    def learned(self) -> bool:
        return self.form != "fixed"


@dataclass
class EpisodicResult:
    """The outcome of :func:`meta_train`.

    ``model`` holds the learned initialization and ``inner`` the learned inner rates (use both
    through :func:`evaluate_tasks`); ``hyperparameters`` are the final rates keyed
    ``inner_lr/<layer>/<inner step>`` (the mean rate of the layer for per-parameter rates) and
    ``weight_decay/<layer>``. ``trajectory`` has the columns of
    :data:`hypermeta.TRAJECTORY_COLUMNS` with ``step`` the meta step, ``segment`` the inner step,
    ``hypergradient`` d(query loss)/d(log value), ``train_loss`` the mean meta-training query loss
    since the previous row and ``valid_loss`` the meta-validation query loss. ``evaluations`` has
    one row per evaluation (meta step 0 included) on the meta-validation tasks. ``status`` is
    ``"completed"``, ``"stopped"`` (by ``on_evaluation``) or ``"diverged"`` (``reason`` says why).
    """

    model: torch.nn.Module
    inner: InnerRates
    inner_steps: int
    trajectory: pd.DataFrame
    evaluations: pd.DataFrame
    hyperparameters: dict[str, float]
    status: str
    reason: str | None
    steps: int
    rejected_steps: int = 0  # as in TrainResult; an episodic run stops at the first non-finite meta step


def meta_train(
    model: torch.nn.Module,
    *,
    tasks,
    shots: int,
    query: int,
    inner_steps: int,
    meta_steps: int,
    meta_batch: int = 25,
    inner_lr: InnerLearningRate | None = None,
    inner_weight_decay: WeightDecay | None = None,
    meta_lr: float = 1e-3,
    multi_step_loss: bool = False,
    loss_fn: Callable[..., torch.Tensor] | None = None,
    eval_every: int | None = None,
    valid_tasks: int = 100,
    seed: int = 0,
    device: str | torch.device = "cpu",
    on_evaluation: Callable[[int, dict[str, float]], bool] | None = None,
    on_steps: Callable[[int], None] | None = None,
) -> EpisodicResult:
    """Meta-learn ``model``'s initialization and its inner learning rates over ``tasks``.

    Every meta step adapts the initialization to ``meta_batch`` meta-training tasks (``shots``
    support examples each -- per class for classification) with ``inner_steps`` SGD steps, and
    moves the initialization (Adam, ``meta_lr``) and the learned rates (Adam in log space,
    ``inner_lr.meta_lr``) down the mean query loss, differentiated through the inner steps.
    With ``multi_step_loss`` the objective is the query loss averaged over the weights after
    every inner step (MAML++'s multi-step loss, not annealed), so that early steps are good too.
    Every ``eval_every`` meta steps (by default about 10 times) and at the start and end, the
    query loss (and accuracy) after ``inner_steps`` is measured on ``valid_tasks`` fixed
    meta-validation tasks; ``on_evaluation(step, metrics)`` returning ``True`` stops the run.
    ``loss_fn`` defaults to the task distribution's and must average over examples. The model
    must not use batch norm (it runs under ``torch.func.vmap``). Meta-test tasks are never read.

    Example:
        >>> import torch, hypermeta
        >>> torch.manual_seed(0) and None
        >>> model = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
        >>> result = hypermeta.meta_train(
        ...     model, tasks=hypermeta.tasks.Sinusoid(), shots=5, query=5, inner_steps=2, meta_steps=4,
        ...     meta_batch=4, inner_lr=hypermeta.InnerLearningRate(form="per_layer_per_step"), eval_every=2)
        >>> result.status, result.evaluations["step"].tolist(), sorted(result.hyperparameters)[:2]
        ('completed', [0, 2, 4], ['inner_lr/0/0', 'inner_lr/0/1'])
    """
    for name, value in (("inner_steps", inner_steps), ("meta_steps", meta_steps), ("meta_batch", meta_batch),
                        ("valid_tasks", valid_tasks)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not meta_lr >= 0:
        raise ValueError(f"meta_lr must be >= 0, got {meta_lr!r}")
    inner_lr = inner_lr or InnerLearningRate()
    if inner_weight_decay is not None and isinstance(inner_weight_decay.init, tuple):
        raise ValueError(f"inner_weight_decay init={inner_weight_decay.init!r} is a search range; give a number")
    eval_every = eval_every or max(1, meta_steps // 10)
    model = model.to(device)
    dtype = next(model.parameters()).dtype
    valid = tasks.sample(
        valid_tasks, shots=shots, query=query, generator=torch.Generator().manual_seed(seed + 1), split="valid"
    ).to(device, dtype)
    train_generator = torch.Generator().manual_seed(seed)
    inner = make_inner_rates(model, inner_lr=inner_lr, inner_weight_decay=inner_weight_decay, inner_steps=inner_steps)
    loop = InnerLoop(model, inner, loss_fn or tasks.loss_fn)
    groups = [{"params": list(model.parameters()), "lr": meta_lr}]
    if inner.tensors():
        groups.append({"params": inner.tensors(), "lr": inner_lr.meta_lr})
    meta_optimizer = torch.optim.Adam(groups)
    classification = bool(getattr(tasks, "classification", False))
    on_steps = on_steps or (lambda n: None)

    rows, evaluations, train_losses = [], [], []
    status, reason, step = "completed", None, 0

    def evaluate_now() -> bool:
        metrics = {"step": step, "train_loss": float(torch.tensor(train_losses).mean()) if train_losses else math.nan}
        scores = _scores(loop, valid, [inner_steps], classification)
        metrics.update({f"valid_{name}": float(values.mean()) for name, values in scores[inner_steps].items()})
        evaluations.append(metrics)
        if step:
            rows.extend(_rows(step, inner, metrics))
        train_losses.clear()
        return on_evaluation is not None and step > 0 and on_evaluation(step, metrics)

    evaluate_now()
    while step < meta_steps:
        episodes = tasks.sample(meta_batch, shots=shots, query=query, generator=train_generator).to(device, dtype)
        adapted = list(loop.adapt(episodes.support, inner_steps, differentiable=True))
        scored = adapted if multi_step_loss else adapted[-1:]
        query_loss = torch.stack([loop.task_losses(fast, episodes.query)[0].mean() for fast in scored]).mean()
        meta_optimizer.zero_grad()
        query_loss.backward()
        grads = [p.grad for group in groups for p in group["params"] if p.grad is not None]
        if not math.isfinite(float(query_loss.detach())) or not all(torch.isfinite(g).all() for g in grads):
            status, reason = "diverged", f"the query loss or its meta-gradient is not finite at meta step {step + 1}"
            break
        meta_optimizer.step()
        inner.project()
        train_losses.append(float(query_loss.detach()))
        step += 1
        on_steps(1)
        if step % eval_every == 0 or step == meta_steps:
            if evaluate_now():
                status, reason = "stopped", f"stopped at meta step {step} by on_evaluation"
                break
            if not math.isfinite(evaluations[-1]["valid_loss"]):
                status, reason = "diverged", f"the meta-validation loss is not finite at meta step {step}"
                break
    for param in [*model.parameters(), *inner.tensors()]:
        param.grad = None
    return EpisodicResult(
        model=model, inner=inner, inner_steps=inner_steps,
        trajectory=pd.DataFrame(rows, columns=TRAJECTORY_COLUMNS), evaluations=pd.DataFrame(evaluations),
        hyperparameters=inner.values(), status=status, reason=reason, steps=step,
    )


def make_inner_rates(model, *, inner_lr: InnerLearningRate, inner_weight_decay: WeightDecay | None,
                     inner_steps: int) -> InnerRates:
    """The rates of ``model``'s layers (modules owning parameters, as :func:`hypermeta.train` groups them)."""
    groups = parameter_groups(model)
    owner = {id(p): index for index, params in enumerate(groups.values()) for p in params}
    params = list(model.parameters())
    if len(owner) != len(params) or not all(p.requires_grad for p in params):
        raise ValueError("meta_train needs every parameter of the model to be trainable")
    return InnerRates(
        spec=inner_lr, weight_decay=inner_weight_decay, layers=list(groups),
        layer_of=[owner[id(p)] for p in params], params=params, inner_steps=inner_steps,
    )


def evaluate_tasks(
    result: EpisodicResult,
    *,
    tasks,
    shots: int,
    query: int,
    steps: tuple[int, ...] = (1, 5),
    n_tasks: int = 600,
    seed: int = 0,
    split: str = "test",
    batch: int = 200,
) -> pd.DataFrame:
    """Mean and 95% interval of the query loss (and accuracy) after adapting to held-out tasks.

    ``n_tasks`` tasks of ``split`` (meta-test by default, from a stream apart from training's:
    the same tasks for every result evaluated with the same arguments) are each adapted from the
    learned initialization with the learned inner rates; after each number of inner steps in
    ``steps`` the query metrics are averaged over tasks. The interval is
    ``1.96 * std / sqrt(n_tasks)``. Returns one row per entry of ``steps``: ``steps``,
    ``loss``, ``loss_ci95`` (and ``accuracy``, ``accuracy_ci95`` for classification).

    Example:
        >>> import torch, hypermeta
        >>> model = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        >>> sinusoid = hypermeta.tasks.Sinusoid()
        >>> result = hypermeta.meta_train(model, tasks=sinusoid, shots=5, query=5, inner_steps=1, meta_steps=1)
        >>> table = hypermeta.evaluate_tasks(result, tasks=sinusoid, shots=5, query=20, n_tasks=50)
        >>> table.columns.tolist(), table["steps"].tolist()
        (['steps', 'loss', 'loss_ci95'], [1, 5])
    """
    if not steps or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in steps):
        raise ValueError(f"steps must be integers >= 0, got {steps!r}")
    loop = InnerLoop(result.model, result.inner, tasks.loss_fn)
    generator = torch.Generator().manual_seed(TEST_SEED_OFFSET + seed)
    parameter = next(result.model.parameters())
    classification = bool(getattr(tasks, "classification", False))
    collected: dict[int, dict[str, list[torch.Tensor]]] = {s: {} for s in steps}
    every = tasks.sample(n_tasks, shots=shots, query=query, generator=generator, split=split)
    for start in range(0, n_tasks, batch):
        part = slice(start, start + batch)
        episodes = Episodes(Split(every.support.x[part], every.support.y[part]),
                            Split(every.query.x[part], every.query.y[part]))
        scores = _scores(loop, episodes.to(parameter.device, parameter.dtype), steps, classification)
        for s, metrics in scores.items():
            for name, values in metrics.items():
                collected[s].setdefault(name, []).append(values)
    rows = []
    for s in steps:
        row = {"steps": s}
        for name, parts in collected[s].items():
            values = torch.cat(parts).double()
            row[name] = float(values.mean())
            row[f"{name}_ci95"] = float(1.96 * values.std() / math.sqrt(len(values))) if len(values) > 1 else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def _scores(loop: InnerLoop, episodes: Episodes, steps, classification: bool) -> dict[int, dict[str, torch.Tensor]]:
    """Per-task query metrics after each number of inner steps in ``steps`` (no meta-gradient)."""
    wanted = set(steps)
    scores = {}

    def measure(params):
        with torch.no_grad():
            losses, output = loop.task_losses(params, episodes.query)
        metrics = {"loss": losses.detach()}
        if classification:
            metrics["accuracy"] = (output.argmax(-1) == episodes.query.y).double().mean(dim=1)
        return metrics

    if 0 in wanted:
        scores[0] = measure([p.detach().expand(len(episodes), *p.shape) for p in loop.model.parameters()])
    for index, fast in enumerate(loop.adapt(episodes.support, max(steps), differentiable=False), start=1):
        if index in wanted:
            scores[index] = measure(fast)
    return scores


def _rows(step: int, inner: InnerRates, metrics: dict[str, float]) -> list[dict]:
    return [
        {"step": step, "name": name, "group": group, "segment": segment, "value": value, "hypergradient": grad,
         "train_loss": metrics["train_loss"], "valid_loss": metrics["valid_loss"]}
        for name, group, segment, value, grad in inner.entries()
    ]


@dataclass(kw_only=True)
class EpisodicSetup:
    """One episodic meta-training run: what a study's build function returns for few-shot studies.

    The fields are :func:`meta_train`'s arguments of the same names; ``meta_lr`` may also be a
    ``(low, high)`` range for Optuna to choose (log scale, parameter ``meta_lr``). After
    training, ``test_tasks`` meta-test tasks give the trial's ``test_loss`` (and
    ``test_accuracy``) after ``inner_steps``. A study's metric is ``valid_loss`` or
    ``valid_accuracy`` (the query metrics on the meta-validation tasks).

    Example:
        >>> import torch, hypermeta
        >>> setup = hypermeta.EpisodicSetup(
        ...     model=torch.nn.Linear(1, 1), tasks=hypermeta.tasks.Sinusoid(), shots=10, query=10,
        ...     inner_steps=1, meta_steps=100, meta_lr=(1e-4, 1e-2))
        >>> setup.inner_lr.form
        'per_layer_per_step'
    """

    model: torch.nn.Module
    tasks: object
    shots: int
    query: int
    inner_steps: int
    meta_steps: int
    meta_batch: int = 25
    inner_lr: InnerLearningRate = dataclasses.field(default_factory=InnerLearningRate)
    inner_weight_decay: WeightDecay | None = None
    meta_lr: float | tuple[float, float] = 1e-3
    multi_step_loss: bool = False
    eval_every: int | None = None
    valid_tasks: int = 100
    test_tasks: int = 100

    def __post_init__(self) -> None:
        if not isinstance(self.model, torch.nn.Module):
            raise TypeError(f"EpisodicSetup.model must be a Module, got {type(self.model).__name__}")
        if not callable(getattr(self.tasks, "sample", None)):
            raise TypeError("EpisodicSetup.tasks must be a task distribution, e.g. hypermeta.tasks.Sinusoid()")
        if not isinstance(self.inner_lr, InnerLearningRate):
            raise TypeError(f"EpisodicSetup.inner_lr must be an InnerLearningRate, got {type(self.inner_lr).__name__}")
        for name in ("shots", "query", "inner_steps", "meta_steps", "meta_batch", "valid_tasks", "test_tasks",
                     "eval_every"):
            value = getattr(self, name)
            if value is None and name == "eval_every":
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"EpisodicSetup.{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.meta_lr, tuple):
            if len(self.meta_lr) != 2 or not 0 < self.meta_lr[0] < self.meta_lr[1]:
                raise ValueError(f"a meta_lr range must be (low, high) with 0 < low < high, got {self.meta_lr}")
        # A distribution that cannot give these episodes (shots larger than a class) fails here, at build time.
        for split in ("train", "valid", "test"):
            self.tasks.sample(1, shots=self.shots, query=self.query, generator=torch.Generator(), split=split)

    def train(self, *, initial_values: dict[str, float] | None = None, **options):
        """:func:`meta_train` on this set-up; ``options`` are its remaining keyword arguments."""
        if initial_values:
            raise ValueError("episodic set-ups take no initial hyperparameter values (no warm start)")
        if isinstance(self.meta_lr, tuple):
            raise ValueError(f"meta_lr={self.meta_lr} is a search range; choose a value first")
        return meta_train(
            self.model, tasks=self.tasks, shots=self.shots, query=self.query, inner_steps=self.inner_steps,
            meta_steps=self.meta_steps, meta_batch=self.meta_batch, inner_lr=self.inner_lr,
            inner_weight_decay=self.inner_weight_decay, meta_lr=self.meta_lr, multi_step_loss=self.multi_step_loss,
            eval_every=self.eval_every, valid_tasks=self.valid_tasks, **options,
        )

    @property
    def steps(self) -> int:
        """The run's length in the runner's unit: meta steps."""
        return self.meta_steps

    def test_metrics(self, result, *, device, seed: int) -> dict[str, float]:
        """Query loss (and accuracy) after ``inner_steps`` on ``test_tasks`` meta-test tasks."""
        test = evaluate_tasks(
            result, tasks=self.tasks, shots=self.shots, query=self.query, steps=(self.inner_steps,),
            n_tasks=self.test_tasks, seed=seed,
        ).iloc[0]
        return {name: float(test[name]) for name in ("loss", "accuracy") if name in test}

    def metric_problem(self, metric: str) -> str | None:
        """Why ``metric`` cannot be a study's objective with this set-up, or ``None``."""
        if metric not in EPISODIC_METRICS:
            return f"an episodic study's metric must be one of {EPISODIC_METRICS}, got {metric!r}"
        if metric == "valid_accuracy" and not getattr(self.tasks, "classification", False):
            return f"metric 'valid_accuracy' needs classification tasks; {type(self.tasks).__name__} is regression"
        return None
