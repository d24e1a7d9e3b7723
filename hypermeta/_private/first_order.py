"""First-order hypergradients that follow the optimizer state (forward mode, no second derivatives).

Training runs as plain ``torch.optim`` steps, so with a meta learning rate of 0 a run is the
plain run. Beside each step, forward-mode tangents carry how every weight and the optimizer state
(SGD's momentum buffer, with dampening and Nesterov; Adam's ``exp_avg`` and ``exp_avg_sq``)
depend on each hyperparameter of the window: the learning rate of every schedule segment it
touches and the weight decay. The training loss's gradient is held constant (its Hessian is
dropped); the weight-decay term ``wd * weight`` of the gradient is differentiated exactly. The
tangents start at zero at the window start, as the unrolled estimator starts from the committed
state, and are contracted with one validation gradient at its end. With K = 1 this is the exact
hypergradient. With settling steps (``Hypergradient.settle``) a copy of the tangents as they stood
before them is contracted with the same gradient: the settled hypergradient.

A parameter belongs to one group and so depends on one learning rate per segment and one weight
decay: the tangents of all parameters are one tensor of shape ``(rows, number of weights)``, a
row per segment the window touches plus one for weight decay, and every operation on them is one
kernel for the whole model (per-group learning rates and decays become factors per element).
"""

from __future__ import annotations

import itertools
import math

import torch

from hypermeta._private.modes import validation_mode
from hypermeta._private.plain import set_values, snapshot, trained_in_place
from hypermeta._private.window import Window


def first_order_window(run, start: int, n_steps: int, *, settle: int = 0) -> Window:
    """With ``settle``, the tangents as they stood before the last ``settle`` steps (the
    settled hypergradient: the Hessian that would carry them on is dropped anyway) and at the end
    are contracted with the same validation gradient."""
    model, optimizer, hyper = run.model, run.optimizer, run.hyper
    saved = snapshot(model, optimizer)
    first_segment = hyper.segment(start)
    n_lr_rows = hyper.segment(start + n_steps - 1) - first_segment + 1
    wd_row = n_lr_rows if hyper.log_weight_decay is not None else None
    tangents = _Tangents(optimizer, n_lr_rows + (wd_row is not None), wd_row=wd_row)
    train_losses, settled = [], None
    for step in range(start, start + n_steps):
        if step == start + n_steps - settle:
            settled = tangents.weights.clone()
        segment = hyper.segment(step)
        if step == start or segment != hyper.segment(step - 1):
            set_values(optimizer, hyper, step)
        x, y = run.train_batches.next()
        optimizer.zero_grad(set_to_none=True)
        loss = run.loss_fn(model(x), y)
        loss.backward()
        train_losses.append(loss.detach())
        tangents.step(lr_row=segment - first_segment)
    valid_loss, sums = _contract(run, tangents, tangents.weights, *([] if settled is None else [settled]))
    whole, *settled = [_hypergradients(hyper, of_set, first_segment, n_lr_rows, wd_row) for of_set in sums]
    return trained_in_place(
        model, optimizer, saved, train_losses, valid_loss=valid_loss, hypergradients=whole,
        settled=settled[0] if settled else None,
    )


def _hypergradients(hyper, sums: torch.Tensor, first_segment: int, n_lr_rows: int, wd_row: int | None):
    """Row (value) by group sums into d(valid loss)/d(leaf), shaped as the leaves."""
    grads = [torch.zeros_like(hyper.log_lr)]
    lr_rows = grads[0][first_segment:first_segment + n_lr_rows]
    lr_rows.index_add_(1, _columns(hyper.log_lr.shape[1], sums), sums[:n_lr_rows])
    if wd_row is not None:
        grads.append(torch.zeros_like(hyper.log_weight_decay))
        grads[1].index_add_(0, _columns(len(hyper.log_weight_decay), sums), sums[wd_row])
    return grads


def _columns(n_values: int, sums: torch.Tensor) -> torch.Tensor:
    """For each parameter group (a column of ``sums``), the index of its value: its own, or the shared one."""
    n_groups = sums.shape[1]
    if n_values > 1:
        return torch.arange(n_groups, device=sums.device)
    return torch.zeros(n_groups, dtype=torch.long, device=sums.device)


