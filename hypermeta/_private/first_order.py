"""First-order hypergradients that follow the optimizer state (forward mode, no second derivatives).

Training runs as plain ``torch.optim`` steps, so with a meta learning rate of 0 a run is the
plain run. Beside each step, forward-mode tangents carry how every weight and the optimizer state
(SGD's momentum buffer, with dampening and Nesterov; Adam's ``exp_avg`` and ``exp_avg_sq``)
depend on each hyperparameter of the window: the learning rate of every schedule segment it
touches and the weight decay. The training loss's gradient is held constant (its Hessian is
dropped); the weight-decay term ``wd * weight`` of the gradient is differentiated exactly. The
tangents start at zero at the window start, as the unrolled estimator starts from the committed
state, and are contracted with one validation gradient at its end. With K = 1 this is the exact
hypergradient.

A parameter belongs to one group and so depends on one learning rate per segment and one weight
decay: its tangents are stacked in one tensor of shape ``(rows, *parameter.shape)``, a row per
segment the window touches plus one for weight decay.
"""

from __future__ import annotations

import itertools
import math

import torch

from hypermeta._private.greedy import _slots
from hypermeta._private.modes import validation_mode
from hypermeta._private.plain import set_values, snapshot, trained_in_place
from hypermeta._private.window import Window, agreed


def first_order_window(run, start: int, n_steps: int, *, settle: int = 0) -> Window:
    """With ``settle``, the tangents as they stood before the last ``settle`` steps (the
    settled hypergradient: the Hessian that would carry them on is dropped anyway) and at the end
    are contracted with the same validation gradient; the window moves the values by ``agreed``."""
    model, optimizer, hyper = run.model, run.optimizer, run.hyper
    saved = snapshot(model, optimizer)
    first_segment = hyper.segment(start)
    n_lr_rows = hyper.segment(start + n_steps - 1) - first_segment + 1
    wd_row = n_lr_rows if hyper.log_weight_decay is not None else None
    rows = n_lr_rows + (wd_row is not None)
    tangents = _Tangents(optimizer, rows, with_state=wd_row is not None)
    train_losses, settled = [], None
    for step in range(start, start + n_steps):
        if step == start + n_steps - settle:
            settled = [weight.clone() for weight in tangents.weights]
        if step == start or hyper.segment(step) != hyper.segment(step - 1):
            set_values(optimizer, hyper, step)
        x, y = run.train_batches.next()
        optimizer.zero_grad(set_to_none=True)
        loss = run.loss_fn(model(x), y)
        loss.backward()
        train_losses.append(loss.detach())
        tangents.step(lr_row=hyper.segment(step) - first_segment, wd_row=wd_row)
    valid_loss, per_rows = _contract(run, tangents, tangents.weights, *([settled] if settled else []))
    grads = [_hypergradients(hyper, per_row, first_segment, n_lr_rows, wd_row) for per_row in per_rows]
    grads = agreed(*grads) if settled else grads[0]
    return trained_in_place(model, optimizer, saved, train_losses, valid_loss=valid_loss, hypergradients=grads)


def _hypergradients(hyper, per_row, first_segment: int, n_lr_rows: int, wd_row: int | None) -> list[torch.Tensor]:
    """Per-group row sums into d(valid loss)/d(leaf), shaped as the leaves."""
    grads = [torch.zeros_like(hyper.log_lr)]
    lr_column = _slots(hyper.log_lr.shape[1])
    for index, sums in enumerate(per_row):
        grads[0][first_segment:first_segment + n_lr_rows, lr_column(index)] += sums[:n_lr_rows]
    if wd_row is not None:
        grads.append(torch.zeros_like(hyper.log_weight_decay))
        wd_column = _slots(len(hyper.log_weight_decay))
        for index, sums in enumerate(per_row):
            grads[1][wd_column(index)] += sums[wd_row]
    return grads


