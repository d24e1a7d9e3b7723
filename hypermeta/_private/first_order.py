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

import math

import torch

from hypermeta._private.plain import restore, set_values, snapshot
from hypermeta._private.window import Window, nothing


def first_order_window(run, start: int, n_steps: int) -> Window:
    model, optimizer, hyper = run.model, run.optimizer, run.hyper
    saved = snapshot(model, optimizer)
    first_segment = hyper.segment(start)
    n_lr_rows = hyper.segment(start + n_steps - 1) - first_segment + 1
    wd_row = n_lr_rows if hyper.log_weight_decay is not None else None
    rows = n_lr_rows + (wd_row is not None)
    tangents = _Tangents(optimizer, rows, with_state=wd_row is not None)
    train_losses = []
    for step in range(start, start + n_steps):
        if step == start or hyper.segment(step) != hyper.segment(step - 1):
            set_values(optimizer, hyper, step)
        x, y = run.train_batches.next()
        optimizer.zero_grad(set_to_none=True)
        loss = run.loss_fn(model(x), y)
        loss.backward()
        train_losses.append(loss.detach())
        tangents.step(lr_row=hyper.segment(step) - first_segment, wd_row=wd_row)
    valid_loss, per_row = _contract(run, tangents)
    grads = [torch.zeros_like(hyper.log_lr)]
    lr_column = _slots(hyper.log_lr.shape[1])
    for index, sums in enumerate(per_row):
        grads[0][first_segment:first_segment + n_lr_rows, lr_column(index)] += sums[:n_lr_rows]
    if wd_row is not None:
        grads.append(torch.zeros_like(hyper.log_weight_decay))
        wd_column = _slots(len(hyper.log_weight_decay))
        for index, sums in enumerate(per_row):
            grads[1][wd_column(index)] += sums[wd_row]
    return Window(
        train_loss=torch.stack(train_losses).mean(),
        valid_loss=valid_loss,
        hypergradients=grads,
        commit=nothing,
        rollback=lambda: restore(model, optimizer, saved),
    )


class _Tangents:
    """d(weights)/d(log value) and d(optimizer state)/d(log value), a stacked tensor per parameter."""

    def __init__(self, optimizer: torch.optim.Optimizer, rows: int, *, with_state: bool) -> None:
        """``with_state``: whether the state depends on the values (only through weight decay)."""
        self.optimizer = optimizer
        self.rows = rows
        self.adam = isinstance(optimizer, torch.optim.Adam)
        self.weights = _zeros_like(optimizer, rows)
        self.moments = _zeros_like(optimizer, rows) if with_state else None
        self.squares = _zeros_like(optimizer, rows) if with_state and self.adam else None

    @torch.no_grad()
    def step(self, *, lr_row: int, wd_row: int | None) -> None:
        """Take the optimizer's step and carry the tangents through it; gradients are in ``.grad``."""
        groups = self.optimizer.param_groups
        before = [
            [(position, p, _regularized(p, group), self._fresh(p))
             for position, p in enumerate(group["params"]) if p.grad is not None]
            for group in groups
        ]
        self.optimizer.step()
        carry = self._adam if self.adam else self._sgd
        for index, (group, params) in enumerate(zip(groups, before, strict=True)):
            for position, p, direction, fresh in params:
                weights = self.weights[index][position]
                d_direction = None
                if wd_row is not None:  # tangent of the regularized gradient grad + wd * weight
                    d_direction = weights * group["weight_decay"]
                    d_direction[wd_row] += direction - p.grad
                carry(group, (index, position), p, direction, d_direction, fresh, weights[lr_row])

    def _fresh(self, p: torch.Tensor) -> bool:
        """Whether this step starts SGD's momentum buffer (``torch.optim`` sets it to the gradient)."""
        return not self.adam and self.optimizer.state.get(p, {}).get("momentum_buffer") is None

    def _sgd(self, group, at, p, direction, d_direction, fresh, lr_weights) -> None:
        lr, momentum = group["lr"], group["momentum"]
        index, position = at
        weights = self.weights[index][position]
        if momentum:
            buffer = self.optimizer.state[p]["momentum_buffer"]
            update = direction + momentum * buffer if group["nesterov"] else buffer
            if d_direction is not None:
                moment = self.moments[index][position]
                if fresh:
                    moment.copy_(d_direction)
                else:
                    moment.mul_(momentum).add_(d_direction, alpha=1 - group["dampening"])
                d_direction = d_direction.add(moment, alpha=momentum) if group["nesterov"] else moment
        else:
            update = direction
        if d_direction is not None:
            weights.sub_(d_direction, alpha=lr)
        lr_weights.sub_(update, alpha=lr)

    def _adam(self, group, at, p, direction, d_direction, fresh, lr_weights) -> None:
        index, position = at
        lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
        state = self.optimizer.state[p]
        step = float(state["step"])
        bias1, bias2_sqrt = 1 - beta1**step, math.sqrt(1 - beta2**step)
        exp_avg, root = state["exp_avg"], state["exp_avg_sq"].sqrt()
        denom = (root / bias2_sqrt).add_(eps).mul_(bias1)  # times bias1: the step is lr * exp_avg / this
        update = exp_avg / denom
        if d_direction is not None:
            weights = self.weights[index][position]
            moment, square = self.moments[index][position], self.squares[index][position]
            moment.mul_(beta1).add_(d_direction, alpha=1 - beta1)
            square.mul_(beta2).add_(d_direction * direction, alpha=2 * (1 - beta2))
            # d denom = d sqrt(exp_avg_sq) * bias1 / bias2_sqrt, and d sqrt(v) = dv / (2 sqrt(v)), 0 at v = 0.
            d_root_factor = torch.where(root > 0, (bias1 / bias2_sqrt / 2) / root, 0.0)
            weights.sub_((moment - update * square * d_root_factor) / denom, alpha=lr)
        lr_weights.sub_(update, alpha=lr)


def _regularized(p: torch.Tensor, group: dict) -> torch.Tensor:
    """The gradient the optimizer uses, ``grad + wd * weight``, with the weight before the step."""
    return p.grad.add(p, alpha=group["weight_decay"]) if group["weight_decay"] else p.grad


def _zeros_like(optimizer: torch.optim.Optimizer, rows: int) -> list[list[torch.Tensor]]:
    return [
        [torch.zeros((rows, *p.shape), dtype=p.dtype, device=p.device) for p in group["params"]]
        for group in optimizer.param_groups
    ]


def _slots(n_values: int):
    """Which value of a hyperparameter a parameter group uses: its own, or the shared one."""
    return (lambda group: group) if n_values > 1 else (lambda group: 0)


def _contract(run, tangents: _Tangents) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The validation loss and, per group, <validation gradient, tangent> for every row."""
    params = [p for group in run.optimizer.param_groups for p in group["params"]]
    x, y = run.valid_batches.next()
    loss = run.loss_fn(run.model(x), y)
    grads = iter(torch.autograd.grad(loss, params, allow_unused=True))
    per_row = []
    for weights in tangents.weights:
        sums = torch.zeros(tangents.rows, dtype=loss.dtype, device=loss.device)
        for tangent in weights:
            grad = next(grads)
            if grad is not None:
                sums += tangent.flatten(1) @ grad.flatten()
        per_row.append(sums)
    return loss.detach(), per_row