class _Flat:
    """Every parameter's elements in one vector, in order; per-parameter tensors are copied into it.

    On the CPU a ``torch._foreach_*`` call is a loop of one kernel per parameter; on flat vectors
    the tangent arithmetic is one kernel per operation for the whole model.
    """

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.params = params
        self.sizes = [p.numel() for p in params]
        self.like = {"dtype": params[0].dtype, "device": params[0].device}
        self._spread = {}

    def zeros(self, *rows: int) -> torch.Tensor:
        return torch.zeros((*rows, sum(self.sizes)), **self.like)

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of ``flat`` shaped as the parameters: writing them writes ``flat``."""
        return [v.view_as(p) for v, p in zip(flat.split(self.sizes), self.params, strict=True)]

    def spread(self, values: list[float]) -> float | torch.Tensor:
        """One value per parameter as a factor per element: a number when they are all the same."""
        if all(value == values[0] for value in values):
            return values[0]
        key = tuple(values)
        if key not in self._spread:
            sizes = torch.tensor(self.sizes, device=self.like["device"])
            self._spread[key] = torch.tensor(values, **self.like).repeat_interleave(sizes)
        return self._spread[key]


class _Gathered:
    """A flat vector (see :class:`_Flat`), reused, that tensors of the parameters are copied into."""

    def __init__(self, flat: _Flat) -> None:
        self.vector = flat.zeros()
        self._views = flat.views(self.vector)

    def of(self, tensors: list[torch.Tensor], indices: list[int]) -> torch.Tensor:
        """The vector with ``tensors`` (of the parameters at ``indices``) copied in; the rest is stale."""
        torch._foreach_copy_([self._views[i] for i in indices], tensors)
        return self.vector


class _Tangents:
    """d(weights)/d(log value) and d(optimizer state)/d(log value): a flat row (see :class:`_Flat`) per value.

    A parameter without a gradient in a step is skipped by ``torch.optim`` and, through factors
    of 0 (learning rate, state update) and 1 (state kept), by its tangents. Momentum, dampening,
    Nesterov and the betas are read from the first group: ``train()`` gives every group the same
    options.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, rows: int, *, wd_row: int | None) -> None:
        """``wd_row``: the weight decay's row, the only value the state depends on (``None``: not adapted)."""
        self.optimizer = optimizer
        self.wd_row = wd_row
        self.adam = isinstance(optimizer, torch.optim.Adam)
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.groups = [group for group in optimizer.param_groups for _ in group["params"]]
        self.flat = _Flat(self.params)
        ends = itertools.accumulate(sum(p.numel() for p in group["params"]) for group in optimizer.param_groups)
        self.group_columns = [slice(start, end) for start, end in itertools.pairwise([0, *ends])]
        self.weights = self.flat.zeros(rows)
        self.moments = self.flat.zeros(rows) if wd_row is not None else None
        self.squares = self.flat.zeros(rows) if wd_row is not None and self.adam else None
        self.gathered = {name: _Gathered(self.flat) for name in ("weights", "grads", "first", "second")}
        group = optimizer.param_groups[0]
        # heavy-ball SGD steps along its momentum buffer; Adam needs the direction only for the tangents
        self.uses_direction = wd_row is not None if self.adam else not group["momentum"] or group["nesterov"]

    @torch.no_grad()
    def step(self, *, lr_row: int) -> None:
        """Take the optimizer's step and carry the tangents through it; gradients are in ``.grad``."""
        on = [p.grad is not None for p in self.params]
        active = [i for i, used in enumerate(on) if used]
        direction, d_direction = self._direction(on, active)
        fresh = None if self.adam else ["momentum_buffer" not in self.optimizer.state.get(p, {}) for p in self.params]
        self.optimizer.step()
        carry = self._adam if self.adam else self._sgd
        update, d_update = carry(on, active, fresh, direction, d_direction)
        lrs = self._masked([group["lr"] for group in self.groups], on, off=0.0)
        if d_update is not None:
            _add_scaled(self.weights, lrs, d_update, value=-1.0)
        _add_scaled(self.weights[lr_row], lrs, update, value=-1.0)

    def _direction(self, on, active):
        """From before the step: the gradient the optimizer follows (decay included; ``None`` where unused)
        and its tangent (``None``: zero)."""
        params = [self.params[i] for i in active]
        direction = self.gathered["grads"].of([p.grad for p in params], active) if self.uses_direction else None
        if self.wd_row is None:
            return direction, None
        decays = self._masked([group["weight_decay"] for group in self.groups], on, off=0.0)
        weights = self.gathered["weights"].of(params, active)
        d_direction = self.weights * decays
        _add_scaled(d_direction[self.wd_row], decays, weights)
        if direction is not None:
            _add_scaled(direction, decays, weights)
        return direction, d_direction

    def _masked(self, values: list[float], on: list[bool], *, off: float) -> float | torch.Tensor:
        """Per-parameter ``values`` spread over the elements, ``off`` for parameters without a gradient."""
        if all(on):
            return self.flat.spread(values)
        return self.flat.spread([value if used else off for value, used in zip(values, on, strict=True)])

    def _carry(self, state: torch.Tensor, tangent: torch.Tensor, on, *, keep: float, add: list[float]) -> None:
        """``state = keep * state + add * tangent`` where a parameter has a gradient; elsewhere ``state`` is kept."""
        state.mul_(self._masked([keep] * len(on), on, off=1.0))
        _add_scaled(state, self._masked(add, on, off=0.0), tangent)

    def _state(self, key: str, active: list[int]) -> torch.Tensor:
        """The optimizer state ``key`` of the active parameters, gathered."""
        tensors = [self.optimizer.state[self.params[i]][key] for i in active]
        return self.gathered["second" if key == "exp_avg_sq" else "first"].of(tensors, active)

    def _sgd(self, on, active, fresh, direction, d_direction):
        """The step ``-lr * update`` and the update's tangent (``None``: zero)."""
        group = self.optimizer.param_groups[0]
        momentum, nesterov = group["momentum"], group["nesterov"]
        if not momentum:
            return direction, d_direction
        buffers = self._state("momentum_buffer", active)
        update = direction + momentum * buffers if nesterov else buffers
        if d_direction is None:
            return update, None
        # torch.optim starts a buffer at the gradient, undamped; the tangent of a fresh one is 0 before
        damped = [1.0 if new else 1 - group["dampening"] for new in fresh]
        self._carry(self.moments, d_direction, on, keep=momentum, add=damped)
        return update, d_direction + momentum * self.moments if nesterov else self.moments

    def _adam(self, on, active, fresh, direction, d_direction):
        group = self.optimizer.param_groups[0]
        (beta1, beta2), eps = group["betas"], group["eps"]
        # Any step count > 0 keeps the arithmetic of parameters without a gradient finite.
        state = self.optimizer.state
        steps = [float(state[p]["step"]) if used else 1.0 for p, used in zip(self.params, on, strict=True)]
        bias1 = self.flat.spread([1 - beta1**step for step in steps])
        bias2_sqrt = self.flat.spread([math.sqrt(1 - beta2**step) for step in steps])
        roots = self._state("exp_avg_sq", active).sqrt()
        denom = (roots / bias2_sqrt + eps) * bias1  # times bias1: the step is lr * exp_avg / this
        update = self._state("exp_avg", active) / denom
        if d_direction is None:
            return update, None
        n = len(on)
        self._carry(self.moments, d_direction, on, keep=beta1, add=[1 - beta1] * n)
        self._carry(self.squares, d_direction * direction, on, keep=beta2, add=[2 * (1 - beta2)] * n)
        # d denom = d sqrt(exp_avg_sq) * bias1 / bias2_sqrt, and d sqrt(v) = dv / (2 sqrt(v)), 0 at v = 0.
        factor = torch.where(roots > 0, update * (bias1 / bias2_sqrt / 2) / roots, 0.0)
        return update, (self.moments - self.squares * factor) / denom


def _add_scaled(target: torch.Tensor, factor: float | torch.Tensor, tensor: torch.Tensor, *, value=1.0) -> None:
    """``target += value * factor * tensor`` in one kernel, ``factor`` a number or a factor per element."""
    if torch.is_tensor(factor):
        target.addcmul_(factor, tensor, value=value)
    else:
        target.add_(tensor, alpha=value * factor)


def _contract(run, tangents: _Tangents, *weight_sets) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The validation loss and, for each set of weight tangents, <validation gradient, tangent> per
    row (value) and parameter group (column)."""
    x, y = run.valid_batches.next()
    with validation_mode(run.model):
        loss = run.loss_fn(run.model(x), y)
    grads = torch.autograd.grad(loss, tangents.params, allow_unused=True)
    used = [i for i, grad in enumerate(grads) if grad is not None]
    gradient = _Gathered(tangents.flat).of([grads[i] for i in used], used)  # zero where unused
    return loss.detach(), [
        torch.stack([weights[:, columns] @ gradient[columns] for columns in tangents.group_columns], dim=1)
        for weights in weight_sets
    ]