class _Tangents:
    """d(weights)/d(log value) and d(optimizer state)/d(log value), a stacked tensor per parameter.

    The arithmetic is ``torch._foreach_*`` over every parameter at once (per-parameter Python
    would cost as much as the training step on a small model). Momentum, dampening, Nesterov and
    the betas are read from the first group: ``train()`` gives every group the same options.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, rows: int, *, with_state: bool) -> None:
        """``with_state``: whether the state depends on the values (only through weight decay)."""
        self.optimizer = optimizer
        self.rows = rows
        self.adam = isinstance(optimizer, torch.optim.Adam)
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.groups = [group for group in optimizer.param_groups for _ in group["params"]]
        self.weights = self._zeros()
        self.moments = self._zeros() if with_state else None
        self.squares = self._zeros() if with_state and self.adam else None

    def _zeros(self) -> list[torch.Tensor]:
        return [torch.zeros((self.rows, *p.shape), dtype=p.dtype, device=p.device) for p in self.params]

    @torch.no_grad()
    def step(self, *, lr_row: int, wd_row: int | None) -> None:
        """Take the optimizer's step and carry the tangents through it; gradients are in ``.grad``."""
        active = [i for i, p in enumerate(self.params) if p.grad is not None]
        params, groups = [self.params[i] for i in active], [self.groups[i] for i in active]
        grads, lrs = [p.grad for p in params], [group["lr"] for group in groups]
        decays = [group["weight_decay"] for group in groups]
        decay = torch._foreach_mul(params, decays) if wd_row is not None else None  # wd * weight before the step
        directions = grads if decay is None else torch._foreach_add(grads, decay)  # what the optimizer follows
        fresh = [not self.adam and self.optimizer.state.get(p, {}).get("momentum_buffer") is None for p in params]
        self.optimizer.step()
        weights = [self.weights[i] for i in active]
        d_directions = None
        if decay is not None:
            d_directions = torch._foreach_mul(weights, decays)
            torch._foreach_add_([d[wd_row] for d in d_directions], decay)
        carry = self._adam if self.adam else self._sgd
        updates, d_updates = carry(active, params, directions, d_directions, fresh)
        if d_updates is not None:
            torch._foreach_sub_(weights, torch._foreach_mul(d_updates, lrs))
        torch._foreach_sub_([w[lr_row] for w in weights], torch._foreach_mul(updates, lrs))

    def _sgd(self, active, params, directions, d_directions, fresh):
        """The step ``-lr * update`` and the update's tangent (``None``: zero)."""
        group = self.optimizer.param_groups[0]
        momentum = group["momentum"]
        if not momentum:
            return directions, d_directions
        buffers = [self.optimizer.state[p]["momentum_buffer"] for p in params]
        updates = torch._foreach_add(directions, buffers, alpha=momentum) if group["nesterov"] else buffers
        if d_directions is None:
            return updates, None
        moments = [self.moments[i] for i in active]
        for moment, d_direction, new in zip(moments, d_directions, fresh, strict=True):
            if new:  # torch.optim starts the buffer at the gradient, undamped
                moment.copy_(d_direction)
        kept = [(m, d) for m, d, new in zip(moments, d_directions, fresh, strict=True) if not new]
        if kept:
            torch._foreach_mul_([m for m, _ in kept], momentum)
            torch._foreach_add_([m for m, _ in kept], [d for _, d in kept], alpha=1 - group["dampening"])
        if group["nesterov"]:
            return updates, torch._foreach_add(d_directions, moments, alpha=momentum)
        return updates, moments

    def _adam(self, active, params, directions, d_directions, fresh):
        group = self.optimizer.param_groups[0]
        (beta1, beta2), eps = group["betas"], group["eps"]
        states = [self.optimizer.state[p] for p in params]
        steps = [float(state["step"]) for state in states]
        bias1 = [1 - beta1**step for step in steps]
        bias2_sqrt = [math.sqrt(1 - beta2**step) for step in steps]
        roots = torch._foreach_sqrt([state["exp_avg_sq"] for state in states])
        denoms = torch._foreach_div(roots, bias2_sqrt)
        torch._foreach_add_(denoms, eps)
        torch._foreach_mul_(denoms, bias1)  # times bias1: the step is lr * exp_avg / this
        updates = torch._foreach_div([state["exp_avg"] for state in states], denoms)
        if d_directions is None:
            return updates, None
        moments, squares = [self.moments[i] for i in active], [self.squares[i] for i in active]
        torch._foreach_mul_(moments, beta1)
        torch._foreach_add_(moments, d_directions, alpha=1 - beta1)
        torch._foreach_mul_(squares, beta2)
        torch._foreach_add_(squares, _times(d_directions, directions), alpha=2 * (1 - beta2))
        # d denom = d sqrt(exp_avg_sq) * bias1 / bias2_sqrt, and d sqrt(v) = dv / (2 sqrt(v)), 0 at v = 0.
        factors = [
            torch.where(root > 0, update * (b1 / b2 / 2) / root, 0.0)
            for root, update, b1, b2 in zip(roots, updates, bias1, bias2_sqrt, strict=True)
        ]
        d_updates = torch._foreach_sub(moments, _times(squares, factors))
        return updates, _times(d_updates, denoms, divide=True)


def _times(stacked: list[torch.Tensor], factors: list[torch.Tensor], *, divide: bool = False) -> list[torch.Tensor]:
    """Each stacked tangent (rows, *shape) times (or over) its parameter-shaped factor."""
    expanded = [f.expand_as(t) for t, f in zip(stacked, factors, strict=True)]
    return torch._foreach_div(stacked, expanded) if divide else torch._foreach_mul(stacked, expanded)


def _contract(run, tangents: _Tangents, *weight_sets) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
    """The validation loss and, for each set of weight tangents, per group <validation gradient, tangent> per row."""
    x, y = run.valid_batches.next()
    with validation_mode(run.model):
        loss = run.loss_fn(run.model(x), y)
    grads = torch.autograd.grad(loss, tangents.params, allow_unused=True)
    return loss.detach(), [_per_row(run, tangents.rows, grads, weights, loss) for weights in weight_sets]


def _per_row(run, rows: int, grads, weights, loss) -> list[torch.Tensor]:
    pairs = iter(zip(grads, weights, strict=True))
    per_row = []
    for group in run.optimizer.param_groups:
        sums = torch.zeros(rows, dtype=loss.dtype, device=loss.device)
        for grad, tangent in itertools.islice(pairs, len(group["params"])):
            if grad is not None:
                sums += tangent.flatten(1) @ grad.flatten()
        per_row.append(sums)
    return per_row
