"""First-order ("greedy") hypergradients in the manner of Baydin et al. 2018.

Training runs as plain ``torch.optim`` steps. Each step adds the derivative of the update with
respect to its learning rate and weight decay -- optimizer state held fixed, so no second-order
terms -- to a running direction. At the end of a window of K steps the validation gradient is
dotted with those directions. With K = 1 this is exactly d(valid loss after the step)/d(value).
Its cost over plain training is a few element-wise operations per step (plus a copy of the
weights, except for heavy-ball SGD whose momentum buffer is the direction) and one validation
gradient per window.
"""

from __future__ import annotations

import torch

from hypermeta._private.modes import validation_mode
from hypermeta._private.plain import plain_step, restore, snapshot, trained_in_place
from hypermeta._private.window import Window


def greedy_window(run, start: int, n_steps: int) -> Window:
    """Train ``n_steps`` plain steps, summing each update's derivatives; contract them with the validation gradient."""
    model, optimizer, hyper = run.model, run.optimizer, run.hyper
    saved = snapshot(model, optimizer)
    groups = [[p.detach() for p in group["params"]] for group in optimizer.param_groups]
    try:
        train_losses, lr_directions, wd_directions = _directions(run, groups, start, n_steps)
        valid_loss, valid_grads = _valid_gradient(run, groups)
    except BaseException:  # a window cut short (a loop of the user's own stopped mid-window) leaves no trace
        restore(model, optimizer, saved)
        raise
    return trained_in_place(
        model, optimizer, saved, train_losses, valid_loss=valid_loss,
        hypergradients=_hypergradients(hyper, valid_grads, lr_directions, wd_directions),
    )


def _directions(run, groups, start: int, n_steps: int):
    """The window's plain steps: their losses and the summed derivatives of the updates (per log-tensor
    entry, group and parameter)."""
    model, optimizer, hyper = run.model, run.optimizer, run.hyper
    lr_slot = _slots(hyper.log_lr.shape[1])
    wd_slot = None if hyper.log_weight_decay is None else _slots(len(hyper.log_weight_decay))
    lr_directions, wd_directions = {}, {}  # (row, column) of the log tensor -> group -> per-parameter sums
    train_losses = []
    for step in range(start, start + n_steps):
        before = None if _lr_direction_in_state(optimizer) else [torch._foreach_mul(p, 1.0) for p in groups]
        # Looked up by the optimizer's own parameters: the detached copies in ``groups`` are not its keys.
        had_state = wd_slot and [[bool(optimizer.state.get(p)) for p in g["params"]] for g in optimizer.param_groups]
        train_losses.append(plain_step(model, optimizer, hyper, run.loss_fn, run.train_batches.next(), step))
        segment = hyper.segment(step)
        for index, (group, params) in enumerate(zip(optimizer.param_groups, groups, strict=True)):
            if before is None:  # SGD with heavy-ball momentum: the update is -lr * buffer
                buffers = [optimizer.state[p]["momentum_buffer"] for p in group["params"]]
                d_lr = torch._foreach_neg(buffers)
                weights = wd_slot and torch._foreach_add(params, buffers, alpha=group["lr"])
            else:
                d_lr = torch._foreach_sub(params, before[index])
                torch._foreach_div_(d_lr, group["lr"])
                weights = before[index]
            _accumulate(lr_directions, (segment, lr_slot(index)), index, d_lr)
            if wd_slot is not None:
                d_wd = [
                    d_update_d_weight_decay(optimizer, group, p, w, had)
                    for p, w, had in zip(group["params"], weights, had_state[index], strict=True)
                ]
                _accumulate(wd_directions, (0, wd_slot(index)), index, d_wd)
    return train_losses, lr_directions, wd_directions


def _hypergradients(hyper, valid_grads, lr_directions: dict, wd_directions: dict) -> list[torch.Tensor]:
    grads = [_contract(lr_directions, valid_grads, hyper.log_lr)]
    if hyper.log_weight_decay is not None:
        grads.append(_contract(wd_directions, valid_grads, hyper.log_weight_decay[None])[0])
    return grads


def _lr_direction_in_state(optimizer: torch.optim.Optimizer) -> bool:
    """Whether d(new weights)/d(lr) is minus the momentum buffer, so the weights need no copy."""
    return isinstance(optimizer, torch.optim.SGD) and all(
        group["momentum"] > 0 and not group["nesterov"] for group in optimizer.param_groups
    )


def _slots(n_values: int):
    """Which value of a hyperparameter a parameter group uses: its own, or the shared one."""
    return (lambda group: group) if n_values > 1 else (lambda group: 0)


def _accumulate(directions: dict, key: tuple[int, int], group: int, direction: list[torch.Tensor]) -> None:
    per_group = directions.setdefault(key, {})
    if group in per_group:
        torch._foreach_add_(per_group[group], direction)
    else:
        per_group[group] = direction


def _valid_gradient(run, groups) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
    params = [p for group in run.optimizer.param_groups for p in group["params"]]
    x, y = run.valid_batches.next()
    with validation_mode(run.model):
        loss = run.loss_fn(run.model(x), y)
    flat = iter(torch.autograd.grad(loss, params))
    return loss.detach(), [[next(flat) for _ in params] for params in groups]


def _contract(directions: dict, valid_grads: list, log_values: torch.Tensor) -> torch.Tensor:
    """d(valid loss)/d(log value) = value * <valid gradient, d weights / d value>."""
    out = torch.zeros_like(log_values)
    for (row, column), per_group in directions.items():
        out[row, column] = sum(
            (grad * direction).sum()
            for group, sums in per_group.items()
            for grad, direction in zip(valid_grads[group], sums, strict=True)
        )
    return out * log_values.detach().exp()


def d_update_d_weight_decay(optimizer, group, p, weight_before, had_state: bool) -> torch.Tensor:
    """d(new weight)/d(weight decay) for one step with the optimizer state before it fixed."""
    lr, wd = group["lr"], group["weight_decay"]
    state = optimizer.state[p]
    if isinstance(optimizer, torch.optim.SGD):
        momentum = group["momentum"]
        if momentum == 0:
            return -lr * weight_before
        d_buffer = weight_before if not had_state else (1 - group["dampening"]) * weight_before
        d_direction = weight_before + momentum * d_buffer if group["nesterov"] else d_buffer
        return -lr * d_direction
    beta1, beta2 = group["betas"]
    step = float(state["step"])
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    gradient = p.grad + wd * weight_before
    bias1, bias2_sqrt = 1 - beta1**step, (1 - beta2**step) ** 0.5
    root = exp_avg_sq.sqrt()
    denom = root / bias2_sqrt + group["eps"]
    d_exp_avg = (1 - beta1) * weight_before
    d_root = torch.where(root > 0, (1 - beta2) * gradient * weight_before / root.clamp_min(1e-30), 0)
    d_denom = d_root / bias2_sqrt
    return -lr / bias1 * (d_exp_avg / denom - exp_avg * d_denom / denom**2)
