"""Differentiable hyperparameters: what the user declares and how the engine stores them."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_SCOPES = ("global", "per_group")

LR_BOUNDS = (1e-6, 10.0)
WEIGHT_DECAY_BOUNDS = (1e-8, 1.0)


@dataclass(frozen=True, kw_only=True)
class LearningRate:
    """Learning rate adapted by hypergradients.

    Kept in log space and projected into ``bounds`` after every meta step.

    Args:
        init: the starting value, or a ``(low, high)`` range for Optuna to choose it from (log
            scale) in each trial of a study.
        scope: ``"global"`` (one rate for the whole model) or ``"per_group"`` (one per layer /
            parameter group).
        segments: number of piecewise-constant schedule segments over the training budget;
            each segment is a separate hyperparameter, and each starts as far (in log space)
            from its starting value as the previous segment has moved from its own.
        bounds: ``(low, high)``, where hypergradients may move the rate; defaults to the
            ``init`` range when there is one (the values a search would try), else ``(1e-6, 10)``.

    Example:
        >>> import hypermeta
        >>> hypermeta.LearningRate(init=0.01, scope="per_group", segments=4).segments
        4
    """

    init: float | tuple[float, float]
    scope: str = "global"
    segments: int = 1
    bounds: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        _default_bounds(self, LR_BOUNDS)
        _check(self, "learning rate")
        if not isinstance(self.segments, int) or self.segments < 1:
            raise ValueError(f"learning rate segments must be an integer >= 1, got {self.segments!r}")


@dataclass(frozen=True, kw_only=True)
class WeightDecay:
    """L2 regularization (coupled weight decay) adapted by hypergradients.

    Args:
        init: the starting value (must be > 0: it lives in log space), or a ``(low, high)`` range
            for Optuna to choose it from in each trial of a study.
        scope: ``"global"`` or ``"per_group"``.
        bounds: ``(low, high)``, where hypergradients may move the value; defaults to the
            ``init`` range when there is one, else ``(1e-8, 1)``.

    Example:
        >>> import hypermeta
        >>> hypermeta.WeightDecay(init=1e-4).scope
        'global'
    """

    init: float | tuple[float, float]
    scope: str = "global"
    bounds: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        _default_bounds(self, WEIGHT_DECAY_BOUNDS)
        _check(self, "weight decay")


def _default_bounds(spec: LearningRate | WeightDecay, fallback: tuple[float, float]) -> None:
    if spec.bounds is None:
        object.__setattr__(spec, "bounds", spec.init if isinstance(spec.init, tuple) else fallback)


def _check(spec: LearningRate | WeightDecay, what: str) -> None:
    low, high = spec.bounds
    if not 0 < low < high:
        raise ValueError(f"{what} bounds must satisfy 0 < low < high, got {spec.bounds!r}")
    init = spec.init
    if isinstance(init, tuple):
        if len(init) != 2 or not low <= init[0] < init[1] <= high:
            raise ValueError(f"{what} init range {init!r} must be (low, high) inside its bounds {spec.bounds!r}")
    elif not low <= init <= high:
        raise ValueError(f"{what} init {init!r} is outside its bounds {spec.bounds!r}")
    if spec.scope not in _SCOPES:
        raise ValueError(f"{what} scope must be one of {_SCOPES}, got {spec.scope!r}")


class HyperParameters:
    """The engine's view: log-space leaf tensors, one entry per (kind, segment, group).

    ``log_lr`` has shape ``(segments, groups)`` (``groups`` is 1 for a global rate) and
    ``log_weight_decay`` has shape ``(groups,)`` or is ``None``. ``start`` keeps the starting
    values (after :meth:`load_values`), from which :meth:`carry_into` measures what a segment
    learned.
    """

    def __init__(
        self,
        *,
        learning_rate: LearningRate,
        weight_decay: WeightDecay | None,
        group_names: list[str],
        total_steps: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        for spec in (learning_rate, weight_decay):
            if spec is not None and isinstance(spec.init, tuple):
                raise ValueError(
                    f"init={spec.init!r} is a search range, chosen per trial by `hypermeta run`; give train() a number"
                )
        if learning_rate.segments > total_steps:
            raise ValueError(
                f"{learning_rate.segments} learning-rate segments need at least as many steps, got {total_steps}"
            )
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.group_names = group_names
        self.total_steps = total_steps
        n_lr = len(group_names) if learning_rate.scope == "per_group" else 1
        self.log_lr = torch.full(
            (learning_rate.segments, n_lr), math.log(learning_rate.init), dtype=dtype, device=device
        ).requires_grad_()
        self.log_weight_decay = None
        if weight_decay is not None:
            n_wd = len(group_names) if weight_decay.scope == "per_group" else 1
            self.log_weight_decay = torch.full(
                (n_wd,), math.log(weight_decay.init), dtype=dtype, device=device
            ).requires_grad_()
        self.start = self.state()

    def tensors(self) -> list[torch.Tensor]:
        """The leaves the meta-optimizer updates."""
        return [t for t in (self.log_lr, self.log_weight_decay) if t is not None]

    def segment(self, step: int) -> int:
        """The schedule segment that inner step ``step`` (0-based) falls in."""
        return min(step * self.learning_rate.segments // self.total_steps, self.learning_rate.segments - 1)

    def segment_start(self, segment: int) -> int:
        """The first inner step of schedule segment ``segment`` (``total_steps`` for one past the last)."""
        return -(-segment * self.total_steps // self.learning_rate.segments)

    @torch.no_grad()
    def carry_into(self, step: int) -> None:
        """At the first step of a segment, shift its rates by what the previous segment learned.

        Each segment starts as far (in log space) from its own starting value as the previous
        segment has moved from its starting value, so what hypergradients learned carries over
        the boundary instead of the rate jumping back. Elsewhere this does nothing; it may be
        called again after the divergence guard undid the segment's first window.
        """
        segment = self.segment(step)
        if segment == 0 or self.segment_start(segment) != step:
            return
        learned = self.log_lr[segment - 1] - self.start[0][segment - 1]
        self.log_lr[segment] = self.start[0][segment] + learned
        self.project()

    @torch.no_grad()
    def keep_other_segments(self, state: list[torch.Tensor], segment: int) -> None:
        """Put back, from ``state``, the learning rates of every segment but ``segment``.

        A hyper-step thus changes only the segment the window trained; the others keep the values
        that were used in training.
        """
        saved = state[0]
        others = torch.arange(len(saved), device=saved.device) != segment
        self.log_lr[others] = saved[others]

    def lrs(self, step: int) -> list[torch.Tensor]:
        """Per-group learning rates (differentiable) for inner step ``step``."""
        return self._per_group(self.log_lr[self.segment(step)].exp())

    def weight_decays(self) -> list[torch.Tensor] | None:
        if self.log_weight_decay is None:
            return None
        return self._per_group(self.log_weight_decay.exp())

    def group_floats(self, step: int) -> tuple[list[float], list[float] | None]:
        """:meth:`lrs` and :meth:`weight_decays` as Python numbers, one conversion per leaf."""
        lrs = self._per_group(self.log_lr[self.segment(step)].exp().tolist())
        if self.log_weight_decay is None:
            return lrs, None
        return lrs, self._per_group(self.log_weight_decay.exp().tolist())

    def override(self, step: int) -> dict[str, list[torch.Tensor]]:
        """``higher``-style override of the optimizer settings for inner step ``step``."""
        override = {"lr": self._per_group(self.log_lr[self.segment(step)].exp())}
        if self.log_weight_decay is not None:
            override["weight_decay"] = self._per_group(self.log_weight_decay.exp())
        return override

    def _per_group(self, values):
        """One entry per group from a 1-d tensor or list: a global value repeated, else the values."""
        if len(values) == 1:
            return [values[0]] * len(self.group_names)
        return list(values)

    @torch.no_grad()
    def project(self) -> None:
        """Clamp every value into its bounds."""
        specs = [spec for spec in (self.learning_rate, self.weight_decay) if spec is not None]
        for tensor, spec in zip(self.tensors(), specs, strict=True):
            tensor.clamp_(*(math.log(b) for b in spec.bounds))

    def entries(self) -> list[tuple[str, str, int, torch.Tensor, int]]:
        """Every scalar hyperparameter as ``(name, group, segment, log-tensor, flat index)``."""
        rows = []
        lr_groups = self.group_names if self.log_lr.shape[1] > 1 else ["all"]
        for segment in range(self.log_lr.shape[0]):
            for index, group in enumerate(lr_groups):
                rows.append(("lr", group, segment, self.log_lr, segment * len(lr_groups) + index))
        if self.log_weight_decay is not None:
            wd_groups = self.group_names if self.log_weight_decay.numel() > 1 else ["all"]
            for index, group in enumerate(wd_groups):
                rows.append(("weight_decay", group, 0, self.log_weight_decay, index))
        return rows

    def values(self) -> dict[str, float]:
        """Current values keyed ``lr/<group>/<segment>`` and ``weight_decay/<group>``."""
        return {
            self._key(name, group, segment): float(tensor.detach().flatten()[index].exp())
            for name, group, segment, tensor, index in self.entries()
        }

    @staticmethod
    def _key(name: str, group: str, segment: int) -> str:
        return f"{name}/{group}" + (f"/{segment}" if name == "lr" else "")

    @torch.no_grad()
    def load_values(self, values: dict[str, float]) -> None:
        """Start from ``values``, keyed as :meth:`values` returns them."""
        entries = {self._key(*entry[:3]): entry[3:] for entry in self.entries()}
        for key, value in values.items():
            if key not in entries:
                raise ValueError(f"no hyperparameter {key!r}; this run has {', '.join(entries)}")
            spec = self.learning_rate if key.startswith("lr/") else self.weight_decay
            if not within_bounds(value, spec.bounds):
                raise ValueError(f"{key} = {value!r} is outside its bounds {spec.bounds!r}")
            low, high = spec.bounds
            tensor, index = entries[key]
            tensor.view(-1)[index] = math.log(min(max(value, low), high))
        self.start = self.state()

    def state(self) -> list[torch.Tensor]:
        return [t.detach().clone() for t in self.tensors()]

    @torch.no_grad()
    def load_state(self, state: list[torch.Tensor]) -> None:
        for tensor, saved in zip(self.tensors(), state, strict=True):
            tensor.copy_(saved)


def within_bounds(value: float, bounds: tuple[float, float]) -> bool:
    """``value`` in ``bounds``; a value a run stored at a bound comes back a float32 rounding error beyond it."""
    low, high = bounds
    return low * (1 - 1e-5) <= value <= high * (1 + 1e-5)
